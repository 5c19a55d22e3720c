"""Seeded train/val/test index splits, optionally stratified by label.

Why our own and not sklearn's `train_test_split`: we want one torch.Generator-seeded function that returns
three index tensors at once, stratifies per class with exact largest-remainder rounding (so split sizes are
the same whether or not one stratifies), and reports bad fractions as a one-line DataError. The loop is over
classes, never over samples.
"""

from __future__ import annotations

import math

import torch

from lamina.data.base import TensorData
from lamina.errors import DataError

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def check_fraction(name: str, value) -> float:
    """A split fraction as float in [0, 1); anything else is a DataError naming it."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{name}: expected a number in [0, 1), got {value!r}") from None
    if not 0.0 <= f < 1.0 or math.isnan(f):
        raise DataError(f"{name}: expected a number in [0, 1), got {value!r}")
    return f


def _apportion(counts: torch.Tensor, fraction: float, total: int) -> torch.Tensor:
    """Split `total` over classes proportionally to `counts` (largest remainder; ties go to lower class ids)."""
    ideal = counts.double() * fraction
    base = ideal.floor().long()
    rest = total - int(base.sum())
    if rest > 0:
        order = torch.argsort(-(ideal - base), stable=True)
        base[order[:rest]] += 1
    return torch.minimum(base, counts)


def split_indices(
    n: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    stratify: torch.Tensor | None = None,
) -> Split:
    """Disjoint (train, val, test) int64 index tensors covering range(n), each sorted ascending.

    val/test get round(n * fraction) samples. With `stratify` (one label per sample), each class contributes
    in proportion to its size, so class frequencies match across splits up to rounding. Same seed, same split.
    """
    vf, tf = check_fraction("val_fraction", val_fraction), check_fraction("test_fraction", test_fraction)
    if vf + tf >= 1.0:
        raise DataError(f"val_fraction + test_fraction must be < 1, got {vf} + {tf} = {vf + tf}")
    n = int(n)
    if n <= 0:
        raise DataError(f"cannot split an empty data set (n={n})")
    n_test, n_val = round(n * tf), round(n * vf)
    g = torch.Generator().manual_seed(int(seed))
    if stratify is None:
        perm = torch.randperm(n, generator=g)
        test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    else:
        labels = torch.as_tensor(stratify).reshape(-1)
        if len(labels) != n:
            raise DataError(f"stratify has {len(labels)} labels for {n} samples")
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        c_test = _apportion(counts, tf, n_test)
        c_val = torch.minimum(_apportion(counts, vf, n_val), counts - c_test)
        parts: tuple[list, list, list] = ([], [], [])
        for c in range(len(classes)):
            idx = torch.nonzero(inverse == c).reshape(-1)
            idx = idx[torch.randperm(len(idx), generator=g)]
            t, v = int(c_test[c]), int(c_val[c])
            parts[0].append(idx[t + v :])
            parts[1].append(idx[t : t + v])
            parts[2].append(idx[:t])
        train, val, test = (torch.cat(p) for p in parts)
    if len(train) == 0:
        raise DataError(f"no training samples left: n={n}, val_fraction={vf}, test_fraction={tf}")
    return train.sort().values, val.sort().values, test.sort().values


def apply_split(tensors: dict[str, torch.Tensor], split: Split) -> tuple[TensorData, TensorData | None, TensorData | None]:
    """Index every tensor by each split; an empty val/test split becomes None."""
    out = [TensorData(**{k: v[idx] for k, v in tensors.items()}) if len(idx) else None for idx in split]
    return out[0], out[1], out[2]


def train_subset(data: TensorData, fraction: float, seed: int, kind: str) -> TensorData:
    """`fraction` of a training split of a data set of `kind` (its DataBundle.task): per class in proportion for
    classification data (a small subset keeps every class), a prefix for token streams (windows need
    contiguous text), a seeded random sample otherwise."""
    n = len(data)
    if kind == "language_modeling":
        return data.subset(torch.arange(max(1, int(n * fraction))))
    g = torch.Generator().manual_seed(seed + 7919)  # independent of the split's own permutation
    y = data.tensors.get("y")
    if kind == "classification" and y is not None and y.ndim == 1 and not y.is_floating_point():
        keep = []
        for c in torch.unique(y):
            idx = (y == c).nonzero().flatten()
            keep.append(idx[torch.randperm(len(idx), generator=g)[:max(1, round(len(idx) * fraction))]])
        return data.subset(torch.cat(keep).sort().values)
    return data.subset(torch.randperm(n, generator=g)[:max(1, int(n * fraction))].sort().values)
