"""Batched in-memory loader: one gather per batch instead of one Python call per sample.

torch's DataLoader over a TensorDataset calls __getitem__ per sample and collates; on small data that costs
more than the model (see ../shared/ANCHORS.md). Here a permutation is drawn once per epoch from a seeded
generator and each batch is `tensor[idx]`: same math, no per-sample Python. `make_loader` falls back to
torch's DataLoader for data that does not fit in memory (any Dataset that is not a TensorData).
"""

from __future__ import annotations

import math

import torch

from lamina.data.base import TensorData


class InMemoryLoader:
    """Iterate dict batches over TensorData. The generator state is part of the resume state."""

    def __init__(
        self,
        data: TensorData,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        device: torch.device | str | None = None,
        transform=None,
        trim: dict[str, str] | None = None,
        bucket: str | None = None,
        sampler=None,
    ):
        self.data = data
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(seed)
        self.transform = transform  # batched: dict -> dict, draws randomness from self.generator
        # Padded token tensors: {tensor: its length tensor}; each batch is cut to its longest sequence, so a
        # batch of short sentences does not pay for the longest one in the data set.
        self.trim = dict(trim or {})
        # Length bucketing (shuffled training only): sort each chunk of 64 batches by this length tensor, then
        # shuffle the batches. Padding falls ~3x on Multi30k; batches stay random in order and content mix.
        self.bucket = bucket
        # Structured batches (e.g. P identities x K images for triplet losses): an object with __len__ (batches
        # per epoch) and __call__(generator) -> index tensors, drawn from this loader's generator.
        self.sampler = sampler
        # Moving the whole split once beats moving every batch (and pinning) for data this small.
        self.tensors = {k: v.to(device) if device is not None else v for k, v in data.tensors.items()}

    def to(self, device) -> "InMemoryLoader":
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self

    def __len__(self) -> int:
        if self.sampler is not None:
            return len(self.sampler)
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _bucketed(self, order: torch.Tensor) -> list[torch.Tensor]:
        """Batches of similar length: sort chunks of 64 batches by length, then shuffle the batch order."""
        lengths = self.data.tensors[self.bucket].cpu()
        chunk = 64 * self.batch_size
        batches = []
        for c in range(0, len(order), chunk):
            part = order[c:c + chunk]
            part = part[torch.argsort(lengths[part], stable=True)]
            batches += list(part.split(self.batch_size))
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches = [b for b in batches if len(b) == self.batch_size]
        perm = torch.randperm(len(batches), generator=self.generator)
        return [batches[i] for i in perm.tolist()][:len(self)]

    def _index_batches(self):
        """Per batch: an index tensor, or a slice for unshuffled data (no gather needed)."""
        if self.sampler is not None:
            yield from self.sampler(self.generator)
            return
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        bucketed = self._bucketed(order) if order is not None and self.bucket else None
        for b in range(len(self)):
            if order is None:
                yield slice(b * self.batch_size, min(n, (b + 1) * self.batch_size))
            else:
                yield bucketed[b] if bucketed is not None else order[b * self.batch_size : (b + 1) * self.batch_size]

    def __iter__(self):
        for idx in self._index_batches():
            if isinstance(idx, slice):
                batch = {k: v[idx] for k, v in self.tensors.items()}
            else:
                dev_idx = idx.to(next(iter(self.tensors.values())).device)
                batch = {k: v.index_select(0, dev_idx) for k, v in self.tensors.items()}
            for key, len_key in self.trim.items():
                batch[key] = batch[key][:, :int(batch[len_key].max())]
            if self.transform is not None:
                batch = self.transform(batch, self.generator)
            yield batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def make_loader(data, batch_size: int, shuffle: bool = False, seed: int = 0, device=None, transform=None,
                drop_last: bool = False, num_workers: int = 0, trim: dict[str, str] | None = None,
                bucket: str | None = None):
    """InMemoryLoader for TensorData; StreamingImageLoader for image files and StreamingTableLoader for Parquet
    tables (data bigger than memory), which give the same batches (tables: in file order); torch DataLoader (seeded) for any other Dataset."""
    from lamina.data.outofcore import ImageFiles, StreamingImageLoader
    from lamina.data.tablestream import StreamingTableLoader, TableStream

    if isinstance(data, ImageFiles):
        return StreamingImageLoader(data, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                                    device=device, transform=transform,
                                    num_workers=data.num_workers)
    if isinstance(data, TableStream):
        return StreamingTableLoader(data, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, device=device,
                                    transform=transform)
    if isinstance(data, TensorData):
        return InMemoryLoader(data, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                              device=device, transform=transform, trim=trim, bucket=bucket)
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=g,
                                       drop_last=drop_last, num_workers=num_workers)
