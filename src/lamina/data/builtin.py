"""Built-in data sets that need no download: scikit-learn's bundled tables, Fashion-MNIST from the Debian
package, Tiny Shakespeare from the shared data folder.

They exist so every model family and tutorial has real data that loads offline in well under a second
(Fashion-MNIST: about one). Statistics (standardization) are fitted on the train split only and stored as
lists in `meta`, so `predict` can treat new inputs identically and a checkpoint stays plain YAML/JSON.
scikit-learn is imported inside the loaders: importing lamina.data must stay cheap.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lamina.data.base import DataBundle, TensorData
from lamina.data.files import PathLike, _classification_bundle, _train_stats, char_lm_bundle, idx_pair, registered
from lamina.data.splits import apply_split, split_indices
from lamina.errors import DataError

_SKLEARN = "scikit-learn (bundled with the package)"


def _standardized(x: np.ndarray, train_idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(x - train mean) / train std (population std; constant columns get std 1), float32."""
    mean, std = _train_stats(x[train_idx.numpy()])
    return torch.from_numpy(((x - mean) / std).astype(np.float32)), {"mean": mean.tolist(), "std": std.tolist()}


def _sklearn_tabular(name: str, raw, task: str, val_fraction: float, test_fraction: float, seed: int) -> DataBundle:
    """Tabular sklearn Bunch -> DataBundle: x (N,F) standardized; y int64 (N,) or float32 (N,1)."""
    x_np = np.asarray(raw.data, np.float64)
    if task == "classification":
        y = torch.from_numpy(np.asarray(raw.target, np.int64))
        split = split_indices(len(y), val_fraction, test_fraction, seed, stratify=y)
        class_names = [str(c) for c in raw.target_names]
    else:
        y = torch.from_numpy(np.asarray(raw.target, np.float32).reshape(-1, 1))
        split = split_indices(len(y), val_fraction, test_fraction, seed)
        class_names = None
    x, stats = _standardized(x_np, split[0])
    meta = {"loader": name, **stats, "feature_names": [str(f) for f in raw.feature_names], "classes": class_names}
    train, val, test = apply_split({"x": x, "y": y}, split)
    return DataBundle(name, train, val, test, task, (x.shape[1],),
                      len(class_names) if class_names else None, class_names, meta)


@registered("digits", "8x8 handwritten digits, 1,797 images, 10 classes (sklearn load_digits)", "classification", _SKLEARN)
def digits(*, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """x: float32 (N,1,8,8) = pixel / 16 in [0, 1]; y: int64 digit; meta: pixel_max=16."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.from_numpy(np.asarray(raw.images, np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(np.asarray(raw.target, np.int64))
    names = [str(c) for c in raw.target_names]
    meta = {"loader": "digits", "pixel_max": 16.0, "classes": names}
    return _classification_bundle("digits", {"x": x, "y": y}, names, meta, val_fraction, test_fraction, seed)


def _sk(loader: str, **kw):
    import sklearn.datasets

    return getattr(sklearn.datasets, loader)(**kw)


@registered("iris", "iris flowers, 150 x 4 features, 3 classes (sklearn load_iris)", "classification", _SKLEARN)
def iris(*, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """x: float32 (150, 4) standardized with train mean/std (meta mean, std); y: int64."""
    return _sklearn_tabular("iris", _sk("load_iris"), "classification", val_fraction, test_fraction, seed)


@registered("wine", "wine cultivars, 178 x 13 features, 3 classes (sklearn load_wine)", "classification", _SKLEARN)
def wine(*, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """x: float32 (178, 13) standardized with train mean/std (meta mean, std); y: int64."""
    return _sklearn_tabular("wine", _sk("load_wine"), "classification", val_fraction, test_fraction, seed)


@registered("breast_cancer", "Wisconsin breast cancer, 569 x 30 features, 2 classes (sklearn)", "classification", _SKLEARN)
def breast_cancer(*, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """x: float32 (569, 30) standardized with train mean/std (meta mean, std); y: int64 (0 malignant, 1 benign)."""
    return _sklearn_tabular("breast_cancer", _sk("load_breast_cancer"), "classification", val_fraction, test_fraction, seed)


@registered("diabetes", "diabetes progression, 442 x 10 features, regression (sklearn load_diabetes)", "regression", _SKLEARN)
def diabetes(*, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """x: float32 (442, 10) raw features standardized with train mean/std; y: float32 (N, 1) raw target."""
    return _sklearn_tabular("diabetes", _sk("load_diabetes", scaled=False), "regression", val_fraction, test_fraction, seed)


FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@registered("fashion_mnist", "Fashion-MNIST, 60,000 + 10,000 28x28 grayscale images, 10 classes",
            "classification", f"{FASHION_MNIST_ROOT} (Debian package dataset-fashion-mnist)")
def fashion_mnist(*, val_fraction: float = 5000 / 60000, test_fraction: float | None = None, seed: int = 0,
                  root: PathLike = FASHION_MNIST_ROOT, limit: int | None = None) -> DataBundle:
    """x: float32 (N,1,28,28) in [0, 1]; y: int64. test = the official 10,000 images; val is carved from the
    60,000 train images (stratified, seeded). `limit` keeps only the first `limit` train images (for tests).
    `test_fraction` exists for a uniform interface and must stay None: the test split is fixed.
    """
    if test_fraction is not None:
        raise DataError("fashion_mnist: test_fraction is not accepted; the official 10,000-image test split is used")
    root = Path(root).expanduser()
    names = {f"{k}-{kind}": root / f"{k}-{kind}-idx{d}-ubyte.gz"
             for k in ("train", "t10k") for kind, d in (("images", 3), ("labels", 1))}
    missing = [p for p in names.values() if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: Fashion-MNIST file not found; install the Debian package dataset-fashion-mnist "
                        f"(apt-get install dataset-fashion-mnist) or pass root= pointing at a folder with the 4 IDX .gz files")
    x, y = idx_pair(names["train-images"], names["train-labels"], limit)
    x_test, y_test = idx_pair(names["t10k-images"], names["t10k-labels"])
    y, y_test = torch.from_numpy(y.astype(np.int64)), torch.from_numpy(y_test.astype(np.int64))
    train, val, _ = apply_split({"x": x, "y": y}, split_indices(len(y), val_fraction, 0.0, seed, stratify=y))
    test = TensorData(x=x_test, y=y_test)
    meta = {"loader": "fashion_mnist", "pixel_max": 255.0, "classes": FASHION_MNIST_CLASSES}
    return DataBundle("fashion_mnist", train, val, test, "classification", (1, 28, 28), 10, list(FASHION_MNIST_CLASSES), meta)


def datasets_root() -> Path:
    """$LAMINA_DATASETS if set, else datasets/ in the source checkout: the small data sets the repository ships."""
    env = os.environ.get("LAMINA_DATASETS")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[3] / "datasets"


def shared_data_dir() -> Path:
    """$LAMINA_SHARED_DATA if set, else ../shared/data relative to the current working directory."""
    env = os.environ.get("LAMINA_SHARED_DATA")
    return Path(env).expanduser() if env else Path.cwd() / ".." / "shared" / "data"


@registered("tiny_shakespeare", "Tiny Shakespeare, 1.1M characters, char-level language modeling",
            "language_modeling", "../shared/data/tinyshakespeare/input.txt (or $LAMINA_SHARED_DATA)")
def tiny_shakespeare(*, path: PathLike | None = None, block_size: int = 64, val_fraction: float = 0.1,
                     test_fraction: float = 0.0, seed: int = 0) -> DataBundle:
    """Splits hold {"ids": int64 (T,)}: one contiguous token stream per split (first 90% train, last 10% val),
    not samples; the task cuts windows of block_size + 1. meta: vocab (list of chars), vocab_size, block_size.
    test is None unless test_fraction > 0 (then it is the tail after val). `seed` is unused (no shuffling).
    """
    p = Path(path).expanduser() if path is not None else shared_data_dir() / "tinyshakespeare" / "input.txt"
    if not p.is_file():
        raise DataError(f"{p}: Tiny Shakespeare text not found; pass path= or set LAMINA_SHARED_DATA to the shared data folder")
    return char_lm_bundle("tiny_shakespeare", p, block_size, val_fraction, test_fraction)
