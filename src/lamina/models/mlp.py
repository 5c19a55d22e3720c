"""Multi-layer perceptron for vectors (tabular rows, flattened images), with optional categorical embeddings.

    x (B, F) [+ embed(x_cat) (B, n_cat * E)] -> [Linear-Norm-Act-Dropout] * depth -> Linear -> logits

With `residual=True` the input is first projected to `width`, then each block is a pre-norm residual
`h = h + Dropout(Act(Linear(Norm(h))))` (the "ResNet-MLP" of Gorishniy et al. 2021), and a final
Norm-Act precedes the head. Residual blocks need equal widths, so `width` must then be a single number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from lamina.errors import InputShapeError, ModelError, unknown_name
from lamina.models.contract import build_model
from lamina.models.registry import register_model
from lamina.nn import get_activation, init_weights

NORMS = ("none", "batch", "layer")


@dataclass
class MLPConfig:
    in_features: int = 64  # sklearn digits flattened (8x8); set to your table's number of numeric columns
    num_classes: int = 10  # 0 -> no head, forward returns features
    depth: int = 2  # hidden layers; 2 is enough for most tabular problems, deeper rarely helps an MLP
    width: int | tuple[int, ...] = 256  # hidden width; a tuple gives per-layer widths (len == depth)
    activation: str = "relu"  # cheap, non-saturating; "gelu"/"silu" are smoother alternatives
    dropout: float = 0.1  # light regulariser: tabular data sets are small and MLPs overfit them fast
    norm: str = "none"  # "batch" helps deep/plain MLPs train; "layer" is batch-size independent
    residual: bool = False  # skip connections make depth > 3 trainable; plain is best for shallow nets
    cat_cardinalities: tuple[int, ...] = ()  # one entry per categorical column: its number of categories
    cat_embed_dim: int = 8  # per-column embedding width; small, since most columns have few categories

    def __post_init__(self):
        if isinstance(self.width, (list, tuple)):
            self.width = tuple(int(w) for w in self.width)
        self.cat_cardinalities = tuple(int(c) for c in self.cat_cardinalities)
        if self.in_features < 0 or (self.in_features == 0 and not self.cat_cardinalities):
            raise ModelError(f"mlp: in_features must be a positive integer, got {self.in_features}")
        if self.num_classes < 0:
            raise ModelError(f"mlp: num_classes must be >= 0, got {self.num_classes}")
        if self.depth < 0:
            raise ModelError(f"mlp: depth must be >= 0, got {self.depth}")
        if self.norm not in NORMS:
            raise ModelError(unknown_name("mlp norm", self.norm, NORMS))
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"mlp: dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.width, tuple) and len(self.width) != self.depth:
            raise ModelError(
                f"mlp: width has {len(self.width)} entries but depth={self.depth}; "
                f"give depth={len(self.width)} or a single width"
            )
        if self.residual and len(set(self.widths)) > 1:
            raise ModelError(f"mlp: residual=True needs a constant width, got width={self.width}")
        if any(c < 1 for c in self.cat_cardinalities):
            raise ModelError(f"mlp: cat_cardinalities must be positive, got {self.cat_cardinalities}")

    @property
    def widths(self) -> tuple[int, ...]:
        return self.width if isinstance(self.width, tuple) else (int(self.width),) * self.depth


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(dim)
    return nn.LayerNorm(dim) if kind == "layer" else nn.Identity()


class MLPBlock(nn.Module):
    """Plain: Linear -> Norm -> Act -> Dropout. Residual (pre-norm): h + Dropout(Act(Linear(Norm(h))))."""

    def __init__(self, in_dim: int, out_dim: int, cfg: MLPConfig, residual: bool):
        super().__init__()
        self.residual = residual
        self.norm = _norm(cfg.norm, in_dim if residual else out_dim)
        # BatchNorm right after the Linear subtracts the per-feature mean, which cancels a bias exactly.
        self.fc = nn.Linear(in_dim, out_dim, bias=residual or cfg.norm != "batch")
        self.act = get_activation(cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            return x + self.drop(self.act(self.fc(self.norm(x))))
        return self.drop(self.act(self.norm(self.fc(x))))


class MLP(nn.Module):
    flattens_input = True  # accepts (B, C, H, W) when C*H*W == in_features (see forward_features)

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.cfg = cfg
        self.input_spec = (cfg.in_features,)
        self.embeds = nn.ModuleList(nn.Embedding(c, cfg.cat_embed_dim) for c in cfg.cat_cardinalities)
        dim = cfg.in_features + len(cfg.cat_cardinalities) * cfg.cat_embed_dim
        widths = cfg.widths
        if cfg.residual and widths:
            self.proj = nn.Linear(dim, widths[0])  # input projection: residual blocks need in == out
            dim = widths[0]
            self.blocks = nn.Sequential(*(MLPBlock(dim, dim, cfg, residual=True) for _ in widths))
            self.final = nn.Sequential(_norm(cfg.norm, dim), get_activation(cfg.activation))
        else:
            self.proj = nn.Identity()
            layers = []
            for w in widths:
                layers.append(MLPBlock(dim, w, cfg, residual=False))
                dim = w
            self.blocks = nn.Sequential(*layers)
            self.final = nn.Identity()
        self.num_features = dim
        self.num_classes = cfg.num_classes
        self.head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        init_weights(self, cfg.activation)

    @property
    def _name(self) -> str:
        return getattr(self, "model_name", "mlp")

    def forward_features(self, x: torch.Tensor, x_cat: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() > 2 and math.prod(x.shape[1:]) == self.cfg.in_features:
            x = x.flatten(1)  # (B, C, H, W) -> (B, C*H*W): lets an MLP run on image data sets
        if x.dim() != 2 or x.shape[1] != self.cfg.in_features:
            got = ", ".join(["B", *(str(d) for d in x.shape[1:])])
            raise InputShapeError(f"model {self._name} expects input of shape (B, {self.cfg.in_features}), got ({got})")
        if self.embeds:
            n_cat = len(self.embeds)
            if x_cat is None or x_cat.dim() != 2 or x_cat.shape[1] != n_cat:
                got = None if x_cat is None else tuple(x_cat.shape)
                raise InputShapeError(
                    f"model {self._name} expects x_cat of shape (B, {n_cat}) (category codes), got {got}"
                )
            emb = [e(x_cat[:, i].long()) for i, e in enumerate(self.embeds)]  # n_cat x (B, E)
            x = torch.cat([x, *emb], dim=1)  # (B, F + n_cat * E)
        return self.final(self.blocks(self.proj(x)))  # (B, num_features)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, x_cat: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, x_cat))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self.head, self.cfg.activation)


@register_model("mlp", input_kind="vector")
def mlp(**kwargs) -> MLP:
    """MLP for vectors (tabular or flattened images), optional categorical embeddings and residual blocks."""
    return build_model("mlp", MLP, MLPConfig(), kwargs)
