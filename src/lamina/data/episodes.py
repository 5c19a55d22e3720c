"""Few-shot episodes: N classes drawn from a pool, K support and Q query samples of each (Vinyals et al. 2016).

An episode is one batch dict: x (N*(K+Q), ...) with the support first (class-major: class 0's K shots, class 1's,
...), then the queries in the same order; y the episode's own labels 0..N-1; "shots" and "ways" as 0-d tensors so
the episodic task knows where the support ends. The sampler is an iterable of `episodes` such batches with a seeded
generator, so it plugs into the Trainer like any loader. `groups` (one id per class, e.g. its alphabet) draws the
N classes of an episode from one group: Omniglot's within-alphabet episodes.
"""

from __future__ import annotations

import torch

from lamina.data.base import TensorData
from lamina.data.sample import take
from lamina.errors import ConfigError


class EpisodeSampler:
    def __init__(self, data: TensorData, ways: int, shots: int, queries: int, episodes: int, seed: int = 0,
                 groups: dict[int, int] | None = None, device=None):
        y = data.y
        classes, counts = torch.unique(y, return_counts=True)
        if ways < 2:
            raise ConfigError(f"fewshot.ways: an episode needs at least 2 classes, got {ways}")
        if ways > len(classes):
            raise ConfigError(f"fewshot.ways: {ways} classes per episode, but the pool has only {len(classes)}")
        need = shots + queries
        if int(counts.min()) < need:
            c = int(classes[counts.argmin()])
            raise ConfigError(f"fewshot: {shots} shots + {queries} queries = {need} samples per class, but class {c} "
                              f"has only {int(counts.min())}; lower fewshot.shots or fewshot.queries")
        self.data, self.ways, self.shots, self.queries, self.episodes = data, ways, shots, queries, episodes
        self.device = device
        self.seed, self.epoch = int(seed), 0
        self.by_class = {int(c): (y == c).nonzero().flatten() for c in classes}
        self.pools = [list(self.by_class)]
        if groups is not None:
            by_group: dict[int, list[int]] = {}
            for c in self.by_class:
                by_group.setdefault(groups[c], []).append(c)
            self.pools = [p for p in by_group.values() if len(p) >= ways]
            if not self.pools:
                raise ConfigError(f"fewshot.ways: no group (alphabet) has {ways} classes")

    def __len__(self) -> int:
        return self.episodes

    def to(self, device):
        self.device = device
        return self

    def sample(self, g: torch.Generator) -> dict:
        pool = self.pools[int(torch.randint(len(self.pools), (1,), generator=g))]
        pick = torch.randperm(len(pool), generator=g)[:self.ways]
        sup, qry = [], []
        for c in pick.tolist():
            idx = self.by_class[pool[c]]
            idx = idx[torch.randperm(len(idx), generator=g)[:self.shots + self.queries]]
            sup.append(idx[:self.shots])
            qry.append(idx[self.shots:])
        order = torch.cat(sup + qry)
        x = take(self.data, order)["x"]  # decodes just these when the split is streamed from files
        labels = torch.arange(self.ways)
        y = torch.cat([labels.repeat_interleave(self.shots), labels.repeat_interleave(self.queries)])
        batch = {"x": x, "y": y, "shots": torch.tensor(self.shots), "ways": torch.tensor(self.ways),
                 "classes": torch.tensor([pool[c] for c in pick.tolist()])}
        if self.device is not None:
            batch = {k: v.to(self.device) for k, v in batch.items()}
        return batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + 7907 * self.epoch)
        self.epoch += 1
        for _ in range(self.episodes):
            yield self.sample(g)


__all__ = ["EpisodeSampler"]
