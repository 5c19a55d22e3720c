"""Reading part of a split, whatever its kind: tools that explain, attack, calibrate or embed use these instead
of `split.x`, so that they work on streamed splits (image files, Parquet/CSV tables) too.

* `first_samples(data, n)`: the first n samples as tensors, reading only those (n files decoded; table batches
  read until n rows are in hand). The same tensors `data.x[:n]` gives on the in-memory path.
* `take(data, idx)`: the samples at `idx` (few-shot episodes draw a handful per step).
* `split_batches(data, batch_size)`: the whole split in order, batch by batch through its loader (bounded memory).
* `SampledLoader(data, sampler)`: batches of indices a sampler draws (P x K identities), read with take().
* `require_in_memory(split, what, input_shape)`: the one refusal, for steps that truly need every tensor at once;
  the message says how much memory that would take.
"""

from __future__ import annotations

import math

import torch

from lamina.data.base import TensorData
from lamina.errors import DataError


def is_streamed(data) -> bool:
    """True for a split kept as files (image folders, tables over the memory budget), not as tensors."""
    from lamina.data.outofcore import ImageFiles
    from lamina.data.tablestream import TableStream

    return isinstance(data, (ImageFiles, TableStream))


def _loader(data, batch_size: int, device=None, transform=None):
    from lamina.data.loader import make_loader
    from lamina.data.outofcore import ImageFiles, StreamingImageLoader

    if isinstance(data, ImageFiles) and math.ceil(len(data) / batch_size) <= 1:
        # one batch: decoding it here beats starting worker processes for it
        return StreamingImageLoader(data, batch_size, device=device, transform=transform, num_workers=0)
    return make_loader(data, batch_size, device=device, transform=transform)


def first_samples(data, n: int) -> dict[str, torch.Tensor]:
    """The first `n` samples (fewer if the split is smaller) as a dict of tensors, in split order; x as the loader
    gives it (float32 [0, 1] images, encoded table rows), no transform applied."""
    n = min(int(n), len(data))
    if n < 1:
        raise DataError(f"expected at least one sample, the split has {len(data)}")
    if isinstance(data, TensorData):
        return {k: v[:n] for k, v in data.tensors.items()}
    sub = data.subset(torch.arange(n))
    if hasattr(sub, "decode_cache"):
        sub.decode_cache = False  # read once: a decode cache would only write a temp file
    return next(iter(_loader(sub, n)))


def take(data, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The samples at `idx` (any order, repeats allowed) as a dict of tensors, in that order."""
    from lamina.data.outofcore import ImageFiles, to_float

    if isinstance(data, TensorData):
        return {k: v[idx] for k, v in data.tensors.items()}
    if isinstance(data, ImageFiles):
        b = data.batch(idx.tolist())
        return {"x": to_float(b["x"]), "y": b["y"]}
    # a table stream reads its rows in file order: read them sorted, then put them back in the asked order
    order, back = torch.unique(idx, return_inverse=True)
    got = first_samples(data.subset(order), len(order))
    return {k: v[back] for k, v in got.items()}


class SampledLoader:
    """InMemoryLoader(data, sampler=...) for a streamed split: each batch is the index tensor `sampler(generator)`
    yields, read with take() (files decoded in this process), then `transform(batch, generator)`: the same draws
    in the same order from the same seeded generator, so the same batches as in memory."""

    def __init__(self, data, sampler, seed: int = 0, device=None, transform=None):
        self.data, self.sampler, self.transform = data, sampler, transform
        self.generator = torch.Generator().manual_seed(seed)
        self.device = torch.device(device) if device is not None else None

    def to(self, device) -> SampledLoader:
        self.device = torch.device(device)
        return self

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for idx in self.sampler(self.generator):
            batch = take(self.data, idx)
            if self.device is not None and self.device.type != "cpu":
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            yield self.transform(batch, self.generator) if self.transform is not None else batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def split_batches(data, batch_size: int, device=None, transform=None):
    """Every sample of the split once, in order, as dict batches (unshuffled, no augmentation beyond `transform`)."""
    yield from _loader(data, int(batch_size), device, transform)


def in_memory_bytes(data, input_shape) -> int:
    """What the split's inputs take as float32 tensors."""
    return len(data) * math.prod(int(s) for s in input_shape) * 4


def require_in_memory(data, what: str, input_shape) -> None:
    """One clear refusal for a step that needs every tensor of a split at once (the message: how much memory)."""
    from lamina.data.outofcore import human_bytes

    if data is not None and is_streamed(data):
        raise DataError(f"{what} needs the whole split in memory as tensors ({len(data)} samples, "
                        f"{human_bytes(in_memory_bytes(data, input_shape))} as float32) but it is streamed from "
                        "files; pass data.in_memory=true (with enough memory) or a smaller data set")


__all__ = ["SampledLoader", "first_samples", "in_memory_bytes", "is_streamed", "require_in_memory", "split_batches",
           "take"]
