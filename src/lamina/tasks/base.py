"""Task contract: a task turns a batch into model inputs, a loss and metrics, and outputs into answers.

The Trainer only talks to tasks. Training-time metrics are cheap tensor sums accumulated without a host
sync per step; evaluation metrics use torchmetrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
import torch.nn as nn

from lamina.errors import ConfigError, unknown_name


def check_options(what: str, options: Mapping, allowed: Sequence[str]) -> None:
    """A task's `from_facts` options: the first key not in `allowed` is a ConfigError
    `task.<key>: unknown <what> '<key>' ...; valid: ...` (what: e.g. "option of task masked_lm")."""
    bad = [k for k in options if k not in allowed]
    if bad:
        raise ConfigError(f"task.{bad[0]}: {unknown_name(what, bad[0], allowed)}")


def model_inputs(batch: dict) -> tuple[tuple, dict]:
    """Positional input is batch["x"]; categorical codes travel as x_cat (see models/mlp.py)."""
    kwargs = {"x_cat": batch["x_cat"]} if "x_cat" in batch else {}
    return (batch["x"],), kwargs


class Task(Protocol):
    name: str
    default_monitor: tuple[str, str]  # (metric, "min"|"max")

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor: ...
    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor: ...
    def train_stats(self, outputs: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]: ...
    def make_metrics(self): ...
    def update_metrics(self, metrics, outputs: torch.Tensor, batch: dict) -> None: ...
    def predict(self, outputs: torch.Tensor) -> dict[str, torch.Tensor]: ...
