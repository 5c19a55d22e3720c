"""Stochastic depth (Huang et al. 2016), a.k.a. DropPath / drop-connect in EfficientNet.

On a residual branch `x + f(x)`: during training, each *sample's* branch output f(x) is zeroed with
probability p and the survivors are scaled by 1 / (1 - p), so the expected output is unchanged and eval needs
no rescaling (eval is the identity). A dropped branch makes the block the identity for that sample: the net
is trained as an ensemble of shallower nets, which regularises deep ViTs and EfficientNets.

Not `nn.Dropout`: that drops single activations; here one Bernoulli draw covers a sample's whole tensor.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lamina.errors import ModelError


def drop_path(x: torch.Tensor, p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Zero each sample of x (dim 0) with probability p and scale the rest by 1 / (1 - p); identity in eval."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, ...): one draw per sample
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ModelError(f"drop_path: probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
