"""CenterNet-style anchor-free detector (Zhou et al. 2019, "Objects as Points") with a small FPN neck.

    x (B, C, H, W)
    -> backbone: stem conv s2 -> stage s4 (c4) -> stage s8 (c8)          (conv-BN-ReLU, 2 per stage)
    -> neck (FPN top-down): p4 = lateral(c4) + upsample(lateral(c8))      (B, F, H/4, W/4)
    -> heads, each conv3x3-ReLU-conv1x1 on p4:
         heatmap (num_classes)  object centres, one channel per class (logits; the task applies sigmoid)
         size (2)               box width, height in pixels / stride
         offset (2)             centre's sub-cell offset in [0, 1)
    -> one tensor (B, num_classes + 4, H/4, W/4): one output keeps export and the Trainer's contract simple

`backbone` swaps the built-in stem and stages for a classifier of the zoo (resnet18, efficientnet_lite0,
cnn_medium, ... with `backbone_options`): its `stage_features` give the pyramid, and the neck reads the last map
at stride 4 and the last at stride 8 (found by one dry run when the model is built; the backbone then drops
its deeper stages, which would only cost time and dead parameters).

The heatmap's bias starts at -2.19 (sigmoid 0.1, the paper's prior) so early training is not swamped by the
background's loss. `stride` (4) is what the task uses to map cells to pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.errors import ModelError
from lamina.models.contract import build_model
from lamina.models.registry import register_model


@dataclass
class CenterNetConfig:
    in_chans: int = 1
    num_classes: int = 10
    widths: tuple[int, int, int] = (32, 64, 128)  # stem, stride-4 and stride-8 stages
    neck: int = 64  # FPN width
    head: int = 64  # hidden width of each head
    backbone: str = ""  # "" = the built-in 3-stage CNN (widths); else a zoo classifier with stage_features
    backbone_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.widths) != 3 or any(not isinstance(w, int) or w < 1 for w in self.widths):
            raise ModelError(f"centernet_small: widths must be 3 positive integers, got {self.widths!r}")
        for k in ("in_chans", "num_classes", "neck", "head"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ModelError(f"centernet_small: {k} must be a positive integer, got {v!r}")


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _zoo_backbone(cfg: CenterNetConfig):
    """(backbone, (index of the last stage at stride 4, ... at stride 8), (their channels)) for cfg.backbone."""
    from lamina.models.registry import create_model, get_entry

    try:
        entry = get_entry(cfg.backbone)
    except ModelError as e:
        raise ModelError(f"centernet backbone: {e}") from None
    net = create_model(cfg.backbone, **{**cfg.backbone_options, "in_chans": cfg.in_chans, "num_classes": 0})
    if entry.input_kind != "image" or not hasattr(net, "stage_features") or not hasattr(net, "keep_stages"):
        raise ModelError(f"centernet backbone: {cfg.backbone} gives no stage feature maps; use a conv backbone "
                         "(cnn_medium, resnet18, resnet20, efficientnet_lite0, ...)")
    side = 64
    was = net.training
    net.eval()
    with torch.no_grad():
        maps = net.stage_features(torch.zeros(1, cfg.in_chans, side, side))
    net.train(was)
    strides = [side // m.shape[-1] for m in maps]
    if 4 not in strides or 8 not in strides:
        raise ModelError(f"centernet backbone: {cfg.backbone}'s stages have strides {strides}; the neck needs maps "
                         "at stride 4 and 8 (resnet18/34/50, efficientnet and cnn_medium give both)")
    i4 = max(i for i, s in enumerate(strides) if s == 4)
    i8 = max(i for i, s in enumerate(strides) if s == 8)
    net.keep_stages(i8 + 1)  # deeper stages would be parameters no loss reaches (DDP refuses those)
    return net, (i4, i8), (maps[i4].shape[1], maps[i8].shape[1])


def _head(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, hidden, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(hidden, cout, 1))


class CenterNet(nn.Module):
    output_kind = "detection"
    stride = 4

    def __init__(self, cfg: CenterNetConfig):
        super().__init__()
        self.cfg = cfg
        self.input_spec = (cfg.in_chans, None, None)
        self.min_input_size = 8
        if cfg.backbone:
            self.backbone, (self.tap4, self.tap8), (w1, w2) = _zoo_backbone(cfg)
        else:
            w0, w1, w2 = cfg.widths
            self.stem = _cbr(cfg.in_chans, w0, 2)
            self.stage4 = nn.Sequential(_cbr(w0, w1, 2), _cbr(w1, w1))
            self.stage8 = nn.Sequential(_cbr(w1, w2, 2), _cbr(w2, w2))
        self.lat4, self.lat8 = nn.Conv2d(w1, cfg.neck, 1), nn.Conv2d(w2, cfg.neck, 1)
        self.smooth = _cbr(cfg.neck, cfg.neck)
        self.num_classes = cfg.num_classes
        self.num_features = cfg.neck
        self.heatmap = _head(cfg.neck, cfg.head, cfg.num_classes)
        self.size = _head(cfg.neck, cfg.head, 2)
        self.offset = _head(cfg.neck, cfg.head, 2)
        nn.init.constant_(self.heatmap[-1].bias, -2.19)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.backbone:
            maps = self.backbone.stage_features(x, upto=self.tap8)
            c4, c8 = maps[self.tap4], maps[self.tap8]
        else:
            c4 = self.stage4(self.stem(x))  # (B, w1, H/4, W/4)
            c8 = self.stage8(c4)  # (B, w2, H/8, W/8)
        p4 = self.lat4(c4) + F.interpolate(self.lat8(c8), size=c4.shape[-2:], mode="nearest")
        return self.smooth(p4)  # (B, neck, H/4, W/4)

    def forward_head(self, p: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return p.mean(dim=(2, 3))  # (B, neck): the pooled features, as the classifier contract gives
        return torch.cat([self.heatmap(p), self.size(p), self.offset(p)], dim=1)  # (B, C + 4, H/4, W/4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.heatmap = _head(self.cfg.neck, self.cfg.head, num_classes)
        nn.init.constant_(self.heatmap[-1].bias, -2.19)


@register_model("detection", input_kind="detection")
def centernet_small(**kwargs) -> CenterNet:
    """CenterNet-style anchor-free detector: 3-stage CNN, FPN neck at stride 4, heatmap + size + offset heads."""
    return build_model("centernet_small", CenterNet, CenterNetConfig(), kwargs)


__all__ = ["CenterNet", "CenterNetConfig", "centernet_small"]
