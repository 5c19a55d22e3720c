"""Read inputs for `lamina predict`: turn files into tensors exactly like the training data.

Accepted: .npy / .pt arrays already in the model's input layout (one sample or a batch), .csv rows for
table and other vector data sets (raw values; the run's normalization is applied), and image files
(PNG/JPEG/PGM/BMP; converted to the run's channels and size, scaled to [0, 1]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lamina.errors import DataError, InputShapeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".bmp", ".ppm")


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def _as_batch(arr: torch.Tensor, input_shape: tuple, src: str) -> torch.Tensor:
    if tuple(arr.shape) == input_shape:
        arr = arr.unsqueeze(0)
    if tuple(arr.shape[1:]) != input_shape:
        raise InputShapeError(f"{src}: expected an array of shape {_shape_str(input_shape)} or "
                              f"(N, {_shape_str(input_shape)[1:-1]}), got {_shape_str(arr.shape)}")
    return arr.float()


def _read_array(path: Path, input_shape: tuple) -> torch.Tensor:
    try:
        if path.suffix == ".npy":
            arr = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            arr = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # numpy/torch raise many types for a bad file
        raise DataError(f"{path}: cannot read array ({type(e).__name__})") from None
    if not isinstance(arr, torch.Tensor):
        raise DataError(f"{path}: expected a single tensor/array, got {type(arr).__name__}")
    return _as_batch(arr, input_shape, str(path))


def _images(paths: list[Path], facts) -> torch.Tensor:
    from lamina.data.files import load_image_files

    shape = tuple(facts.input_shape)
    if len(shape) != 3:
        raise InputShapeError(f"image input given, but the model expects vectors of shape {_shape_str(shape)}")
    meta = facts.meta
    img_meta = {"image_size": meta.get("image_size", list(shape[1:])),
                "grayscale": meta.get("grayscale", shape[0] == 1)}
    return load_image_files(paths, img_meta)


def _csv(path: Path, facts) -> dict:
    meta = facts.meta
    try:
        import pandas as pd
    except ImportError:
        from lamina.errors import MissingDependencyError

        raise MissingDependencyError('reading CSV input needs pandas: pip install "lamina[tables]"') from None
    if "numeric" in meta and "categorical" in meta:  # a `table` run: same encoding as in training
        from lamina.data.files import transform_table_rows

        out = transform_table_rows(meta, pd.read_csv(path))
        out.pop("y", None)
        return out
    shape = tuple(facts.input_shape)
    if len(shape) != 1 or "mean" not in meta:
        raise InputShapeError(f"{path}: CSV input fits vector data sets; this model expects {_shape_str(shape)}")
    names = meta.get("feature_names")
    df = pd.read_csv(path)
    if names and all(n in df.columns for n in names):
        df = df[names]
    elif df.shape[1] == shape[0] and not all(_is_number(c) for c in df.columns):
        pass
    else:
        df = pd.read_csv(path, header=None)
    if df.shape[1] != shape[0]:
        raise InputShapeError(f"{path}: expected {shape[0]} columns" + (f" ({', '.join(names)})" if names else "")
                              + f", got {df.shape[1]}")
    x = torch.tensor(df.to_numpy(dtype=np.float32))
    x = (x - torch.tensor(meta["mean"])) / torch.tensor(meta["std"])
    return {"x": x}


def _is_number(s) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def read_inputs(inputs: list[str], facts) -> tuple[dict, list[str]]:
    """(tensors for a TensorData, one display name per row)."""
    shape = tuple(facts.input_shape)
    parts: list[dict] = []
    names: list[str] = []
    images: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if not p.is_file():
            raise DataError(f"input file not found: {raw}")
        suf = p.suffix.lower()
        if suf in IMAGE_SUFFIXES:
            images.append(p)
            continue
        if suf in (".npy", ".pt", ".pth"):
            x = _read_array(p, shape)
            parts.append({"x": x})
        elif suf == ".csv":
            parts.append(_csv(p, facts))
        else:
            raise DataError(f"{raw}: unsupported input type '{suf}'; accepted: .npy, .pt, .csv, "
                            + ", ".join(IMAGE_SUFFIXES))
        n = len(parts[-1]["x"])
        names += [str(p)] if n == 1 else [f"{p}[{i}]" for i in range(n)]
    if images:
        parts.append({"x": _images(images, facts)})
        names += [str(p) for p in images]
    keys = set(parts[0])
    if any(set(pt) != keys for pt in parts):
        raise DataError("inputs mix kinds that produce different tensors; predict one kind at a time")
    return {k: torch.cat([pt[k] for pt in parts]) for k in keys}, names
