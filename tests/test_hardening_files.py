"""Hardening (issue 14): files a user is handed never run code, and a refused file is one line.

Each crafted file carries a pickle whose __reduce__ creates a marker file when unpickled; every reader must
answer a one-line error and leave no marker.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from lamina.errors import CheckpointError
from lamina.io import sha256_file


class _Payload:
    """Unpickling calls open(marker, "w"): the marker appears iff the pickle was run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _one_line(msg: str) -> bool:
    return "\n" not in msg.strip() and "Traceback" not in msg


def _plant_sharded(ckpt: Path, marker: Path, keep_safetensors: bool) -> None:
    """Turn a plain checkpoint into a 'sharded' one whose shards/.metadata runs code, with matching sha256."""
    shards = ckpt / "shards"
    shards.mkdir()
    (shards / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sharded"] = True
    meta["sha256"]["shards/.metadata"] = sha256_file(shards / ".metadata")
    if not keep_safetensors:
        (ckpt / "model.safetensors").unlink()
        meta["sha256"].pop("model.safetensors")
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _tiny_checkpoint(tmp_path: Path, state=None) -> tuple[Path, torch.nn.Module]:
    from lamina.engine.checkpoint import save_checkpoint
    from lamina.models import create_model

    model = create_model("mlp", in_features=4, num_classes=3, depth=1, width=8)
    path = save_checkpoint(tmp_path / "ck", model, state if state is not None else {"epoch": 1}, {"epoch": 1})
    return path, model


# ----- case 1: sharded checkpoints -----------------------------------------------------------------------
def test_crafted_sharded_checkpoint_never_unpickles_dcp_metadata(tmp_path):
    from lamina.engine.checkpoint import load_model_weights, load_sharded_into, read_dcp_metadata
    from lamina.models import create_model

    marker = tmp_path / "pwned"
    ckpt, _ = _tiny_checkpoint(tmp_path)
    _plant_sharded(ckpt, marker, keep_safetensors=False)
    model = create_model("mlp", in_features=4, num_classes=3, depth=1, width=8)
    with pytest.raises(CheckpointError) as e:  # weights only (eval/serve/predict/compress): shards never opened
        load_model_weights(ckpt, model)
    assert "cannot be read safely" in str(e.value) and _one_line(str(e.value))
    with pytest.raises(CheckpointError) as e:  # resume: the restricted unpickler refuses the payload
        load_sharded_into(ckpt, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert "refused" in str(e.value) and "io.open is not a DCP metadata class" in str(e.value) and _one_line(str(e.value))
    with pytest.raises(CheckpointError, match="refused"):
        read_dcp_metadata(ckpt / "shards" / ".metadata")
    assert not marker.exists()


def test_sharded_checkpoint_with_consolidated_weights_loads_them_not_the_shards(tmp_path):
    from lamina.engine.checkpoint import load_model_weights
    from lamina.models import create_model

    marker = tmp_path / "pwned"
    ckpt, src = _tiny_checkpoint(tmp_path)
    _plant_sharded(ckpt, marker, keep_safetensors=True)
    model = create_model("mlp", in_features=4, num_classes=3, depth=1, width=8)
    load_model_weights(ckpt, model)
    for a, b in zip(model.state_dict().values(), src.state_dict().values()):
        assert torch.equal(a, b)
    assert not marker.exists()


def test_lamina_eval_on_a_crafted_sharded_run_is_one_line_and_runs_nothing(digits_run_copy, tmp_path, capsys):
    from lamina.cli.main import main

    marker = tmp_path / "pwned"
    for which in ("best", "last"):
        ckpt = digits_run_copy / "checkpoints" / which
        if ckpt.is_dir():
            _plant_sharded(ckpt, marker, keep_safetensors=False)
    capsys.readouterr()
    assert main(["eval", str(digits_run_copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "sharded" in err and "cannot be read safely" in err and _one_line(err), err
    assert not marker.exists()


def test_fsdp_one_process_checkpoint_writes_consolidated_weights_and_resumes_through_the_safe_reader(
        tmp_path, monkeypatch):
    """A real DCP checkpoint (fsdp, private one-rank group): model.safetensors beside the shards, hashed; the
    restricted unpickler reads torch's own .metadata; the optimizer state comes back through it."""
    from lamina.engine import ModelCheckpoint, Trainer
    from lamina.data import InMemoryLoader
    from lamina.data.base import TensorData
    from lamina.engine.checkpoint import load_checkpoint, load_sharded_into, read_dcp_metadata
    from lamina.models import create_model
    from lamina.tasks import ClassificationTask

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    torch.manual_seed(0)
    data = TensorData(x=torch.randn(32, 8), y=torch.randint(0, 3, (32,)))
    model = create_model("mlp", in_features=8, num_classes=3, depth=2, width=16)
    trainer = Trainer(max_epochs=1, strategy="fsdp", callbacks=[ModelCheckpoint(tmp_path / "ck", monitor="train/loss")])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    try:
        trainer.fit(model, ClassificationTask(3), InMemoryLoader(data, 16, shuffle=True), optimizer=opt)
        with torch.no_grad():
            ref = model.eval()(data.tensors["x"][:4])
    finally:
        trainer.dist.close()
    last = tmp_path / "ck" / "last"
    meta = json.loads((last / "meta.json").read_text())
    assert meta["sharded"] and "model.safetensors" in meta["sha256"]
    assert type(read_dcp_metadata(last / "shards" / ".metadata")).__name__ == "Metadata"
    weights, _, _ = load_checkpoint(last, with_state=False, consolidated=True)
    plain = create_model("mlp", in_features=8, num_classes=3, depth=2, width=16).eval()
    plain.load_state_dict(weights)
    with torch.no_grad():
        assert torch.allclose(plain(data.tensors["x"][:4]), ref, atol=1e-6)
    # resume path: weights and the optimizer state (tensors and hyper-parameters) through the safe reader
    fresh = create_model("mlp", in_features=8, num_classes=3, depth=2, width=16)
    fopt = torch.optim.AdamW(fresh.parameters(), lr=5.0)
    load_sharded_into(last, fresh, fopt)
    assert fopt.param_groups[0]["lr"] == pytest.approx(1e-2)
    assert all(torch.equal(v, weights[k]) for k, v in fresh.state_dict().items())
    assert all("exp_avg" in s for s in fopt.state.values()) and len(fopt.state) == len(list(fresh.parameters()))


# ----- case 3: pickled state.pt ------------------------------------------------------------------------------
def test_pickled_state_pt_is_one_line_not_a_lamina_checkpoint(tmp_path):
    from lamina.engine.checkpoint import load_checkpoint

    marker = tmp_path / "pwned"
    ckpt, _ = _tiny_checkpoint(tmp_path, state={"epoch": 1, "evil": _Payload(marker)})
    assert not marker.exists()  # saving pickles, it does not unpickle
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    msg = str(e.value)
    assert "is not a lamina checkpoint" in msg and "state.pt" in msg and _one_line(msg)
    assert "weights_only" not in msg
    assert not marker.exists()
    (ckpt / "state.pt").write_bytes(b"not a zip file at all")  # garbage with a matching hash: one line too
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sha256"]["state.pt"] = sha256_file(ckpt / "state.pt")
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="is not a lamina checkpoint") as e:
        load_checkpoint(ckpt)
    assert _one_line(str(e.value))


# ----- case 2: compressed variants ---------------------------------------------------------------------------
def test_compressed_variant_is_safetensors_plus_recipe_and_rebuilds_to_the_same_model(digits_run_copy):
    from lamina.compress.run import evaluate_model, load_variant, open_context, quantize_run

    res = quantize_run(digits_run_copy, "dynamic", repeats=1)
    out = Path(res["saved"])
    assert sorted(p.name for p in out.iterdir()) == ["compress.json", "model.safetensors", "recipe.json"]
    recipe = json.loads((out / "recipe.json").read_text())
    assert (recipe["kind"], recipe["method"]) == ("quantize", "dynamic")
    loaded = load_variant(out)
    assert any("quantized" in type(m).__module__ for m in loaded.modules())
    got = evaluate_model(loaded, open_context(digits_run_copy))
    assert got["acc"] == pytest.approx(res["rows"][1]["test_acc"])  # the rebuilt model is the measured one


def test_qat_and_magnitude_variants_rebuild_to_the_measured_models(digits_run_copy):
    from lamina.compress.run import evaluate_model, load_variant, open_context, prune_run, quantize_run

    ctx = open_context(digits_run_copy)
    res = quantize_run(digits_run_copy, "qat", epochs=0.2, repeats=1)  # state: the fine-tuned fake-quant model
    assert evaluate_model(load_variant(res["saved"]), ctx)["acc"] == pytest.approx(res["rows"][1]["test_acc"])
    res = prune_run(digits_run_copy, "magnitude", 0.5, epochs=0.2, repeats=1)
    loaded = load_variant(res["saved"])
    assert evaluate_model(loaded, ctx)["acc"] == pytest.approx(res["rows"][-1]["test_acc"])


def test_pickled_or_crafted_variant_is_refused_in_one_line(digits_run_copy, tmp_path):
    from lamina.compress.run import load_variant

    marker = tmp_path / "pwned"
    old = digits_run_copy / "compressed" / "quant-dynamic"
    old.mkdir(parents=True)
    torch.save(_Payload(marker), old / "model.pt")  # an older lamina's (or an attacker's) pickled module
    (old / "compress.json").write_text(json.dumps({"format": "torch.save"}))
    for target in (old, old / "model.pt"):
        with pytest.raises(CheckpointError) as e:
            load_variant(target)
        assert "not loaded" in str(e.value) and _one_line(str(e.value))
    (old / "compress.json").write_text(json.dumps({"format": "torchscript (torch.jit.load(path))"}))
    with pytest.raises(CheckpointError, match="not loaded"):
        load_variant(old)
    assert not marker.exists()
    shutil.rmtree(old)
    old.mkdir()
    (old / "recipe.json").write_text(json.dumps({"format": "lamina-compressed-1", "kind": "quantize",
                                                 "method": "__import__('os')", "options": {}}))
    with pytest.raises(CheckpointError, match="unknown kind/method") as e:
        load_variant(old)
    assert _one_line(str(e.value))
