"""Parquet tables bigger than memory: the `table` data set's encoding, applied batch by batch while streaming.

The in-memory `table` path reads the whole file into pandas. Here only the target column is read whole (one
column: the split, the task and the classes need all labels, and the split must be the very one the in-memory
path draws); the features are read with pyarrow.parquet.ParquetFile.iter_batches. A first streaming pass fits
the training split's statistics (means and stds merged batch by batch with Chan's formula, float64; category
sets); then every batch goes through `transform_table_rows` with that meta, the same code the in-memory path
and `predict` use, so features agree with the in-memory tensors up to float64 rounding of the statistics.

Training order: each epoch visits the row groups in a seeded random order and shuffles rows within a window of
`shuffle_rows` rows (a shuffle buffer: the file is read sequentially, never randomly). Evaluation reads in file
order, which is the in-memory split's order (split indices are sorted), so eval batches match exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from lamina.data.base import DataBundle
from lamina.data.splits import split_indices
from lamina.errors import DataError

_ROWS = 65536  # rows per Arrow record batch read


def parquet_decoded_bytes(path) -> int | None:
    """What the in-memory path would hold: rows x columns x 8 bytes (pandas float64/object slots); None if the
    file is not Parquet."""
    from lamina.data.files import _require

    p = Path(path).expanduser()
    if p.suffix.lower() not in (".parquet", ".pq") or not p.is_file():
        return None
    pq = _require("pyarrow.parquet", "tables", "pyarrow")
    try:
        md = pq.ParquetFile(p).metadata
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{p}: cannot read Parquet metadata ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]})") from None
    return int(md.num_rows) * int(md.num_columns) * 8


def _pandas_index_columns(schema) -> set[str]:
    """Columns pandas stored its index in (to_parquet of a non-default index): read_parquet makes them the index,
    not features, so the streamed path leaves them out too."""
    import json

    try:
        meta = json.loads((schema.metadata or {}).get(b"pandas", b"{}"))
        return {c for c in meta.get("index_columns", []) if isinstance(c, str)}
    except (ValueError, AttributeError):
        return set()


class TableStream:
    """A split of a streamed table: its file rows (ascending), labels, and the fitted meta to encode with."""

    def __init__(self, path: Path, meta: dict, rows: np.ndarray, y: torch.Tensor, n_file_rows: int):
        self.path, self.meta, self.rows, self.n_file_rows = path, meta, rows, n_file_rows
        self.tensors = {"y": y}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def y(self) -> torch.Tensor:
        return self.tensors["y"]

    @property
    def x(self):
        raise DataError("this table split is streamed from Parquet (data.in_memory=false or over "
                        "data.memory_budget); this step needs it in memory: pass data.in_memory=true")

    def subset(self, idx: torch.Tensor) -> TableStream:
        idx = idx.sort().values
        return TableStream(self.path, self.meta, self.rows[idx.numpy()], self.y[idx], self.n_file_rows)

    def member(self) -> np.ndarray:
        m = np.zeros(self.n_file_rows, bool)
        m[self.rows] = True
        return m


def _row_groups(path: Path):
    from lamina.data.files import _require

    pq = _require("pyarrow.parquet", "tables", "pyarrow")
    pf = pq.ParquetFile(path)
    sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    return pf, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _batches(path: Path, columns: list[str], order=None):
    """(first file row, pandas frame) per record batch, row groups in `order` (default: file order)."""
    pf, starts = _row_groups(path)
    for g in (range(len(starts) - 1) if order is None else order):
        start = int(starts[g])
        for rb in pf.iter_batches(batch_size=_ROWS, row_groups=[int(g)], columns=columns):
            df = rb.to_pandas()
            df.columns = [str(c) for c in df.columns]
            yield start, df
            start += len(df)


def stream_table(path, target: str, task, categorical: str, drop: list[str], val_fraction: float,
                 test_fraction: float, seed: int, missing_target: str, resample, why: str) -> DataBundle:
    """The `table` data set for a Parquet file over the memory budget (options as in lamina.data.files.table)."""
    from lamina.data.files import _as_str, _codes, _infer_task, _require

    pd = _require("pandas", "tables")
    pa = _require("pyarrow", "tables")
    p = Path(path).expanduser()
    if resample is not None:
        raise DataError("resample: balancing classes needs the table in memory; pass data.in_memory=true or "
                        "drop resample")
    pf, _ = _row_groups(p)
    schema = pf.schema_arrow
    columns = [str(n) for n in schema.names if str(n) not in _pandas_index_columns(schema)]
    for c in [target, *drop]:
        if c not in columns:
            raise DataError(f"column '{c}' not found; columns: {', '.join(columns)}")
    features = [c for c in columns if c != target and c not in drop]
    if not features:
        raise DataError(f"{p}: no feature columns left besides target '{target}'")
    n_file = pf.metadata.num_rows
    ycol = pf.read(columns=[target]).column(0).to_pandas()
    missing = ycol.isna().to_numpy()
    if missing.all():
        raise DataError(f"{p}: target column '{target}' has no values")
    if missing.any() and missing_target == "error":
        rows = (missing.nonzero()[0] + 2).tolist()
        raise DataError(f"{p}: target '{target}' is missing (empty or NaN) in {len(rows)} row(s), first row "
                        f"{rows[0]}; fill them, or pass missing_target=drop (data.missing_target=drop) to leave "
                        "those rows out")
    kept = (~missing).nonzero()[0].astype(np.int64)  # file row of each kept row
    ycol = ycol[~missing].reset_index(drop=True)
    task = task or _infer_task(ycol)

    def is_num(t) -> bool:  # what pandas.read_parquet would call numeric
        return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)

    numeric = [c for c in features if is_num(schema.field(c).type)]
    cat_cols = [c for c in features if c not in numeric]
    if task == "classification":
        labels = _as_str(ycol)
        classes = (_as_str(pd.Series(np.sort(ycol.unique()))).tolist() if pd.api.types.is_numeric_dtype(ycol)
                   else sorted(set(labels)))
        if len(classes) < 2:
            raise DataError(f"{p}: target '{target}' has a single class '{classes[0]}'; classification needs at "
                            "least 2")
        y_all = torch.from_numpy(_codes(classes, labels))
        split = split_indices(len(ycol), val_fraction, test_fraction, seed, stratify=y_all)
    else:
        classes = None
        if not pd.api.types.is_numeric_dtype(ycol):
            raise DataError(f"{p}: regression target '{target}' must be numeric, got dtype {ycol.dtype}")
        y_all = torch.from_numpy(ycol.to_numpy(np.float32).reshape(-1, 1))
        split = split_indices(len(ycol), val_fraction, test_fraction, seed)
    del ycol

    # Pass 1: the training split's statistics, merged batch by batch (Chan et al.'s parallel variance).
    train_member = np.zeros(n_file, bool)
    train_member[kept[split[0].numpy()]] = True
    k = len(numeric)
    cnt, mean, m2 = np.zeros(k), np.zeros(k), np.zeros(k)
    cats: list[set] = [set() for _ in cat_cols]
    for start, df in _batches(p, numeric + cat_cols):
        sel = train_member[start:start + len(df)]
        if not sel.any():
            continue
        df = df[sel]
        if k:
            x = df[numeric].to_numpy(np.float64, na_value=np.nan)
            ok = ~np.isnan(x)
            nb = ok.sum(0)
            mb = np.where(ok, x, 0.0).sum(0) / np.maximum(nb, 1)
            m2b = (np.where(ok, x - mb, 0.0) ** 2).sum(0)
            tot = cnt + nb
            delta = mb - mean
            mean = np.where(tot > 0, mean + delta * nb / np.maximum(tot, 1), 0.0)
            m2 = m2 + m2b + delta ** 2 * cnt * nb / np.maximum(tot, 1)
            cnt = tot
        for s, c in zip(cats, cat_cols):
            s.update(_as_str(df[c]).dropna())
    std = np.sqrt(m2 / np.maximum(cnt, 1))
    std = np.where((cnt == 0) | (std == 0), 1.0, std)
    categories = [sorted(s) for s in cats]
    meta = {
        "loader": "table", "target": target, "task": task, "numeric": numeric, "categorical": cat_cols,
        "categorical_mode": categorical, "categories": categories,
        "mean": mean.tolist(), "std": std.tolist(), "classes": classes,
        "feature_names": numeric + ([] if categorical == "embed"
                                    else [f"{c}={v}" for c, cs in zip(cat_cols, categories) for v in cs]),
    }
    if categorical == "embed":
        meta["cat_cardinalities"] = [len(c) + 1 for c in categories]
    train, val, test = (TableStream(p, meta, kept[s.numpy()], y_all[s], n_file) if len(s) else None for s in split)
    if task == "classification":
        meta["class_counts"] = torch.bincount(train.y, minlength=len(classes)).tolist()
        meta["resample"] = None
    n_in = len(numeric) if categorical == "embed" else len(meta["feature_names"])
    bundle = DataBundle("table", train, val, test, task, (n_in,), len(classes) if classes else None, classes, meta)
    bundle.extras["data_path"] = why
    return bundle


class StreamingTableLoader:
    """Dict batches ({"x", ["x_cat"], "y"}) encoded per Arrow batch; the generator state is the resume state."""

    def __init__(self, data: TableStream, batch_size: int, shuffle: bool = False, drop_last: bool = False,
                 seed: int = 0, device=None, transform=None, shuffle_rows: int = 1 << 18):
        self.data, self.batch_size = data, int(batch_size)
        self.shuffle, self.drop_last, self.shuffle_rows = shuffle, drop_last, int(shuffle_rows)
        self.generator = torch.Generator().manual_seed(seed)
        self.device = torch.device(device) if device is not None else None
        self.transform = transform
        self._member = data.member()

    def to(self, device) -> StreamingTableLoader:
        self.device = torch.device(device)
        return self

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _encoded(self):
        """Encoded tensors of this split's rows, one Arrow batch at a time (row groups shuffled when training)."""
        from lamina.data.files import transform_table_rows

        meta, d = self.data.meta, self.data
        cols = meta["numeric"] + meta["categorical"]
        order = None
        if self.shuffle:
            _, starts = _row_groups(d.path)
            order = torch.randperm(len(starts) - 1, generator=self.generator).tolist()
        for start, df in _batches(d.path, cols, order):
            sel = self._member[start:start + len(df)]
            if not sel.any():
                continue
            rows = start + sel.nonzero()[0]
            out = transform_table_rows(meta, df[sel])
            out["y"] = d.y[torch.from_numpy(np.searchsorted(d.rows, rows))]
            yield out

    def __iter__(self):
        buf: dict[str, list] = {}
        held = 0
        limit = self.shuffle_rows if self.shuffle else self.batch_size
        emitted = 0
        for part in self._encoded():
            for k, v in part.items():
                buf.setdefault(k, []).append(v)
            held += len(part["y"])
            if held >= limit:
                cat = {k: torch.cat(v) for k, v in buf.items()}
                if self.shuffle:
                    perm = torch.randperm(held, generator=self.generator)
                    cat = {k: v[perm] for k, v in cat.items()}
                full = held // self.batch_size * self.batch_size
                for i in range(0, full, self.batch_size):
                    yield self._out({k: v[i:i + self.batch_size] for k, v in cat.items()})
                    emitted += 1
                buf = {k: [v[full:]] for k, v in cat.items()}
                held -= full
        if held and emitted < len(self):
            cat = {k: torch.cat(v) for k, v in buf.items()}
            if self.shuffle:
                perm = torch.randperm(held, generator=self.generator)
                cat = {k: v[perm] for k, v in cat.items()}
            for i in range(0, held, self.batch_size):
                if emitted >= len(self):
                    break
                yield self._out({k: v[i:i + self.batch_size] for k, v in cat.items()})
                emitted += 1

    def _out(self, batch: dict) -> dict:
        if self.device is not None and self.device.type != "cpu":
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return self.transform(batch, self.generator) if self.transform is not None else batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
