"""Vision Transformer (Dosovitskiy et al. 2020), laid out like timm's vision_transformer.py.

    x (B, C, H, W) -> PatchEmbed (conv p x p, stride p) -> tokens (B, N, D), N = (H/p)(W/p)
      -> [cls token; tokens] + pos_embed -> dropout                  (B, P + N, D), P = 1 with a cls token
      -> depth x Block: x + drop_path(attn(ln_1(x))), x + drop_path(mlp(ln_2(x)))   (pre-LN encoder)
      -> norm -> pool: the cls token ("cls") or the mean of the patch tokens ("mean") -> head

* Blocks are lamina.nn's MultiHeadAttention (not causal) and FeedForward (GELU, mlp_ratio x wide), LayerNorm
  eps 1e-6 as in the paper's JAX code and timm.
* `pool="mean"` drops the cls token altogether (Beyer et al. 2022, "Better plain ViT baselines": global average
  pooling is as good and simpler); then P = 0 and attention maps are (N, N).
* Position embeddings are learned for the `img_size` grid. Another input size (a multiple of the patch) gets
  the grid resized bicubically, the usual way to fine-tune at a new resolution (DeiT, timm); with
  `interpolate_pos=False` it is an InputShapeError instead.
* Attention maps: `model(x, return_attention=True)` -> (logits, maps) and `model.attention_maps(x)` -> maps,
  a list with one (B, n_head, P + N, P + N) tensor per block: the post-softmax weights before dropout, each row
  summing to 1 (what attention rollout, Abnar & Zuidema 2020, multiplies through the layers). This runs the
  explicit softmax path; plain forward uses SDPA.
* Init: Linear weights truncated normal std 0.02 and biases 0 (timm), the patch conv LeCun normal (the JAX
  ViT's), pos_embed std 0.02, cls token std 1e-6 (timm).

Checkpoint notes (for a future timm/JAX loader): timm fuses q, k, v into `attn.qkv` (3D, D); here they are
`attn.{q,k,v}_proj`: split timm's weight and bias in thirds along dim 0. `attn.proj` -> `attn.out_proj`,
`mlp.fc1/fc2` -> `mlp.fc/out_proj`, `norm1/norm2` -> `ln_1/ln_2`; cls_token, pos_embed, patch_embed.proj,
norm and head keep timm's names. The parameter count equals timm's (vit_tiny_patch16_224: 5,717,416).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.errors import InputShapeError, ModelError, unknown_name
from lamina.models.contract import build_model
from lamina.models.registry import register_model
from lamina.nn import DropPath, FeedForward, MultiHeadAttention, PatchEmbed, make_norm

POOLS = ("cls", "mean")


@dataclass
class ViTConfig:
    img_size: int = 224  # the grid pos_embed is learned for; other multiples of patch_size are interpolated
    patch_size: int = 16  # 16 px: 196 tokens at 224, the paper's ViT-B/16 trade-off of cost and accuracy
    in_chans: int = 3  # RGB
    num_classes: int = 1000  # ImageNet-1k; 0 -> no head
    embed_dim: int = 192  # ViT-Tiny (DeiT); token width D
    depth: int = 12  # encoder blocks
    n_head: int = 3  # head size 64, as in every ViT size
    mlp_ratio: float = 4.0  # MLP hidden = 4 D (the transformer default)
    pool: str = "cls"  # "cls" token (paper) or "mean" of patch tokens (no cls token; equal accuracy, simpler)
    dropout: float = 0.0  # after pos_embed, attention projection and MLP; 0 with stochastic depth, as DeiT
    attn_dropout: float = 0.0  # on attention weights; DeiT found it useless
    drop_path: float = 0.0  # stochastic depth, rising linearly to this over the blocks; 0.1 helps small data
    bias: bool = True  # biases in q/k/v/out projections (timm's qkv_bias=True)
    interpolate_pos: bool = True  # other input sizes: resize the position grid bicubically (else an error)

    def __post_init__(self):
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelError(f"vit: {name} must be a positive integer, got {value!r}")
        if self.num_classes < 0:
            raise ModelError(f"vit: num_classes must be >= 0, got {self.num_classes}")
        if self.img_size % self.patch_size:
            raise ModelError(f"vit: img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.embed_dim % self.n_head:
            raise ModelError(f"vit: embed_dim ({self.embed_dim}) must be divisible by n_head ({self.n_head})")
        if self.pool not in POOLS:
            raise ModelError(unknown_name("vit pool", self.pool, POOLS))
        if self.mlp_ratio <= 0:
            raise ModelError(f"vit: mlp_ratio must be positive, got {self.mlp_ratio}")
        for name in ("dropout", "attn_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ModelError(f"vit: {name} must be in [0, 1), got {getattr(self, name)}")


class Block(nn.Module):
    """Pre-LN encoder block: x + drop_path(drop(attn(ln_1(x)))), then x + drop_path(mlp(ln_2(x)))."""

    def __init__(self, cfg: ViTConfig, drop_path: float):
        super().__init__()
        D = cfg.embed_dim
        self.ln_1 = make_norm("layer", D, eps=1e-6)
        self.attn = MultiHeadAttention(D, cfg.n_head, dropout=cfg.attn_dropout, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)  # on the attention output (timm's proj_drop); FeedForward has its own
        self.ln_2 = make_norm("layer", D, eps=1e-6)
        self.mlp = FeedForward(D, int(D * cfg.mlp_ratio), activation="gelu", dropout=cfg.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, D) -> (x, attention weights (B, nh, T, T) or None)."""
        h = self.attn(self.ln_1(x), need_weights=need_weights)
        h, att = h if need_weights else (h, None)
        x = x + self.drop_path(self.drop(h))  # (B, T, D)
        return x + self.drop_path(self.mlp(self.ln_2(x))), att


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.input_spec = (cfg.in_chans, None, None)
        self.min_input_size = cfg.patch_size  # one patch; larger inputs must be multiples of it
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.in_chans, D, cfg.patch_size)
        self.grid_size = self.patch_embed.grid_size(cfg.img_size, cfg.img_size)  # (gh, gw) pos_embed is for
        self.num_prefix_tokens = 1 if cfg.pool == "cls" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.pool == "cls" else None
        n_pos = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, D))  # (1, P + N, D)
        self.pos_drop = nn.Dropout(cfg.dropout)
        rates = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()  # deeper blocks are dropped more often
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = make_norm("layer", D, eps=1e-6)
        self.num_features = D
        self.num_classes = cfg.num_classes
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Patch projection: LeCun normal, std 1 / sqrt(C p p), the JAX ViT's (flax Conv default) init. With std
        # 0.02 a 4x4 Fashion-MNIST patch would project to ~0.04, the scale of the random position embeddings.
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w, std=w[0].numel() ** -0.5)
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)  # timm: near zero, so it starts as "no content"

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """pos_embed (1, P + gh*gw, D) for a gh x gw patch grid: as learned, or bicubically resized."""
        if grid == self.grid_size:
            return self.pos_embed
        if not self.cfg.interpolate_pos:
            p = self.cfg.patch_size
            raise InputShapeError(
                f"model {getattr(self, 'model_name', 'vit')} has position embeddings for "
                f"{self.cfg.img_size}x{self.cfg.img_size} inputs, got {grid[0] * p}x{grid[1] * p}; "
                f"resize the images or set interpolate_pos=True"
            )
        P, D = self.num_prefix_tokens, self.pos_embed.shape[-1]
        prefix, patches = self.pos_embed[:, :P], self.pos_embed[:, P:]
        patches = patches.reshape(1, *self.grid_size, D).permute(0, 3, 1, 2)  # (1, D, gh0, gw0)
        patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)  # (1, D, gh, gw)
        return torch.cat([prefix, patches.flatten(2).transpose(1, 2)], dim=1)  # (1, P + gh*gw, D)

    def forward_features(self, x: torch.Tensor, return_attention: bool = False):
        """Images (B, C, H, W) -> normed tokens (B, P + N, D); with return_attention also the per-block maps."""
        grid = self.patch_embed.grid_size(x.shape[-2], x.shape[-1])
        x = self.patch_embed(x)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = self.pos_drop(x + self._pos_embed_for(grid))
        maps = []
        for blk in self.blocks:
            x, att = blk(x, need_weights=return_attention)  # (B, P + N, D), (B, nh, P + N, P + N) | None
            if return_attention:
                maps.append(att)
        x = self.norm(x)
        return (x, maps) if return_attention else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.cfg.pool == "cls" else x[:, self.num_prefix_tokens:].mean(1)  # (B, D)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """Images -> logits (B, num_classes); with return_attention=True, (logits, list of per-block maps)."""
        if not return_attention:
            return self.forward_head(self.forward_features(x))
        feats, maps = self.forward_features(x, return_attention=True)
        return self.forward_head(feats), maps

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One (B, n_head, P + N, P + N) post-softmax attention map per block, first block first."""
        return self.forward_features(x, return_attention=True)[1]

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)


VIT_CONFIGS: dict[str, ViTConfig] = {
    "vit_tiny": ViTConfig(),  # ViT-Ti/16 (DeiT-Tiny): 224 px, 16 px patches, 192 wide, 12 x 3 heads
    "vit_small": ViTConfig(embed_dim=384, n_head=6),  # ViT-S/16: 22M params
    # 28x28 grayscale (Fashion-MNIST, MNIST): 4 px patches give a 7x7 grid of 49 tokens, fine enough for garment
    # details while attention stays cheap on a CPU; 128 wide (head size 32), 6 blocks, MLP 2x (the MLP is
    # most of a block's cost; 2x keeps more epochs in a CPU budget), mean pooling. 0.8M params.
    # Measured on 1 CPU thread: ~195 s per Fashion-MNIST epoch, vs 330 s at width 192 and 107 s with 7 px patches.
    "vit_fashion": ViTConfig(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=6,
                             n_head=4, mlp_ratio=2.0, pool="mean"),
}


def _create(name: str, kwargs: dict) -> VisionTransformer:
    return build_model(name, VisionTransformer, VIT_CONFIGS[name], kwargs)


@register_model("vit")
def vit_tiny(**kwargs) -> VisionTransformer:
    """ViT-Tiny/16 (224 px, 192 wide, 12 blocks x 3 heads, cls token), 5.7M params as timm's vit_tiny_patch16_224."""
    return _create("vit_tiny", kwargs)


@register_model("vit")
def vit_small(**kwargs) -> VisionTransformer:
    """ViT-Small/16 (224 px, 384 wide, 12 blocks x 6 heads, cls token), 22.1M params."""
    return _create("vit_small", kwargs)


@register_model("vit")
def vit_fashion(**kwargs) -> VisionTransformer:
    """ViT for 28x28 grayscale: 4 px patches (49 tokens), 128 wide, 6 blocks x 4 heads, mean pooling, 0.8M params."""
    return _create("vit_fashion", kwargs)


def hf_vit_key_map(cfg: ViTConfig) -> dict[str, str]:
    """Hugging Face ViTForImageClassification parameter name -> lamina name, for a cls-pooled ViT with a head
    (the names transformers saves; 5.x renames them on load). With bias=False HF still has an output-projection
    bias (attention.output.dense.bias), which is not in this map: an exporter writes zeros there."""
    m = {"vit.embeddings.cls_token": "cls_token", "vit.embeddings.position_embeddings": "pos_embed",
         "vit.layernorm.weight": "norm.weight", "vit.layernorm.bias": "norm.bias",
         "classifier.weight": "head.weight", "classifier.bias": "head.bias"}
    for kind in ("weight", "bias"):
        m[f"vit.embeddings.patch_embeddings.projection.{kind}"] = f"patch_embed.proj.{kind}"
    for i in range(cfg.depth):
        hf, lm = f"vit.encoder.layer.{i}", f"blocks.{i}"
        parts = {"layernorm_before": "ln_1", "layernorm_after": "ln_2", "intermediate.dense": "mlp.fc",
                 "output.dense": "mlp.out_proj"}
        for h, o in parts.items():
            for kind in ("weight", "bias"):
                m[f"{hf}.{h}.{kind}"] = f"{lm}.{o}.{kind}"
        attn = {"attention.attention.query": "attn.q_proj", "attention.attention.key": "attn.k_proj",
                "attention.attention.value": "attn.v_proj", "attention.output.dense": "attn.out_proj"}
        for h, o in attn.items():
            for kind in ("weight", "bias") if cfg.bias else ("weight",):
                m[f"{hf}.{h}.{kind}"] = f"{lm}.{o}.{kind}"
    return m
