"""Patch embedding for vision transformers (Dosovitskiy et al. 2020): cut an image into p x p patches and
project each to a D-wide token.

    x (B, C, H, W) -> conv(k=p, stride=p) -> (B, D, H/p, W/p) -> flatten -> tokens (B, N, D), N = (H/p)(W/p)

A conv with kernel = stride = p is exactly "flatten each patch (C*p*p values, channel-major) and apply one
shared Linear", but runs as a single oneDNN/cuDNN call; its weight (D, C, p, p) is the layout timm and the
original JAX checkpoints use. Tokens come out in row-major patch order (left to right, then top to bottom).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lamina.errors import InputShapeError, ModelError


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) with N = (H / ph) * (W / pw); H and W must be multiples of the patch size."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int | tuple[int, int] = 16, bias: bool = True):
        super().__init__()
        self.patch_size = _pair(patch_size)
        if min(self.patch_size) < 1 or in_chans < 1 or embed_dim < 1:
            raise ModelError(f"patch embedding: need patch_size, in_chans, embed_dim >= 1, got "
                             f"{self.patch_size}, {in_chans}, {embed_dim}")
        self.in_chans, self.embed_dim = in_chans, embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, stride=self.patch_size, bias=bias)

    def grid_size(self, h: int, w: int) -> tuple[int, int]:
        """Patches per column and row for an h x w image; InputShapeError if a side is not a multiple."""
        ph, pw = self.patch_size
        if h % ph or w % pw or h < ph or w < pw:
            raise InputShapeError(
                f"patch embedding: image {h}x{w} is not a positive multiple of the patch size {ph}x{pw}; "
                f"resize, pad or crop it to a multiple (e.g. {max(ph, h // ph * ph)}x{max(pw, w // pw * pw)})"
            )
        return h // ph, w // pw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise InputShapeError(f"patch embedding: expects images (B, {self.in_chans}, H, W), "
                                  f"got {tuple(x.shape)}")
        self.grid_size(x.shape[2], x.shape[3])
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, gh, gw) -> (B, gh*gw, D)
