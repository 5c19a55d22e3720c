"""Face embedders: a zoo backbone, an embedding layer and a cosine classifier over the training identities.

    x (B, C, H, W) -> backbone.forward_features -> pool -> dropout -> linear(embed_dim) -> BN -> L2-normalise
      = e (B, embed_dim), unit rows: the face's embedding, compared by cosine with enrolled ones
    head(e) = e @ normalise(W).T  (B, num_classes): cosines to the training identities' centres

The backbone is any classifier of the zoo (cnn_medium, resnet18, efficientnet, vit ...) built with no head, so
a face model is composed, not a copy of a backbone. Embedding + BN as the last layers follows ArcFace's
"BN-dropout-FC-BN" output block (Deng et al. 2019): the BN keeps embedding components on one scale before
normalisation. The classifier contract holds (forward = forward_head(forward_features)); `forward_head(..,
pre_logits=True)` is the embedding, so every tool that reads pooled features (few-shot probes, k-NN, export)
reads the face embedding. The margin (ArcFace / CosFace) lives in the task's loss, not in the model: at test
time the logits are plain cosines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.errors import ModelError
from lamina.models.contract import build_model
from lamina.models.registry import create_model, get_entry, register_model


class CosineHead(nn.Module):
    """Cosines between unit embeddings and unit class centres: (B, E) -> (B, K)."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return F.normalize(e, dim=-1) @ F.normalize(self.weight, dim=-1).t()


@dataclass
class FaceConfig:
    in_chans: int = 1
    num_classes: int = 40  # training identities (the cosine head); 0 -> embeddings only
    backbone: str = "cnn_medium"  # a zoo classifier; built with num_classes=0
    backbone_options: dict = field(default_factory=dict)
    embed_dim: int = 128
    dropout: float = 0.2  # before the embedding layer; 200 training faces overfit quickly without it

    def __post_init__(self):
        try:
            entry = get_entry(self.backbone)
        except ModelError as e:
            raise ModelError(f"face model backbone: {e}") from None
        if entry.input_kind != "image":
            raise ModelError(f"face model backbone: {self.backbone} is not an image classifier; use one of the "
                             "cnn, resnet, efficientnet or vit models")
        for k in ("in_chans", "embed_dim"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ModelError(f"face model: {k} must be a positive integer, got {v!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ModelError(f"face model: num_classes must be an integer >= 0, got {self.num_classes!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"face model: dropout must be in [0, 1), got {self.dropout}")


class FaceEmbedder(nn.Module):
    output_kind = "embedding"

    def __init__(self, cfg: FaceConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = create_model(cfg.backbone, **{**cfg.backbone_options, "in_chans": cfg.in_chans,
                                                      "num_classes": 0})
        self.input_spec = (cfg.in_chans, *getattr(self.backbone, "input_spec", (None, None, None))[1:])
        self.min_input_size = getattr(self.backbone, "min_input_size", 8)
        self.drop = nn.Dropout(cfg.dropout)
        self.embed = nn.Linear(self.backbone.num_features, cfg.embed_dim, bias=False)
        self.bn = nn.BatchNorm1d(cfg.embed_dim)
        self.num_features = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.head = CosineHead(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, f: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.backbone.forward_head(f, pre_logits=True).flatten(1)
        e = F.normalize(self.bn(self.embed(self.drop(pooled))), dim=-1)  # (B, embed_dim), unit rows
        return e if pre_logits else self.head(e)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = CosineHead(self.cfg.embed_dim, num_classes) if num_classes > 0 else nn.Identity()


@register_model("face")
def face_cnn(**kwargs) -> FaceEmbedder:
    """Face embedder on cnn_medium (3 stages 32/64/128): 128-d unit embeddings + cosine head; for ArcFace/CosFace."""
    return build_model("face_cnn", FaceEmbedder, FaceConfig(), kwargs)


@register_model("face")
def face_resnet(**kwargs) -> FaceEmbedder:
    """Face embedder on a small-input ResNet-18: 128-d unit embeddings + cosine head; for ArcFace/CosFace."""
    base = FaceConfig(backbone="resnet18", backbone_options={"small_input": True, "widths": (32, 64, 128, 256)})
    return build_model("face_resnet", FaceEmbedder, base, kwargs)


__all__ = ["CosineHead", "FaceConfig", "FaceEmbedder", "face_cnn", "face_resnet"]
