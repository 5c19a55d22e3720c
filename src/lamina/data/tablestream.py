"""Tables bigger than memory (Parquet, CSV/TSV): the `table` data set's encoding, applied batch by batch.

The in-memory `table` path reads the whole file into pandas. Here only the target column is read whole (one
column: the split, the task and the classes need all labels, and the split must be the very one the in-memory
path draws); the features are read in batches: Parquet with pyarrow.parquet.ParquetFile.iter_batches, CSV with
pandas' chunked reader (pandas, not pyarrow.csv: a column's type must be the one pandas.read_csv gives the whole
file, so a first CSV pass finds which columns are numbers in every chunk, and later passes read the others as
text, exactly as the in-memory path sees them; pyarrow.csv infers types from the first block only). A pass fits
the training split's statistics (means and stds merged batch by batch with Chan's formula, float64; category
sets); then every batch goes through `transform_table_rows` with that meta, the same code the in-memory path
and `predict` use, so features agree with the in-memory tensors up to float64 rounding of the statistics.

Training order: each epoch visits the row groups in a seeded random order and shuffles rows within a window of
`shuffle_rows` rows (a shuffle buffer: the file is read sequentially, never randomly). A CSV file is one group (text
has no index to seek by), so its rows mix within the buffer only. Evaluation reads in file order, which is the
in-memory split's order (split indices are sorted), so eval batches match exactly.
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

    def __init__(self, source, meta: dict, rows: np.ndarray, y: torch.Tensor, n_file_rows: int):
        self.source, self.meta, self.rows, self.n_file_rows = source, meta, rows, n_file_rows
        self.tensors = {"y": y}

    @property
    def path(self) -> Path:
        return self.source.path

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def y(self) -> torch.Tensor:
        return self.tensors["y"]

    @property
    def x(self):
        raise DataError("this table split is streamed from its file (data.in_memory=false or over "
                        "data.memory_budget); this step needs it in memory: pass data.in_memory=true")

    def subset(self, idx: torch.Tensor) -> TableStream:
        idx = idx.sort().values
        return TableStream(self.source, self.meta, self.rows[idx.numpy()], self.y[idx], self.n_file_rows)

    def member(self) -> np.ndarray:
        m = np.zeros(self.n_file_rows, bool)
        m[self.rows] = True
        return m


class _ParquetSource:
    """Row groups of a Parquet file: the unit of shuffling, read by pyarrow in record batches."""

    def __init__(self, path: Path):
        from lamina.data.files import _require

        pa = _require("pyarrow", "tables")
        pq = _require("pyarrow.parquet", "tables", "pyarrow")
        self.path = path
        pf = pq.ParquetFile(path)
        self.schema = pf.schema_arrow
        self.columns = [str(n) for n in self.schema.names if str(n) not in _pandas_index_columns(self.schema)]
        self.n_rows = pf.metadata.num_rows
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._is_num = lambda t: pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)

    def groups(self) -> int:
        return len(self.starts) - 1

    def target(self, name: str):
        from lamina.data.files import _require

        pq = _require("pyarrow.parquet", "tables", "pyarrow")
        return pq.ParquetFile(self.path).read(columns=[name]).column(0).to_pandas()

    def numeric(self, features: list[str]) -> list[str]:
        """What pandas.read_parquet would call numeric: the file's schema says."""
        return [c for c in features if self._is_num(self.schema.field(c).type)]

    def batches(self, columns: list[str], order=None):
        """(first file row, pandas frame) per record batch, row groups in `order` (default: file order)."""
        from lamina.data.files import _require

        pf = _require("pyarrow.parquet", "tables", "pyarrow").ParquetFile(self.path)
        for g in (range(self.groups()) if order is None else order):
            start = int(self.starts[g])
            for rb in pf.iter_batches(batch_size=_ROWS, row_groups=[int(g)], columns=columns):
                df = rb.to_pandas()
                df.columns = [str(c) for c in df.columns]
                yield start, df
                start += len(df)


def _csv_format(p: Path) -> str | None:
    """"," for .csv, "\t" for .tsv (either optionally .gz), else None."""
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return {".csv": ",", ".tsv": "\t"}.get(suffixes[-1] if suffixes else "")


class _CsvSource:
    """A CSV/TSV file (optionally gzip) read in chunks by pandas; one group (text cannot be read out of order)."""

    def __init__(self, path: Path):
        self.path, self.sep = path, _csv_format(path)
        self.columns = [str(c) for c in self._read(nrows=0).columns]
        self.n_rows = None  # known once the target column is read
        self.text: list[str] = []  # columns read as text (categorical): set by numeric()

    def _read(self, **kw):
        from lamina.data.files import _require

        pd = _require("pandas", "tables")
        try:
            return pd.read_csv(self.path, sep=self.sep, **kw)
        except pd.errors.EmptyDataError:
            raise DataError(f"{self.path}: empty file; expected a header row and data rows") from None
        except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError, EOFError) as e:
            raise DataError(f"{self.path}: cannot parse table: {str(e).splitlines()[0][:200]}") from None

    def _chunks(self, columns: list[str], text: list[str]):
        from lamina.data.files import _require

        pd = _require("pandas", "tables")
        # every column is parsed (no usecols): pandas would drop a ragged row's extra fields unseen when some are
        # left out, where the whole-file read refuses the file
        reader = self._read(dtype=dict.fromkeys(text, str), chunksize=_ROWS)
        start = 0
        with reader:
            while True:
                try:
                    df = next(reader)
                except StopIteration:
                    return
                except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError, EOFError) as e:
                    raise DataError(f"{self.path}: cannot parse table after row {start + 1}: "
                                    f"{str(e).splitlines()[0][:200]}") from None
                df.columns = [str(c) for c in df.columns]
                yield start, df[columns]
                start += len(df)

    def groups(self) -> int:
        return 1

    def target(self, name: str):
        """The target column of every row (chunks joined: a chunk of numbers and one of text make text, as in the
        whole-file read). The same pass notes which columns are numbers in every chunk, for numeric()."""
        from lamina.data.files import _require

        pd = _require("pandas", "tables")
        cols = self.columns
        self._total, self._bad = dict.fromkeys(cols, 0), dict.fromkeys(cols, 0)
        self._texty: set[str] = set()
        self._first: dict[str, tuple[int, str]] = {}
        parts = []
        for start, df in self._chunks(cols, []):
            parts.append(df[name])
            for c in cols:
                s = df[c].dropna()
                self._total[c] += len(s)
                if pd.api.types.is_numeric_dtype(df[c]):
                    continue
                self._texty.add(c)
                miss = pd.to_numeric(s.astype(str).str.strip(), errors="coerce").isna().to_numpy()
                self._bad[c] += int(miss.sum())
                if miss.any() and c not in self._first:
                    i = miss.nonzero()[0][0]
                    self._first[c] = (start + int(s.index[i] - df.index[0]), s.iloc[i])
        y = pd.concat(parts, ignore_index=True)
        self.n_rows = len(y)
        return y

    def numeric(self, features: list[str]) -> list[str]:
        """A column is numeric when pandas parsed it as numbers in every chunk (then the whole-file read does too);
        the others are read as text from now on. A text column whose cells are numbers but for a few is a typo,
        reported as the in-memory path reports it (files._check_numeric_text). Needs target() first (its pass)."""
        for c in features:  # in file column order, as the in-memory check goes
            total, bad = self._total[c], self._bad[c]
            if c in self._texty and total >= 10 and 0 < bad <= 0.05 * total:
                row, value = self._first[c]
                raise DataError(f"{self.path}: column '{c}', row {row + 2}: {value!r} is not a number, but "
                                f"{total - bad} of its {total} values are; fix the cell (or leave it empty for "
                                "missing)")
        self.text = [c for c in features if c in self._texty]
        return [c for c in features if c not in self._texty]

    def batches(self, columns: list[str], order=None):
        yield from self._chunks(columns, [c for c in self.text if c in columns])


def _source(path: Path):
    return _CsvSource(path) if _csv_format(path) else _ParquetSource(path)


def csv_decoded_bytes(path) -> int | None:
    """What the in-memory path would hold for a CSV/TSV file (optionally .gz): rows x columns x 8 bytes, rows
    counted as line breaks in one bounded read (a quoted line break counts too: an over-estimate, never under);
    None if the file is not CSV/TSV."""
    import gzip
    import zlib

    p = Path(path).expanduser()
    if _csv_format(p) is None or not p.is_file():
        return None
    ncols = len(_CsvSource(p).columns)
    lines, last = 0, b"\n"
    try:
        with (gzip.open(p, "rb") if p.suffix.lower() == ".gz" else open(p, "rb")) as f:
            while block := f.read(1 << 20):
                lines += block.count(b"\n")
                last = block[-1:]
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{p}: cannot read table ({type(e).__name__}: {e})") from None
    rows = max(0, lines - 1 + (last != b"\n"))  # the header line is not a row; a last line may lack its break
    return rows * ncols * 8


def stream_table(path, target: str, task, categorical: str, drop: list[str], val_fraction: float,
                 test_fraction: float, seed: int, missing_target: str, resample, why: str) -> DataBundle:
    """The `table` data set for a Parquet or CSV file over the memory budget (options as in
    lamina.data.files.table)."""
    from lamina.data.files import _as_str, _codes, _infer_task, _require, table_meta

    pd = _require("pandas", "tables")
    p = Path(path).expanduser()
    if resample is not None:
        raise DataError("resample: balancing classes needs the table in memory; pass data.in_memory=true or "
                        "drop resample")
    src = _source(p)
    columns = src.columns
    for c in [target, *drop]:
        if c not in columns:
            raise DataError(f"column '{c}' not found; columns: {', '.join(columns)}")
    features = [c for c in columns if c != target and c not in drop]
    if not features:
        raise DataError(f"{p}: no feature columns left besides target '{target}'")
    ycol = src.target(target)
    n_file = src.n_rows
    if n_file == 0:
        raise DataError(f"{p}: table has a header but zero data rows")
    numeric = src.numeric(features)
    cat_cols = [c for c in features if c not in numeric]
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
    for start, df in src.batches(numeric + cat_cols):
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
    meta = table_meta(target, task, numeric, cat_cols, categorical, categories, mean, std, classes)
    train, val, test = (TableStream(src, meta, kept[s.numpy()], y_all[s], n_file) if len(s) else None
                        for s in split)
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
        order, groups = None, d.source.groups()
        if self.shuffle and groups > 1:  # one group (a CSV): no draw, so a table within one buffer is shuffled
            # by the very permutation InMemoryLoader draws
            order = torch.randperm(groups, generator=self.generator).tolist()
        for start, df in d.source.batches(cols, order):
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
