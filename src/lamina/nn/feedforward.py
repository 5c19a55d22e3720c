"""Position-wise feed-forward blocks of transformers.

* `FeedForward(dim, hidden, activation, dropout, bias)`: x -> fc -> act -> out_proj -> dropout, the
  GPT-2 / BERT MLP (hidden = 4 * dim there).
* `SwiGLU(dim, hidden, bias)`: x -> out_proj(silu(gate_proj(x)) * up_proj(x)) (Shazeer 2020), the Llama MLP;
  with hidden = 8/3 * dim it costs the same as a 4x FeedForward.

The projection that writes back into the residual stream is called `out_proj` in every block (attention too),
so models can find it for the 1/sqrt(2 * n_layer) residual init without knowing which block they hold.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.nn.activations import get_activation


class FeedForward(nn.Module):
    """(B, T, dim) -> (B, T, dim) through a (B, T, hidden) activation."""

    def __init__(self, dim: int, hidden: int, activation: str | nn.Module = "gelu", dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.act = get_activation(activation) if isinstance(activation, str) else activation
        self.out_proj = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.out_proj(self.act(self.fc(x))))


class SwiGLU(nn.Module):
    """(B, T, dim) -> (B, T, dim): out_proj(drop(act(gate_proj(x)) * up_proj(x))); act = silu by default.

    Other gates are the same block with another activation: GEGLU (T5 v1.1's "gated-gelu") is
    `SwiGLU(dim, hidden, activation="gelu_tanh")`."""

    def __init__(self, dim: int, hidden: int, bias: bool = False, activation: str | nn.Module = "silu",
                 dropout: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.out_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = F.silu if activation == "silu" else (
            get_activation(activation) if isinstance(activation, str) else activation)
        self.drop = nn.Dropout(dropout)  # T5 drops the gated hidden units before out_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.drop(self.act(self.gate_proj(x)) * self.up_proj(x)))  # (B,T,hidden) -> (B,T,dim)
