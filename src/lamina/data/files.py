"""Data sets from the user's own files: tables (CSV/Parquet), image folders, IDX arrays, plain text.

Each loader is registered (`load_dataset("table", path=..., target=...)`) and returns a DataBundle whose
`meta` holds every statistic fitted on the *train split only* (means, stds, categories, label order, image
size, vocabulary), and each has a companion for `predict` (`transform_table_rows`, `load_image_files`,
`encode_text`) that runs the very same encoding on new inputs; training and prediction share the code path
so they cannot drift apart.

Why hand-written pieces: the IDX format is 20 lines of struct and numpy, not worth torchvision as a
dependency; table encoding is a few pandas calls whose fitted state must be plain lists (it goes into a
checkpoint as YAML/JSON), which sklearn's pickled transformers are not. pandas/pyarrow and Pillow are
optional and imported lazily, so `import lamina.data` stays light.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import inspect
import math
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lamina.data.base import DataBundle, TensorData
from lamina.data.registry import register_dataset
from lamina.data.splits import apply_split, check_fraction, split_indices
from lamina.errors import DataError, MissingDependencyError, did_you_mean, unknown_name

PathLike = str | os.PathLike


def registered(name: str, description: str, task: str, source: str):
    """register_dataset + option checking: an unknown or missing option is a one-line DataError, not a TypeError."""

    def deco(fn):
        params = inspect.signature(fn).parameters
        required = [k for k, p in params.items() if p.default is p.empty]

        @functools.wraps(fn)
        def loader(**options) -> DataBundle:
            for k in options:
                if k not in params:
                    raise DataError(f"data set '{name}': {unknown_name('option', k, params)}")
            for k in required:
                if k not in options:
                    raise DataError(f"data set '{name}': missing required option '{k}' (pass {k}=...)")
            return fn(**options)

        register_dataset(name, description, task, source)(loader)
        return loader

    return deco


def _require(module: str, extra: str, package: str | None = None):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f'{package or module} is needed for this; install it with pip install "lamina[{extra}]"') from None


def _existing_file(path: PathLike, what: str = "file") -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: {what} not found")
    return p


def _class_labels(y: np.ndarray, where: str) -> tuple[torch.Tensor, list[str]]:
    """Map labels to 0..K-1 in sorted order; class names are the original values as strings."""
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        only = classes[0] if len(classes) else "none"
        raise DataError(f"{where}: labels have a single class ({only}); classification needs at least 2")
    return torch.from_numpy(codes.reshape(-1).astype(np.int64)), [str(c) for c in classes.tolist()]


def _classification_bundle(name: str, tensors: dict[str, torch.Tensor], class_names: list[str], meta: dict,
                           val_fraction: float, test_fraction: float, seed: int) -> DataBundle:
    split = split_indices(len(tensors["y"]), val_fraction, test_fraction, seed, stratify=tensors["y"])
    train, val, test = apply_split(tensors, split)
    return DataBundle(name, train, val, test, "classification", tuple(tensors["x"].shape[1:]),
                      len(class_names), class_names, meta)


# ----------------------------------------------------------------------------------------------- IDX

# IDX (LeCun's MNIST format): magic = 0x00 0x00 <dtype code> <ndim>, then ndim big-endian uint32 dims, then data.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike, limit: int | None = None) -> np.ndarray:
    """Parse an IDX file (raw or gzip by magic bytes) into a native-endian array; `limit` reads only the first items."""
    p = _existing_file(path, "IDX file")
    with open(p, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(p, "rb") if gz else open(p, "rb")) as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataError(f"{p}: truncated IDX file: expected a 4-byte magic number, got {len(head)} bytes")
            if head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or head[3] == 0:
                raise DataError(f"{p}: not an IDX file: magic bytes {head.hex()}, "
                                "expected 0000<dtype 08/09/0b/0c/0d/0e><ndim >= 1>")
            ndim = head[3]
            dim_bytes = f.read(4 * ndim)
            if len(dim_bytes) < 4 * ndim:
                raise DataError(f"{p}: truncated IDX file: expected {ndim} dimension sizes in the header")
            dims = struct.unpack(f">{ndim}I", dim_bytes)
            count = dims[0] if limit is None else min(int(limit), dims[0])
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            nbytes = count * math.prod(dims[1:]) * dtype.itemsize
            data = f.read(nbytes)
            if len(data) < nbytes:
                raise DataError(f"{p}: truncated IDX file: shape {list(dims)} needs {nbytes} data bytes, found {len(data)}")
            if limit is None and f.read(1):
                raise DataError(f"{p}: IDX file has trailing bytes after the {nbytes} data bytes of shape {list(dims)}")
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{p}: cannot read IDX file: {e}") from None
    return np.frombuffer(data, dtype).astype(dtype.newbyteorder("="), copy=True).reshape(count, *dims[1:])


def idx_images_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """IDX image array -> float32 (N, C, H, W); uint8 scaled to [0, 1]. (N,H,W) gets C=1; (N,F) stays 2-D."""
    x = torch.from_numpy(arr)
    x = x.float().div_(255.0) if arr.dtype == np.uint8 else x.float()
    return x.unsqueeze(1) if x.ndim == 3 else x


def idx_pair(images: PathLike, labels: PathLike, limit: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    x, y = read_idx(images, limit), read_idx(labels, limit)
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{labels}: expected one label per image ({len(x)}), got an array of shape {list(y.shape)}")
    if len(x) == 0:
        raise DataError(f"{images}: IDX file holds zero items")
    return idx_images_to_tensor(x), y


@registered("idx", "images + labels from a pair of IDX files (.gz or raw), MNIST style", "classification",
            "path: images=, labels=")
def idx(*, images: PathLike, labels: PathLike, limit: int | None = None, val_fraction: float = 0.1,
        test_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """x: float32 (N,1,H,W) for 3-D IDX (uint8 scaled to [0,1]); y: int64 codes of the sorted label values."""
    x, y_raw = idx_pair(images, labels, limit)
    y, class_names = _class_labels(y_raw, str(labels))
    meta = {"loader": "idx", "pixel_max": 255.0 if x.dtype == torch.float32 else None, "classes": class_names}
    return _classification_bundle("idx", {"x": x, "y": y}, class_names, meta, val_fraction, test_fraction, seed)


# ------------------------------------------------------------------------------------------ text (LM)


def encode_text(meta: dict, text: str) -> torch.Tensor:
    """Characters -> int64 ids with the training vocabulary (meta["vocab"]); an unknown character is a DataError."""
    stoi = {c: i for i, c in enumerate(meta["vocab"])}
    try:
        return torch.tensor([stoi[c] for c in text], dtype=torch.int64)
    except KeyError as e:
        raise DataError(f"character {e.args[0]!r} is not in the training vocabulary ({len(stoi)} characters)") from None


def decode_text(meta: dict, ids) -> str:
    vocab = meta["vocab"]
    return "".join(vocab[int(i)] for i in torch.as_tensor(ids).reshape(-1).tolist())


def char_lm_bundle(name: str, path: Path, block_size: int = 64, val_fraction: float = 0.1,
                   test_fraction: float = 0.0) -> DataBundle:
    """Character-level LM: the whole file as one 1-D int64 stream under key "ids", split contiguously.

    train = first (1 - val - test) of the tokens, then val, then test (nanoGPT style, no shuffling, so no
    window straddles two splits). Vocabulary = sorted distinct characters of the whole file.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text:
        raise DataError(f"{path}: empty text file")
    vf, tf = check_fraction("val_fraction", val_fraction), check_fraction("test_fraction", test_fraction or 0.0)
    if vf + tf >= 1.0:
        raise DataError(f"val_fraction + test_fraction must be < 1, got {vf} + {tf}")
    if int(block_size) < 1:
        raise DataError(f"block_size: expected a positive integer, got {block_size!r}")
    block_size = int(block_size)
    # Codepoints in one vectorized pass; np.unique sorts them, which is the order of sorted(set(text)).
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    uniq, inv = np.unique(codes, return_inverse=True)
    ids = torch.from_numpy(inv.reshape(-1).astype(np.int64))
    n = len(ids)
    n_val, n_test = round(n * vf), round(n * tf)
    n_train = n - n_val - n_test
    parts = (ids[:n_train], ids[n_train : n_train + n_val], ids[n_train + n_val :])
    for split_name, part in zip(("train", "val", "test"), parts):
        if (split_name == "train" or len(part)) and len(part) <= block_size:
            raise DataError(f"{path}: the {split_name} split has {len(part)} characters, needs more than "
                            f"block_size={block_size}; use a smaller block_size or a longer text")
    train, val, test = (TensorData(ids=p) if len(p) else None for p in parts)
    vocab = [chr(c) for c in uniq.tolist()]
    meta = {"loader": "text", "vocab": vocab, "vocab_size": len(vocab), "block_size": block_size}
    return DataBundle(name, train, val, test, "language_modeling", (block_size,), None, None, meta)


@registered("text", "character-level language modeling on any UTF-8 text file", "language_modeling", "path: path=")
def text(*, path: PathLike, block_size: int = 64, val_fraction: float = 0.1, test_fraction: float = 0.0,
         seed: int = 0) -> DataBundle:
    """Splits hold {"ids": int64 (T,)}, a token stream, not samples; meta: vocab, vocab_size, block_size.

    `seed` is accepted for a uniform interface; the contiguous split draws nothing at random.
    """
    return char_lm_bundle("text", _existing_file(path, "text file"), block_size, val_fraction, test_fraction)


# ------------------------------------------------------------------------------------------- tables


def _read_table(path: PathLike):
    pd = _require("pandas", "tables")
    p = _existing_file(path, "table file")
    suffix = p.suffix.lower()
    if suffix == ".gz" and len(p.suffixes) > 1:  # t.csv.gz / t.tsv.gz: pandas reads the gzip stream
        suffix = p.suffixes[-2].lower()
    try:
        if suffix in (".csv", ".tsv"):
            df = pd.read_csv(p, sep="\t" if suffix == ".tsv" else ",")
        elif suffix in (".parquet", ".pq"):
            _require("pyarrow", "tables")
            df = pd.read_parquet(p)
        else:
            raise DataError(f"{p}: unsupported table format '{suffix}'; expected .csv, .tsv (optionally .gz) or .parquet")
    except pd.errors.EmptyDataError:
        raise DataError(f"{p}: empty file; expected a header row and data rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{p}: cannot parse table: {e}") from None
    if len(df) == 0:
        raise DataError(f"{p}: table has a header but zero data rows")
    df.columns = [str(c) for c in df.columns]
    return df


def _as_str(s):
    """Values as strings, missing as None; integer-valued floats print as ints ('1', not '1.0')."""
    pd = _require("pandas", "tables")
    if pd.api.types.is_float_dtype(s) and bool((s.dropna() % 1 == 0).all()):
        s = s.astype("Int64")
    return s.astype(str).where(s.notna(), None)


def _codes(categories: list[str], values) -> np.ndarray:
    """Index of each value in `categories`, -1 for unknown or missing (None)."""
    pd = _require("pandas", "tables")
    return pd.Index(categories, dtype=object).get_indexer(values.to_numpy(object)).astype(np.int64)


def _infer_task(s) -> str:
    """Strings/bools -> classification; integer-valued with <= 20 distinct values -> classification; else regression."""
    pd = _require("pandas", "tables")
    if pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
        return "classification"
    v = s.dropna()
    integral = pd.api.types.is_integer_dtype(s) or bool((v % 1 == 0).all())
    return "classification" if integral and v.nunique() <= 20 else "regression"


def _check_columns(df, cols: Sequence[str], what: str) -> None:
    for c in cols:
        if c not in df.columns:
            raise DataError(f"{what} '{c}' not found{did_you_mean(c, df.columns)}; columns: {', '.join(df.columns)}")


def _check_numeric_text(df, cols: Sequence[str], path) -> None:
    """A column whose cells are numbers but for a few (>= 95% of at least 10 values parse) is a numeric column
    with a typo, not a categorical one: one DataError naming the column, row (the header is row 1) and value."""
    pd = _require("pandas", "tables")
    for c in cols:
        s = df[c].dropna()
        if len(s) < 10:
            continue
        num = pd.to_numeric(s.astype(str).str.strip(), errors="coerce")
        bad = num.isna()
        if 0 < int(bad.sum()) <= 0.05 * len(s):
            i = bad.to_numpy().nonzero()[0][0]
            raise DataError(f"{path}: column '{c}', row {int(s.index[i]) + 2}: {s.iloc[i]!r} is not a number, but "
                            f"{int((~bad).sum())} of its {len(s)} values are; fix the cell (or leave it empty for "
                            "missing)")


def table_meta(target: str, task: str, numeric: list[str], cat_cols: list[str], categorical: str,
               categories: list[list[str]], mean: np.ndarray, std: np.ndarray, classes) -> dict:
    """A table's meta: everything transform_table_rows and predict need (the in-memory and streamed paths alike)."""
    meta = {
        "loader": "table", "target": target, "task": task, "numeric": numeric, "categorical": cat_cols,
        "categorical_mode": categorical, "categories": categories,
        "mean": mean.tolist(), "std": std.tolist(), "classes": classes,
        "feature_names": numeric + ([] if categorical == "embed"
                                    else [f"{c}={v}" for c, cats in zip(cat_cols, categories) for v in cats]),
    }
    if categorical == "embed":
        meta["cat_cardinalities"] = [len(c) + 1 for c in categories]  # index 0 = unknown/missing
    return meta


def _train_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NaN-aware per-column mean and population std; an all-missing column gets 0/1, a constant one std 1."""
    ok = ~np.isnan(x)
    cnt = ok.sum(0)
    mean = np.where(ok, x, 0.0).sum(0) / np.maximum(cnt, 1)
    std = np.sqrt((np.where(ok, x - mean, 0.0) ** 2).sum(0) / np.maximum(cnt, 1))
    return mean, np.where((cnt == 0) | (std == 0), 1.0, std)


def transform_table_rows(meta: dict, df) -> dict[str, torch.Tensor]:
    """Encode rows exactly as at training: {"x": float32 (N,F)}, + "x_cat" int64 (N,C) in embed mode,
    + "y" when the target column is present and complete.

    Numeric: missing -> train mean, then (v - mean) / std. Categorical: one-hot over train categories
    (unknown/missing -> all zeros) or codes 1..K (0 = unknown/missing).
    """
    pd = _require("pandas", "tables")
    _check_columns(df, meta["numeric"] + meta["categorical"], "input column")
    n = len(df)
    num = np.zeros((n, 0))
    if meta["numeric"]:
        num = df[meta["numeric"]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    mean, std = np.asarray(meta["mean"], np.float64), np.asarray(meta["std"], np.float64)
    num = (np.where(np.isnan(num), mean, num) - mean) / std
    codes = [_codes(cats, _as_str(df[c])) + 1
             for c, cats in zip(meta["categorical"], meta["categories"])]
    out: dict[str, torch.Tensor] = {}
    if meta["categorical_mode"] == "embed":
        out["x"] = torch.from_numpy(num.astype(np.float32))
        out["x_cat"] = torch.from_numpy(np.stack(codes, 1) if codes else np.zeros((n, 0), np.int64))
    else:
        onehot = [(k[:, None] == np.arange(1, len(cats) + 1)[None]).astype(np.float64)
                  for k, cats in zip(codes, meta["categories"])]
        out["x"] = torch.from_numpy(np.concatenate([num, *onehot], 1).astype(np.float32))
    t = meta["target"]
    if t in df.columns and bool(df[t].notna().all()):
        if meta["task"] == "classification":
            y = _codes(meta["classes"], _as_str(df[t]))
            if (y < 0).any():
                bad = _as_str(df[t])[y < 0].iloc[0]
                raise DataError(f"target '{t}': label '{bad}' was not seen in training; known: {', '.join(meta['classes'])}")
            out["y"] = torch.from_numpy(y)
        else:
            out["y"] = torch.from_numpy(pd.to_numeric(df[t], errors="coerce").to_numpy(np.float32).reshape(-1, 1))
    return out


@registered("table", "a CSV or Parquet table with a target column", "classification|regression", "path: path=, target=")
def table(*, path: PathLike, target: str, task: str | None = None, categorical: str = "onehot",
          drop: Sequence[str] | None = None, val_fraction: float = 0.1, test_fraction: float = 0.2,
          seed: int = 0, missing_target: str = "error", resample: str | None = None,
          resample_ratio: float = 1.0, in_memory="auto", memory_budget: float | None = None) -> DataBundle:
    """Keys: "x" float32 (N,F) [+ "x_cat" int64 (N,C) with categorical="embed"], "y" int64 (N,) or float32 (N,1).

    A missing target is an error naming the row unless missing_target="drop" (those rows are then left out).
    resample="under"|"over" (classification): the training split only, by lamina.data.imbalance, to a majority /
    minority ratio of `resample_ratio`; val and test keep the file's class rates. meta (what
    `transform_table_rows` needs): target, task, numeric, categorical, categorical_mode, categories, mean, std,
    feature_names, classes, cat_cardinalities (embed); classification adds class_counts (of the training split,
    after resampling) and resample. A Parquet or CSV file whose frame would exceed `memory_budget` (GB;
    in_memory=auto) or in_memory=false is streamed instead (lamina.data.tablestream): same split, statistics and
    encoding.
    """
    from lamina.data.imbalance import check_resample
    from lamina.data.imbalance import resample as resample_split

    from lamina.data.outofcore import choose_in_memory
    from lamina.data.tablestream import csv_decoded_bytes, parquet_decoded_bytes, stream_table

    pd = _require("pandas", "tables")
    if task not in (None, "classification", "regression"):
        raise DataError(f"task: expected 'classification', 'regression' or None (auto), got {task!r}")
    if categorical not in ("onehot", "embed"):
        raise DataError(f"categorical: expected 'onehot' or 'embed', got {categorical!r}")
    if missing_target not in ("error", "drop"):
        raise DataError(f"missing_target: expected 'error' or 'drop', got {missing_target!r}")
    resample, resample_ratio = check_resample(resample, resample_ratio)
    drop = [drop] if isinstance(drop, str) else list(drop or [])
    # how big the frame would be: Parquet's footer says; a CSV's line breaks are counted (one bounded read)
    size = parquet_decoded_bytes(_existing_file(path, "table file"))
    size = csv_decoded_bytes(path) if size is None else size
    why = None
    if size is not None:
        keep, why = choose_in_memory(size, in_memory, memory_budget)
        if not keep:
            return stream_table(path, target, task, categorical, drop, val_fraction, test_fraction, seed,
                                missing_target, resample, why)
    df = _read_table(path)
    _check_columns(df, drop, "drop column")
    _check_columns(df, [target], "target column")
    features = [c for c in df.columns if c != target and c not in drop]
    if not features:
        raise DataError(f"{path}: no feature columns left besides target '{target}'")
    _check_numeric_text(df, [c for c in features if not pd.api.types.is_numeric_dtype(df[c])], path)
    missing = df[target].isna()
    if bool(missing.all()):
        raise DataError(f"{path}: target column '{target}' has no values")
    if bool(missing.any()) and missing_target == "error":
        rows = (missing.to_numpy().nonzero()[0] + 2).tolist()  # spreadsheet rows: the header is row 1
        raise DataError(f"{path}: target '{target}' is missing (empty or NaN) in {len(rows)} row(s), first row "
                        f"{rows[0]}; fill them, or pass missing_target=drop (data.missing_target=drop) to leave "
                        "those rows out")
    df = df[~missing].reset_index(drop=True)
    task = task or _infer_task(df[target])
    numeric = [c for c in features if pd.api.types.is_numeric_dtype(df[c])]
    cat_cols = [c for c in features if c not in numeric]

    if task == "classification":
        labels = _as_str(df[target])
        if pd.api.types.is_numeric_dtype(df[target]):  # numeric labels in numeric order: 2 before 10
            classes = _as_str(pd.Series(np.sort(df[target].unique()))).tolist()
        else:
            classes = sorted(set(labels))
        if len(classes) < 2:
            raise DataError(f"{path}: target '{target}' has a single class '{classes[0]}'; classification needs at least 2")
        y_codes = torch.from_numpy(_codes(classes, labels))
        split = split_indices(len(df), val_fraction, test_fraction, seed, stratify=y_codes)
    else:
        classes = None
        if not pd.api.types.is_numeric_dtype(df[target]):
            raise DataError(f"{path}: regression target '{target}' must be numeric, got dtype {df[target].dtype}")
        split = split_indices(len(df), val_fraction, test_fraction, seed)

    train_rows = df.iloc[split[0].numpy()]
    num_train = train_rows[numeric].to_numpy(np.float64, na_value=np.nan) if numeric else np.zeros((len(train_rows), 0))
    mean, std = _train_stats(num_train)
    categories = [sorted(set(_as_str(train_rows[c]).dropna())) for c in cat_cols]
    meta = table_meta(target, task, numeric, cat_cols, categorical, categories, mean, std, classes)
    tensors = transform_table_rows(meta, df)
    train, val, test = apply_split(tensors, split)
    if resample is not None:
        if task != "classification":
            raise DataError(f"resample: '{resample}' sampling balances classes; target '{target}' is a {task} target")
        train = resample_split(train, resample, resample_ratio, seed)
    if task == "classification":
        meta["class_counts"] = torch.bincount(train.y, minlength=len(classes)).tolist()
        meta["resample"] = {"mode": resample, "ratio": resample_ratio} if resample else None
    bundle = DataBundle("table", train, val, test, task, (tensors["x"].shape[1],),
                        len(classes) if classes else None, classes, meta)
    if why:
        bundle.extras["data_path"] = why
    return bundle


# ------------------------------------------------------------------------------------------- images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".bmp")
_GRAY_MODES = ("1", "L", "LA")


def _open_image(Image, f: Path):
    try:
        im = Image.open(f)
        im.load()
        return im
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{f}: cannot read image ({type(e).__name__}: {e})") from None


def _decode_images(Image, paths: Sequence[Path], hw: tuple[int, int], gray: bool) -> np.ndarray:
    """Decode, convert ("L" or "RGB") and resize (bilinear) to (H, W); uint8 (N, H, W, C)."""
    h, w = hw
    out = np.empty((len(paths), h, w, 1 if gray else 3), np.uint8)
    for i, f in enumerate(paths):
        im = _open_image(Image, f).convert("L" if gray else "RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.BILINEAR)
        out[i] = np.asarray(im, np.uint8).reshape(h, w, -1)
    return out


def _to_chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def _hw(size) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, int) and v > 0 for v in hw):
        raise DataError(f"size: expected a positive int or [height, width], got {size!r}")
    return hw  # type: ignore[return-value]


def load_image_files(paths: Sequence[PathLike], meta: dict) -> torch.Tensor:
    """Images for predict, treated like training ones: mode meta["grayscale"], resized to meta["image_size"], /255."""
    Image = _require("PIL.Image", "images", "Pillow")
    files = [_existing_file(p, "image file") for p in paths]
    return _to_chw(_decode_images(Image, files, tuple(meta["image_size"]), bool(meta["grayscale"])))


@registered("image_folder", "images in one sub-folder per class (PNG/JPEG/PGM/BMP)", "classification", "path: path=")
def image_folder(*, path: PathLike, size: int | Sequence[int] | None = None, grayscale: bool | None = None,
                 val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0, in_memory="auto",
                 memory_budget: float | None = None, num_workers: int | None = None,
                 decode_cache="auto") -> DataBundle:
    """x: float32 (N, C, H, W) in [0, 1] (C = 1 if grayscale else 3); y: int64 index of the sorted class folder.

    size=None keeps the first image's size and requires all to match; grayscale=None means "all images are
    gray". meta: image_size [H, W], grayscale, channels, classes, pixel_max — all `load_image_files` needs.
    in_memory="auto" decodes everything up front when the float32 tensors fit `memory_budget` (GB; default a
    quarter of RAM), else the splits stay files (lamina.data.outofcore.ImageFiles) decoded batch by batch in
    loader workers (num_workers of them; default all cores but one); extras["data_path"] says which and why.
    decode_cache=auto|true|false: streamed splits keep each image decoded once, as uint8, in a temp file (TMPDIR)
    read back in later epochs (auto: when the disk has room); see lamina.data.outofcore.DecodeCache.
    """
    from lamina.data.outofcore import (ImageFiles, check_decode_cache, check_workers, choose_in_memory,
                                       human_bytes, image_decoded_bytes, resolve_decode_cache)

    num_workers = check_workers(num_workers)
    decode_cache = check_decode_cache(decode_cache)

    Image = _require("PIL.Image", "images", "Pillow")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(class_dirs) < 2:
        raise DataError(f"{root}: expected one sub-folder per class (at least 2), found {len(class_dirs)}")
    files, labels = [], []
    for ci, d in enumerate(class_dirs):
        imgs = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not imgs:
            raise DataError(f"{d}: class folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        files += imgs
        labels += [ci] * len(imgs)
    # Header pass (cheap, no decoding): modes and sizes decide grayscale and the target size.
    heads = []
    for f in files:
        try:
            with Image.open(f) as im:
                heads.append((im.mode, im.size))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{f}: cannot read image ({type(e).__name__}: {e})") from None
    if size is None:
        w0, h0 = heads[0][1]
        for f, (_, (w, h)) in zip(files, heads):
            if (w, h) != (w0, h0):
                raise DataError(f"{f}: image is {h}x{w} (HxW) but {files[0]} is {h0}x{w0}; "
                                f"pass size= (e.g. size={h0}) to resize all")
        hw = (h0, w0)
    else:
        hw = _hw(size)
    gray = all(m in _GRAY_MODES for m, _ in heads) if grayscale is None else bool(grayscale)
    keep, why = choose_in_memory(image_decoded_bytes(len(files), hw, gray), in_memory, memory_budget)
    class_names = [d.name for d in class_dirs]
    meta = {"loader": "image_folder", "image_size": list(hw), "grayscale": gray, "channels": 1 if gray else 3,
            "pixel_max": 255.0, "classes": class_names}
    y = torch.tensor(labels, dtype=torch.int64)
    if keep:
        x = _to_chw(_decode_images(Image, files, hw, gray))
        bundle = _classification_bundle("image_folder", {"x": x, "y": y}, class_names, meta, val_fraction,
                                        test_fraction, seed)
    else:  # the same stratified split as the in-memory path, over files instead of tensors
        split = split_indices(len(y), val_fraction, test_fraction, seed, stratify=y)
        cache_bytes = image_decoded_bytes(len(files), hw, gray) // 4  # uint8, every split
        decode_cache = resolve_decode_cache(decode_cache, cache_bytes)
        why += (f"; each image decoded once, then read as uint8 from a {human_bytes(cache_bytes)} temp-file cache"
                if decode_cache else "; decoded every epoch (no decode cache)")
        train, val, test = (ImageFiles(files, y, hw, gray, num_workers, decode_cache).subset(s) if len(s) else None
                            for s in split)
        bundle = DataBundle("image_folder", train, val, test, "classification", (1 if gray else 3, *hw),
                            len(class_names), class_names, meta)
    bundle.extras["data_path"] = why
    return bundle
