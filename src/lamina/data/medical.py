"""Medical images: PneumoniaMNIST (pediatric chest X-rays, normal vs pneumonia), shipped in datasets/pneumoniamnist.

The .npz is read with allow_pickle=False (a file of arrays, never objects) and every array's shape and dtype is
checked before use. Splits are the file's own: train 3,882 (388 normal / 3,494 pneumonia), val 524 and test 624,
the last two as in MedMNIST v2 (see datasets/pneumoniamnist/README.md for how the training split differs).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lamina.data.base import DataBundle, TensorData
from lamina.data.files import PathLike, registered
from lamina.errors import DataError

PNEUMONIA_CLASSES = ["normal", "pneumonia"]


def datasets_root() -> Path:
    """$LAMINA_DATASETS if set, else datasets/ in the source checkout."""
    env = os.environ.get("LAMINA_DATASETS")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[3] / "datasets"


def read_medmnist(path: Path, classes: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images uint8 (N, H, W), labels int64 (N,))} of a MedMNIST-layout .npz, every array checked."""
    if not path.is_file():
        raise DataError(f"{path}: MedMNIST file not found; it ships in the source checkout under datasets/ (or set "
                        "LAMINA_DATASETS, or pass path=)")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz of arrays ({str(e).splitlines()[0]})") from None
    out = {}
    try:
        with z:
            for split in ("train", "val", "test"):
                xi, yi = f"{split}_images", f"{split}_labels"
                if xi not in z.files or yi not in z.files:
                    raise DataError(f"{path}: missing {xi} / {yi}; expected MedMNIST's train/val/test _images and "
                                    "_labels")
                x, y = z[xi], z[yi].reshape(-1)  # object arrays raise here: allow_pickle=False
                if x.dtype != np.uint8 or x.ndim != 3 or len(x) != len(y) or len(x) == 0:
                    raise DataError(f"{path}: {xi} must be uint8 (N, H, W) with one label each, got {x.dtype} "
                                    f"{x.shape} and {len(y)} labels")
                if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= classes:
                    raise DataError(f"{path}: {yi} must hold integer labels in 0..{classes - 1}")
                out[split] = (x, y.astype(np.int64))
    except (ValueError, OSError) as e:  # pickled objects, truncated members
        raise DataError(f"{path}: unreadable arrays ({str(e).splitlines()[0]}); expected plain uint8 images and "
                        "integer labels") from None
    return out


@registered("pneumoniamnist", "PneumoniaMNIST chest X-rays (MedMNIST v2), 28x28 gray, normal vs pneumonia; "
            "3,882 / 524 / 624", "classification", "datasets/pneumoniamnist (CC BY 4.0)")
def pneumoniamnist(*, path: PathLike | None = None, seed: int = 0) -> DataBundle:
    p = Path(path).expanduser() if path is not None else datasets_root() / "pneumoniamnist" / "pneumoniamnist.npz"
    parts = read_medmnist(p, len(PNEUMONIA_CLASSES))
    data = {s: TensorData(x=torch.from_numpy(x).float().div_(255.0).unsqueeze(1), y=torch.from_numpy(y))
            for s, (x, y) in parts.items()}
    meta = {"loader": "pneumoniamnist", "pixel_max": 255.0, "classes": PNEUMONIA_CLASSES,
            "class_counts": {s: np.bincount(y, minlength=2).tolist() for s, (_, y) in parts.items()}}
    return DataBundle("pneumoniamnist", data["train"], data["val"], data["test"], "classification",
                      (1, *parts["train"][0].shape[1:]), len(PNEUMONIA_CLASSES), PNEUMONIA_CLASSES, meta)


__all__ = ["PNEUMONIA_CLASSES", "datasets_root", "pneumoniamnist", "read_medmnist"]
