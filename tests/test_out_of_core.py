"""Data bigger than memory: streamed image folders, memory-mapped token files and streamed Parquet tables give the
very batches of the in-memory path; the automatic choice; hostile token headers; mid-epoch resume."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lamina import runs
from lamina.cli.main import main
from lamina.config import load_config
from lamina.data import load_dataset, make_loader
from lamina.data.outofcore import ImageFiles, StreamingImageLoader, choose_in_memory
from lamina.data.tablestream import StreamingTableLoader, TableStream
from lamina.data.tokenfiles import TokenStream, build_token_files, open_tokens
from lamina.data.transforms import build_transforms
from lamina.data.windows import RandomWindowLoader, SequentialWindowLoader
from lamina.engine import Callback
from lamina.errors import DataError

AUG = [{"name": "random_crop", "padding": 1}, {"name": "hflip"}]


def _image_folder(root: Path, n_per_class=(7, 6, 5), hw=(6, 5), mode="RGB", seed=0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, n in enumerate(n_per_class):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n):
            shape = (*hw, 3) if mode == "RGB" else hw
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def _batches(loader):
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def _assert_same(a, b):
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


# ------------------------------------------------------------------------------------------------ images

@pytest.mark.parametrize("workers", [0, 1])
def test_streamed_images_equal_in_memory(tmp_path, workers):
    root = _image_folder(tmp_path / "imgs")
    mem = load_dataset("image_folder", path=root, in_memory=True, seed=3)
    disk = load_dataset("image_folder", path=root, in_memory=False, seed=3, num_workers=workers)
    assert isinstance(disk.train, ImageFiles) and not isinstance(mem.train, ImageFiles)
    assert disk.input_shape == mem.input_shape == (3, 6, 5) and disk.meta == mem.meta
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(disk, split).y, getattr(mem, split).y)
    # training: shuffled, augmented; same generator draws in the same order -> the same tensors, two epochs
    lm = make_loader(mem.train, 4, shuffle=True, seed=5, transform=build_transforms(AUG))
    ld = make_loader(disk.train, 4, shuffle=True, seed=5, transform=build_transforms(AUG))
    assert isinstance(ld, StreamingImageLoader) and len(ld) == len(lm)
    for _ in range(2):
        _assert_same(_batches(lm), _batches(ld))
    # evaluation order, no augmentation: exactly the in-memory tensors
    _assert_same(_batches(make_loader(mem.test, 2)), _batches(make_loader(disk.test, 2)))
    assert torch.equal(disk.train[0]["x"], mem.train.x[0])


@pytest.mark.parametrize("workers", [0, 1])
def test_decode_cache_decodes_each_image_once_and_gives_the_same_batches(tmp_path, monkeypatch, workers):
    import lamina.data.files as files

    root = _image_folder(tmp_path / "imgs")
    mem = load_dataset("image_folder", path=root, in_memory=True, seed=3)
    disk = load_dataset("image_folder", path=root, in_memory=False, seed=3, num_workers=workers)
    assert "each image decoded once" in disk.extras["data_path"]
    decoded = []
    real = files._decode_images
    monkeypatch.setattr(files, "_decode_images", lambda Image, paths, hw, gray: (decoded.extend(paths),
                                                                                 real(Image, paths, hw, gray))[1])
    lm = make_loader(mem.train, 4, shuffle=True, seed=5, transform=build_transforms(AUG))
    ld = make_loader(disk.train, 4, shuffle=True, seed=5, transform=build_transforms(AUG))
    cache = disk.train.cache
    assert cache is not None and cache.cached() == 0 and Path(cache.path).is_file()
    for _ in range(3):  # epoch 1 decodes (in a worker when workers=1) and fills the cache; 2 and 3 read it
        _assert_same(_batches(lm), _batches(ld))
    assert cache.cached() == len(disk.train)
    if workers == 0:  # the patched decoder runs in this process only
        assert sorted(decoded) == sorted(disk.train.files)  # each file once over three epochs
    path = cache.path
    del ld, disk, cache
    import gc

    gc.collect()
    assert not Path(path).exists()  # the temp file goes with its split
    stale = Path(tempfile.gettempdir()) / "lamina-decoded-999999999-x.u8"  # a killed run's (no such pid)
    stale.write_bytes(b"")
    load_dataset("image_folder", path=root, in_memory=False).train.use_cache()  # a new cache sweeps first
    assert not stale.exists()


def test_decode_cache_off_and_without_room(tmp_path, monkeypatch):
    import lamina.data.outofcore as ooc

    root = _image_folder(tmp_path / "imgs")
    off = load_dataset("image_folder", path=root, in_memory=False, decode_cache=False, num_workers=0)
    assert "no decode cache" in off.extras["data_path"]
    list(make_loader(off.train, 4))
    assert off.train.cache is None
    monkeypatch.setattr(ooc, "CACHE_DISK_MARGIN", 1 << 62)  # no disk has that much free
    auto = load_dataset("image_folder", path=root, in_memory=False, num_workers=0)
    assert "no decode cache" in auto.extras["data_path"]
    with pytest.raises(DataError, match="decode_cache=true: the temp folder .* lacks") as e:
        load_dataset("image_folder", path=root, in_memory=False, decode_cache=True)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="decode_cache: expected auto, true or false"):
        load_dataset("image_folder", path=root, in_memory=False, decode_cache="sometimes")


def test_automatic_choice_by_decoded_size(tmp_path):
    root = _image_folder(tmp_path / "imgs", mode="L")  # 18 gray 6x5 images: 18 * 30 * 4 = 2160 bytes as float32
    small = load_dataset("image_folder", path=root, memory_budget=2e-6)  # 2000 bytes
    assert isinstance(small.train, ImageFiles)
    assert small.extras["data_path"].startswith("streaming from files: decoded size 2.2 kB > budget 2.0 kB")
    big = load_dataset("image_folder", path=root, memory_budget=3e-6)
    assert not isinstance(big.train, ImageFiles) and big.extras["data_path"].startswith("in memory")
    keep, why = choose_in_memory(10**12)  # 1 TB against the default quarter of this machine's RAM
    assert not keep and "default budget" in why
    assert choose_in_memory(10**12, in_memory="true")[0] is True
    with pytest.raises(DataError, match="in_memory: expected auto, true or false"):
        load_dataset("image_folder", path=root, in_memory="maybe")
    with pytest.raises(DataError, match="memory_budget: expected a positive number"):
        load_dataset("image_folder", path=root, memory_budget=-1)
    with pytest.raises(DataError, match="num_workers"):
        load_dataset("image_folder", path=root, in_memory=False, num_workers=-2)
    with pytest.raises(DataError, match="streamed from files"):
        _ = small.train.x


def test_streamed_corrupt_image_is_one_line(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    data = load_dataset("image_folder", path=root, in_memory=False, num_workers=1)
    Path(data.train.files[0]).write_bytes(b"not a png")  # broken after the header pass
    with pytest.raises(DataError, match="cannot read image") as e:
        list(make_loader(data.train, 4))
    assert "\n" not in str(e.value)


def test_loader_resume_mid_epoch_images(tmp_path):
    disk = load_dataset("image_folder", path=_image_folder(tmp_path / "imgs"), in_memory=False, num_workers=0)
    a = make_loader(disk.train, 3, shuffle=True, seed=1, transform=build_transforms(AUG))
    start = a.state_dict()
    full = _batches(a)
    b = make_loader(disk.train, 3, shuffle=True, seed=99, transform=build_transforms(AUG))
    b.load_state_dict(start)
    _assert_same(full, _batches(b))


FAST = ["logging.tensorboard=false", "logging.plots=false", "trainer.progress=false", "data.batch_size=8",
        "data.name=image_folder", "model.name=mlp", "trainer.max_epochs=3", "trainer.deterministic=true",
        "data.augment=[{name: hflip}]", "data.num_workers=0", "cost.energy=false", "cost.flops=false"]


class _StopAt(Callback):
    def __init__(self, batches):
        self.batches, self.n = batches, 0

    def on_train_batch_end(self, trainer, loss):
        self.n += 1
        if self.n >= self.batches:
            trainer.should_stop = True


def test_trainer_resume_mid_epoch_streamed_equals_in_memory(tmp_path):
    from lamina.engine.checkpoint import load_checkpoint

    root = _image_folder(tmp_path / "imgs", (20, 20), hw=(4, 4), mode="L")

    def cfg(name, in_memory):
        return load_config(None, [*FAST, f"logging.root={tmp_path}", f"name={name}", f"data.path={root}",
                                  f"data.in_memory={in_memory}"])

    mem = runs.train(cfg("mem", "true"))
    part = runs.train(cfg("disk", "false"), callbacks=[_StopAt(5)])  # 28 train images: batch 5 is inside epoch 2
    assert part.summary["steps"] == 5 and part.summary["data_path"].startswith("streaming from files")
    resumed = runs.train(cfg("disk", "false"), resume=part.run_dir)
    a, _, _ = load_checkpoint(mem.run_dir / "checkpoints" / "last", with_state=False)
    b, _, _ = load_checkpoint(resumed.run_dir / "checkpoints" / "last", with_state=False)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["train/loss"] for r in mem.history] == [r["train/loss"] for r in resumed.history]


def test_cli_prints_data_path_and_bad_option(tmp_path, capsys):
    root = _image_folder(tmp_path / "imgs", (6, 6), hw=(4, 4), mode="L")
    args = [*FAST, "trainer.max_epochs=1", f"logging.root={tmp_path}", f"data.path={root}"]
    assert main(["train", *args, "data.memory_budget=1e-9", "name=a"]) == 0
    out = capsys.readouterr()
    assert "data: streaming from files: decoded size" in out.err
    run = Path(out.out.strip())
    summary = json.loads((run / "summary.json").read_text())
    assert main(["eval", str(run), "--json"]) == 0  # the tools reopen the run's data the same way: streamed
    assert json.loads(capsys.readouterr().out)["test/acc"] == pytest.approx(summary["test"]["test/acc"], abs=1e-6)
    assert main(["train", *args, "data.in_memory=sometimes", "name=b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("in_memory: expected auto, true or false, got 'sometimes'") and "\n" not in err
    assert main(["train", *args, "data.in_memory=false", "data.decode_cache=maybe", "name=c"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("decode_cache: expected auto, true or false, got 'maybe'") and "\n" not in err


# ------------------------------------------------------------------------------------------------ tokens

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 6


def test_token_files_equal_text_stream(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    meta = build_token_files(tmp_path / "t.txt", tmp_path / "tok", "char", val_fraction=0.1)
    assert meta["dtype"] == "uint16"
    assert (tmp_path / "tok" / "train.bin").stat().st_size == 2 * meta["files"]["train"]["tokens"]
    mem = load_dataset("text", path=tmp_path / "t.txt", block_size=8, val_fraction=0.1)
    mm = load_dataset("token_bin", path=tmp_path / "tok", block_size=8)
    assert isinstance(mm.train, TokenStream) and isinstance(mm.train.tensors["ids"], np.memmap)
    assert mm.meta["vocab"] == mem.meta["vocab"] and mm.meta["vocab_size"] == mem.meta["vocab_size"]
    assert np.array_equal(np.asarray(mm.train.tensors["ids"]), mem.train.tensors["ids"].numpy())
    a = RandomWindowLoader(mem.train.tensors["ids"], 8, 4, steps_per_epoch=5, seed=2)
    b = RandomWindowLoader(mm.train.tensors["ids"], 8, 4, steps_per_epoch=5, seed=2)
    _assert_same(_batches(a), _batches(b))
    _assert_same(_batches(SequentialWindowLoader(mem.val.tensors["ids"], 8, 3)),
                 _batches(SequentialWindowLoader(mm.val.tensors["ids"], 8, 3)))
    state = b.state_dict()
    again = _batches(b)
    c = RandomWindowLoader(mm.train.tensors["ids"], 8, 4, steps_per_epoch=5, seed=0)
    c.load_state_dict(state)
    _assert_same(again, _batches(c))


def test_token_files_bpe_and_training(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT * 4)
    assert main(["tokenize", str(tmp_path / "t.txt"), str(tmp_path / "bpe"), "--tokenizer", "bpe",
                 "--vocab-size", "300"]) == 0
    assert "train with data.name=token_bin" in capsys.readouterr().err
    meta = json.loads((tmp_path / "bpe" / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] <= 300 and "vocab" not in meta
    ids = open_tokens(tmp_path / "bpe", "train")
    assert 0 < len(ids) < len(TEXT * 4) * 0.9 and int(ids.max()) < meta["vocab_size"]  # merges happened
    bundle = load_dataset("token_bin", path=tmp_path / "bpe", block_size=8)
    tok = bundle.extras["tokenizer"]
    assert "To be, or not to be" in tok.decode(np.asarray(ids[:40]).tolist())
    res = runs.train(load_config(None, ["logging.tensorboard=false", "logging.plots=false", "trainer.progress=false",
                                        f"logging.root={tmp_path}", "data.name=token_bin",
                                        f"data.path={tmp_path / 'bpe'}",
                                        "data.block_size=8", "data.batch_size=4", "data.steps_per_epoch=3",
                                        "model.name=gpt_mini", "trainer.max_epochs=1"]))
    assert res.summary["steps"] == 3 and res.summary["data_path"].startswith("memory-mapped token files")


def _hostile(tmp_path, meta: dict, n_bytes: int, ids=None) -> Path:
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    (d / "meta.json").write_text(json.dumps({"format": "lamina-tokens", **meta}))
    raw = np.asarray(ids, "<u2").tobytes() if ids is not None else b"\0" * n_bytes
    (d / "train.bin").write_bytes(raw)
    return d


def test_hostile_token_headers(tmp_path, capsys):
    files = {"train": {"file": "train.bin", "tokens": 10**12}}
    d = _hostile(tmp_path, {"dtype": "uint16", "vocab_size": 50, "files": files}, 100)
    with pytest.raises(DataError, match=r"declares 1000000000000 uint16 tokens \(2000000000000 bytes\) but the file "
                                        r"has 100 bytes"):
        open_tokens(d, "train")
    # the CLI: one line, exit 2
    assert main(["train", "data.name=token_bin", f"data.path={d}", "model.name=gpt_mini", "trainer.progress=false",
                 f"logging.root={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "declares 1000000000000 uint16 tokens" in err and "\n" not in err
    for meta, msg in [({"dtype": "float64", "vocab_size": 5}, "dtype: expected one of uint16, uint32"),
                      ({"dtype": "uint16", "vocab_size": 70000}, "vocab_size: expected an integer in 1..65536"),
                      ({"dtype": "uint16", "vocab_size": 5, "files": {"train": {"file": "../../etc/passwd"}}},
                       "expected a plain file name"),
                      ({"dtype": "uint32", "vocab_size": 5}, "not a whole number of uint32 ids")]:
        with pytest.raises(DataError, match=msg):
            open_tokens(_hostile(tmp_path, meta, 102), "train")
    with pytest.raises(DataError, match="token 3 is id 9, not below vocab_size 5"):
        open_tokens(_hostile(tmp_path, {"dtype": "uint16", "vocab_size": 5}, 0, ids=[1, 2, 3, 9, 0]), "train")
    (d / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        open_tokens(d, "train")


# ------------------------------------------------------------------------------------------------ tables

def _parquet(path: Path, n=200, seed=0) -> Path:
    import pandas as pd

    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "a": rng.normal(3, 2, n), "b": rng.integers(0, 50, n).astype(float),
        "color": rng.choice(["red", "green", "blue", None], n),
        "label": rng.choice(["yes", "no", "maybe"], n),
    })
    df.loc[rng.choice(n, 15, replace=False), "a"] = np.nan
    df.index = [f"r{i}" for i in range(n)]  # a named index is stored as a column; it is not a feature
    df.to_parquet(path, row_group_size=23)
    return path


@pytest.mark.parametrize("mode", ["onehot", "embed"])
def test_streamed_table_equals_in_memory(tmp_path, mode):
    p = _parquet(tmp_path / "t.parquet")
    mem = load_dataset("table", path=p, target="label", categorical=mode, in_memory=True)
    disk = load_dataset("table", path=p, target="label", categorical=mode, in_memory=False)
    assert isinstance(disk.train, TableStream) and disk.input_shape == mem.input_shape
    assert disk.meta["categories"] == mem.meta["categories"] and disk.meta["classes"] == mem.meta["classes"]
    np.testing.assert_allclose(disk.meta["mean"], mem.meta["mean"], rtol=1e-12)
    np.testing.assert_allclose(disk.meta["std"], mem.meta["std"], rtol=1e-12)
    assert disk.meta["class_counts"] == mem.meta["class_counts"]
    # evaluation order = the in-memory split's order (sorted file rows): the same tensors batch by batch
    a, b = _batches(make_loader(mem.test, 16)), _batches(make_loader(disk.test, 16))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and torch.equal(x["y"], y["y"])
        torch.testing.assert_close(x["x"], y["x"], rtol=1e-6, atol=1e-6)
        if "x_cat" in x:
            assert torch.equal(x["x_cat"], y["x_cat"])
    # training: shuffled through row groups and a buffer; every training row exactly once an epoch, seeded
    ld = make_loader(disk.train, 16, shuffle=True, seed=4)
    assert isinstance(ld, StreamingTableLoader) and len(ld) == len(make_loader(mem.train, 16))
    state = ld.state_dict()
    epoch = _batches(ld)
    got = torch.cat([b["x"] for b in epoch])
    want = mem.train.x
    def key(t):  # rows in a canonical (lexicographic) order
        return t[torch.from_numpy(np.lexsort(t.numpy().T[::-1]).copy())]

    torch.testing.assert_close(key(got), key(want), rtol=1e-6, atol=1e-6)
    assert not torch.equal(got, want)  # shuffled
    ld2 = make_loader(disk.train, 16, shuffle=True, seed=0)
    ld2.load_state_dict(state)
    _assert_same(epoch, _batches(ld2))


def test_table_choice_and_errors(tmp_path):
    p = _parquet(tmp_path / "t.parquet")
    auto = load_dataset("table", path=p, target="label", memory_budget=1e-6)  # 200 rows x 4 cols x 8 B = 6.4 kB
    assert isinstance(auto.train, TableStream) and auto.extras["data_path"].startswith("streaming")
    with pytest.raises(DataError, match="resample: balancing classes needs the table in memory"):
        load_dataset("table", path=p, target="label", in_memory=False, resample="under")
    with pytest.raises(DataError, match="streamed from its file"):
        _ = auto.test.x


@pytest.mark.parametrize("args,msg", [
    (["missing.txt"], "missing.txt: text file not found"),
    (["t.txt", "--tokenizer", "wordpiece"], "tokenizer: expected char, bpe or a tokenizer.json file, got 'wordpiece'"),
    (["t.txt", "--val-fraction", "1.5"], "val_fraction: expected a number in [0, 1), got 1.5"),
])
def test_cli_tokenize_bad_input(tmp_path, capsys, monkeypatch, args, msg):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text(TEXT)
    assert main(["tokenize", *args[:1], "out", *args[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(msg) and "\n" not in err


def test_abandoned_epoch_leaves_no_stale_batches(tmp_path):
    """A pass stopped early (the FLOP counter's one batch, max_steps) must not leak prefetched batches from the
    persistent workers into the next pass."""
    disk = load_dataset("image_folder", path=_image_folder(tmp_path / "imgs"), in_memory=False, num_workers=1)
    a = make_loader(disk.train, 2, shuffle=True, seed=1)
    state = a.state_dict()
    next(iter(a))  # 1 of 7 batches; the worker has prefetched more
    a.load_state_dict(state)
    b = make_loader(disk.train, 2, shuffle=True, seed=1)
    _assert_same(_batches(b), _batches(a))
