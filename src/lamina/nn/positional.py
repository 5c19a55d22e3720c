"""Positional information for sequence models: learned and sinusoidal absolute encodings, rotary embeddings.

* `LearnedPositionalEmbedding(max_len, dim)`: a trained (max_len, dim) table added to the token embeddings
  (GPT-2, BERT). `forward(x, offset)` returns `x + table[offset : offset + T]`; its parameter is named `weight`
  so GPT-2 / BERT checkpoints (`wpe.weight`, `position_embeddings.weight`) map one to one.
* Every encoding also takes explicit `positions`, a long tensor (T,) or (B, T) (HF's `position_ids`), instead
  of `offset`: a context-parallel rank holds tokens that are not contiguous in the sequence (zigzag shards),
  so their positions cannot be an offset. positions = arange(offset, offset + T) gives the same numbers.
* `SinusoidalPositionalEncoding(max_len, dim)`: the fixed encoding of Vaswani et al. 2017,
  PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(p / 10000^(2i/dim)); a non-persistent buffer
  (recomputed at construction, never saved in checkpoints).
* `RotaryEmbedding(head_dim, max_len, base)`: RoPE (Su et al. 2021) in the rotate-half layout of Llama / HF:
  channel i is paired with channel i + hs/2 and the pair is rotated by angle p * base^(-2i/hs), so
  `rope(q, k, offset)` (or `rope(q, k, positions=p)`) returns `q*cos + rotate_half(q)*sin` (same for k). q.k
  then depends only on the positions' difference. It is applied to q and k inside attention, not added to x.

RoPE's entry point is `forward(q, k, offset)` (alias `rotate`), not `apply`: `nn.Module.apply(fn)` is torch's
recursive init hook, and overriding it would break `model.apply(init_fn)` on any model holding a RoPE.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lamina.errors import InputShapeError, ModelError


def _check_len(what: str, offset: int, T: int, max_len: int) -> None:
    if offset + T > max_len:
        raise InputShapeError(f"{what}: positions {offset}..{offset + T - 1} exceed max_len={max_len}; "
                              f"build it with a larger max_len or use a shorter sequence")


def _check_positions(what: str, positions: torch.Tensor, T: int, max_len: int) -> None:
    """positions: integer (T,) or (B, T) with values in [0, max_len). The range is read only on the CPU: on an
    accelerator that read is a host sync per layer, and the models check the range once per forward."""
    if positions.dtype not in (torch.int64, torch.int32) or positions.dim() not in (1, 2) \
            or positions.shape[-1] != T:
        raise InputShapeError(f"{what}: positions must be an int64 tensor of shape (T,) or (B, T) with T={T}, "
                              f"got {str(positions.dtype).removeprefix('torch.')} {tuple(positions.shape)}")
    if positions.device.type == "cpu" and positions.numel():
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= max_len:
            raise InputShapeError(f"{what}: positions {lo}..{hi} are outside 0..{max_len - 1} (max_len={max_len}); "
                                  f"build it with a larger max_len or use a shorter sequence")


class LearnedPositionalEmbedding(nn.Module):
    """x (B, T, dim) -> x + weight[offset : offset + T]; weight (max_len, dim) starts at N(0, 0.02^2)."""

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.max_len, self.dim = max_len, dim
        self.weight = nn.Parameter(torch.empty(max_len, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)  # GPT-2 / BERT's init; N(0, 1) would swamp the token embeddings

    def forward(self, x: torch.Tensor, offset: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim) at positions offset .. offset+T-1, or at `positions` (T,) / (B, T) when given."""
        T = x.shape[1]
        if positions is not None:
            _check_positions("learned positional embedding", positions, T, self.max_len)
            return x + self.weight[positions]  # (B, T, dim) + (T, dim) or (B, T, dim)
        _check_len("learned positional embedding", offset, T, self.max_len)
        return x + self.weight[offset:offset + T]  # (B, T, dim) + (T, dim)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, dim={self.dim}"


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """(max_len, dim): PE[p, 2i] = sin(p * w_i), PE[p, 2i+1] = cos(p * w_i), w_i = 10000^(-2i/dim)."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]  # (L, 1); float64 so large p*w stay exact
    w = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))  # (ceil(dim/2),)
    pe = torch.zeros(max_len, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * w)
    pe[:, 1::2] = torch.cos(pos * w)[:, : dim // 2]  # odd dim: one fewer cosine column
    return pe.float()


class SinusoidalPositionalEncoding(nn.Module):
    """x (B, T, dim) -> x + PE[offset : offset + T]; PE is fixed (no parameters, not saved)."""

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.max_len, self.dim = max_len, dim
        self.register_buffer("pe", sinusoidal_table(max_len, dim), persistent=False)  # (max_len, dim)

    def forward(self, x: torch.Tensor, offset: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim) at positions offset .. offset+T-1, or at `positions` (T,) / (B, T) when given."""
        T = x.shape[1]
        if positions is not None:
            _check_positions("sinusoidal positional encoding", positions, T, self.max_len)
            return x + self.pe[positions].to(x.dtype)  # (B, T, dim) + (T, dim) or (B, T, dim)
        _check_len("sinusoidal positional encoding", offset, T, self.max_len)
        return x + self.pe[offset:offset + T].to(x.dtype)  # (B, T, dim) + (T, dim)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, dim={self.dim}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim split in halves (Llama / HF layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE tables cos/sin (max_len, head_dim) as non-persistent buffers; `rope(q, k, offset)` rotates both."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ModelError(f"rotary embedding: head_dim must be even, got {head_dim}")
        self.head_dim, self.max_len, self.base = head_dim, max_len, base
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # (hs/2,)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (L, hs/2)
        angles = torch.cat((angles, angles), dim=-1)  # (L, hs): channel i and i + hs/2 share an angle
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, nh, T, hs), k (B, n_kv, T, hs) at positions offset .. offset+T-1, or at `positions` (T,) or
        (B, T) when given -> rotated (q, k)."""
        T = q.shape[-2]
        if positions is not None:
            _check_positions("rotary embedding", positions, T, self.max_len)
            cos = self.cos[positions].to(q.dtype)  # (T, hs) or (B, T, hs)
            sin = self.sin[positions].to(q.dtype)
            if positions.dim() == 2:  # (B, T, hs) -> (B, 1, T, hs): the same angles for every head
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        else:
            _check_len("rotary embedding", offset, T, self.max_len)
            cos = self.cos[offset:offset + T].to(q.dtype)  # (T, hs)
            sin = self.sin[offset:offset + T].to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    rotate = forward

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_len={self.max_len}, base={self.base}"


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """T5's bucketing of key_pos - query_pos (Raffel et al. 2020, sec. 2.1): half the buckets are exact small
    offsets, the rest grow logarithmically up to max_distance (everything beyond shares the last bucket).
    Bidirectional (encoder) splits the buckets by sign; unidirectional (decoder) sees only the past."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # future keys (> 0) are masked anyway; map them to 0
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log-spaced buckets between max_exact and max_distance; the float division is safe where is_small
    large = max_exact + (torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """T5 relative position bias: a learned scalar per (bucket, head), added to the attention scores.

    `forward(T, S, offset)` -> (1, n_head, T, S) for queries at positions offset .. offset+T-1 and keys at
    0 .. S-1 (offset = the KV cache length while decoding)."""

    def __init__(self, n_head: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        self.n_head, self.num_buckets, self.max_distance = n_head, num_buckets, max_distance
        self.bidirectional = bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, n_head)

    def forward(self, T: int, S: int, offset: int = 0) -> torch.Tensor:
        device = self.relative_attention_bias.weight.device
        q_pos = torch.arange(offset, offset + T, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        buckets = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (T, S, nh) -> (1, nh, T, S)

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, buckets={self.num_buckets}, max_distance={self.max_distance}, " \
               f"bidirectional={self.bidirectional}"
