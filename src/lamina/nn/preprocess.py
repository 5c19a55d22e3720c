"""Input normalization in front of a model: `Normalize(mean, std)` and `Normalized(model, mean, std)`.

The one place lamina computes (x - mean) / std per channel inside a module graph: attacks wrap a run's model so
they act on pixels in their natural range (`Normalized`), the adversarial training step does the same, and a
pretrained backbone's input pre-hook (lamina.hub.adapt) normalizes with the checkpoint's statistics. The batch
transform of a data pipeline (lamina.data.transforms.Normalize) computes the same expression on a batch dict.

Statistics are float32 buffers shaped (1, C, 1, 1) (a scalar broadcasts over every channel), non-persistent so
they never enter a state dict; they are cast to the input's device and dtype at each call, so a wrapper built
on the CPU works on any device and under autocast / half precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std over the channel dim of (B, C, H, W) inputs."""

    def __init__(self, mean: Sequence[float] | float, std: Sequence[float] | float):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)

    def extra_repr(self) -> str:
        fmt = lambda t: "[" + ", ".join(f"{v:.4g}" for v in t.flatten().tolist()) + "]"  # noqa: E731
        return f"mean={fmt(self.mean)}, std={fmt(self.std)}"


class Normalized(nn.Module):
    """model((x - mean) / std): callers (attacks, explanations) work on pixels in their natural range while the
    model sees what it was trained on (a run's `normalize` augment step). The model stays at `.model`."""

    def __init__(self, model: nn.Module, mean: Sequence[float] | float, std: Sequence[float] | float):
        super().__init__()
        self.model = model
        self.normalize = Normalize(mean, std)

    @property
    def mean(self) -> torch.Tensor:
        return self.normalize.mean

    @property
    def std(self) -> torch.Tensor:
        return self.normalize.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))
