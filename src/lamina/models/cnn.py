"""A compact, fast conv net for small images (8x8 digits up to 32x32), VGG-style with BatchNorm.

    x (B, C, H, W) -> stage_1 .. stage_k -> global pool -> dropout -> linear
    stage_i = [conv3x3(channels[i]) -> BN -> ReLU] * blocks_per_stage -> maxpool2  (halves H, W)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lamina.errors import ModelError, unknown_name
from lamina.models.contract import build_model
from lamina.models.registry import register_model
from lamina.nn import init_weights

POOLS = ("avg", "max", "avgmax")


@dataclass
class SmallCNNConfig:
    in_chans: int = 1  # grayscale digits
    num_classes: int = 10
    channels: tuple[int, ...] = (32, 64)  # one stage per entry
    blocks_per_stage: int = 1
    dropout: float = 0.0
    global_pool: str = "avg"
    pool_last: bool = True

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if not self.channels or min(self.channels) < 1:
            raise ModelError(f"small_cnn: channels must be a non-empty tuple of positive ints, got {self.channels}")
        if self.blocks_per_stage < 1:
            raise ModelError(f"small_cnn: blocks_per_stage must be >= 1, got {self.blocks_per_stage}")
        if self.global_pool not in POOLS:
            raise ModelError(unknown_name("small_cnn global_pool", self.global_pool, POOLS))
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"small_cnn: dropout must be in [0, 1), got {self.dropout}")
        if self.in_chans < 1 or self.num_classes < 0:
            raise ModelError(f"small_cnn: need in_chans >= 1 and num_classes >= 0, got {self.in_chans}, {self.num_classes}")


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    def __init__(self, cfg: SmallCNNConfig):
        super().__init__()
        self.cfg = cfg
        self.input_spec = (cfg.in_chans, None, None)
        stages, cin = [], cfg.in_chans
        for i, c in enumerate(cfg.channels):
            layers = []
            for _ in range(cfg.blocks_per_stage):
                layers.append(conv_bn_relu(cin, c))
                cin = c
            if cfg.pool_last or i < len(cfg.channels) - 1:
                layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        n_pools = len(cfg.channels) - (0 if cfg.pool_last else 1)
        self.min_input_size = 2**n_pools
        self.num_features = cin * (2 if cfg.global_pool == "avgmax" else 1)
        self.num_classes = cfg.num_classes
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        init_weights(self, "relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)  # (B, channels[-1], H / 2^k, W / 2^k)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.cfg.global_pool == "avg":
            x = x.mean((2, 3))
        elif self.cfg.global_pool == "max":
            x = x.amax((2, 3))
        else:
            x = torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)
        return x if pre_logits else self.head(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self.head, "relu")


CNN_CONFIGS: dict[str, SmallCNNConfig] = {
    "small_cnn": SmallCNNConfig(),
    "cnn_medium": SmallCNNConfig(channels=(32, 64, 128), blocks_per_stage=2),
}


@register_model("cnn")
def small_cnn(**kwargs) -> SmallCNN:
    """Small fast CNN for 8-32 px images."""
    return build_model("small_cnn", SmallCNN, CNN_CONFIGS["small_cnn"], kwargs)


@register_model("cnn")
def cnn_medium(**kwargs) -> SmallCNN:
    """Medium CNN for 28-32 px images."""
    return build_model("cnn_medium", SmallCNN, CNN_CONFIGS["cnn_medium"], kwargs)
