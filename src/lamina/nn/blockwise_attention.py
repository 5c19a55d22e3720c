"""Exact attention computed in key/value blocks with an online softmax (FlashAttention-style).

    q (B, H, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv)  ->  out (B, H, T, Dv)
    out = softmax(q k^T * scale + mask) v, never holding a T x S matrix: memory is linear in T and S.

Why write it when PyTorch has SDPA: SDPA's fused kernels are the fast path and `MultiHeadAttention` keeps using
them, but they are opaque. Ring attention (nn/ring_attention.py) needs the pieces a fused kernel hides: a
forward over one (query chunk, key chunk) pair that returns the logsumexp, a merge of two partial results, and
a backward against the *global* output and logsumexp. This module provides those pieces and builds exact
attention from them.

Two implementations of the same math, chosen by `impl=`:
* "reference": pure PyTorch, the loops below over plain matmuls; readable, and the parity oracle.
* "fused": every (query block, key block) tile is one call of PyTorch's fused flash kernel, which also returns
  the tile's logsumexp (CPU: `aten._scaled_dot_product_flash_attention_for_cpu` and its `_backward`; CUDA:
  `aten._scaled_dot_product_efficient_attention` and its backward). Tiles are merged with `merge_attention`;
  the backward calls the kernel's backward with the FINAL out and lse (rows that saw no key: lse +inf, so
  P = 0), which makes each tile's dq / dk / dv exact. Causal tiles are never masked densely: rows that see
  nothing are dropped, keys every remaining row sees go in one unmasked call, the rest in one top-left
  `is_causal` call. Padding / attn_mask go in as the kernel's additive float mask (CPU only).
* "auto" (default): "fused" where it applies (CPU fp32 / bf16 / fp16 with D == Dv; CUDA likewise without
  masks and D % 8 == 0, falling back to "reference" with a warning if the kernel raises; that branch has only
  a CUDA-gated test), else "reference" (fp64, Dv != D, other devices). "fused" demands the kernel (fp64
  allowed on CPU) and raises if it cannot.
Default block sizes differ: the reference's score tiles are Bq x Bk tensors (512); the fused kernel tiles
internally, so bigger blocks only mean fewer calls and merges (4096; measured in
benchmarks/blockwise_attention.py).

Reference forward (online softmax, Milakov & Gimelshein 2018; Dao et al. 2022). For each query block (Bq rows) we walk
the key blocks (Bk keys) keeping a running row max m, running sum l and unnormalized output acc:

    s = q_blk k_blk^T * scale                       # (.., Bq, Bk): the only score tile alive at a time
    m' = max(m, rowmax(s));  p = exp(s - m');  a = exp(m - m')
    l = a * l + rowsum(p);   acc = a * acc + p v_blk;  m = m'
    out = acc / l,  lse = m + log(l)

Reference backward (FlashAttention-2): autograd saves only q, k, v, out and lse; with D = rowsum(dO * O), for each key
block (outer loop, so dK/dV accumulate locally) and each query block that can see it:

    P = exp(S - lse);  dV += P^T dO;  dP = dO V^T;  dS = P * (dP - D);  dQ += dS K * scale;  dK += dS^T Q * scale

Memory: the inputs, out, lse (B, H, T) and, in backward, fp32 copies of q / dO / dQ; plus a few (Bq x Bk) tiles
per (batch, head) (reference) or the kernel's internal tiles (fused). Nothing scales with T * S.

Conventions (the same as lamina.nn.attention), for both implementations:
* `causal` is aligned bottom-right: query i of T sees keys j <= i + (S - T). Key blocks entirely above the
  diagonal are skipped, not masked, so causal attention does about half the work.
* `key_padding_mask` is (B, S) bool, True = keep.
* A query row with no visible key outputs zeros (not NaN), gets lse = -inf and zero gradients.
* Grouped-query attention: kv head g serves query heads g*rep ... g*rep + rep - 1 (rep = H // Hkv). k and v are
  never repeated (reference: the rep query heads of a group are stacked as extra rows against the group's one
  k/v block, so dK/dV sum over the group for free; q, dO and dQ are permuted once to that row layout. The CPU
  kernel takes GQA as it is; on CUDA k/v are expanded per call.)
* Precision: reference: fp32 and fp64 compute in their own dtype; bf16/fp16 inputs are upcast to fp32 for every
  matmul and accumulator, and the result is cast back. fused: the kernel takes bf16/fp16 as they are
  (fp32 accumulators inside, like SDPA); each tile's out is rounded to the input dtype before the fp32 merge,
  and a float mask is cast to the input dtype.

Public API
----------
Every entry point below takes `impl="auto" | "fused" | "reference"` (see above); `block_size=None` /
`q_block_size=None` mean the chosen implementation's default.

`blockwise_attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, block_size=None,
q_block_size=None, impl="auto") -> out` is exact attention with autograd (a custom `torch.autograd.Function`
whose backward recomputes the score tiles). `scale` defaults to 1/sqrt(D); `block_size` is Bk, `q_block_size` Bq
(default Bk).

`BlockwiseAttention(block_size=None, q_block_size=None, impl="auto")` is a module with SDPA's call signature,
`(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)`, so it can stand
where `torch.nn.functional.scaled_dot_product_attention` is called (as in `MultiHeadAttention.forward`). Like
SDPA, its `is_causal` is top-left aligned (query i sees keys j <= i) and `attn_mask` is bool (True = attend)
or float (added to the scores; not differentiated), broadcastable to (B, H, T, S). A dense mask is itself
T x S, so for long sequences pass `causal` / `key_padding_mask` to `blockwise_attention` instead.
`dropout_p > 0` is refused (no dropout in this kernel).

Primitives for ring attention (one query chunk against one key/value chunk; no autograd graph is recorded, the
caller wraps them in its own autograd.Function):

* `attention_chunk_forward(q, k, v, *, scale, causal_offset=None, key_padding_mask=None, block_size=None,
  q_block_size=None, out_dtype=None, impl="auto") -> (out, lse)`: out (B, H, T, Dv) in `out_dtype` (default q's
  dtype; pass torch.float32 to merge bf16 chunks in fp32), lse (B, H, T) fp32 (fp64 for fp64 inputs).
  `causal_offset` None = no causal mask; an int c = query i sees key j iff j <= i + c. For a query chunk
  starting at global position q0 and a key chunk starting at k0 of a causal sequence with T_total queries and
  S_total keys, c = q0 - k0 + (S_total - T_total); c = S - T on whole sequences is `causal=True`.
  Rows with no visible key get out 0 and lse -inf. `key_padding_mask` is (B, S_chunk).
* `merge_attention(out_a, lse_a, out_b, lse_b) -> (out, lse)`: combine two partial results over disjoint key
  sets: lse = log(e^lse_a + e^lse_b), out = (e^(lse_a - lse) out_a + e^(lse_b - lse) out_b). -inf on both sides
  gives out 0, lse -inf. Computed in fp32 (fp64 if an input is); out comes back in out_a's dtype.
* `attention_chunk_backward(q, k, v, out, lse, dout, *, scale, causal_offset=None, key_padding_mask=None,
  block_size=None, q_block_size=None, grad_dtype=None, impl="auto") -> (dq, dk, dv)`: `out` and `lse` must be the FINAL
  output and logsumexp of these queries over ALL keys (every chunk merged). Then P = exp(S - lse) are the true
  global probabilities of this chunk's keys, and summing dq over the key chunks, and taking each chunk's dk/dv,
  gives exactly the full-attention gradients. dk/dv are shaped like k/v (summed over each GQA group's query
  heads); grads come back in `grad_dtype` (default: the dtype of q / k / v).
"""

from __future__ import annotations

import math
import warnings
from numbers import Real

import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.errors import InputShapeError

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NEG_INF = float("-inf")
IMPLS = ("auto", "fused", "reference")
# default (key) block sizes: the reference materializes Bq x Bk score tiles; the fused kernel tiles internally,
# so its blocks only set how many calls and merges there are (4096: within noise of one SDPA call at 1-4k tokens)
_DEFAULT_BLOCK = {"reference": 512, "fused": 4096}


# ----------------------------------------------------------------------------------------------- validation
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (gradcheck needs it); everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_qkv(fn: str, q, k, v, key_padding_mask=None) -> tuple[int, int, int, int, int, int]:
    """Validate q (B, H, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), mask (B, S); return (B, H, Hkv, T, S, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputShapeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise InputShapeError(f"{fn}: {name} must be 4-D (B, heads, length, head_dim), got shape "
                                  f"{tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise InputShapeError(f"{fn}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise InputShapeError(f"{fn}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise InputShapeError(f"{fn}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, T, D = q.shape
    Bk, Hkv, S, Dk = k.shape
    if k.shape[:3] != v.shape[:3]:
        raise InputShapeError(f"{fn}: k and v must agree in (B, Hkv, S), got k {tuple(k.shape)} and "
                              f"v {tuple(v.shape)}")
    if Bk != B:
        raise InputShapeError(f"{fn}: q and k must have the same batch size, got q {tuple(q.shape)} and "
                              f"k {tuple(k.shape)}")
    if Dk != D:
        raise InputShapeError(f"{fn}: q and k must have the same head_dim, got q {tuple(q.shape)} (D={D}) and "
                              f"k {tuple(k.shape)} (D={Dk})")
    if Hkv < 1 or H % Hkv:
        raise InputShapeError(f"{fn}: query heads ({H}) must be a multiple of key/value heads ({Hkv}), "
                              f"got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if key_padding_mask is not None and (not isinstance(key_padding_mask, torch.Tensor)
                                         or key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (B, S)):
        got = (f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
               if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__)
        raise InputShapeError(f"{fn}: key_padding_mask must be a bool tensor of shape (B, S) = ({B}, {S}) "
                              f"(True = keep), got {got}")
    return B, H, Hkv, T, S, D


def _check_blocks(fn: str, block_size, q_block_size) -> tuple[int | None, int | None]:
    """Validate (q_block_size, block_size); None stays None (= the implementation's default, see _blocks)."""
    for name, b in (("block_size", block_size), ("q_block_size", q_block_size)):
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise InputShapeError(f"{fn}: {name} must be a positive integer or None (the default), got {b!r}")
    return q_block_size, block_size


def _blocks(impl: str, bq: int | None, bk: int | None) -> tuple[int, int]:
    """(Bq, Bk) for the implementation that runs: Bk defaults per implementation, Bq to Bk."""
    bk = _DEFAULT_BLOCK[impl] if bk is None else bk
    return (bk if bq is None else bq), bk


def _check_impl(fn: str, impl) -> str:
    if impl not in IMPLS:
        raise InputShapeError(f"{fn}: impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    return impl


def _fused_unsupported(q: torch.Tensor, v: torch.Tensor, masked: bool, strict: bool) -> str | None:
    """Why the fused kernel cannot run these inputs (None: it can). `strict` (impl="fused") allows fp64 on CPU."""
    if q.shape[-1] != v.shape[-1]:
        return f"the kernels need v's head_dim ({v.shape[-1]}) equal to q's ({q.shape[-1]})"
    if q.device.type == "cpu":
        if not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
            return "this PyTorch has no aten._scaled_dot_product_flash_attention_for_cpu"
        if q.dtype == torch.float64 and not strict:
            return "float64 runs the reference path (the oracle for gradcheck)"
        return None
    if q.device.type == "cuda":
        if q.dtype == torch.float64:
            return "the CUDA kernel takes float16, bfloat16 or float32, not float64"
        if masked:
            return "masks other than causal are not passed to the CUDA kernel"
        if q.shape[-1] % 8:
            return f"the CUDA kernel needs head_dim a multiple of 8, got {q.shape[-1]}"
        return None
    return f"no fused attention kernel with logsumexp on device type '{q.device.type}'"


def _pick_impl(fn: str, impl: str, q: torch.Tensor, v: torch.Tensor, masked: bool) -> str:
    """Resolve "auto" to "fused" or "reference"; impl="fused" raises when the kernel cannot run the inputs."""
    if impl == "reference":
        return impl
    why = _fused_unsupported(q, v, masked, strict=impl == "fused")
    if why is None:
        return "fused"
    if impl == "fused":
        raise InputShapeError(f"{fn}: impl='fused' cannot run these inputs: {why}; use impl='auto' or 'reference'")
    return "reference"


def _check_scale(fn: str, scale, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale):
        raise InputShapeError(f"{fn}: scale must be a finite number or None (= 1/sqrt(head_dim)), got {scale!r}")
    return float(scale)


def _check_offset(fn: str, causal_offset) -> int | None:
    if causal_offset is not None and (isinstance(causal_offset, bool) or not isinstance(causal_offset, int)):
        raise InputShapeError(f"{fn}: causal_offset must be an int (query i sees key j iff j <= i + offset) "
                              f"or None (no causal mask), got {causal_offset!r}")
    return causal_offset


def _prep_attn_mask(fn: str, mask, B: int, H: int, Hkv: int, T: int, S: int, dtype) -> torch.Tensor | None:
    """SDPA-style attn_mask broadcastable to (B, H, T, S) -> (Bm, H|1, Tm, Sm), bool or float in the compute
    dtype (each implementation converts it: _mask_rows for the reference, _additive for the fused kernel)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputShapeError(f"{fn}: attn_mask must be a bool (True = attend) or float (added) tensor, got {got}")
    if mask.dtype != torch.bool and mask.requires_grad:
        raise InputShapeError(f"{fn}: a float attn_mask that requires grad (a learned bias) is not "
                              f"differentiated by blockwise attention; use SDPA for learned biases")
    full = (B, H, T, S)
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    if mask.ndim > 4 or any(m not in (1, f) for m, f in zip(shape, full)):
        raise InputShapeError(f"{fn}: attn_mask of shape {tuple(mask.shape)} does not broadcast to "
                              f"(B, H, T, S) = {full}")
    mask = mask.reshape(shape)
    return mask if mask.dtype == torch.bool else mask.to(_compute_dtype(dtype))


def _mask_rows(mask: torch.Tensor | None, Hkv: int) -> torch.Tensor | None:
    """(Bm, H|1, Tm, Sm) -> a view (Bm, Hkv|1, Tm, rep|1, Sm) in the reference's row layout."""
    if mask is None:
        return None
    if mask.shape[1] == 1:
        return mask[:, :, :, None, :]  # (Bm, 1, Tm, 1, Sm)
    return mask.unflatten(1, (Hkv, mask.shape[1] // Hkv)).transpose(2, 3)  # (Bm, Hkv, Tm, rep, Sm)


# ----------------------------------------------------------------------------------------------- layout
def _to_rows(x: torch.Tensor, Hkv: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, T, *F) -> (B, Hkv, T * rep, *F): the rep query heads of a kv group become rows t*rep + r, so a
    query block [i0, i1) is the contiguous row slice [i0*rep, i1*rep) and meets its group's k/v with no copy."""
    B, H, T = x.shape[:3]
    x = x.unflatten(1, (Hkv, H // Hkv)).transpose(2, 3)  # (B, Hkv, T, rep, *F)
    return x.reshape(B, Hkv, T * (H // Hkv), *x.shape[4:]).to(dtype).contiguous()


def _from_rows(x: torch.Tensor, H: int, T: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of _to_rows: (B, Hkv, T * rep, *F) -> (B, H, T, *F)."""
    B, Hkv = x.shape[:2]
    x = x.reshape(B, Hkv, T, H // Hkv, *x.shape[3:]).transpose(2, 3)  # (B, Hkv, rep, T, *F)
    return x.reshape(B, H, T, *x.shape[4:]).to(dtype)


class _Tiles:
    """Which tiles exist and how to mask one: shared by forward and backward so they mask identically."""

    def __init__(self, B, Hkv, rep, T, S, bq, bk, causal_offset, kpm, attn_mask):
        self.B, self.Hkv, self.rep, self.T, self.S, self.bq, self.bk = B, Hkv, rep, T, S, bq, bk
        self.c = causal_offset
        self.kpm = None if kpm is None else kpm[:, None, None, None, :]  # (B, 1, 1, 1, S)
        self.attn = attn_mask  # (Bm, Hkv|1, Tm, rep|1, Sm) bool or float, or None

    def q_blocks(self):
        return range(0, self.T, self.bq)

    def k_blocks(self):
        return range(0, self.S, self.bk)

    def k_blocks_for(self, i0: int, i1: int):
        """Key blocks that query rows [i0, i1) can see: under a causal mask, stop past the diagonal (the last
        row, i1 - 1, sees keys up to i1 - 1 + c)."""
        stop = self.S if self.c is None else max(0, min(self.S, i1 + self.c))
        return range(0, stop, self.bk)

    def q_blocks_for(self, j0: int):
        """Query blocks that can see key block j0: under a causal mask, rows i >= j0 - c."""
        start = 0 if self.c is None else max(0, j0 - self.c)
        return range(start - start % self.bq, self.T, self.bq)

    def scores(self, qb: torch.Tensor, kb: torch.Tensor, i0: int, j0: int) -> torch.Tensor:
        """q rows of query block i0 against key block j0: masked, scaled scores (B, Hkv, bq * rep, bk)."""
        s = qb @ kb.transpose(-2, -1)  # (B, Hkv, bq * rep, bk); q is prescaled
        bq, bk = qb.shape[2] // self.rep, kb.shape[2]
        i1, j1 = i0 + bq, j0 + bk
        s5 = s.view(self.B, self.Hkv, bq, self.rep, bk)
        if self.attn is not None:
            a = self.attn
            a = a[:, :, i0:i1] if a.shape[2] > 1 else a
            a = a[..., j0:j1] if a.shape[4] > 1 else a
            if a.dtype == torch.bool:
                s5.masked_fill_(~a, _NEG_INF)
            else:
                s5.add_(a)
        if self.kpm is not None:
            s5.masked_fill_(~self.kpm[..., j0:j1], _NEG_INF)
        if self.c is not None and j1 - 1 > i0 + self.c:  # the tile crosses the causal diagonal
            i = torch.arange(i0, i1, device=s.device)[:, None, None]  # (bq, 1, 1)
            j = torch.arange(j0, j1, device=s.device)  # (bk,)
            s5.masked_fill_(j > i + self.c, _NEG_INF)
        return s


# ----------------------------------------------------------------------------------------------- kernels
def _forward(q, k, v, scale, causal_offset, kpm, attn_mask, bq, bk, out_dtype):
    """Online-softmax forward: returns out (B, H, T, Dv) in out_dtype and lse (B, H, T) in the compute dtype."""
    B, H, T, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    rep, cdt = H // Hkv, _compute_dtype(q.dtype)
    tiles = _Tiles(B, Hkv, rep, T, S, bq, bk, causal_offset, kpm, _mask_rows(attn_mask, Hkv))
    qr = _to_rows(q, Hkv, cdt) * scale  # (B, Hkv, T * rep, D), prescaled once; never in place (may alias q)
    kc, vc = k.to(cdt).contiguous(), v.to(cdt).contiguous()  # (B, Hkv, S, D|Dv); no copy for contiguous fp32
    out = torch.empty(B, Hkv, T * rep, Dv, dtype=cdt, device=q.device)
    lse = torch.empty(B, Hkv, T * rep, dtype=cdt, device=q.device)
    for i0 in tiles.q_blocks():
        i1 = min(i0 + bq, T)
        qb = qr[:, :, i0 * rep:i1 * rep]  # (B, Hkv, R, D), R = (i1 - i0) * rep
        R = qb.shape[2]
        m = torch.full((B, Hkv, R, 1), _NEG_INF, dtype=cdt, device=q.device)  # running row max
        l = torch.zeros(B, Hkv, R, 1, dtype=cdt, device=q.device)  # running row sum of exp(s - m)  # noqa: E741
        acc = torch.zeros(B, Hkv, R, Dv, dtype=cdt, device=q.device)  # running unnormalized output
        for j0 in tiles.k_blocks_for(i0, i1):
            j1 = min(j0 + bk, S)
            s = tiles.scores(qb, kc[:, :, j0:j1], i0, j0)  # (B, Hkv, R, bk)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            m_safe = m_new.masked_fill(m_new == _NEG_INF, 0.0)  # rows with nothing visible yet: avoid inf - inf
            p = s.sub_(m_safe).exp_()  # masked entries -> exp(-inf) = 0
            alpha = (m - m_safe).exp_()  # rescales the old statistics to the new max (0 while m was -inf)
            l.mul_(alpha).add_(p.sum(-1, keepdim=True))
            acc.mul_(alpha).add_(p @ vc[:, :, j0:j1])
            m = m_new
        seen = l > 0  # rows that saw at least one key
        out[:, :, i0 * rep:i1 * rep] = acc / torch.where(seen, l, 1.0)  # unseen rows: acc is 0 -> out 0
        lse[:, :, i0 * rep:i1 * rep] = torch.where(seen, m + l.log(), _NEG_INF).squeeze(-1)
    return _from_rows(out, H, T, out_dtype), _from_rows(lse, H, T, cdt)


def _backward(q, k, v, out, lse, dout, scale, causal_offset, kpm, attn_mask, bq, bk, grad_dtype):
    """FlashAttention-2 backward against the (global) out and lse; returns dq, dk, dv in grad_dtype."""
    B, H, T, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    rep, cdt = H // Hkv, _compute_dtype(q.dtype)
    tiles = _Tiles(B, Hkv, rep, T, S, bq, bk, causal_offset, kpm, _mask_rows(attn_mask, Hkv))
    qr = _to_rows(q, Hkv, cdt) * scale  # (B, Hkv, T * rep, D); not in place: may alias q
    dor = _to_rows(dout, Hkv, cdt)  # (B, Hkv, T * rep, Dv)
    Dr = (dor * _to_rows(out, Hkv, cdt)).sum(-1, keepdim=True)  # (B, Hkv, T * rep, 1): rowsum(dO * O)
    # rows that saw no key: lse -inf -> +inf makes P = exp(s - inf) = 0 even where s is -inf too
    lser = _to_rows(lse, Hkv, cdt)
    lser = lser.masked_fill(lser == _NEG_INF, float("inf")).unsqueeze(-1)  # (B, Hkv, T * rep, 1); a new tensor
    kc, vc = k.to(cdt).contiguous(), v.to(cdt).contiguous()
    dqr = torch.zeros_like(qr)  # (B, Hkv, T * rep, D): accumulated over key blocks
    dk = torch.zeros(B, Hkv, S, D, dtype=cdt, device=q.device)
    dv = torch.zeros(B, Hkv, S, Dv, dtype=cdt, device=q.device)
    for j0 in tiles.k_blocks():
        j1 = min(j0 + bk, S)
        kb, vb = kc[:, :, j0:j1], vc[:, :, j0:j1]  # (B, Hkv, bk, D|Dv)
        dkb, dvb = dk[:, :, j0:j1], dv[:, :, j0:j1]  # views: accumulate in place, per key block
        for i0 in tiles.q_blocks_for(j0):
            i1 = min(i0 + bq, T)
            r0, r1 = i0 * rep, i1 * rep
            qb, dob = qr[:, :, r0:r1], dor[:, :, r0:r1]  # (B, Hkv, R, D|Dv)
            p = tiles.scores(qb, kb, i0, j0).sub_(lser[:, :, r0:r1]).exp_()  # (B, Hkv, R, bk) global probs
            dvb.add_(p.transpose(-2, -1) @ dob)  # sums the rep heads of the group: (B, Hkv, bk, Dv)
            ds = (dob @ vb.transpose(-2, -1)).sub_(Dr[:, :, r0:r1]).mul_(p)  # dS = P * (dP - D)
            dqr[:, :, r0:r1].add_(ds @ kb)  # times scale below
            dkb.add_(ds.transpose(-2, -1) @ qb)  # q is prescaled: dS^T Q * scale
    dq = _from_rows(dqr.mul_(scale), H, T, grad_dtype)
    return dq, dk.to(grad_dtype), dv.to(grad_dtype)


# ----------------------------------------------------------------------------------------------- fused kernels
# One call = one tile: (out, lse) of q rows against k/v keys; `causal` is top-left (row r sees keys <= r); `mask`
# an additive float mask in q's dtype broadcastable to (B, H, rows, keys), or None. Looked up by name at call
# time (_kernels), so a test can count the calls.
def _cpu_flash_forward(q, k, v, causal, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                      scale=scale)


def _cpu_flash_backward(dout, q, k, v, out, lse, causal, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)


def _expand_kv(t: torch.Tensor, H: int) -> torch.Tensor:
    return t if t.shape[1] == H else t.repeat_interleave(H // t.shape[1], dim=1)  # (B, H, S, D)


def _cuda_efficient_forward(q, k, v, causal, mask, scale):  # mask is None: _fused_unsupported refuses masks
    H, T = q.shape[1], q.shape[2]
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, _expand_kv(k, H), _expand_kv(v, H), None, True, 0.0, causal, scale=scale)[:2]
    return out, lse[:, :, :T]  # the kernel pads lse's rows to a multiple of 32


def _cuda_efficient_backward(dout, q, k, v, out, lse, causal, mask, scale):
    H, T, Hkv = q.shape[1], q.shape[2], k.shape[1]
    lse = F.pad(lse, (0, -T % 32)).contiguous()  # back to the kernel's padded (B, H, ceil32(T)) layout
    unused = torch.zeros((), dtype=torch.int64, device=q.device)  # philox seed / offset: read only with dropout
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout.contiguous(), q, _expand_kv(k, H), _expand_kv(v, H), None, out.contiguous(), lse, unused, unused, 0.0,
        [True, True, True, False], causal, scale=scale)
    if Hkv != H:  # sum the expanded heads back onto their kv head
        dk, dv = (g.unflatten(1, (Hkv, H // Hkv)).sum(2) for g in (dk, dv))
    return dq, dk, dv


def _kernels(device: torch.device):
    if device.type == "cuda":
        return _cuda_efficient_forward, _cuda_efficient_backward
    return _cpu_flash_forward, _cpu_flash_backward


def _tile_calls(i0: int, i1: int, j0: int, j1: int, c: int | None):
    """Kernel calls (r0, r1, a, b, causal) covering query rows [i0, i1) x keys [j0, j1) under causal offset c
    (row i sees key j iff j <= i + c): rows before r0 see none of these keys and are left out; keys [j0, d)
    are seen by every row from r0 on (no mask); keys [d, ..) are the diagonal, top-left causal from row r0."""
    if c is None:
        return [(i0, i1, j0, j1, False)]
    r0 = max(i0, j0 - c)  # first row that sees key j0
    if r0 >= i1:
        return []
    d = r0 + c  # the last key row r0 sees (>= j0)
    calls = [(r0, i1, j0, min(j1, d), False)] if d > j0 else []
    if d < j1:  # keys past the last row's diagonal, d + (i1 - 1 - r0), are hidden from every row: trimmed
        calls.append((r0, i1, d, min(j1, d + i1 - r0), True))
    return calls


def _key_stop(S: int, i1: int, c: int | None) -> int:
    """Keys beyond this are hidden from query rows < i1 (the last one, i1 - 1, sees keys <= i1 - 1 + c)."""
    return S if c is None else max(0, min(S, i1 + c))


def _additive(kpm, attn_mask, dtype) -> torch.Tensor | None:
    """key_padding_mask (B, S) bool and/or attn_mask (Bm, H|1, Tm, Sm) -> one additive mask in the kernel's
    dtype (it takes no bool masks): 0 = attend, -inf = masked, floats added."""
    bias = None
    if attn_mask is not None:
        bias = (attn_mask.to(dtype) if attn_mask.dtype != torch.bool else
                torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(~attn_mask, _NEG_INF))
    if kpm is not None:
        pad = torch.zeros(kpm.shape, dtype=dtype, device=kpm.device).masked_fill_(~kpm, _NEG_INF)[:, None, None, :]
        bias = pad if bias is None else bias + pad
    return bias


def _mask_tile(bias, r0: int, r1: int, a: int, b: int):
    if bias is None:
        return None
    bias = bias[:, :, r0:r1] if bias.shape[2] > 1 else bias
    return bias[..., a:b] if bias.shape[3] > 1 else bias


def _dead_rows(mask: torch.Tensor, rows: int, causal: bool) -> torch.Tensor:
    """(Bm, Hm, rows | 1) bool: rows of a masked call that see no key. The kernel gives them out 0 but lse 0; the
    convention (and merging) needs lse -inf."""
    keep = mask != _NEG_INF  # (Bm, Hm, Tm, n)
    if not causal:
        return ~keep.any(-1)
    n = keep.shape[-1]
    if keep.shape[2] == 1:  # padding mask: row r sees keys 0 .. r, so it is alive iff any of them is kept
        seen = keep[:, :, 0].cumsum(-1) > 0  # (Bm, Hm, n)
        return ~seen[..., torch.arange(rows, device=mask.device).clamp_(max=n - 1)]
    tril = torch.ones(rows, n, dtype=torch.bool, device=mask.device).tril_()
    return ~(keep & tril).any(-1)


def _fused_forward(q, k, v, scale, causal_offset, kpm, attn_mask, bq, bk, out_dtype):
    """Forward with the fused kernel per tile, merged over key tiles: out (B, H, T, Dv) in out_dtype and lse
    (B, H, T) in the compute dtype, the same contract as _forward."""
    kernel = _kernels(q.device)[0]
    B, H, T, _ = q.shape
    S, Dv = k.shape[2], v.shape[3]
    cdt = _compute_dtype(q.dtype)
    bias = _additive(kpm, attn_mask, q.dtype)
    outs, lses = [], []
    for i0 in range(0, T, bq):
        i1 = min(i0 + bq, T)
        out = lse = None  # the query block's running result; fp32 once a second tile is merged in
        for j0 in range(0, _key_stop(S, i1, causal_offset), bk):
            for r0, r1, a, b, causal in _tile_calls(i0, i1, j0, min(j0 + bk, S), causal_offset):
                m = _mask_tile(bias, r0, r1, a, b)
                o, l = kernel(q[:, :, r0:r1], k[:, :, a:b], v[:, :, a:b], causal, m, scale)  # noqa: E741
                l = l.to(cdt)  # noqa: E741
                if m is not None:
                    l = l.masked_fill(_dead_rows(m, r1 - r0, causal), _NEG_INF)  # noqa: E741
                if out is None and r0 == i0:
                    out, lse = o, l
                    continue
                if out is None:  # rows [i0, r0) see no key of this query block's first tile
                    out = q.new_zeros((B, H, i1 - i0, Dv), dtype=cdt)
                    lse = q.new_full((B, H, i1 - i0), _NEG_INF, dtype=cdt)
                out, r = out.to(cdt), r0 - i0
                out[:, :, r:], lse[:, :, r:] = merge_attention(out[:, :, r:], lse[:, :, r:], o, l)
        if out is None:  # no key visible to any row of the block
            out = q.new_zeros((B, H, i1 - i0, Dv), dtype=cdt)
            lse = q.new_full((B, H, i1 - i0), _NEG_INF, dtype=cdt)
        outs.append(out.to(out_dtype))
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    if not outs:  # T == 0
        return q.new_zeros((B, H, 0, Dv), dtype=out_dtype), q.new_zeros((B, H, 0), dtype=cdt)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _fused_backward(q, k, v, out, lse, dout, scale, causal_offset, kpm, attn_mask, bq, bk, grad_dtype):
    """The kernel's backward per tile against the global out and lse: exact dq (summed over tiles), dk, dv."""
    kernel = _kernels(q.device)[1]
    B, H, T, D = q.shape
    S = k.shape[2]
    cdt = _compute_dtype(q.dtype)
    bias = _additive(kpm, attn_mask, q.dtype)
    out, dout = out.to(q.dtype).contiguous(), dout.to(q.dtype).contiguous()
    lse = lse.to(cdt)
    lse = lse.masked_fill(lse == _NEG_INF, float("inf")).contiguous()  # rows that saw nothing: P = exp(s - inf) = 0
    calls = [call for i0 in range(0, T, bq)
             for j0 in range(0, _key_stop(S, min(i0 + bq, T), causal_offset), bk)
             for call in _tile_calls(i0, min(i0 + bq, T), j0, min(j0 + bk, S), causal_offset)]

    def grads(r0, r1, a, b, causal):
        return kernel(dout[:, :, r0:r1], q[:, :, r0:r1], k[:, :, a:b], v[:, :, a:b], out[:, :, r0:r1],
                      lse[:, :, r0:r1], causal, _mask_tile(bias, r0, r1, a, b), scale)

    if len(calls) == 1 and calls[0][:4] == (0, T, 0, S):  # one tile: its gradients are the answer
        return tuple(g.to(grad_dtype) for g in grads(*calls[0]))
    dq = torch.zeros(B, H, T, D, dtype=cdt, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=q.device)
    for r0, r1, a, b, causal in calls:
        gq, gk, gv = grads(r0, r1, a, b, causal)
        dq[:, :, r0:r1] += gq
        dk[:, :, a:b] += gk
        dv[:, :, a:b] += gv
    return dq.to(grad_dtype), dk.to(grad_dtype), dv.to(grad_dtype)


_warned_fallback = False


def _run(impl: str, fused, reference, *args):
    """Run the chosen implementation; on CUDA a kernel error under impl="auto" (e.g. a shape the kernel was not
    built for) falls back to the reference once per call with a warning. CPU errors propagate: that path is
    tested. `impl` here is "fused", "fused-auto" (auto resolved to fused) or "reference"."""
    global _warned_fallback
    if impl == "reference":
        return reference(*args), "reference"
    if impl == "fused-auto" and args[0].device.type == "cuda":
        try:
            return fused(*args), impl
        except RuntimeError as e:
            if not _warned_fallback:
                warnings.warn(f"blockwise attention: the fused CUDA kernel failed ({str(e).splitlines()[0]}); "
                              f"using the reference implementation", RuntimeWarning, stacklevel=3)
                _warned_fallback = True
            return reference(*args), "reference"
    return fused(*args), impl


def _resolve(fn: str, impl, q, v, masked: bool, bq, bk) -> tuple[str, int, int]:
    """(implementation to run, Bq, Bk): "fused-auto" marks auto resolved to fused (may fall back on CUDA)."""
    chosen = _pick_impl(fn, _check_impl(fn, impl), q, v, masked)
    bq, bk = _blocks(chosen, bq, bk)
    return ("fused-auto" if chosen == "fused" and impl == "auto" else chosen), bq, bk


class _BlockwiseAttentionFn(torch.autograd.Function):
    """out = attention(q, k, v); saves q, k, v, out, lse and recomputes score tiles in backward."""

    @staticmethod
    def forward(ctx, q, k, v, kpm, attn_mask, scale, causal_offset, bq, bk, impl):
        (out, lse), impl = _run(impl, _fused_forward, _forward, q, k, v, scale, causal_offset, kpm, attn_mask,
                                bq, bk, q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.masks = (kpm, attn_mask)  # not differentiated; held by reference, no copy
        ctx.args = (scale, causal_offset, bq, bk, impl)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale, causal_offset, bq, bk, impl = ctx.args
        kpm, attn_mask = ctx.masks
        (dq, dk, dv), _ = _run(impl, _fused_backward, _backward, q, k, v, out, lse, dout, scale, causal_offset,
                               kpm, attn_mask, bq, bk, q.dtype)
        return dq, dk, dv, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------- public API
def blockwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                        block_size: int | None = None, q_block_size: int | None = None,
                        impl: str = "auto") -> torch.Tensor:
    """Exact softmax(q k^T * scale + mask) v with memory linear in the lengths; differentiable.

    q (B, H, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) with H % Hkv == 0; key_padding_mask (B, S) bool,
    True = keep; `causal` bottom-right aligned (query i sees keys j <= i + S - T). Returns (B, H, T, Dv).
    impl: "auto" (fused kernel per tile where it applies), "fused" or "reference" (pure PyTorch)."""
    fn = "blockwise_attention"
    B, H, Hkv, T, S, D = _check_qkv(fn, q, k, v, key_padding_mask)
    bq, bk = _check_blocks(fn, block_size, q_block_size)
    scale = _check_scale(fn, scale, D)
    impl, bq, bk = _resolve(fn, impl, q, v, key_padding_mask is not None, bq, bk)
    offset = S - T if causal else None
    return _BlockwiseAttentionFn.apply(q, k, v, key_padding_mask, None, scale, offset, bq, bk, impl)


class BlockwiseAttention(nn.Module):
    """Drop-in for `F.scaled_dot_product_attention` (same call signature) computed blockwise; no parameters.

    `is_causal` is top-left aligned as in SDPA; `attn_mask` bool (True = attend) or float (added, not
    differentiated), broadcastable to (B, H, T, S); GQA is handled whether or not `enable_gqa` is passed."""

    def __init__(self, block_size: int | None = None, q_block_size: int | None = None, impl: str = "auto"):
        super().__init__()
        self.q_block_size, self.block_size = _check_blocks("BlockwiseAttention", block_size, q_block_size)
        self.impl = _check_impl("BlockwiseAttention", impl)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, q_block_size={self.q_block_size}, impl={self.impl!r}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
        fn = "BlockwiseAttention"
        if dropout_p:
            raise InputShapeError(f"{fn}: attention dropout is not supported (dropout_p must be 0), got "
                                  f"dropout_p={dropout_p}; use SDPA or dropout=0 when training")
        B, H, Hkv, T, S, D = _check_qkv(fn, q, k, v)
        mask = _prep_attn_mask(fn, attn_mask, B, H, Hkv, T, S, q.dtype)
        impl, bq, bk = _resolve(fn, self.impl, q, v, mask is not None, self.q_block_size, self.block_size)
        return _BlockwiseAttentionFn.apply(q, k, v, None, mask, _check_scale(fn, scale, D),
                                           0 if is_causal else None, bq, bk, impl)


def attention_chunk_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None,
                            causal_offset: int | None = None, key_padding_mask: torch.Tensor | None = None,
                            block_size: int | None = None, q_block_size: int | None = None,
                            out_dtype: torch.dtype | None = None,
                            impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One query chunk against one key/value chunk: (out (B, H, T, Dv), lse (B, H, T) fp32, fp64 for fp64).

    causal_offset c: query i sees key j iff j <= i + c (None: no causal mask). Rows with no visible key: out 0,
    lse -inf. Records no autograd graph. scale None = 1/sqrt(D). impl: "auto", "fused" or "reference"."""
    fn = "attention_chunk_forward"
    B, H, Hkv, T, S, D = _check_qkv(fn, q, k, v, key_padding_mask)
    bq, bk = _check_blocks(fn, block_size, q_block_size)
    scale, offset = _check_scale(fn, scale, D), _check_offset(fn, causal_offset)
    impl, bq, bk = _resolve(fn, impl, q, v, key_padding_mask is not None, bq, bk)
    with torch.no_grad():
        return _run(impl, _fused_forward, _forward, q, k, v, scale, offset, key_padding_mask, None, bq, bk,
                    q.dtype if out_dtype is None else out_dtype)[0]


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial attention over two disjoint key sets: out (B, H, T, Dv) in out_a's dtype, lse (B, H, T).

    Stable: weights are exp(lse_x - lse) <= 1; a row that is -inf in both stays out 0, lse -inf."""
    fn = "merge_attention"
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or tuple(lse_a.shape) != tuple(out_a.shape[:-1]):
        raise InputShapeError(f"{fn}: expected out_a, out_b of one shape (..., T, Dv) and lse_a, lse_b of shape "
                              f"(..., T), got out {tuple(out_a.shape)}, {tuple(out_b.shape)} and lse "
                              f"{tuple(lse_a.shape)}, {tuple(lse_b.shape)}")
    cdt = torch.float64 if torch.float64 in (out_a.dtype, out_b.dtype, lse_a.dtype, lse_b.dtype) else torch.float32
    la, lb = lse_a.to(cdt), lse_b.to(cdt)
    m = torch.maximum(la, lb)
    m_safe = m.masked_fill(m == _NEG_INF, 0.0)  # both empty: exp(-inf - 0) = 0 on both sides
    wa, wb = (la - m_safe).exp(), (lb - m_safe).exp()  # in [0, 1]
    total = wa + wb
    seen = total > 0
    lse = torch.where(seen, m_safe + total.log(), _NEG_INF)
    inv = torch.where(seen, total, 1.0).reciprocal()
    out = out_a.to(cdt) * (wa * inv)[..., None] + out_b.to(cdt) * (wb * inv)[..., None]
    return out.to(out_a.dtype), lse.to(torch.promote_types(lse_a.dtype, lse_b.dtype))


def attention_chunk_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, dout: torch.Tensor, *, scale: float | None,
                             causal_offset: int | None = None, key_padding_mask: torch.Tensor | None = None,
                             block_size: int | None = None, q_block_size: int | None = None,
                             grad_dtype: torch.dtype | None = None, impl: str = "auto",
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one (query chunk, key chunk) pair: (dq like q, dk like k, dv like v).

    `out` (B, H, T, Dv) and `lse` (B, H, T) must be the FINAL output / logsumexp of these queries over all keys;
    then dq summed over key chunks and each chunk's dk, dv equal the full-attention gradients."""
    fn = "attention_chunk_backward"
    B, H, Hkv, T, S, D = _check_qkv(fn, q, k, v, key_padding_mask)
    want = (B, H, T, v.shape[3])
    for name, t in (("out", out), ("dout", dout)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputShapeError(f"{fn}: {name} must have shape (B, H, T, Dv) = {want}, got {got}")
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (B, H, T):
        got = tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise InputShapeError(f"{fn}: lse must have shape (B, H, T) = {(B, H, T)}, got {got}")
    bq, bk = _check_blocks(fn, block_size, q_block_size)
    scale, offset = _check_scale(fn, scale, D), _check_offset(fn, causal_offset)
    impl, bq, bk = _resolve(fn, impl, q, v, key_padding_mask is not None, bq, bk)
    with torch.no_grad():
        return _run(impl, _fused_backward, _backward, q, k, v, out, lse, dout, scale, offset, key_padding_mask,
                    None, bq, bk, q.dtype if grad_dtype is None else grad_dtype)[0]


class BlockwiseKernel:
    """The `MultiHeadAttention.kernel` protocol on blockwise attention: `use_blockwise_attention(model)` swaps it
    into every self-attention of a model, from outside, e.g. for long padded sequences where SDPA's fused CPU
    kernels would need a materialized (B, 1, T, S) mask and fall back to the math path. Causal is bottom-right
    aligned and padding masks are (B, S) bool, as in MultiHeadAttention."""

    supports_padding_mask = True

    def __init__(self, block_size: int | None = None, q_block_size: int | None = None, impl: str = "auto"):
        self.block_size, self.q_block_size, self.impl = block_size, q_block_size, impl

    def __call__(self, q, k, v, *, causal: bool = False, scale: float | None = None, dropout_p: float = 0.0,
                 key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if dropout_p:
            raise InputShapeError(f"blockwise attention: attention dropout is not supported, got dropout_p="
                                  f"{dropout_p} in training; build the model with dropout=0 or remove the kernel")
        return blockwise_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                                   block_size=self.block_size, q_block_size=self.q_block_size, impl=self.impl)

    def __repr__(self) -> str:
        return f"BlockwiseKernel(block_size={self.block_size}, impl={self.impl!r})"


def use_blockwise_attention(model: torch.nn.Module, block_size: int | None = None, enable: bool = True,
                            impl: str = "auto") -> int:
    """Swap blockwise attention into (enable=False: out of) every MultiHeadAttention of `model`; returns how many."""
    from lamina.nn.attention import MultiHeadAttention

    kernel, n = BlockwiseKernel(block_size, impl=impl) if enable else None, 0
    for m in model.modules():
        if isinstance(m, MultiHeadAttention) and (enable or isinstance(m.kernel, BlockwiseKernel)):
            m.kernel, n = kernel, n + 1
    return n
