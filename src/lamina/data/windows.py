"""Window loaders for token streams (language modeling).

Training draws `steps_per_epoch` batches of random windows per "epoch" (nanoGPT's get_batch: an epoch is
just an evaluation interval), each a single gather from the 1-D stream: x = ids[o : o+T], y = ids[o+1 : o+T+1].
Evaluation walks non-overlapping windows in order, so the validation loss is exact and repeatable instead
of an estimate over random batches.

The stream is an int64 tensor, or a numpy array such as the np.memmap of a token file (lamina.data.tokenfiles):
then each batch reads only its windows from the file (one fancy-index gather), converted to int64, so a mapped
stream gives the very batches its in-memory copy would.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lamina.errors import DataError


def _check(ids: torch.Tensor, block_size: int, what: str) -> None:
    if ids.ndim != 1:
        raise DataError(f"{what}: expected a 1-D token stream, got shape {tuple(ids.shape)}")
    if len(ids) < block_size + 1:
        raise DataError(f"{what}: {len(ids)} tokens is fewer than block_size + 1 = {block_size + 1}; "
                        "use a smaller data.block_size or more text")


class RandomWindowLoader:
    def __init__(self, ids: torch.Tensor, block_size: int, batch_size: int, steps_per_epoch: int, seed: int = 0,
                 device=None):
        _check(ids, block_size, "train split")
        self.mapped = isinstance(ids, np.ndarray)  # stays on disk; batches are read and then moved
        self.device = torch.device(device) if device is not None else None
        self.ids = ids.to(device) if device is not None and not self.mapped else ids
        self.block_size, self.batch_size, self.steps = int(block_size), int(batch_size), int(steps_per_epoch)
        self.generator = torch.Generator().manual_seed(seed)
        self._ar = torch.arange(self.block_size + 1, device=None if self.mapped else self.ids.device)

    def to(self, device) -> "RandomWindowLoader":
        self.device = torch.device(device)
        if not self.mapped:
            self.ids, self._ar = self.ids.to(device), self._ar.to(device)
        return self

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        hi = len(self.ids) - self.block_size - 1
        for _ in range(self.steps):
            if self.mapped:
                off = torch.randint(0, hi + 1, (self.batch_size,), generator=self.generator)
                w = _read(self.ids, (off[:, None] + self._ar).numpy(), self.device)  # (B, T+1) from the file
            else:
                off = torch.randint(0, hi + 1, (self.batch_size,), generator=self.generator).to(self.ids.device)
                w = self.ids[off[:, None] + self._ar]  # (B, T+1), one gather
            yield {"x": w[:, :-1], "y": w[:, 1:]}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class SequentialWindowLoader:
    """Non-overlapping windows covering the stream once (the last partial window is dropped)."""

    def __init__(self, ids: torch.Tensor, block_size: int, batch_size: int, device=None):
        _check(ids, block_size, "evaluation split")
        self.block_size, self.batch_size = int(block_size), int(batch_size)
        n = (len(ids) - 1) // self.block_size
        self.mapped = isinstance(ids, np.ndarray)
        self.device = torch.device(device) if device is not None else None
        if self.mapped:  # views of the mapped file, read batch by batch
            self.x = ids[: n * self.block_size].reshape(n, self.block_size)
            self.y = ids[1 : n * self.block_size + 1].reshape(n, self.block_size)
            return
        ids = ids.to(device) if device is not None else ids
        self.x = ids[: n * self.block_size].view(n, self.block_size)
        self.y = ids[1 : n * self.block_size + 1].view(n, self.block_size)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.x), self.batch_size):
            if self.mapped:
                yield {"x": _read(self.x, slice(i, i + self.batch_size), self.device),
                       "y": _read(self.y, slice(i, i + self.batch_size), self.device)}
            else:
                yield {"x": self.x[i : i + self.batch_size], "y": self.y[i : i + self.batch_size]}


def _read(ids: np.ndarray, index, device) -> torch.Tensor:
    """ids[index] from a mapped stream as int64 (uint16/uint32 on disk), on `device`."""
    w = torch.from_numpy(np.asarray(ids[index], dtype=np.int64))
    return w.to(device) if device is not None and device.type != "cpu" else w
