"""Window loaders for token streams (language modeling).

Training draws `steps_per_epoch` batches of random windows per "epoch" (nanoGPT's get_batch: an epoch is
just an evaluation interval), each a single gather from the 1-D stream: x = ids[o : o+T], y = ids[o+1 : o+T+1].
Evaluation walks non-overlapping windows in order, so the validation loss is exact and repeatable instead
of an estimate over random batches.
"""

from __future__ import annotations

import math

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
        self.ids = ids.to(device) if device is not None else ids
        self.block_size, self.batch_size, self.steps = int(block_size), int(batch_size), int(steps_per_epoch)
        self.generator = torch.Generator().manual_seed(seed)
        self._ar = torch.arange(self.block_size + 1, device=self.ids.device)

    def to(self, device) -> "RandomWindowLoader":
        self.ids, self._ar = self.ids.to(device), self._ar.to(device)
        return self

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        hi = len(self.ids) - self.block_size - 1
        for _ in range(self.steps):
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
        ids = ids.to(device) if device is not None else ids
        self.x = ids[: n * self.block_size].view(n, self.block_size)
        self.y = ids[1 : n * self.block_size + 1].view(n, self.block_size)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.x), self.batch_size):
            yield {"x": self.x[i : i + self.batch_size], "y": self.y[i : i + self.batch_size]}
