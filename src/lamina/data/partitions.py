"""Client partitions of a training split for federated learning: which sample indices each client holds.

- **iid**: a seeded permutation cut into `clients` nearly equal parts (sizes differ by at most one).
- **dirichlet**: label skew as in Hsu et al. 2019 ("Measuring the effects of non-identical data distribution"):
  for every class, the clients' shares are drawn from Dir(alpha * 1) and the class's (shuffled) samples are cut
  in those proportions. Small alpha: each client holds few classes; large alpha: close to IID. A draw that leaves
  a client with fewer than `min_size` samples is redrawn (the usual fix; a client without data cannot train).

Clients hold index tensors into the one training split, never copies of the data: a client materialises its
samples only while it trains. Everything is deterministic given the seed (numpy's Generator for the Dirichlet
draws, which torch does not seed).
"""

from __future__ import annotations

import numpy as np
import torch

from lamina.errors import ConfigError

SPLITS = ("iid", "dirichlet")


def _check(n: int, clients: int) -> None:
    if clients > n:
        raise ConfigError(f"federated.clients: {clients} clients but only {n} training samples; expected at most {n}")


def iid_partition(n: int, clients: int, seed: int) -> list[torch.Tensor]:
    _check(n, clients)
    g = torch.Generator().manual_seed(int(seed))
    return [p.sort().values for p in torch.randperm(n, generator=g).tensor_split(clients)]


def dirichlet_partition(labels: torch.Tensor, clients: int, alpha: float, seed: int, min_size: int = 1,
                        tries: int = 1000) -> list[torch.Tensor]:
    labels = torch.as_tensor(labels).long().view(-1)
    n = len(labels)
    _check(n, clients)
    if min_size * clients > n:
        raise ConfigError(f"federated.min_client_samples: {min_size} samples for each of {clients} clients needs "
                          f"{min_size * clients}, but the training split has {n}")
    rng = np.random.default_rng(int(seed))
    y = labels.numpy()
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            share = rng.dirichlet(np.full(clients, float(alpha)))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].append(piece)
        sizes = [sum(len(p) for p in ps) for ps in parts]
        if min(sizes) >= min_size:
            return [torch.from_numpy(np.sort(np.concatenate(ps))).long() for ps in parts]
    raise ConfigError(f"federated.alpha: {alpha} with {clients} clients left some client under "
                      f"{min_size} samples in {tries} draws; use a larger alpha, fewer clients or a smaller "
                      "federated.min_client_samples")


def make_partition(split: str, labels: torch.Tensor, clients: int, seed: int, alpha: float = 0.3,
                   min_size: int = 1) -> list[torch.Tensor]:
    if split == "iid":
        return iid_partition(len(labels), clients, seed)
    if split == "dirichlet":
        return dirichlet_partition(labels, clients, alpha, seed, min_size)
    raise ConfigError(f"federated.split: unknown split '{split}'; expected one of {', '.join(SPLITS)}")


def label_skew(parts: list[torch.Tensor], labels: torch.Tensor) -> float:
    """Mean total-variation distance between each client's label distribution and the whole split's, weighted
    by client size: 0 for identical distributions, near 1 when every client holds classes others lack."""
    labels = torch.as_tensor(labels).long().view(-1)
    k = int(labels.max()) + 1
    glob = torch.bincount(labels, minlength=k).double() / len(labels)
    tv = 0.0
    for p in parts:
        local = torch.bincount(labels[p], minlength=k).double() / max(len(p), 1)
        tv += len(p) * 0.5 * float((local - glob).abs().sum())
    return tv / sum(len(p) for p in parts)


def class_counts(parts: list[torch.Tensor], labels: torch.Tensor) -> list[list[int]]:
    labels = torch.as_tensor(labels).long().view(-1)
    k = int(labels.max()) + 1
    return [torch.bincount(labels[p], minlength=k).tolist() for p in parts]


__all__ = ["SPLITS", "class_counts", "dirichlet_partition", "iid_partition", "label_skew", "make_partition"]
