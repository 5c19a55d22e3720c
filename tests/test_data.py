"""lamina.data: splits, built-in data sets, file loaders (table, IDX, image folder, text), the in-memory loader.

Numbers are checked against hand computation or against the source (sklearn arrays, raw IDX bytes).
"""

from __future__ import annotations

import gzip
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lamina.data as ld
from lamina.data import InMemoryLoader, TensorData, load_dataset, split_indices
from lamina.data.files import decode_text, encode_text, load_image_files, read_idx, transform_table_rows
from lamina.errors import DataError, MissingDependencyError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------ splits


def test_split_sizes_disjoint_and_deterministic():
    tr, va, te = split_indices(100, 0.1, 0.2, seed=3)
    assert (len(tr), len(va), len(te)) == (70, 10, 20)
    assert torch.equal(torch.cat([tr, va, te]).sort().values, torch.arange(100))
    again = split_indices(100, 0.1, 0.2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((tr, va, te), again))
    assert not torch.equal(te, split_indices(100, 0.1, 0.2, seed=4)[2])


def test_split_stratified_proportions():
    y = torch.tensor([0] * 60 + [1] * 40)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    tr, va, te = split_indices(100, 0.1, 0.2, seed=0, stratify=y)
    assert torch.bincount(y[te]).tolist() == [12, 8]
    assert torch.bincount(y[va]).tolist() == [6, 4]
    assert torch.bincount(y[tr]).tolist() == [42, 28]
    # largest remainder: 3 classes of 5, 20% test = 3 -> one per class
    y3 = torch.arange(15) % 3
    assert torch.bincount(y3[split_indices(15, 0.0, 0.2, 0, stratify=y3)[2]]).tolist() == [1, 1, 1]


@pytest.mark.parametrize("vf, tf, needle", [(1.0, 0.1, "val_fraction"), (0.1, -0.5, "test_fraction"),
                                            (0.5, 0.5, "must be < 1"), ("abc", 0.1, "val_fraction")])
def test_split_rejects_bad_fractions(vf, tf, needle):
    with pytest.raises(DataError) as e:
        split_indices(10, vf, tf, 0)
    assert needle in one_line(e)


# ---------------------------------------------------------------------------------- built-in sets


def test_registry_lists_all_and_checks_options():
    assert {"digits", "iris", "wine", "breast_cancer", "diabetes", "fashion_mnist", "tiny_shakespeare",
            "table", "image_folder", "idx", "text"} <= set(ld.list_datasets())
    with pytest.raises(DataError) as e:
        load_dataset("iris", val_fractoin=0.1)
    assert "did you mean 'val_fraction'" in one_line(e)
    with pytest.raises(DataError) as e:
        load_dataset("table")
    assert "'path'" in one_line(e)
    with pytest.raises(DataError):
        load_dataset("irsi")


def test_digits_values_are_sklearn_over_16():
    from sklearn.datasets import load_digits

    raw = load_digits()
    b = load_dataset("digits")
    assert b.input_shape == (1, 8, 8) and b.num_classes == 10 and b.class_names == [str(i) for i in range(10)]
    tr, va, te = split_indices(len(raw.target), 0.1, 0.2, 0, stratify=torch.from_numpy(raw.target))
    expect = torch.from_numpy(raw.images / 16.0).float().unsqueeze(1)
    assert torch.equal(b.train.x, expect[tr]) and torch.equal(b.test.x, expect[te])
    assert torch.equal(b.val.y, torch.from_numpy(raw.target)[va])
    assert b.train.x.dtype == torch.float32 and b.train.y.dtype == torch.int64
    assert float(b.train.x.min()) == 0.0 and float(b.train.x.max()) == 1.0


def test_tabular_standardized_with_train_stats_only():
    from sklearn.datasets import load_iris

    raw = load_iris()
    b = load_dataset("iris", seed=1)
    tr, _, te = split_indices(150, 0.1, 0.2, 1, stratify=torch.from_numpy(raw.target))
    mean, std = raw.data[tr.numpy()].mean(0), raw.data[tr.numpy()].std(0)
    np.testing.assert_allclose(b.meta["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(b.meta["std"], std, rtol=1e-12)
    torch.testing.assert_close(b.train.x.mean(0), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.train.x.std(0, unbiased=False), torch.ones(4), atol=1e-5, rtol=0)
    np.testing.assert_allclose(b.test.x.numpy(), (raw.data[te.numpy()] - mean) / std, rtol=1e-5, atol=1e-6)
    assert b.class_names == ["setosa", "versicolor", "virginica"]
    assert torch.bincount(b.test.y).tolist() == [10, 10, 10]  # stratified


def test_diabetes_is_regression_with_raw_targets():
    from sklearn.datasets import load_diabetes

    raw = load_diabetes(scaled=False)
    b = load_dataset("diabetes")
    tr, _, _ = split_indices(442, 0.1, 0.2, 0)
    assert b.task == "regression" and b.num_classes is None and b.train.y.shape == (len(tr), 1)
    assert b.train.y.dtype == torch.float32
    assert torch.equal(b.train.y[:, 0], torch.from_numpy(raw.target[tr.numpy()]).float())
    for name in ("wine", "breast_cancer"):
        w = load_dataset(name)
        assert w.task == "classification" and w.train.x.shape[1] == len(w.meta["mean"])


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_limit():
    b = load_dataset("fashion_mnist", limit=300)
    assert len(b.train) + len(b.val) == 300 and len(b.val) == 25 and len(b.test) == 10000
    assert b.train.x.shape[1:] == (1, 28, 28) and b.train.x.dtype == torch.float32
    assert b.class_names[0] == "T-shirt/top" and b.class_names[9] == "Ankle boot" and b.num_classes == 10
    raw = read_idx(FMNIST / "train-images-idx3-ubyte.gz", limit=300)
    labels = torch.from_numpy(read_idx(FMNIST / "train-labels-idx1-ubyte.gz", limit=300).astype(np.int64))
    tr, va, _ = split_indices(300, 5000 / 60000, 0.0, 0, stratify=labels)
    assert torch.equal(b.val.y, labels[va])
    assert torch.equal(b.train.x, torch.from_numpy(raw[tr.numpy()]).float().unsqueeze(1) / 255)
    assert b.test.y.bincount().tolist() == [1000] * 10


def test_fashion_mnist_missing_root_message(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", root=tmp_path / "nowhere")
    msg = one_line(e)
    assert "nowhere" in msg and "apt-get install dataset-fashion-mnist" in msg and "root=" in msg


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data absent (reference data not copied here)")
def test_tiny_shakespeare(monkeypatch):
    monkeypatch.delenv("LAMINA_SHARED_DATA", raising=False)
    monkeypatch.chdir(ROOT)
    text = (SHARED / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    b = load_dataset("tiny_shakespeare", block_size=32)
    assert b.task == "language_modeling" and b.input_shape == (32,) and b.test is None
    assert b.meta["vocab"] == sorted(set(text)) and b.meta["vocab_size"] == 65
    n_val = round(len(text) * 0.1)
    ids_tr, ids_va = b.train.tensors["ids"], b.val.tensors["ids"]
    assert len(ids_tr) == len(text) - n_val and len(ids_va) == n_val and ids_tr.dtype == torch.int64
    assert decode_text(b.meta, ids_tr[:100]) == text[:100]
    assert decode_text(b.meta, ids_va[-50:]) == text[-50:]


def test_shared_data_env_var_and_text_loader(tmp_path, monkeypatch):
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("abcabcabcabcabcabcabcabcabcabcdd", encoding="utf-8")
    monkeypatch.setenv("LAMINA_SHARED_DATA", str(tmp_path))
    b = load_dataset("tiny_shakespeare", block_size=2, val_fraction=0.25)
    assert b.meta["vocab"] == ["a", "b", "c", "d"] and len(b.val) == 8 and len(b.train) == 24
    assert b.train.tensors["ids"][:4].tolist() == [0, 1, 2, 0]
    assert b.val.tensors["ids"][-2:].tolist() == [3, 3]
    assert encode_text(b.meta, "cab").tolist() == [2, 0, 1]
    with pytest.raises(DataError):
        encode_text(b.meta, "z")
    t = load_dataset("text", path=tmp_path / "tinyshakespeare" / "input.txt", block_size=2, val_fraction=0.25)
    assert torch.equal(t.train.tensors["ids"], b.train.tensors["ids"])
    with pytest.raises(DataError) as e:
        load_dataset("text", path=tmp_path / "tinyshakespeare" / "input.txt", block_size=10, val_fraction=0.25)
    assert "block_size" in one_line(e)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError) as e:
        load_dataset("text", path=tmp_path / "empty.txt")
    assert "empty" in one_line(e)


# -------------------------------------------------------------------------------------------- table

CSV = "age,city,score,label\n1.0,a,10,yes\n2.0,b,20,no\n3.0,a,,yes\n,c,40,no\n5.0,b,50,yes\n"


def test_table_onehot_and_standardization_exact(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text(CSV)
    b = load_dataset("table", path=p, target="label", val_fraction=0.0, test_fraction=0.0)
    assert b.task == "classification" and b.class_names == ["no", "yes"] and b.val is None and b.test is None
    assert b.train.y.tolist() == [1, 0, 1, 0, 1]
    # age: mean 11/4, population std sqrt(8.75/4); score: mean 30, std sqrt(250); missing -> mean -> 0
    sa, ss = math.sqrt(8.75 / 4), math.sqrt(250.0)
    expect = torch.tensor([
        [(1 - 2.75) / sa, -20 / ss, 1, 0, 0],
        [(2 - 2.75) / sa, -10 / ss, 0, 1, 0],
        [(3 - 2.75) / sa, 0.0, 1, 0, 0],
        [0.0, 10 / ss, 0, 0, 1],
        [(5 - 2.75) / sa, 20 / ss, 0, 1, 0],
    ])
    torch.testing.assert_close(b.train.x, expect)
    assert b.meta["feature_names"] == ["age", "score", "city=a", "city=b", "city=c"]
    assert b.input_shape == (5,)
    import pandas as pd

    new = transform_table_rows(b.meta, pd.DataFrame({"age": [np.nan], "city": ["zzz"], "score": [30.0]}))
    assert new["x"].tolist() == [[0.0, 0.0, 0.0, 0.0, 0.0]] and "y" not in new


def test_table_train_stats_only_and_embed(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"f": rng.normal(5, 2, 60), "g": rng.choice(["u", "v", "w"], 60), "y": rng.normal(size=60)})
    df.to_csv(tmp_path / "r.csv", index=False)
    b = load_dataset("table", path=tmp_path / "r.csv", target="y", categorical="embed", seed=2)
    assert b.task == "regression" and b.train.y.shape == (42, 1) and b.train.x.shape == (42, 1)
    tr, _, te = split_indices(60, 0.1, 0.2, 2)
    f_tr = df["f"].to_numpy()[tr.numpy()]
    assert b.meta["mean"][0] == pytest.approx(f_tr.mean()) and b.meta["std"][0] == pytest.approx(f_tr.std())
    f_te = df["f"].to_numpy()[te.numpy()]
    torch.testing.assert_close(b.test.x[:, 0], torch.from_numpy((f_te - f_tr.mean()) / f_tr.std()).float())
    assert b.meta["categories"] == [["u", "v", "w"]] and b.meta["cat_cardinalities"] == [4]
    codes = {"u": 1, "v": 2, "w": 3}
    assert b.train.tensors["x_cat"][:, 0].tolist() == [codes[v] for v in df["g"].to_numpy()[tr.numpy()]]
    new = transform_table_rows(b.meta, pd.DataFrame({"f": [5.0], "g": ["nope"]}))
    assert new["x_cat"].tolist() == [[0]] and new["x_cat"].dtype == torch.int64


def test_table_parquet_matches_csv(tmp_path):
    import pandas as pd

    (tmp_path / "t.csv").write_text(CSV)
    pd.read_csv(tmp_path / "t.csv").to_parquet(tmp_path / "t.parquet")
    a = load_dataset("table", path=tmp_path / "t.csv", target="label", val_fraction=0.0, test_fraction=0.0)
    b = load_dataset("table", path=tmp_path / "t.parquet", target="label", val_fraction=0.0, test_fraction=0.0)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)


def test_table_errors(tmp_path, monkeypatch):
    p = tmp_path / "t.csv"
    p.write_text(CSV)
    with pytest.raises(DataError) as e:
        load_dataset("table", path=p, target="lable")
    msg = one_line(e)
    assert "did you mean 'label'" in msg and "age, city, score, label" in msg
    (tmp_path / "one.csv").write_text("a,y\n1,k\n2,k\n3,k\n")
    with pytest.raises(DataError) as e:
        load_dataset("table", path=tmp_path / "one.csv", target="y")
    assert "single class" in one_line(e)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_dataset("table", path=tmp_path / "empty.csv", target="y")
    (tmp_path / "head.csv").write_text("a,y\n")
    with pytest.raises(DataError, match="zero data rows"):
        load_dataset("table", path=tmp_path / "head.csv", target="y")
    with pytest.raises(DataError, match="drop column 'nope'"):
        load_dataset("table", path=p, target="label", drop=["nope"])
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MissingDependencyError) as e:
        load_dataset("table", path=p, target="label")
    assert 'pip install "lamina[tables]"' in one_line(e)


def test_table_auto_task_integer_labels(tmp_path):
    (tmp_path / "i.csv").write_text("a,y\n1,10\n2,2\n3,10\n4,2\n5,10\n6,2\n")
    b = load_dataset("table", path=tmp_path / "i.csv", target="y", val_fraction=0.0, test_fraction=0.0)
    assert b.task == "classification" and b.class_names == ["2", "10"] and b.train.y.tolist() == [1, 0, 1, 0, 1, 0]


# ---------------------------------------------------------------------------------------------- IDX


def write_idx(path: Path, code: int, fmt: str, dims: tuple[int, ...], values, gz: bool = False) -> Path:
    data = struct.pack(">BBBB", 0, 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    data += struct.pack(f">{len(values)}{fmt}", *values)
    (gzip.open if gz else open)(path, "wb").write(data)
    return path


def test_idx_round_trip(tmp_path):
    p = write_idx(tmp_path / "a.idx", 0x08, "B", (3, 2, 2), list(range(12)))
    arr = read_idx(p)
    assert arr.dtype == np.uint8 and arr.shape == (3, 2, 2) and arr.ravel().tolist() == list(range(12))
    assert read_idx(p, limit=2).shape == (2, 2, 2)
    q = write_idx(tmp_path / "b.idx.gz", 0x0C, "i", (4,), [1, -2, 70000, 0], gz=True)
    assert read_idx(q).tolist() == [1, -2, 70000, 0] and read_idx(q).dtype == np.int32
    f = write_idx(tmp_path / "f.idx", 0x0D, "f", (2,), [1.5, -0.25])
    assert read_idx(f).tolist() == [1.5, -0.25]


def test_idx_bad_magic_and_truncated(tmp_path):
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x01\x02\x08\x03" + b"\x00" * 20)
    with pytest.raises(DataError) as e:
        read_idx(bad)
    assert "bad.idx" in one_line(e) and "magic" in one_line(e)
    trunc = tmp_path / "trunc.idx"
    trunc.write_bytes(struct.pack(">BBBB3I", 0, 0, 8, 3, 3, 2, 2) + bytes(5))
    with pytest.raises(DataError) as e:
        read_idx(trunc)
    assert "trunc.idx" in one_line(e) and "truncated" in one_line(e) and "12" in one_line(e)
    (tmp_path / "tiny.idx").write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "tiny.idx")


def test_idx_dataset(tmp_path):
    imgs = write_idx(tmp_path / "i.gz", 0x08, "B", (10, 2, 3), [i % 256 for i in range(60)], gz=True)
    labs = write_idx(tmp_path / "l.gz", 0x08, "B", (10,), [3, 7] * 5, gz=True)
    b = load_dataset("idx", images=imgs, labels=labs, val_fraction=0.0, test_fraction=0.2)
    assert b.class_names == ["3", "7"] and b.input_shape == (1, 2, 3) and len(b.train) == 8
    assert torch.bincount(b.test.y).tolist() == [1, 1]
    assert float(b.train.x[0, 0, 0, 1]) == pytest.approx(1 / 255)


# ------------------------------------------------------------------------------------- image folder


def make_images(root: Path, mode: str = "L", size=(5, 4)) -> None:
    from PIL import Image

    for c, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            v = 10 * c + i
            Image.new(mode, size, v if mode == "L" else (v, 2 * v, 3 * v)).save(root / cls / f"{i}.png")


def test_image_folder_values(tmp_path):
    make_images(tmp_path)
    b = load_dataset("image_folder", path=tmp_path, val_fraction=0.0, test_fraction=0.0)
    assert b.class_names == ["cat", "dog"] and b.input_shape == (1, 4, 5) and b.meta["grayscale"] is True
    expect = torch.tensor([10 * c + i for c in range(2) for i in range(5)]).float() / 255
    torch.testing.assert_close(b.train.x[:, 0, 2, 3], expect)
    assert b.train.y.tolist() == [0] * 5 + [1] * 5
    files = sorted((tmp_path / "dog").glob("*.png"))
    torch.testing.assert_close(load_image_files(files, b.meta), b.train.x[5:])
    small = load_dataset("image_folder", path=tmp_path, size=2, val_fraction=0.0, test_fraction=0.0)
    assert small.train.x.shape == (10, 1, 2, 2)


def test_image_folder_rgb_and_errors(tmp_path, monkeypatch):
    make_images(tmp_path / "rgb", mode="RGB")
    b = load_dataset("image_folder", path=tmp_path / "rgb", val_fraction=0.0, test_fraction=0.0)
    assert b.input_shape == (3, 4, 5) and b.meta["channels"] == 3
    assert b.train.x[6, :, 0, 0].mul(255).round().tolist() == [11, 22, 33]
    from PIL import Image

    Image.new("RGB", (7, 7)).save(tmp_path / "rgb" / "dog" / "z_big.png")
    with pytest.raises(DataError) as e:
        load_dataset("image_folder", path=tmp_path / "rgb")
    assert "z_big.png" in one_line(e) and "size=" in one_line(e)
    (tmp_path / "rgb" / "dog" / "z_big.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as e:
        load_dataset("image_folder", path=tmp_path / "rgb")
    assert "z_big.png" in one_line(e)
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(MissingDependencyError) as e:
        load_dataset("image_folder", path=tmp_path / "rgb")
    assert 'pip install "lamina[images]"' in one_line(e)


# ------------------------------------------------------------------------------------------- loader


def test_in_memory_loader_visits_every_index_once_per_epoch():
    data = TensorData(x=torch.arange(10).float().unsqueeze(1), y=torch.arange(10))
    loader = InMemoryLoader(data, batch_size=3, shuffle=True, seed=0)
    assert len(loader) == 4
    orders = []
    for _ in range(2):
        seen = torch.cat([b["y"] for b in loader])
        assert seen.sort().values.tolist() == list(range(10))
        orders.append(seen.tolist())
    assert orders[0] != orders[1]
    for b in InMemoryLoader(data, batch_size=3, shuffle=True, seed=0):
        assert torch.equal(b["x"][:, 0].long(), b["y"])  # x and y stay paired
