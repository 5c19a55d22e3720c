"""Under- and over-sampling of a training split by class, for imbalanced classification.

    resample_indices(y, "under", ratio=1.0, seed=0)   every class cut to ratio x the smallest class (no repeats)
    resample_indices(y, "over", ratio=1.0, seed=0)    every class repeated up to (the largest class / ratio)

`ratio` is the largest-to-smallest class ratio left after resampling: 1.0 balances the classes exactly, 10.0 leaves
the majority 10 times the minority. Undersampling keeps a seeded random subset of each large class (Dal Pozzolo et
al. 2015 study it on the credit-card fraud data); oversampling keeps every row once and draws the extra copies of
each small class with replacement (random oversampling; SMOTE-like synthesis is out of scope: it invents rows).
Indices come back sorted, so the order of the file (time, for transaction data) is kept and repeats sit together.

Only the training split is ever resampled (val and test keep the true class rates: metrics at low prevalence
are only meaningful at the real prevalence). Why not imbalanced-learn: these are ten lines of torch indexing over
a label tensor, and a dependency would pull its scikit-learn version pin into every install.
"""

from __future__ import annotations

import math

import torch

from lamina.data.base import TensorData
from lamina.errors import DataError

MODES = ("under", "over")


def check_resample(mode, ratio) -> tuple[str | None, float]:
    """(mode or None, ratio) checked; a bad value is one DataError line naming the option."""
    if mode in (None, "none", False):
        return None, 1.0
    if mode not in MODES:
        raise DataError(f"resample: expected 'under', 'over' or none, got {mode!r}")
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise DataError(f"resample_ratio: expected a number >= 1 (majority rows per minority row), got {ratio!r}") from None
    if not math.isfinite(r) or r < 1.0:
        raise DataError(f"resample_ratio: expected a number >= 1 (majority rows per minority row), got {ratio!r}")
    return mode, r


def resample_indices(y: torch.Tensor, mode: str, ratio: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Sorted int64 indices into `y` (class labels) after under- or over-sampling; see the module docstring."""
    mode, ratio = check_resample(mode, ratio)
    y = torch.as_tensor(y).reshape(-1)
    if mode is None:
        return torch.arange(len(y))
    classes, counts = torch.unique(y, return_counts=True)
    if len(classes) < 2:
        raise DataError(f"resample: the training split has a single class ({classes.tolist()}); nothing to balance")
    g = torch.Generator().manual_seed(int(seed) + 104_729)  # independent of the split's own permutation
    keep = []
    for c, n in zip(classes.tolist(), counts.tolist()):
        idx = torch.nonzero(y == c).reshape(-1)
        if mode == "under":
            cap = min(n, max(1, round(ratio * int(counts.min()))))
            keep.append(idx[torch.randperm(n, generator=g)[:cap]])
        else:
            target = max(n, round(int(counts.max()) / ratio))
            extra = idx[torch.randint(0, n, (target - n,), generator=g)]
            keep += [idx, extra]
    return torch.cat(keep).sort().values


def resample(data: TensorData, mode: str | None, ratio: float = 1.0, seed: int = 0) -> TensorData:
    """The split with its rows under- or over-sampled by data.y (unchanged when mode is None)."""
    if mode is None:
        return data
    return data.subset(resample_indices(data.y, mode, ratio, seed))


__all__ = ["MODES", "check_resample", "resample", "resample_indices"]
