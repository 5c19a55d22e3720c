"""Multi-head attention on PyTorch's `scaled_dot_product_attention` (SDPA), with GQA, RoPE and a KV cache.

    x (B, T, C) -> q (B, nh, T, hs);  kv (B, S, Ckv) -> k, v (B, n_kv, S, hs)
    y = softmax(q k^T / sqrt(hs) + mask) v  -> (B, nh, T, hs) -> (B, T, C) -> out_proj

* Self-attention when `kv` is None, cross-attention otherwise (`kv` is the encoder's output; `kv_dim` its width).
* Grouped-query attention (Ainslie et al. 2023): `n_kv_head` < `n_head` key/value heads, each shared by
  `n_head // n_kv_head` query heads; `n_kv_head == 1` is multi-query attention. SDPA's `enable_gqa` does the
  sharing without copying (torch >= 2.5); the explicit path repeats the kv heads.
* Masks are boolean, True = attend (SDPA's convention). `causal` is aligned bottom-right: query i of T sees
  keys j <= i + (S - T), which is the usual causal mask when S == T and the right one when the first S - T keys
  come from a KV cache. With no padding mask and no cache offset we pass `is_causal=True` and build no mask,
  which lets SDPA pick its flash / memory-efficient kernels.
* A query row whose keys are all masked (e.g. a left-padded position under a causal mask) outputs zeros in
  both paths, rather than NaN.
* `need_weights=True` runs the explicit softmax path and also returns the attention map (B, nh, T, S), the
  post-softmax weights before dropout (what attention-map visualisations want).
* `KVCache` holds preallocated keys/values for incremental decoding: each forward writes its new keys/values at
  the current length and attends over everything cached so far. Decoding runs without gradients; a cache is not
  meant to be backpropagated through across steps (its buffers are written in place).

* `attn_bias` (float, broadcastable to (B, nh, T, S)) is added to the scores before the softmax: T5's
  relative position bias, ALiBi. `scale` replaces 1/sqrt(hs) (T5 folds the scale into its init: scale=1).
* `KVCache.reorder(idx)` selects batch rows (beam search keeps the caches of the surviving beams).
* `positions` (T,) or (B, T), long: the tokens' positions for RoPE (HF's `position_ids`), when they are not
  offset .. offset+T-1 (a context-parallel rank's zigzag shard).
* `kernel`: a swappable component, None by default (SDPA). When set, plain self-attention calls (no kv, no
  cache, no padding mask, no bias, no weights) go to `kernel(q, k, v, causal=, scale=, dropout_p=)` with
  q (B, nh, T, hs), k/v (B, n_kv, T, hs); that is how lamina.engine.context_parallel swaps in ring attention
  from outside. A cached call (decoding) still runs SDPA; a masked, biased or weights call raises, since a
  kernel computing over a sharded sequence would make those silently wrong. A kernel with
  `supports_padding_mask = True` (lamina.nn.blockwise_attention.BlockwiseKernel) also gets
  `key_padding_mask=`: blockwise attention keeps memory linear in T where SDPA would fall back to a
  materialized mask.

`reference_attention` is the explicit softmax(QK^T / sqrt(d)) V, kept for parity tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.errors import InputShapeError, ModelError

# SDPA gained `enable_gqa` in torch 2.5; before that the kv heads are repeated (a copy, same numbers).
_SDPA_GQA = torch.__version__ >= "2.5"


def _fp32_attention_on_cpu(q: torch.Tensor) -> bool:
    """Under CPU bf16 autocast, run SDPA on fp32 q/k/v when heads are narrow: the CPU flash kernel's bf16
    backward is 2-3x slower than its fp32 one at head_dim <= 32 (torch 2.13, AVX512-BF16: 4.5 vs 2.0 ms for
    B12 H4 T64 D32); autocast would cast fp32 inputs back, so it is
    switched off around the call), while the projections around it keep bf16's 2x on matmuls. Wider heads stay in bf16."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-1] <= 32 and \
        torch.is_autocast_enabled("cpu")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, S, hs) -> (B, n_kv * n_rep, S, hs): kv head g serves query heads g*n_rep ... g*n_rep + n_rep-1."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def causal_mask(T: int, S: int, device=None) -> torch.Tensor:
    """(T, S) bool, True = attend; bottom-right aligned: query i sees keys j <= i + (S - T)."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                      causal: bool = False, bias: torch.Tensor | None = None,
                      scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) with a boolean mask (True = attend): (B, nh, T, S); fully masked rows are 0.
    scale defaults to 1/sqrt(hs)."""
    k = repeat_kv(k, q.shape[1] // k.shape[1])  # (B, nh, S, hs)
    T, S = q.shape[-2], k.shape[-2]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)  # (B, nh, T, S)
    if bias is not None:
        att = att + bias
    if causal:
        cm = causal_mask(T, S, q.device)
        mask = cm if mask is None else mask & cm
    if mask is None:
        return torch.softmax(att, dim=-1)
    att = torch.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
    return att.masked_fill(~mask, 0.0)  # rows with every key masked: NaN -> 0, as SDPA returns


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                        causal: bool = False, bias: torch.Tensor | None = None,
                        scale: float | None = None) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(hs) + bias) v; q (B, nh, T, hs), k/v (B, n_kv, S, hs), mask bool
    broadcastable to (B, nh, T, S) with True = attend. The ground truth for the SDPA path."""
    att = attention_weights(q, k, mask, causal, bias, scale)
    return att @ repeat_kv(v, q.shape[1] // v.shape[1])  # (B, nh, T, hs)


class KVCache:
    """Preallocated keys/values (B, n_kv, max_len, hs) for one attention layer, plus how many are filled."""

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled so far == position offset of the next token

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def reset(self) -> None:
        self.length = 0

    def reorder(self, idx: torch.Tensor) -> None:
        """Keep batch rows `idx` (B',) of the filled part, e.g. the parents of the beams that survive a step."""
        self.k = self.k.index_select(0, idx)
        self.v = self.v.index_select(0, idx)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, n_kv, T, hs); return every cached key/value so far, (B, n_kv, length, hs)."""
        T = k.shape[2]
        if self.length + T > self.max_len:
            raise InputShapeError(f"kv cache full: holds {self.length} of {self.max_len} positions, "
                                  f"cannot add {T}; make a larger cache or crop the context")
        if k.shape[:2] != self.k.shape[:2] or k.shape[3] != self.k.shape[3]:
            raise InputShapeError(f"kv cache made for keys of shape (B={self.k.shape[0]}, n_kv={self.k.shape[1]}, "
                                  f"T, hs={self.k.shape[3]}), got {tuple(k.shape)}")
        end = self.length + T
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class MultiHeadAttention(nn.Module):
    """Multi-head (grouped-query) self- or cross-attention; `forward` returns y (B, T, C) or (y, weights)."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int | None = None, dropout: float = 0.0,
                 bias: bool = True, causal: bool = False, rope: nn.Module | None = None,
                 kv_dim: int | None = None, scale: float | None = None):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if d_model % n_head:
            raise ModelError(f"attention: d_model ({d_model}) must be divisible by n_head ({n_head})")
        if n_kv_head < 1 or n_head % n_kv_head:
            raise ModelError(f"attention: n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        if not 0.0 <= dropout < 1.0:
            raise ModelError(f"attention: dropout must be in [0, 1), got {dropout}")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, d_model // n_head
        self.dropout, self.causal, self.rope, self.scale = dropout, causal, rope, scale
        kv_dim = d_model if kv_dim is None else kv_dim
        self.q_proj = nn.Linear(d_model, n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, n_kv_head * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(n_head * self.head_dim, d_model, bias=bias)  # writes into the residual stream
        self.attn_drop = nn.Dropout(dropout)  # explicit path only; SDPA takes dropout_p
        self.kernel = None  # swapped in from outside (e.g. RingAttention); None = SDPA

    def make_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> KVCache:
        w = self.k_proj.weight
        return KVCache(batch_size, self.n_kv_head, max_len, self.head_dim, dtype or w.dtype, device or w.device)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                need_weights: bool = False, attn_bias: torch.Tensor | None = None,
                positions: torch.Tensor | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C); kv (B, S, kv_dim) for cross-attention; key_padding_mask (B, S) bool, True = keep,
        covering every key (cached ones included); cache: self-attention only, T new positions are appended;
        attn_bias: float, broadcastable to (B, nh, T, S), added to the scaled scores; positions (T,) or
        (B, T) long: RoPE positions instead of offset .. offset+T-1."""
        B, T, C = x.shape
        if kv is not None and (cache is not None or self.rope is not None):
            raise ModelError("attention: a kv cache and rotary embeddings apply to self-attention only, "
                             "not with a separate kv input")
        src = x if kv is None else kv
        S = src.shape[1]
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(src).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, S, hs)
        v = self.v_proj(src).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, S, hs)
        offset = cache.length if cache is not None else 0
        if self.rope is not None:
            q, k = self.rope(q, k, offset) if positions is None else self.rope(q, k, positions=positions)
        if self.kernel is not None and kv is None and cache is None:
            masks_ok = getattr(self.kernel, "supports_padding_mask", False)
            if need_weights or attn_bias is not None or (key_padding_mask is not None and not masks_ok):
                raise ModelError(f"attention: the swapped-in kernel {type(self.kernel).__name__} takes plain "
                                 f"self-attention only; need_weights, attn_bias and key_padding_mask are not "
                                 f"supported with it (remove the kernel to use them)")
            extra = {"key_padding_mask": key_padding_mask} if key_padding_mask is not None else {}
            y = self.kernel(q, k, v, causal=self.causal, scale=self.scale,
                            dropout_p=self.dropout if self.training else 0.0, **extra)  # (B, nh, T, hs)
            return self.out_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))  # (B, T, C)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, n_kv, offset + T, hs)
            S = k.shape[2]
        mask, is_causal = self._mask(B, T, S, key_padding_mask, x.device, explicit=attn_bias is not None)

        if need_weights:
            att = attention_weights(q, k, mask, is_causal, attn_bias, self.scale)  # (B, nh, T, S)
            y = self.attn_drop(att) @ repeat_kv(v, self.n_head // self.n_kv_head)  # (B, nh, T, hs)
        else:
            gqa = self.n_kv_head != self.n_head
            if gqa and not _SDPA_GQA:
                k, v = repeat_kv(k, self.n_head // self.n_kv_head), repeat_kv(v, self.n_head // self.n_kv_head)
            if attn_bias is not None:  # SDPA takes one float mask: the bias, with -inf where masked
                bias = attn_bias.to(q.dtype)
                mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
            fp32 = _fp32_attention_on_cpu(q)
            if fp32:
                q, k, v = q.float(), k.float(), v.float()
                mask = mask.float() if mask is not None and mask.is_floating_point() else mask
            with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
                y = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal,
                    scale=self.scale,
                    **({"enable_gqa": True} if gqa and _SDPA_GQA else {}),
                )  # (B, nh, T, hs)
        y = self.out_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))  # (B, T, C)
        return (y, att) if need_weights else y

    def _mask(self, B: int, T: int, S: int, key_padding_mask: torch.Tensor | None,
              device, explicit: bool = False) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal): a boolean (B | 1, 1, T, S) mask, or None plus `is_causal` for SDPA's own causal
        kernels when causal is all there is (no padding mask, no cache offset, no bias: `explicit` False)."""
        # One query (T == 1) under a bottom-right causal mask sees every key: decoding steps need no mask.
        causal = self.causal and T > 1
        if key_padding_mask is None and (not causal or (T == S and not explicit)):
            return None, causal
        mask = causal_mask(T, S, device)[None, None] if causal else None  # (1, 1, T, S)
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, S):
                raise InputShapeError(f"key_padding_mask must be a bool tensor of shape (B, S) = ({B}, {S}) "
                                      f"(True = keep), got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
            kpm = key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
            mask = kpm if mask is None else mask & kpm  # (B, 1, T, S)
        return mask, False
