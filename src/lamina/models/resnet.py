"""ResNet (He et al. 2015): ImageNet layouts (resnet18/34/50) and the CIFAR layouts (resnet20/32/56).

    ImageNet: x -> conv7x7/2 -> BN -> ReLU -> maxpool/2 -> 4 stages (64, 128, 256, 512) x expansion -> GAP -> fc
    small_input: the stem becomes conv3x3/1 -> BN -> ReLU with no maxpool (for 28-32 px images), so a 32x32
    image reaches the last stage at 4x4 instead of 1x1. The CIFAR nets are exactly that stem with 3 stages of
    16/32/64 basic blocks (6n+2 layers).

Shortcuts when a block changes shape:
  * "B" (projection): conv1x1(stride) + BN, the torchvision/timm default and the ImageNet nets' choice.
  * "A" (parameter-free): subsample by the stride and zero-pad the new channels, what the paper used for its
    CIFAR nets; that is why resnet20 has 269,722 parameters here (10 classes), the paper's "0.27M".
Bottleneck blocks put the stride on the 3x3 conv ("ResNet v1.5", as torchvision does).

`zero_init_residual=True` sets the last BN gamma of every residual branch to 0, so each block starts as the
identity: the network starts shallow-equivalent and trains stably at large learning rates (Goyal et al. 2017).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.errors import ModelError, unknown_name
from lamina.models.contract import build_model, run_stages
from lamina.models.registry import register_model
from lamina.nn import init_weights


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)  # BN follows: a bias would be redundant


class PadShortcut(nn.Module):
    """Option-A shortcut: take every `stride`-th pixel, zero-pad the extra channels; no parameters."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (B, cin, H/s, W/s)
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))  # (B, cout, H/s, W/s)


def make_shortcut(kind: str, cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    if kind == "A":
        return PadShortcut(cin, cout, stride)
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus shortcut, then ReLU."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.bn1 = conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, cout), nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(shortcut, cin, cout, stride)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act(x + shortcut)


class Bottleneck(nn.Module):
    """conv1x1 -> BN -> ReLU -> conv3x3(stride) -> BN -> ReLU -> conv1x1 (x4 channels) -> BN, plus shortcut."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(shortcut, cin, cout, stride)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act(x + shortcut)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


@dataclass
class ResNetConfig:
    layers: tuple[int, ...] = (2, 2, 2, 2)  # blocks per stage; (2, 2, 2, 2) is ResNet-18
    widths: tuple[int, ...] = (64, 128, 256, 512)  # planes per stage; each later stage halves H, W
    block: str = "basic"  # "basic" (2 convs) for shallow nets, "bottleneck" (1x1-3x3-1x1, x4) from 50 layers
    in_chans: int = 3  # RGB
    num_classes: int = 1000  # ImageNet-1k; 0 -> no head
    small_input: bool = False  # 3x3/1 stem, no maxpool: keeps resolution for 28-32 px images
    shortcut: str = "B"  # "B" projection (ImageNet nets), "A" zero-pad (paper's CIFAR nets); see docstring
    zero_init_residual: bool = True  # each block starts as the identity: stable early training
    drop_rate: float = 0.0  # dropout before the classifier; ResNets rarely need it

    def __post_init__(self):
        self.layers, self.widths = tuple(int(n) for n in self.layers), tuple(int(w) for w in self.widths)
        if self.block not in BLOCKS:
            raise ModelError(unknown_name("resnet block", self.block, BLOCKS))
        if self.shortcut not in ("A", "B"):
            raise ModelError(unknown_name("resnet shortcut", self.shortcut, ("A", "B")))
        if not self.layers or len(self.layers) != len(self.widths) or min(self.layers) < 1:
            raise ModelError(
                f"resnet: layers and widths need the same positive length, got {self.layers}, {self.widths}"
            )
        if self.in_chans < 1 or self.num_classes < 0:
            raise ModelError(
                f"resnet: need in_chans >= 1 and num_classes >= 0, got {self.in_chans}, {self.num_classes}"
            )


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        self.input_spec = (cfg.in_chans, None, None)
        block = BLOCKS[cfg.block]
        stem_width = cfg.widths[0]
        if cfg.small_input:
            self.stem = nn.Sequential(conv3x3(cfg.in_chans, stem_width), nn.BatchNorm2d(stem_width), nn.ReLU(True))
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(cfg.in_chans, stem_width, 7, stride=2, padding=3, bias=False),  # (B, 64, H/2, W/2)
                nn.BatchNorm2d(stem_width), nn.ReLU(True),
                nn.MaxPool2d(3, stride=2, padding=1),  # (B, 64, H/4, W/4)
            )
        stages, cin = [], stem_width
        for i, (n, planes) in enumerate(zip(cfg.layers, cfg.widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, stride if j == 0 else 1, cfg.shortcut))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)  # (B, num_features, H/r, W/r), r = 2^(stages-1) (x4 without small_input)
        self.num_features = cin
        self.num_classes = cfg.num_classes
        self.min_input_size = 2 ** (len(cfg.layers) - 1) * (1 if cfg.small_input else 4)  # last map >= 1x1
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.fc = nn.Linear(cin, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        init_weights(self, "relu")
        if cfg.zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # (B, num_features, h, w)

    def stage_features(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Each stage's output, the first `upto + 1` only when given (a detector's FPN needs no deeper maps)."""
        return run_stages(self.stem(x), self.stages, upto)

    def keep_stages(self, n: int) -> None:
        """Drop the stages after the first n: what is left is a feature pyramid for a detector's neck."""
        self.stages = self.stages[:n]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x).flatten(1)  # (B, num_features)
        return x if pre_logits else self.fc(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self.fc, "relu")


# Named sizes: a dict of configs (the factories below only pick one).
RESNET_CONFIGS: dict[str, ResNetConfig] = {
    "resnet18": ResNetConfig(layers=(2, 2, 2, 2)),
    "resnet34": ResNetConfig(layers=(3, 4, 6, 3)),
    "resnet50": ResNetConfig(layers=(3, 4, 6, 3), block="bottleneck"),
    # CIFAR nets: 6n+2 layers, n = 3, 5, 9; 10 classes; option-A shortcuts as in the paper (Sec. 4.2).
    **{
        f"resnet{6 * n + 2}": ResNetConfig(
            layers=(n, n, n), widths=(16, 32, 64), num_classes=10, small_input=True, shortcut="A"
        )
        for n in (3, 5, 9)
    },
}


def _create(name: str, kwargs: dict) -> ResNet:
    return build_model(name, ResNet, RESNET_CONFIGS[name], kwargs)


@register_model("resnet")
def resnet18(**kwargs) -> ResNet:
    """ResNet-18: basic blocks (2, 2, 2, 2), 11.7M params; small_input=True for 28-32 px images."""
    return _create("resnet18", kwargs)


@register_model("resnet")
def resnet34(**kwargs) -> ResNet:
    """ResNet-34: basic blocks (3, 4, 6, 3), 21.8M params."""
    return _create("resnet34", kwargs)


@register_model("resnet")
def resnet50(**kwargs) -> ResNet:
    """ResNet-50: bottleneck blocks (3, 4, 6, 3), 25.6M params."""
    return _create("resnet50", kwargs)


@register_model("resnet")
def resnet20(**kwargs) -> ResNet:
    """CIFAR ResNet-20: 3 stages 16/32/64, 3 blocks each, option-A shortcuts, 0.27M params."""
    return _create("resnet20", kwargs)


@register_model("resnet")
def resnet32(**kwargs) -> ResNet:
    """CIFAR ResNet-32: 3 stages 16/32/64, 5 blocks each, option-A shortcuts, 0.46M params."""
    return _create("resnet32", kwargs)


@register_model("resnet")
def resnet56(**kwargs) -> ResNet:
    """CIFAR ResNet-56: 3 stages 16/32/64, 9 blocks each, option-A shortcuts, 0.85M params."""
    return _create("resnet56", kwargs)


def hf_resnet_key_map(cfg: ResNetConfig) -> dict[str, str]:
    """Hugging Face ResNetForImageClassification tensor name -> lamina name (BatchNorm buffers included), for the
    ImageNet layout HF builds: 7x7/2 stem + max-pool, projection shortcuts, a head."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    m = {"resnet.embedder.embedder.convolution.weight": "stem.0.weight",
         **{f"resnet.embedder.embedder.normalization.{k}": f"stem.1.{k}" for k in bn},
         "classifier.1.weight": "fc.weight", "classifier.1.bias": "fc.bias"}
    block = BLOCKS[cfg.block]
    convs = 3 if cfg.block == "bottleneck" else 2
    cin = cfg.widths[0]
    for i, (n, planes) in enumerate(zip(cfg.layers, cfg.widths)):
        for j in range(n):
            hf, lm = f"resnet.encoder.stages.{i}.layers.{j}", f"stages.{i}.{j}"
            for c in range(convs):
                m[f"{hf}.layer.{c}.convolution.weight"] = f"{lm}.conv{c + 1}.weight"
                m.update({f"{hf}.layer.{c}.normalization.{k}": f"{lm}.bn{c + 1}.{k}" for k in bn})
            cout = planes * block.expansion
            if j == 0 and (i > 0 or cin != cout):  # the block that changes shape has a projection shortcut
                m[f"{hf}.shortcut.convolution.weight"] = f"{lm}.downsample.0.weight"
                m.update({f"{hf}.shortcut.normalization.{k}": f"{lm}.downsample.1.{k}" for k in bn})
            cin = cout
    return m
