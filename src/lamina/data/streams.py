"""Continual-learning streams: one labelled data set cut into a sequence of experiences.

Two standard benchmarks (van de Ven, Tuytelaars & Tolias 2022, "Three types of incremental learning"):

- **split**: the classes are partitioned into `n` groups in a fixed order ([0, 1], [2, 3], ... by default) and
  experience t holds only group t's samples. Class-incremental: one head over every class, no task label at
  test time. Task-incremental: the task label is known, so each experience is scored among its own classes.
- **permuted**: every experience holds every class, with the pixels of each sample shuffled by one fixed,
  seeded permutation per experience (experience 0 keeps the original order). Domain-incremental: same labels,
  a new input distribution each time.

Everything is index selection or one gather on the in-memory tensors: an experience costs a copy of its share
of the data, never a Python loop over samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lamina.data.base import TensorData
from lamina.errors import ConfigError


@dataclass
class Experience:
    """One step of a stream: its splits and which classes it contains."""

    index: int
    classes: list[int]
    train: TensorData
    val: TensorData | None
    test: TensorData | None
    permutation: torch.Tensor | None = None  # permuted streams: the flat pixel order of this experience


def class_groups(num_classes: int, n: int, order: list[int] | None = None) -> list[list[int]]:
    """The classes of each experience: `order` (default 0..C-1) cut into `n` nearly equal consecutive groups."""
    order = list(range(num_classes)) if order is None else [int(c) for c in order]
    if sorted(order) != list(range(num_classes)):
        raise ConfigError(f"continual.class_order: expected each of the {num_classes} classes 0..{num_classes - 1} "
                          f"exactly once, got {order}")
    if not 1 <= n <= num_classes:
        raise ConfigError(f"continual.experiences: a split stream of {num_classes} classes allows 1..{num_classes} "
                          f"experiences (at least one class each), got {n}")
    sizes = [num_classes // n + (1 if i < num_classes % n else 0) for i in range(n)]
    out, start = [], 0
    for s in sizes:
        out.append(order[start:start + s])
        start += s
    return out


def _by_classes(data: TensorData | None, classes: list[int]) -> TensorData | None:
    if data is None:
        return None
    keep = torch.isin(data.y, torch.tensor(classes, dtype=data.y.dtype))
    return data.subset(keep.nonzero().flatten())


def split_stream(train: TensorData, val: TensorData | None, test: TensorData | None, num_classes: int, n: int,
                 order: list[int] | None = None) -> list[Experience]:
    groups = class_groups(num_classes, n, order)
    exps = []
    for i, g in enumerate(groups):
        tr = _by_classes(train, g)
        if len(tr) == 0:
            raise ConfigError(f"continual: experience {i} (classes {g}) has no training samples")
        exps.append(Experience(i, g, tr, _by_classes(val, g), _by_classes(test, g)))
    return exps


def pixel_permutations(numel: int, n: int, seed: int) -> list[torch.Tensor]:
    """n flat permutations of `numel` positions; the first is the identity (the original task)."""
    g = torch.Generator().manual_seed(int(seed) + 104729)
    return [torch.arange(numel)] + [torch.randperm(numel, generator=g) for _ in range(n - 1)]


def _permute(data: TensorData | None, perm: torch.Tensor) -> TensorData | None:
    if data is None:
        return None
    x = data.x
    px = x.reshape(len(x), -1)[:, perm].reshape(x.shape)
    return TensorData(**{**data.tensors, "x": px})


def permuted_stream(train: TensorData, val: TensorData | None, test: TensorData | None, num_classes: int, n: int,
                    seed: int = 0) -> list[Experience]:
    if n < 1:
        raise ConfigError(f"continual.experiences: expected a positive integer, got {n}")
    if not train.x.is_floating_point():
        raise ConfigError("continual.stream: permuted needs dense inputs x (images or vectors), not token ids")
    perms = pixel_permutations(train.x[0].numel(), n, seed)
    classes = list(range(num_classes))
    return [Experience(i, classes, _permute(train, p), _permute(val, p), _permute(test, p), p)
            for i, p in enumerate(perms)]


def make_stream(kind: str, train: TensorData, val: TensorData | None, test: TensorData | None, num_classes: int,
                n: int, *, order: list[int] | None = None, seed: int = 0) -> list[Experience]:
    if kind == "split":
        return split_stream(train, val, test, num_classes, n, order)
    if kind == "permuted":
        return permuted_stream(train, val, test, num_classes, n, seed)
    raise ConfigError(f"continual.stream: unknown stream '{kind}'; expected split or permuted")


__all__ = ["Experience", "class_groups", "make_stream", "permuted_stream", "pixel_permutations", "split_stream"]
