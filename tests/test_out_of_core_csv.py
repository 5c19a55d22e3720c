"""CSV/TSV tables streamed in chunks (data.in_memory=false or over data.memory_budget): the same split, statistics,
column types and encoding as the in-memory read; a table within one shuffle buffer trains on the very batches of the
in-memory path; typos and parse errors are one line naming the row, as in memory."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lamina import runs
from lamina.cli.main import main
from lamina.config import load_config
from lamina.data import load_dataset, make_loader
from lamina.data import tablestream
from lamina.data.tablestream import TableStream, csv_decoded_bytes


def _frame(n=120, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "a": rng.normal(3, 2, n),                                   # float, some missing
        "k": rng.integers(0, 9, n),                                 # int
        "flag": rng.choice([True, False], n),                       # bool: numeric to pandas
        "code": rng.choice(["7", "12", "x9", "03"], n),             # numbers in some chunks only: text throughout
        "color": rng.choice(["red", "green", "blue", None], n),     # text with missing
        "label": rng.choice(["yes", "no", "maybe"], n),
    })
    df.loc[rng.choice(n, 9, replace=False), "a"] = np.nan
    df.loc[:20, "code"] = "5"  # the first chunks hold only numbers in 'code'
    return df


def _write(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path, index=False, sep="\t" if ".tsv" in path.name else ",")
    return path


@pytest.mark.parametrize("name,mode", [("t.csv", "onehot"), ("t.tsv.gz", "embed")])
def test_streamed_csv_equals_in_memory(tmp_path, monkeypatch, name, mode):
    monkeypatch.setattr(tablestream, "_ROWS", 16)  # many chunks: types, statistics and rows across chunk borders
    p = _write(_frame(), tmp_path / name)
    mem = load_dataset("table", path=p, target="label", categorical=mode, in_memory=True)
    disk = load_dataset("table", path=p, target="label", categorical=mode, in_memory=False)
    assert isinstance(disk.train, TableStream) and disk.input_shape == mem.input_shape
    for k in ("numeric", "categorical", "categories", "classes", "class_counts", "feature_names"):
        assert disk.meta[k] == mem.meta[k], k
    assert disk.meta["numeric"] == ["a", "k", "flag"] and "x9" in disk.meta["categories"][0]
    np.testing.assert_allclose(disk.meta["mean"], mem.meta["mean"], rtol=1e-12)
    np.testing.assert_allclose(disk.meta["std"], mem.meta["std"], rtol=1e-12)
    for split in ("val", "test"):  # evaluation: file order, the same tensors batch by batch
        a, b = list(make_loader(getattr(mem, split), 8)), list(make_loader(getattr(disk, split), 8))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x.keys() == y.keys() and torch.equal(x["y"], y["y"])
            torch.testing.assert_close(x["x"], y["x"], rtol=1e-6, atol=1e-6)
            if "x_cat" in x:
                assert torch.equal(x["x_cat"], y["x_cat"])
    # training: the whole split fits one shuffle buffer and a CSV is one group -> InMemoryLoader's permutation
    a, b = list(make_loader(mem.train, 8, shuffle=True, seed=3)), list(make_loader(disk.train, 8, shuffle=True, seed=3))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["y"], y["y"])
        torch.testing.assert_close(x["x"], y["x"], rtol=1e-6, atol=1e-6)


def test_csv_size_estimate_and_automatic_choice(tmp_path):
    p = _write(_frame(50), tmp_path / "t.csv")
    assert csv_decoded_bytes(p) == 50 * 6 * 8  # rows x columns x 8 bytes, as for Parquet
    p.write_text(p.read_text().rstrip("\n"))  # no final line break: the last row still counts
    assert csv_decoded_bytes(p) == 50 * 6 * 8
    assert csv_decoded_bytes(tmp_path / "t.parquet") is None
    auto = load_dataset("table", path=p, target="label", memory_budget=2e-6)  # 2.4 kB > 2 kB
    assert isinstance(auto.train, TableStream)
    assert auto.extras["data_path"].startswith("streaming from files: decoded size 2.4 kB > budget 2.0 kB")
    fits = load_dataset("table", path=p, target="label", memory_budget=3e-6)
    assert not isinstance(fits.train, TableStream) and fits.extras["data_path"].startswith("in memory")


def test_streamed_csv_training_equals_in_memory(tmp_path):
    p = _write(_frame(200, seed=1), tmp_path / "t.csv")
    args = ["logging.tensorboard=false", "logging.plots=false", "trainer.progress=false", "data.name=table",
            f"data.path={p}", "data.target=label", "data.batch_size=16", "model.name=mlp", "trainer.max_epochs=2",
            "trainer.deterministic=true", "cost.energy=false", "cost.flops=false", f"logging.root={tmp_path}"]
    a = runs.train(load_config(None, [*args, "name=mem", "data.in_memory=true"]))
    b = runs.train(load_config(None, [*args, "name=disk", "data.in_memory=false"]))
    assert b.summary["data_path"].startswith("streaming from files")
    assert [r["train/loss"] for r in a.history] == pytest.approx([r["train/loss"] for r in b.history], rel=1e-5)
    assert a.summary["test"]["test/acc"] == pytest.approx(b.summary["test"]["test/acc"], abs=1e-6)


def _streamed_table_run(tmp_path, df, target="label", extra=()) -> Path:
    p = _write(df, tmp_path / "t.csv")
    assert main(["train", "logging.tensorboard=false", "logging.plots=false", "trainer.progress=false",
                 "data.name=table", f"data.path={p}", f"data.target={target}", "data.in_memory=false",
                 "model.name=mlp", "trainer.max_epochs=1", "cost.energy=false", "cost.flops=false",
                 f"logging.root={tmp_path}", *extra]) == 0
    return p


def test_cli_streamed_csv_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tablestream, "_ROWS", 16)
    df = _frame()
    df["a"] = df["a"].astype(object)
    df.loc[70, "a"] = "3,5"  # a typo in a number column, past the first chunks
    p = _write(df, tmp_path / "typo.csv")
    base = ["train", "data.name=table", f"data.path={p}", "data.target=label", "data.in_memory=false",
            "model.name=mlp", "trainer.progress=false", f"logging.root={tmp_path}"]
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("typo.csv: column 'a', row 72: '3,5' is not a number, but 110 of its 111 values are; fix the "
                        "cell (or leave it empty for missing)") and "\n" not in err
    bad = tmp_path / "ragged.csv"
    bad.write_text("a,b,label\n" + "1,2,x\n" * 40 + "1,2,3,4,5\n")  # a row with too many fields, in chunk 3
    assert main([*base[:2], f"data.path={bad}", *base[3:]]) == 2
    err = capsys.readouterr().err.strip()
    assert "ragged.csv: cannot parse table" in err and "Expected 3 fields" in err and "\n" not in err
    (tmp_path / "empty.csv").write_text("")
    assert main([*base[:2], f"data.path={tmp_path / 'empty.csv'}", *base[3:]]) == 2
    assert capsys.readouterr().err.strip().endswith("empty.csv: empty file; expected a header row and data rows")


def test_cli_attack_streamed_table_range_checked_per_batch(tmp_path, capsys):
    """Standardized features are not pixels: the streamed test split is checked batch by batch, one line, exit 2."""
    _streamed_table_run(tmp_path, _frame(80))
    capsys.readouterr()
    run = next(d for d in tmp_path.iterdir() if (d / "checkpoints").is_dir())
    assert main(["attack", str(run), "--attack", "fgsm", "--eps", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "outside the attack's value range [0.0, 1.0]; pass clamp=(lo, hi)" in err and "\n" not in err


def test_binary_threshold_on_streamed_csv(tmp_path):
    """The binary task's threshold rule scores whole val/test splits: batch by batch on a streamed table."""
    df = _frame(240, seed=2)
    df["label"] = np.where(df["a"].fillna(3) + np.random.default_rng(0).normal(0, 1, len(df)) > 3.5, "pos", "neg")
    p = _write(df, tmp_path / "b.csv")
    args = ["logging.tensorboard=false", "logging.plots=false", "trainer.progress=false", "data.name=table",
            f"data.path={p}", "data.target=label", "model.name=mlp", "trainer.max_epochs=2", "task.name=binary",
            "trainer.deterministic=true", "cost.energy=false", "cost.flops=false",
            f"logging.root={tmp_path}", "task.positive=pos"]
    a = runs.train(load_config(None, [*args, "name=mem", "data.in_memory=true"]))
    b = runs.train(load_config(None, [*args, "name=disk", "data.in_memory=false"]))
    ta = json.loads((Path(a.run_dir) / "threshold.json").read_text())
    tb = json.loads((Path(b.run_dir) / "threshold.json").read_text())
    assert ta["threshold"] == pytest.approx(tb["threshold"], abs=1e-6)
    assert a.summary["test"]["test/f1"] == pytest.approx(b.summary["test"]["test/f1"], abs=1e-6)
