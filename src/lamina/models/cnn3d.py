"""3-D convolutional classifier for volumes (CT, MR): (B, C, D, H, W) -> class logits.

    stem Conv3d 3^3 -> BN -> ReLU, then per stage: [Conv3d 3^3 -> BN -> ReLU] x blocks, MaxPool3d 2 (not after
    the last) -> global average pool (B, C_last) -> dropout -> Linear

The 2-D small_cnn's layout in three dimensions: 32^3 inputs leave 8^3 after two poolings, enough context for
organ-scale patterns at the resolutions medical_volumes resamples to. The classifier contract is the 2-D
families' (forward_features -> feature map, forward_head pools + classifies, reset_classifier, num_features).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lamina.errors import ModelError
from lamina.models.contract import build_model
from lamina.models.registry import register_model


@dataclass
class CNN3DConfig:
    in_chans: int = 1  # CT / MR volumes are one channel
    num_classes: int = 2
    channels: tuple[int, ...] = (16, 32, 64)  # per stage; small: 3-D convolutions cost 3x a 2-D one per voxel
    blocks_per_stage: int = 1
    dropout: float = 0.2

    def __post_init__(self):
        if not self.channels or any(not isinstance(c, int) or c < 1 for c in self.channels):
            raise ModelError(f"cnn3d_small: channels must be positive integers, got {self.channels!r}")
        if not isinstance(self.blocks_per_stage, int) or self.blocks_per_stage < 1:
            raise ModelError(f"cnn3d_small: blocks_per_stage must be a positive integer, got {self.blocks_per_stage!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"cnn3d_small: dropout must be in [0, 1), got {self.dropout!r}")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class CNN3D(nn.Module):
    def __init__(self, cfg: CNN3DConfig):
        super().__init__()
        self.cfg = cfg
        self.input_spec = (cfg.in_chans, None, None, None)
        layers, cin = [], cfg.in_chans
        for i, c in enumerate(cfg.channels):
            for _ in range(cfg.blocks_per_stage):
                layers.append(_block(cin, c))
                cin = c
            if i < len(cfg.channels) - 1:
                layers.append(nn.MaxPool3d(2))
        self.features = nn.Sequential(*layers)
        self.num_features = cin
        self.num_classes = cfg.num_classes
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cin, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, C, D', H', W')

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3, 4))  # (B, C)
        return x if pre_logits else self.head(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


@register_model("cnn3d", input_kind="volume")
def cnn3d_small(**kwargs) -> CNN3D:
    """3-D CNN for volumes: 3 stages (16, 32, 64) of Conv3d-BN-ReLU with max pooling, global average pool."""
    return build_model("cnn3d_small", CNN3D, CNN3DConfig(), kwargs)


__all__ = ["CNN3D", "CNN3DConfig", "cnn3d_small"]
