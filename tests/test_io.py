"""lamina.io: atomic files and folders keep the old content when a writer fails; tied weights are stored once and
load back tied; files written before aliases existed (tied tensors as clones) still load; strict loading names
what is missing, unexpected or of the wrong shape before it copies anything."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lamina.errors import CheckpointError
from lamina.io import (ALIASES_KEY, atomic_file, atomic_write_bytes, atomic_write_text, check_state, load_state,
                       load_state_strict, save_state, sha256_file, state_for_saving, tied_aliases, write_folder)
from lamina.models import create_model


def _leftovers(folder, keep):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_atomic_writes_replace_and_leave_the_old_file_when_the_writer_raises(tmp_path):
    f = tmp_path / "a" / "notes.txt"
    atomic_write_text(f, "old")
    assert f.read_text() == "old"
    atomic_write_bytes(f, b"new")
    assert f.read_bytes() == b"new"

    with pytest.raises(RuntimeError), atomic_file(f) as tmp:
        assert tmp.parent == f.parent and tmp.suffix == ".txt" and tmp != f  # same folder, same extension
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert f.read_bytes() == b"new"
    assert _leftovers(f.parent, {"notes.txt"}) == []  # the temp file is gone

    with pytest.raises(KeyboardInterrupt), atomic_file(f) as tmp:
        torch.save({"x": torch.ones(2)}, tmp)
        raise KeyboardInterrupt
    assert f.read_bytes() == b"new" and _leftovers(f.parent, {"notes.txt"}) == []


def test_write_folder_keeps_the_old_folder_on_failure_and_replaces_it_on_success(tmp_path):
    target = tmp_path / "ckpt"
    write_folder(target, lambda tmp: (tmp / "w.txt").write_text("v1"))
    assert (target / "w.txt").read_text() == "v1"

    def broken(tmp):
        (tmp / "w.txt").write_text("v2")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_folder(target, broken)
    assert (target / "w.txt").read_text() == "v1"
    assert _leftovers(tmp_path, {"ckpt"}) == []  # no temp folder, no .ckpt.old

    def two_files(tmp):
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"a")
        (tmp / "w.txt").write_text("v2")

    write_folder(target, two_files)
    assert (target / "w.txt").read_text() == "v2" and (target / "sub" / "a.bin").read_bytes() == b"a"
    assert _leftovers(tmp_path, {"ckpt"}) == []


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib

    data = bytes(range(256)) * 5000  # > 1 MiB: more than one chunk
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def _gpt():
    torch.manual_seed(0)
    return create_model("gpt", vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


def test_tied_weights_are_stored_once_and_load_back_tied(tmp_path):
    model = _gpt()
    assert model.lm_head.weight is model.wte.weight
    n_names = len(model.state_dict())
    assert tied_aliases(model) == {"lm_head.weight": "wte.weight"}
    assert len(state_for_saving(model)) == n_names - 1

    path = save_state(tmp_path / "m.safetensors", model, metadata={"note": "hi"})
    with safe_open(str(path), framework="pt") as f:
        assert len(list(f.keys())) == n_names - 1 and "lm_head.weight" not in f.keys()
        meta = f.metadata()
    assert json.loads(meta[ALIASES_KEY]) == {"lm_head.weight": "wte.weight"} and meta["note"] == "hi"

    # the old layout (every name its own clone) is one (V, C) matrix larger on disk
    old = tmp_path / "old.safetensors"
    sd = state_for_saving(model)
    save_file({k: (sd[k] if k in sd else sd["wte.weight"].clone()) for k in model.state_dict()}, str(old))
    assert old.stat().st_size - path.stat().st_size >= model.wte.weight.numel() * 4 - 256  # less a longer header

    state = load_state(path)
    assert set(state) == set(model.state_dict()) and state["lm_head.weight"] is state["wte.weight"]
    torch.manual_seed(1)
    fresh = create_model("gpt", vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    assert not torch.equal(fresh.wte.weight, model.wte.weight)
    load_state_strict(fresh, state, str(path))
    assert fresh.lm_head.weight is fresh.wte.weight  # still tied, one parameter
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    idx = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        assert torch.equal(fresh(idx), model(idx))


def test_old_format_file_with_clones_still_loads(tmp_path):
    model = _gpt()
    sd = model.state_dict()
    old = {k: v.detach().clone().contiguous() for k, v in sd.items()}  # what engine.checkpoint wrote before
    save_file(old, str(tmp_path / "old.safetensors"))
    state = load_state(tmp_path / "old.safetensors")
    assert set(state) == set(sd)
    torch.manual_seed(2)
    fresh = create_model("gpt", vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    load_state_strict(fresh, state, "old file")
    assert fresh.lm_head.weight is fresh.wte.weight and torch.equal(fresh.wte.weight, model.wte.weight)


def test_untied_model_round_trips_and_views_are_copied(tmp_path):
    lin = torch.nn.Linear(4, 3)
    state = {"w": lin.weight, "wt": lin.weight.t(), "b": lin.bias, "empty": torch.empty(0)}  # a view, not an alias
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert set(back) == {"w", "wt", "b", "empty"}
    assert torch.equal(back["wt"], lin.weight.detach().t()) and back["wt"].data_ptr() != back["w"].data_ptr()


def test_load_state_strict_names_missing_unexpected_and_mismatched_before_copying():
    model = _gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    del state["blocks.1.mlp.fc.weight"]
    state["extra.weight"] = torch.zeros(3)
    state["ln_f.weight"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as e:
        load_state_strict(model, state, "some.safetensors")
    msg = str(e.value)
    print(f"\n[io] {msg}")
    assert "\n" not in msg and msg.startswith("checkpoint error: some.safetensors does not match the model: ")
    assert "1 unexpected: extra.weight" in msg
    assert "1 missing: blocks.1.mlp.fc.weight" in msg  # and not lm_head.weight: it is wte, which is there
    assert "1 shape mismatch(es): ln_f.weight (7,) vs (32,)" in msg
    for k, v in model.state_dict().items():  # nothing was copied
        assert torch.equal(v, before[k]), k


def test_load_state_strict_renames_counts_and_casts():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    src = {"first.w": torch.ones(2, 2, dtype=torch.float64), "first.b": torch.zeros(2),
           "second.w": torch.full((1, 2), 2.0), "second.b": torch.zeros(1)}
    names = {"first.w": "0.weight", "first.b": "0.bias", "second.w": "1.weight", "second.b": "1.bias"}
    load_state_strict(model, src, "file", rename=names)
    assert model[0].weight.dtype == torch.float32 and torch.equal(model[0].weight, torch.ones(2, 2))

    bad = {**src, "second.w": torch.zeros(3, 2)}
    bad.update({f"junk.{i}": torch.zeros(1) for i in range(7)})
    with pytest.raises(CheckpointError, match=r"7 unexpected: junk\.0, junk\.1, junk\.2, junk\.3, junk\.4 "
                                              r"\(\+2 more\); 1 shape mismatch\(es\): second\.w \(3, 2\) vs "
                                              r"1\.weight \(1, 2\)$"):
        load_state_strict(model, bad, "file", rename=lambda k: names.get(k))


def test_check_state_against_shapes_with_custom_words():
    expected = {"a": (2, 3), "b": (4,)}
    renamed = check_state(expected, {"A": torch.zeros(2, 3), "B": (4,)}, "x", {"A": "a", "B": "b"})
    assert set(renamed) == {"a", "b"} and renamed["b"] == (4,)
    with pytest.raises(CheckpointError, match=r"^checkpoint error: hub: f: 1 not in the file: b \(from B\)$"):
        check_state(expected, {"A": (2, 3)}, "hub: f", {"A": "a", "B": "b"},
                    labels={"head": "", "missing": "{n} not in the file"}, show_missing=lambda k: f"{k} (from B)")
    check_state(expected, {"A": (2, 3)}, "f", {"A": "a"}, optional={"b"})  # optional names may be absent
