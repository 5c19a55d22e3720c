"""Normalisation layers for transformers, by name: `make_norm("layer" | "rms", dim)`.

`RMSNorm` is `torch.nn.RMSNorm` (torch >= 2.4), re-exported rather than rewritten:
y = x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), no mean subtraction and no bias, which is
what Llama-style models use. LayerNorm is `torch.nn.LayerNorm`; `bias=False` gives nanoGPT's bias-free variant.
"""

from __future__ import annotations

import torch.nn as nn

from lamina.errors import ModelError, unknown_name

RMSNorm = nn.RMSNorm

NORM_KINDS = ("layer", "rms")


def make_norm(kind: str, dim: int, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """A fresh norm over the last dim: "layer" -> LayerNorm(dim, eps, bias), "rms" -> RMSNorm(dim, eps).

    eps 1e-5 is GPT-2's and Llama's choice (torch's LayerNorm default too); `bias` only applies to "layer"."""
    key = str(kind).lower()
    if key == "layer":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if key == "rms":
        return RMSNorm(dim, eps=eps)
    raise ModelError(unknown_name("norm", kind, NORM_KINDS))
