"""Data contracts: a split is a dict of equally long tensors; a bundle is train/val/test + what the task needs.

Everything that fits in memory stays as tensors so the loader can index whole batches at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lamina.errors import DataError


class TensorData(torch.utils.data.Dataset):
    """A dataset of named, equally long tensors; item i is {name: tensor[i]} (works with DataLoader too)."""

    def __init__(self, **tensors: torch.Tensor):
        if not tensors:
            raise DataError("a split needs at least one tensor")
        lengths = {k: len(v) for k, v in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise DataError(f"split tensors differ in length: {lengths}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}

    def subset(self, idx: torch.Tensor) -> "TensorData":
        return TensorData(**{k: v[idx] for k, v in self.tensors.items()})

    @property
    def x(self) -> torch.Tensor:
        return self.tensors["x"]

    @property
    def y(self) -> torch.Tensor:
        return self.tensors["y"]


@dataclass
class DataBundle:
    """What a data set gives the rest of lamina.

    task: "classification" | "regression" | "language_modeling"; input_shape is per sample (C, H, W) or (F,).
    meta carries loader-specific facts (normalization stats, categorical cardinalities, vocab, ...) that
    `predict` needs to treat new inputs exactly like training inputs.
    """

    name: str
    train: TensorData
    val: TensorData | None
    test: TensorData | None
    task: str
    input_shape: tuple[int, ...]
    num_classes: int | None = None
    class_names: list[str] | None = None
    meta: dict = field(default_factory=dict)
    # Live objects that are not saved with a run: a trained tokenizer, raw texts for BLEU references, ...
    extras: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "task": self.task,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "train": len(self.train),
            "val": len(self.val) if self.val is not None else 0,
            "test": len(self.test) if self.test is not None else 0,
        }
