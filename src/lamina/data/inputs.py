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
    x = _as_batch(arr, input_shape, str(path))
    _non_finite(x, str(path))
    return x


def _images(paths: list[Path], facts) -> torch.Tensor:
    from lamina.data.files import load_image_files

    shape = tuple(facts.input_shape)
    if len(shape) != 3:
        raise InputShapeError(f"image input given, but the model expects vectors of shape {_shape_str(shape)}")
    meta = facts.meta
    img_meta = {"image_size": meta.get("image_size", list(shape[1:])),
                "grayscale": meta.get("grayscale", shape[0] == 1)}
    return load_image_files(paths, img_meta)


def _non_finite(x: torch.Tensor, src: str) -> None:
    """One DataError naming the first NaN / infinite value of a float batch (N, ...): a model answers NaN to it."""
    if not x.is_floating_point():
        return
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return
    idx = [int(i) for i in bad.nonzero()[0]]
    v = float(x[tuple(idx)])
    where = (f"row {idx[0] + 1}, column {idx[1] + 1}" if len(idx) == 2
             else f"sample {idx[0] + 1}, index {tuple(idx[1:])}")
    raise DataError(f"{src}: {where}: non-finite value {v}; inputs must be finite numbers")


_F32_MAX = float(np.finfo(np.float32).max)


def _read_csv_cells(path: Path, pd):
    """Every cell as its text (empty: ''), no header inferred: the checks below see what the file says."""
    try:
        df = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty CSV file; expected one row of numbers per sample") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a readable CSV file ({msg})") from None
    return df.fillna("")  # short rows: the missing cells are empty


def _cell_problem(text: str) -> str:
    t = text.strip()
    if not t:
        return "empty cell"
    try:
        float(t)
    except ValueError:
        return f"not a number: {text!r}"
    return f"non-finite value {text!r}"


def _numbers(cells, path: Path, columns: list, labels: list[str], first_row: int, pd) -> np.ndarray:
    """(N, len(columns)) float32 from text cells; NaN, inf, empty, out-of-float32-range or non-numeric cells
    are one DataError naming file, row and column. Rows count as a spreadsheet does (the header is row 1):
    `first_row` is the file row of cells' first row."""
    out = np.empty((len(cells), len(columns)), np.float32)
    for j, (c, label) in enumerate(zip(columns, labels)):
        text = cells[c].astype(str)
        vals = pd.to_numeric(text.str.strip(), errors="coerce").to_numpy(np.float64, na_value=np.nan)
        bad = ~np.isfinite(vals) | (np.abs(vals) > _F32_MAX)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            problem = _cell_problem(text.iloc[i])
            if problem.startswith("non-finite") and np.isfinite(vals[i]):
                problem = f"value {text.iloc[i]!r} is out of float32 range"
            raise DataError(f"{path}: row {first_row + i}, column {label}: {problem}; "
                            "inputs must be finite numbers")
        out[:, j] = vals
    return out


def _csv(path: Path, facts) -> dict:
    meta = facts.meta
    try:
        import pandas as pd
    except ImportError:
        from lamina.errors import MissingDependencyError

        raise MissingDependencyError('reading CSV input needs pandas: pip install "lamina[tables]"') from None
    cells = _read_csv_cells(path, pd)
    if "numeric" in meta and "categorical" in meta:  # a `table` run: same encoding as in training
        from lamina.data.files import transform_table_rows

        header = [str(h) for h in cells.iloc[0]]
        if len(cells) < 2:
            raise DataError(f"{path}: no data rows after the header; expected one row per sample")
        body = cells.iloc[1:].reset_index(drop=True)
        if len(set(header)) != len(header):
            dup = next(h for h in header if header.count(h) > 1)
            raise DataError(f"{path}: column {dup!r} appears more than once in the header")
        body.columns = header
        num = [c for c in meta["numeric"] if c in header]  # missing columns: transform_table_rows names them
        if num:  # numeric inputs must be given (training filled its own gaps; a guess here would be silent)
            _numbers(body, path, num, [repr(c) for c in num], 2, pd)
        out = transform_table_rows(meta, pd.read_csv(path))
        out.pop("y", None)
        return out
    shape = tuple(facts.input_shape)
    if len(shape) != 1 or "mean" not in meta:
        raise InputShapeError(f"{path}: CSV input fits vector data sets; this model expects {_shape_str(shape)}")
    names = meta.get("feature_names")
    first = [str(h).strip() for h in cells.iloc[0]]
    if names and all(n in first for n in names):  # a header with the training feature names: select them
        body, cols, labels, row1 = cells.iloc[1:], [first.index(n) for n in names], [repr(n) for n in names], 2
    elif cells.shape[1] == shape[0] and not all(_is_number(c) for c in first):  # a header of other names
        body, cols, labels, row1 = cells.iloc[1:], list(range(cells.shape[1])), [repr(n) for n in first], 2
    else:  # no header
        body, cols, labels, row1 = cells, list(range(cells.shape[1])), [str(j + 1) for j in range(cells.shape[1])], 1
    if len(cols) != shape[0]:
        raise InputShapeError(f"{path}: expected {shape[0]} columns" + (f" ({', '.join(names)})" if names else "")
                              + f", got {len(cols)}")
    if len(body) == 0:
        raise DataError(f"{path}: no data rows after the header; expected one row per sample")
    x = torch.from_numpy(_numbers(body.reset_index(drop=True), path, cols, labels, row1, pd))
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
