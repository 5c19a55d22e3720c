"""User-item interactions as implicit feedback, split leave-last-out; per-user item sets, negative sampling.

A file of interactions, one row each (CSV or TSV, gzip allowed): a user column, an item column and, optionally, a
time column. Every row is a positive interaction (a rating of any value, a click, a purchase): implicit
feedback. Each (user, item) pair counts once; a repeat keeps its first occurrence in time.

Leave-last-out (the protocol of He et al. 2017 and Kang & McAuley 2018): each user's interactions in order (by
the time column, ties and the no-time case by file order), the last one is the test split, the one before it
the validation split, the rest train. So every user needs at least 3 interactions; a file with fewer for some
user is refused in one line unless `min_user_interactions` drops them. Items are every item of the file, so an
item seen only in a held-out split stays rankable (with no training signal).

Splits hold {"user": int64 (N,), "item": int64 (N,)} as contiguous indices; the bundle's extras map them back to
the file's ids (`user_ids`, `item_ids`) and titles (`titles`, from `items_path` when given). meta: n_users,
n_items and how the file was read.

`UserItems` holds each user's items as CSR (sorted per user). On it, vectorised over a batch and without any
per-sample Python:
* `sample_negatives`: uniform over the items a user has NOT interacted with, exactly (never a positive): the
  r-th non-positive item of user u is r + #{i : p_i - i <= r} over u's sorted positives p_0 < p_1 < ..., one
  `searchsorted` for the whole batch.
* `padded`: each user's items as a (B, L) index tensor padded with n_items, what ranking metrics mask out.
`NegativeSampler` and `SeenItems` are batched transforms for lamina.data.loader.InMemoryLoader (drawing from its
seeded generator, so a resumed run draws the same negatives).
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import numpy as np
import torch

from lamina.data.base import DataBundle, TensorData
from lamina.data.builtin import datasets_root
from lamina.data.files import _require, registered
from lamina.errors import ConfigError, DataError, did_you_mean

PathLike = str | Path
MIN_PER_USER = 3  # train + validation + test
MAX_ROWS = 50_000_000  # ~1.2 GB of int64 indices: beyond this, subsample the file first


# ----- reading ---------------------------------------------------------------------------------------------
def _open_text(p: Path):
    with open(p, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8", newline="") if gz else open(
        p, encoding="utf-8", newline="")


def _sep(p: Path) -> str:
    name = p.name.lower().removesuffix(".gz")
    return "\t" if name.endswith(".tsv") else ","


def read_header(p: Path) -> list[str]:
    """The header row of a CSV/TSV file (gzip or plain); one-line DataErrors for empty or duplicated columns."""
    try:
        with _open_text(p) as f:
            row = next(csv.reader(f, delimiter=_sep(p)), None)
    except (OSError, UnicodeDecodeError, EOFError, csv.Error) as e:
        raise DataError(f"{p}: cannot read ({type(e).__name__}: {e})") from None
    if not row or not any(c.strip() for c in row):
        raise DataError(f"{p}: empty file; expected a header row (e.g. user_id,item_id,timestamp) and one row per "
                        "interaction")
    cols = [c.strip() for c in row]
    seen: set[str] = set()
    for c in cols:
        if c in seen:
            raise DataError(f"{p}: column '{c}' appears twice in the header; column names must be unique")
        seen.add(c)
    return cols


def _column(p: Path, option: str, name: str, cols: list[str]) -> str:
    if name not in cols:
        raise DataError(f"data.{option}: column '{name}' not found in {p}{did_you_mean(name, cols)}; columns: "
                        f"{', '.join(cols)}")
    return name


def _times(values, p: Path, col: str) -> np.ndarray:
    """Numbers as they are (Unix seconds, ranks); otherwise dates/times parsed to int64 nanoseconds."""
    pd = _require("pandas", "tables")
    num = pd.to_numeric(values, errors="coerce")
    if not num.isna().any():
        return num.to_numpy(np.float64)
    try:
        t = pd.to_datetime(values, errors="coerce", format="mixed")
    except (ValueError, TypeError):
        t = pd.Series(pd.NaT, index=values.index)
    bad = np.flatnonzero(t.isna().to_numpy() & num.isna().to_numpy())
    if len(bad):
        raise DataError(f"{p}: data row {int(bad[0]) + 1}: '{values.iloc[bad[0]]}' in time column '{col}' is neither a "
                        f"number nor a date ({len(bad)} such row(s)); fix them or set data.time_col=null to use the "
                        "file order")
    return t.astype("int64").to_numpy(np.float64)


def read_interactions(path: PathLike, user_col: str = "user_id", item_col: str = "item_id",
                      time_col: str | None = "timestamp"):
    """(users, items, times or None) as (str array, str array, float64 array) in file order, checked."""
    pd = _require("pandas", "tables")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: interactions file not found")
    cols = read_header(p)
    use = [_column(p, "user_col", user_col, cols), _column(p, "item_col", item_col, cols)]
    if time_col:
        use.append(_column(p, "time_col", time_col, cols))
    try:
        df = pd.read_csv(p, sep=_sep(p), usecols=use, dtype=str, keep_default_na=False, na_values=[""],
                         compression="infer", skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError, EOFError) as e:
        raise DataError(f"{p}: cannot parse: {str(e).splitlines()[0]}") from None
    if len(df) == 0:
        raise DataError(f"{p}: a header but no interactions; expected one row per interaction")
    if len(df) > MAX_ROWS:
        raise DataError(f"{p}: {len(df):,} interactions; at most {MAX_ROWS:,} (subsample the file)")
    for c in (user_col, item_col):
        bad = np.flatnonzero(df[c].isna().to_numpy())
        if len(bad):
            raise DataError(f"{p}: data row {int(bad[0]) + 1}: empty id in column '{c}' ({len(bad)} such row(s)); "
                            "every interaction needs a user and an item")
    nan_ids = {c: np.flatnonzero(df[c].str.strip().str.lower().isin(("nan", "null", "none")).to_numpy())
               for c in (user_col, item_col)}
    for c, bad in nan_ids.items():
        if len(bad):
            raise DataError(f"{p}: data row {int(bad[0]) + 1}: id '{df[c].iloc[bad[0]]}' in column '{c}' is a missing "
                            f"value ({len(bad)} such row(s)); every interaction needs a user and an item")
    times = _times(df[time_col], p, time_col) if time_col else None
    return df[user_col].str.strip().to_numpy(object), df[item_col].str.strip().to_numpy(object), times


def _ids(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique ids, index of each value); numeric-looking ids sort as numbers (2 before 10)."""
    uniq, inv = np.unique(values.astype(str), return_inverse=True)
    if len(uniq) and all(u.isdigit() for u in uniq):
        order = np.argsort([int(u) for u in uniq], kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        uniq, inv = uniq[order], rank[inv]
    return uniq, inv.astype(np.int64)


def read_titles(path: PathLike, item_col: str, title_col: str, item_ids: np.ndarray) -> list[str]:
    """The title of each item (by id) from an items table; '' for items it does not list."""
    pd = _require("pandas", "tables")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: items file (data.items_path) not found")
    cols = read_header(p)
    _column(p, "item_col", item_col, cols)
    _column(p, "title_col", title_col, cols)
    df = pd.read_csv(p, sep=_sep(p), usecols=[item_col, title_col], dtype=str, keep_default_na=False)
    titles = dict(zip(df[item_col].str.strip(), df[title_col]))
    return [titles.get(i, "") for i in item_ids.tolist()]


# ----- leave-last-out ------------------------------------------------------------------------------------------
def leave_last_out(user: np.ndarray, item: np.ndarray, times: np.ndarray | None, n_users: int):
    """Sort by (user, time, file order), keep each (user, item) once (first in time), and cut each user's last
    interaction to test and the one before to validation. Returns (train, val, test) index arrays into the
    sorted, deduplicated order, that order (indices into the input) and the number of repeats dropped."""
    n = len(user)
    row = np.arange(n)
    order = np.lexsort((row, times if times is not None else row, user))  # stable: ties keep file order
    u, i = user[order], item[order]
    key = u * (int(item.max()) + 1) + i
    _, first = np.unique(key, return_index=True)  # the first occurrence in (user, time) order
    keep = np.sort(first)
    dropped = n - len(keep)
    order, u = order[keep], u[keep]
    counts = np.bincount(u, minlength=n_users)
    ends = np.cumsum(counts)
    test = ends[counts > 0] - 1
    val = ends[counts > 1] - 2
    train = np.ones(len(u), bool)
    train[test] = False
    train[val] = False
    return np.flatnonzero(train), val, test, order, dropped


@registered("interactions", "user-item interactions (CSV/TSV, gzip ok) as implicit feedback, leave-last-out by time "
            "or file order; default: MovieTweetings 100K 5-core (4,333 users, 2,414 movies)", "recommendation",
            "datasets/movietweetings, or path=")
def interactions(*, path: PathLike | None = None, user_col: str = "user_id", item_col: str = "item_id",
                 time_col: str | None = "timestamp", items_path: PathLike | None = None, title_col: str = "title",
                 min_user_interactions: int | None = None, seed: int = 0) -> DataBundle:
    """`seed` is accepted for a uniform interface; leave-last-out draws nothing at random."""
    if path is None:
        root = datasets_root() / "movietweetings"
        path, items_path = root / "ratings.csv.gz", items_path if items_path is not None else root / "movies.csv"
    p = Path(path).expanduser()
    if min_user_interactions is not None and (not isinstance(min_user_interactions, int) or isinstance(
            min_user_interactions, bool) or min_user_interactions < MIN_PER_USER):
        raise ConfigError(f"data.min_user_interactions: expected an integer >= {MIN_PER_USER} (train, validation "
                          f"and test need one each), got {min_user_interactions!r}")
    users_raw, items_raw, times = read_interactions(p, user_col, item_col, time_col or None)
    user_ids, user = _ids(users_raw)
    item_ids, item = _ids(items_raw)
    # repeats are counted before any user is judged short of interactions
    pair = np.unique(user * len(item_ids) + item)
    per_user = np.bincount(pair // len(item_ids), minlength=len(user_ids))
    short = np.flatnonzero(per_user < (min_user_interactions or MIN_PER_USER))
    users_dropped = 0
    if len(short) and min_user_interactions is None:
        u0 = int(short[0])
        raise DataError(f"{p}: user '{user_ids[u0]}' has {int(per_user[u0])} distinct interaction(s) ({len(short)} "
                        f"user(s) have fewer than {MIN_PER_USER}); leave-last-out needs {MIN_PER_USER} per user "
                        f"(train, validation, test): drop them with data.min_user_interactions={MIN_PER_USER}")
    if len(short):
        keep = ~np.isin(user, short)
        if not keep.any():
            raise DataError(f"{p}: no user has {min_user_interactions} distinct interactions; lower "
                            "data.min_user_interactions")
        users_dropped = len(short)
        users_raw, items_raw = users_raw[keep], items_raw[keep]
        times = times[keep] if times is not None else None
        user_ids, user = _ids(users_raw)
        item_ids, item = _ids(items_raw)
    n_users, n_items = len(user_ids), len(item_ids)
    if n_items < 2:
        raise DataError(f"{p}: {n_items} distinct item(s); ranking needs at least 2")
    tr, va, te, order, repeats = leave_last_out(user, item, times, n_users)
    u, i = torch.from_numpy(user[order]), torch.from_numpy(item[order])

    def split(idx):
        idx = torch.from_numpy(idx)
        return TensorData(user=u[idx], item=i[idx])

    train, val, test = split(tr), split(va), split(te)
    full = UserItems.from_pairs(train.tensors["user"], train.tensors["item"], n_users, n_items)
    if bool((full.counts >= n_items).any()):
        u0 = int(torch.nonzero(full.counts >= n_items)[0])
        raise DataError(f"{p}: user '{user_ids[u0]}' interacted with every item in training; negative sampling "
                        "needs at least one item a user has not seen")
    cold = n_items - int(torch.unique(train.tensors["item"]).numel())
    titles = read_titles(items_path, item_col, title_col, item_ids) if items_path is not None else None
    meta = {"loader": "interactions", "path": str(p), "n_users": n_users, "n_items": n_items,
            "interactions": len(order), "order": f"time column '{time_col}'" if time_col else "file order",
            "repeats_dropped": int(repeats), "users_dropped": int(users_dropped), "cold_items": cold,
            "items_path": str(items_path) if items_path is not None else None,
            "protocol": "leave-last-out: last interaction = test, second-to-last = validation"}
    extras = {"user_ids": user_ids, "item_ids": item_ids, "titles": titles}
    return DataBundle("interactions", train, val, test, "recommendation", (), None, None, meta, extras)


# ----- per-user item sets ------------------------------------------------------------------------------------
class UserItems:
    """Each user's items, CSR: items of user u are indices[indptr[u]:indptr[u+1]], sorted and distinct."""

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor, n_items: int):
        self.indptr, self.indices, self.n_items = indptr.long(), indices.long(), int(n_items)
        self.counts = self.indptr[1:] - self.indptr[:-1]
        # q_k = p_k - (rank of p_k within its user), offset by user * n_items: one sorted key array for
        # sample_negatives (non-decreasing within a user, users in increasing blocks)
        rank = torch.arange(len(self.indices)) - torch.repeat_interleave(self.indptr[:-1], self.counts)
        owner = torch.repeat_interleave(torch.arange(len(self.counts)), self.counts)
        self._qkeys = owner * self.n_items + (self.indices - rank)

    @classmethod
    def from_pairs(cls, users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int) -> "UserItems":
        users, items = users.long().cpu(), items.long().cpu()
        key = torch.unique(users * n_items + items)  # sorted, distinct pairs
        u, i = key // n_items, key % n_items
        indptr = torch.zeros(n_users + 1, dtype=torch.long)
        indptr[1:] = torch.cumsum(torch.bincount(u, minlength=n_users), 0)
        return cls(indptr, i, n_items)

    def items_of(self, user: int) -> torch.Tensor:
        return self.indices[self.indptr[user]:self.indptr[user + 1]]

    def padded(self, users: torch.Tensor) -> torch.Tensor:
        """(B, L) items of each user, L = the most any of them has, padded with n_items (an index past the end)."""
        u = users.long().cpu()
        cnt = self.counts[u]
        L = int(cnt.max()) if len(u) else 0
        pos = self.indptr[u][:, None] + torch.arange(L)[None, :]  # (B, L)
        ok = torch.arange(L)[None, :] < cnt[:, None]
        out = torch.full((len(u), L), self.n_items, dtype=torch.long)
        out[ok] = self.indices[pos[ok]]
        return out

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Whether each (user, item) (same shapes, or users (B,) against items (B, K)) is one of the user's."""
        u = users.long().cpu()
        it = items.long().cpu()
        if it.dim() == 2 and u.dim() == 1:
            u = u[:, None].expand_as(it)
        keys = torch.repeat_interleave(torch.arange(len(self.counts)), self.counts) * self.n_items + self.indices
        q = u * self.n_items + it
        pos = torch.searchsorted(keys, q).clamp(max=max(len(keys) - 1, 0))
        return (keys[pos] == q) if len(keys) else torch.zeros_like(q, dtype=torch.bool)

    def nth_unseen(self, users: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The r-th (0-based, in id order) item each user has not interacted with: users (B,), r (B, n) with
        0 <= r < n_items - counts[user] -> (B, n). With u's items p_0 < p_1 < ..., that item is r + #{k : p_k - k
        <= r} (p_k - k counts the unseen items below p_k): one searchsorted over the whole batch."""
        u = users.long().cpu()
        j = torch.searchsorted(self._qkeys, u[:, None] * self.n_items + r, right=True) - self.indptr[u][:, None]
        return r + j

    def sample_negatives(self, users: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, n) items drawn uniformly (with replacement) from those each user has not interacted with."""
        u = users.long().cpu()
        free = self.n_items - self.counts[u]  # (B,) items each user has not seen (>= 1, checked by the loader)
        r = (torch.rand(len(u), n, generator=generator, dtype=torch.float64) * free[:, None]).long()
        return self.nth_unseen(u, torch.minimum(r, free[:, None] - 1))  # rand < 1: the minimum only guards rounding


class NegativeSampler:
    """Batched loader transform: adds "neg" (B, n) items each user has not interacted with (in training)."""

    def __init__(self, seen: UserItems, n: int):
        self.seen, self.n = seen, int(n)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        neg = self.seen.sample_negatives(batch["user"], self.n, generator)
        return {**batch, "neg": neg.to(batch["user"].device)}


class SeenItems:
    """Batched loader transform for evaluation: adds "seen" (B, L), the items to leave out of each user's ranking
    (padded with n_items)."""

    def __init__(self, seen: UserItems):
        self.seen = seen

    def __call__(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        return {**batch, "seen": self.seen.padded(batch["user"]).to(batch["user"].device)}


__all__ = ["MIN_PER_USER", "NegativeSampler", "SeenItems", "UserItems", "interactions", "leave_last_out",
           "read_header", "read_interactions", "read_titles"]
