"""LeNet-5 (LeCun et al. 1998), the classic layout, made to accept 8x8, 28x28 and 32x32 images.

    x (B, C, H, W) -> [pad to >= 28] -> conv5x5(6, pad 2) -> act -> pool2 -> conv5x5(16) -> act -> pool2
      -> adaptive avg pool 5x5 -> (B, 16, 5, 5) -> fc120 -> act -> fc84 -> act -> fc(num_classes)

Size choice (stated, since the 1998 net only took 32x32): the first conv uses padding=2, the modern MNIST
convention, so a 28x28 image reaches the classic 16x5x5 map exactly. Images with a side below 28 (8x8 sklearn
digits) are first zero-padded, centred, to 28 (the way MNIST digits sit in their 28 frame), because two 5x5
convs and two pools need at least ~12 px. Larger inputs (32x32 gives a 6x6 map) are averaged to 5x5 by an
adaptive pool, so the classifier and the parameter count (61,706 for 10 classes) never depend on the size.
Pooling is average pooling ("subsampling" in the paper) and the activation tanh by default; relu trains faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.errors import ModelError, unknown_name
from lamina.models.contract import build_model
from lamina.models.registry import register_model
from lamina.nn import get_activation, init_weights

_MIN_SIDE = 28  # inputs smaller than this are zero-padded up to it (see module docstring)


@dataclass
class LeNetConfig:
    in_chans: int = 1  # grayscale digits, the data LeNet was designed for
    num_classes: int = 10  # ten digits; 0 -> no head
    activation: str = "tanh"  # the 1998 original; "relu" converges faster with Adam
    pool: str = "avg"  # "avg" is the paper's subsampling; "max" is the common modern variant
    dropout: float = 0.0  # the original has none; the net is small enough not to need it on MNIST

    def __post_init__(self):
        if self.pool not in ("avg", "max"):
            raise ModelError(unknown_name("lenet pool", self.pool, ("avg", "max")))
        if self.in_chans < 1 or self.num_classes < 0:
            raise ModelError(f"lenet: need in_chans >= 1 and num_classes >= 0, got {self.in_chans}, {self.num_classes}")
        get_activation(self.activation)  # validate the name early


class LeNet5(nn.Module):
    min_input_size = 1  # anything is padded up to 28, so tests may use tiny images

    def __init__(self, cfg: LeNetConfig):
        super().__init__()
        self.cfg = cfg
        self.input_spec = (cfg.in_chans, None, None)
        pool = nn.AvgPool2d if cfg.pool == "avg" else nn.MaxPool2d
        self.features = nn.Sequential(
            nn.Conv2d(cfg.in_chans, 6, 5, padding=2), get_activation(cfg.activation), pool(2),  # (B, 6, 14, 14)
            nn.Conv2d(6, 16, 5), get_activation(cfg.activation), pool(2),  # (B, 16, 5, 5) at 28x28 input
            nn.AdaptiveAvgPool2d(5),  # (B, 16, 5, 5) at any input size
        )
        self.pre_logits = nn.Sequential(
            nn.Flatten(),  # (B, 400)
            nn.Linear(16 * 5 * 5, 120), get_activation(cfg.activation), nn.Dropout(cfg.dropout),
            nn.Linear(120, 84), get_activation(cfg.activation), nn.Dropout(cfg.dropout),  # (B, 84)
        )
        self.num_features = 84
        self.num_classes = cfg.num_classes
        self.head = nn.Linear(84, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        init_weights(self, cfg.activation)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h < _MIN_SIDE or w < _MIN_SIDE:  # centre small images in a 28x28 frame
            ph, pw = max(0, _MIN_SIDE - h), max(0, _MIN_SIDE - w)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return self.features(x)  # (B, 16, 5, 5)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(x)  # (B, 84)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self.head, self.cfg.activation)


@register_model("lenet", input_kind="image")
def lenet5(**kwargs) -> LeNet5:
    """LeNet-5 (1998): two 5x5 convs + three linear layers, 61.7K params; digits-sized inputs."""
    return build_model("lenet5", LeNet5, LeNetConfig(), kwargs)
