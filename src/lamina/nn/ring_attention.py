"""Ring attention: exact attention over a sequence sharded across the ranks of a process group (context parallelism).

Liu et al. 2023 ("Ring Attention with Blockwise Transformers"); the zigzag load balancing follows
zhuzilin/ring-flash-attention and Llama 3's context parallelism. Every rank keeps its query shard and the
key/value shards travel around the ring, so no rank ever holds the whole sequence's keys or a T x T matrix:

    rank r, step i = 0 .. N-1:  holds kv of rank src = (r - i) mod N
        post isend(kv -> r+1), irecv(kv <- r-1)       # the next shard is in flight ...
        (out_i, lse_i) = attention(q_r, kv_src)        # ... while this one is computed
        (out, lse) = merge(out, lse, out_i, lse_i)     # lse = log(e^lse + e^lse_i); out reweighted (stable)
        wait

Backward (FlashAttention-2 per chunk, against the FINAL out and lse saved by forward): k, v go around the ring
again, and with each kv shard travels its dk, dv accumulator: the rank holding shard src adds its queries'
contribution and passes the sum on, so after a full cycle (one extra hop) each owner receives the gradient of
its own keys/values from every query in the sequence. dq stays home and sums over the N steps.

    D = rowsum(dO * O);  P = exp(S * scale - lse);  dV += P^T dO;  dS = P * (dP - D)
    dQ += dS K * scale;  dK += dS^T Q * scale                   (dK, dV summed over each GQA group's heads)

Layouts (`layout=`), for a global sequence of length L = N * T_local:
* "zigzag" (default): the sequence is cut into 2N chunks; rank r holds chunks r and 2N-1-r, concatenated. Under
  a causal mask each (query half, key half) pair is then fully visible, fully masked or the diagonal, and every
  rank does the same work at every step: step 0 is causal attention on the local shard (its two chunks are in
  increasing order, so the local causal mask is the global one); at a later step, a shard from an earlier rank
  (src < r) is seen by all local queries through its first chunk only (its second chunk lies after all of
  ours), and a shard from a later rank (src > r) is seen whole, by our second chunk only. Each is T x T/2.
* "contiguous": rank r holds chunk r. Non-causal attention is balanced as it is; causal works (src < r fully
  visible, src > r skipped) but rank N-1 does N times the work of rank 0.

`zigzag_shard` / `zigzag_unshard` / `zigzag_positions` (and `shard_sequence` / `unshard_sequence` /
`shard_positions` for either layout) cut a full sequence, put the shards back in order, and give each local
token's global position (what RoPE or a learned position table must see). A global length that does not cut
evenly (2N chunks for zigzag, N for contiguous) raises InputShapeError; `pad_for_context_parallel` pads it.

The per-chunk math is lamina.nn.blockwise_attention's `attention_chunk_forward`, `merge_attention` and
`attention_chunk_backward`, with its `impl=`: "auto" (default) runs PyTorch's fused flash kernel per chunk
(returning the logsumexp; the backward gets the global out / lse) where it applies, "reference" the pure-PyTorch
tiles, "fused" insists on the kernel. Partial outputs, dq and the travelling dk/dv are kept in fp32 and cast to
the input dtype once at the end (with the fused kernel, a bf16 chunk's out and grads are rounded to bf16 first).

Communication is torch.distributed point to point (`batch_isend_irecv`), device agnostic: gloo on CPU
(tested), NCCL on GPUs (where the transfer of the next shard overlaps the compute on the current one). With no
process group (or world size 1) it is plain attention and sends nothing.

Not supported: attention dropout (RingAttention raises), masks other than causal, and ranks holding
different local lengths (checked once per shape with a small all_gather; a mismatch raises on every rank).

    out = ring_attention(q, k, v, group=None, causal=True, layout="zigzag", impl="auto")  # q (B, H, T_local, D)
    mha.kernel = RingAttention(group)    # inside MultiHeadAttention; see lamina.engine.context_parallel
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lamina.errors import InputShapeError, ModelError
from lamina.nn.blockwise_attention import (
    IMPLS,
    attention_chunk_backward,
    attention_chunk_forward,
    merge_attention,
)

LAYOUTS = ("zigzag", "contiguous")
_KV_TAG, _DKV_TAG = 0, 1  # gloo matches messages by (peer, tag): kv and dk/dv shards in flight never mix


# ----------------------------------------------------------------------------------------------- layouts
def _check_impl(fn: str, impl) -> str:
    if impl not in IMPLS:
        raise InputShapeError(f"{fn}: impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    return impl


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise InputShapeError(f"context parallel: unknown layout '{layout}'; valid: {', '.join(LAYOUTS)}")


def _n_chunks(world_size: int, layout: str) -> int:
    _check_layout(layout)
    return 2 * world_size if layout == "zigzag" else world_size


def check_sequence_length(length: int, world_size: int, layout: str = "zigzag") -> None:
    """Raise InputShapeError unless a global length `length` cuts into the layout's equal chunks."""
    n = _n_chunks(world_size, layout)
    if length % n or length == 0:
        what = "2*world_size" if layout == "zigzag" else "world_size"
        raise InputShapeError(f"context parallel ({layout} layout): sequence length {length} does not split into "
                              f"{what} = {n} equal chunks (world_size {world_size}); pad it to a multiple of {n} "
                              f"(next: {max(n, -(-length // n) * n)}), e.g. with pad_for_context_parallel")


def shard_sequence(x: torch.Tensor, dim: int, rank: int, world_size: int, layout: str = "zigzag") -> torch.Tensor:
    """This rank's part of the full sequence x along `dim`: chunks (rank, 2N-1-rank) for zigzag, chunk rank for
    contiguous. (..., L, ...) -> (..., L / N, ...)."""
    n = _n_chunks(world_size, layout)
    check_sequence_length(x.shape[dim], world_size, layout)
    chunks = x.chunk(n, dim)
    if layout == "contiguous":
        return chunks[rank]
    return torch.cat((chunks[rank], chunks[n - 1 - rank]), dim)


def unshard_sequence(parts, dim: int, world_size: int, layout: str = "zigzag") -> torch.Tensor:
    """Inverse of shard_sequence: `parts` is the list of the N ranks' shards in rank order, or their
    concatenation along `dim` (what all_gather + cat gives); returns the full sequence in order."""
    _check_layout(layout)
    parts = list(parts.chunk(world_size, dim) if isinstance(parts, torch.Tensor) else parts)
    if len(parts) != world_size:
        raise InputShapeError(f"context parallel: expected the shards of {world_size} ranks, got {len(parts)}")
    if layout == "contiguous":
        return torch.cat(parts, dim)
    halves = [p.chunk(2, dim) for p in parts]  # rank r: (chunk r, chunk 2N-1-r)
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


def shard_positions(seq_len: int, rank: int, world_size: int, layout: str = "zigzag",
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions (T_local,) int64 of this rank's tokens of a length-`seq_len` sequence."""
    return shard_sequence(torch.arange(seq_len, device=device), 0, rank, world_size, layout)


def zigzag_shard(x: torch.Tensor, dim: int, rank: int, world_size: int) -> torch.Tensor:
    """Chunks rank and 2N-1-rank of x's 2N equal chunks along `dim`, concatenated."""
    return shard_sequence(x, dim, rank, world_size, "zigzag")


def zigzag_unshard(parts, dim: int, world_size: int) -> torch.Tensor:
    """The full sequence from the N zigzag shards (a list in rank order, or their concatenation along dim)."""
    return unshard_sequence(parts, dim, world_size, "zigzag")


def zigzag_positions(seq_len: int, rank: int, world_size: int, device=None) -> torch.Tensor:
    """Global positions (seq_len / N,) of rank's zigzag shard: [r*c, (r+1)*c) then [(2N-1-r)*c, (2N-r)*c)."""
    return shard_positions(seq_len, rank, world_size, "zigzag", device)


def pad_for_context_parallel(x: torch.Tensor, dim: int, world_size: int, layout: str = "zigzag",
                             value: float | int = 0) -> torch.Tensor:
    """x padded with `value` at the end of `dim` to the next length that shards evenly. For language-model
    targets pad with the loss's ignore_index, so the padding adds nothing to the loss."""
    n = _n_chunks(world_size, layout)
    extra = -x.shape[dim] % n
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]  # F.pad lists pads from the last dim backwards
    return F.pad(x, pad, value=value)


# ----------------------------------------------------------------------------------------------- the ring
class _Ring:
    """rank / size in `group` and the global ranks of the neighbours; p2p exchange with them."""

    def __init__(self, group):
        self.group = group
        if group is None and not dist.is_initialized():
            self.rank, self.size = 0, 1  # no process group: one rank, nothing to send
            return
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        g = group if group is not None else dist.group.WORLD
        self.next = dist.get_global_rank(g, (self.rank + 1) % self.size)  # P2POp peers are global ranks
        self.prev = dist.get_global_rank(g, (self.rank - 1) % self.size)

    def exchange(self, tensors, tag: int):
        """Post send(tensors -> next) and recv(<- prev) into fresh buffers; returns (buffers, works) unwaited."""
        recv = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag) for t in recv]
        return recv, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(works) -> None:
        for w in works:
            w.wait()


def _plan(step: int, ring: _Ring, causal: bool, layout: str, T: int):
    """What step `step` computes: (query rows, key rows, causal_offset) of the local q and the visiting kv,
    or None when every pair is masked (contiguous causal, a later rank's shard)."""
    full = slice(None)
    if not causal:
        return full, full, None
    if step == 0:
        return full, full, 0  # own shard: local causal mask == global one (local positions increase)
    src = (ring.rank - step) % ring.size
    if layout == "contiguous":
        return (full, full, None) if src < ring.rank else None
    h = T // 2
    if src < ring.rank:
        return full, slice(0, h), None  # their chunk src precedes both of ours; chunk 2N-1-src follows both
    return slice(h, None), full, None  # only our late chunk 2N-1-r sees theirs, and sees both in full


def _ring_forward(q, k, v, ring: _Ring, causal: bool, scale: float, layout: str, impl: str):
    B, H, T, D = q.shape
    out = q.new_zeros((B, H, T, v.shape[-1]), dtype=torch.float32)  # fp32: merged N times
    lse = q.new_full((B, H, T), float("-inf"), dtype=torch.float32)
    kv = (k, v)
    for step in range(ring.size):
        if step + 1 < ring.size:
            nxt, works = ring.exchange(kv, _KV_TAG)  # next shard in flight during this step's compute
        plan = _plan(step, ring, causal, layout, T)
        if plan is not None:
            qs, ks, offset = plan
            o, l = attention_chunk_forward(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], scale=scale,  # noqa: E741
                                           causal_offset=offset, out_dtype=torch.float32, impl=impl)
            out[:, :, qs], lse[:, :, qs] = merge_attention(out[:, :, qs], lse[:, :, qs], o, l)
        if step + 1 < ring.size:
            ring.wait(works)
            kv = nxt
    return out, lse


def _ring_backward(q, k, v, out, lse, dout, ring: _Ring, causal: bool, scale: float, layout: str, impl: str):
    T = q.shape[2]
    dq = torch.zeros_like(q, dtype=torch.float32)
    kv, dkv, dkv_works = (k, v), None, None
    for step in range(ring.size):
        if step + 1 < ring.size:
            nxt, works = ring.exchange(kv, _KV_TAG)
        dk = torch.zeros_like(k, dtype=torch.float32)  # this step's share of the visiting shard's gradient
        dv = torch.zeros_like(v, dtype=torch.float32)
        plan = _plan(step, ring, causal, layout, T)
        if plan is not None:
            qs, ks, offset = plan
            gq, gk, gv = attention_chunk_backward(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], out[:, :, qs],
                                                  lse[:, :, qs], dout[:, :, qs], scale=scale,
                                                  causal_offset=offset, grad_dtype=torch.float32, impl=impl)
            dq[:, :, qs] += gq
            dk[:, :, ks] += gk
            dv[:, :, ks] += gv
        if dkv_works is not None:  # the visiting shard's accumulator, from the ranks it met before us
            ring.wait(dkv_works)
            dk += dkv[0]
            dv += dkv[1]
        if ring.size > 1:  # pass it on; after the last step it lands on the shard's owner
            dkv, dkv_works = ring.exchange((dk, dv), _DKV_TAG)
        if step + 1 < ring.size:
            ring.wait(works)
            kv = nxt
    if ring.size > 1:
        ring.wait(dkv_works)
        dk, dv = dkv  # our own shard's gradient, back after a full cycle
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttentionFn(torch.autograd.Function):
    """out = attention over the whole ring; saves q, k, v, out and lse (fp32), recomputes tiles in backward."""

    @staticmethod
    def forward(ctx, q, k, v, ring, causal, scale, layout, impl):
        out, lse = _ring_forward(q, k, v, ring, causal, scale, layout, impl)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (ring, causal, scale, layout, impl)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(q, k, v, out, lse, dout.contiguous(), *ctx.args)
        return dq, dk, dv, None, None, None, None, None


# ----------------------------------------------------------------------------------------------- public API
def _check_inputs(q, k, v, ring: _Ring, layout: str, check_shapes: bool) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] \
            or (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]) or q.shape[1] % k.shape[1]:
        raise InputShapeError(f"ring attention: expected q (B, H, T, D) and k, v (B, Hkv, T, D) with H a multiple "
                              f"of Hkv, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    T = q.shape[2]
    if layout == "zigzag" and T % 2:
        raise InputShapeError(f"ring attention (zigzag layout): local length {T} is odd, so the global length "
                              f"{T * ring.size} does not split into 2*world_size = {2 * ring.size} equal chunks; "
                              f"pad the sequence to a multiple of {2 * ring.size}, e.g. with "
                              f"pad_for_context_parallel")
    if check_shapes and ring.size > 1:
        mine = torch.tensor([*q.shape, k.shape[1]], device=q.device)
        shapes = [torch.empty_like(mine) for _ in range(ring.size)]
        dist.all_gather(shapes, mine, group=ring.group)
        shapes = [tuple(s.tolist()) for s in shapes]
        if len(set(shapes)) > 1:
            got = ", ".join(f"rank {r}: q {s[:4]} Hkv={s[4]}" for r, s in enumerate(shapes))
            raise InputShapeError(f"ring attention: every rank must hold an equal shard of the same batch, got {got}")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, causal: bool = False,
                   scale: float | None = None, layout: str = "zigzag", check_shapes: bool = True,
                   impl: str = "auto") -> torch.Tensor:
    """Exact attention over a sequence sharded across `group` (None: the default group, or one process).

    q (B, H, T_local, D), k/v (B, Hkv, T_local, D) (GQA: H % Hkv == 0) are this rank's shard in `layout`
    ("zigzag" or "contiguous", see the module docstring); returns this rank's output (B, H, T_local, D),
    differentiable. `scale` defaults to 1/sqrt(D). `check_shapes` all_gathers the local shapes first (one
    small collective and a host sync) so that unequal shards raise instead of hanging. `impl` picks the per-chunk
    kernel ("auto", "fused", "reference"; see lamina.nn.blockwise_attention)."""
    _check_layout(layout)
    _check_impl("ring attention", impl)
    ring = _Ring(group)
    _check_inputs(q, k, v, ring, layout, check_shapes)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # p2p sends need contiguous buffers; MultiHeadAttention's k, v are transposed views
    return _RingAttentionFn.apply(q, k.contiguous(), v.contiguous(), ring, causal, scale, layout, impl)


class RingAttention:
    """Ring attention as a swappable kernel: `MultiHeadAttention.kernel = RingAttention(group)`.

    Called as `kernel(q, k, v, causal=, scale=, dropout_p=)`. Holds the group and layout; checks the ranks'
    shapes once per new local shape (all ranks see the same shapes in the same order, so they agree on when).
    Not an nn.Module: it has no parameters or state to save, and a copied model shares the process group."""

    def __init__(self, group=None, layout: str = "zigzag", impl: str = "auto"):
        _check_layout(layout)
        self.group, self.layout, self.impl = group, layout, _check_impl("RingAttention", impl)
        self._checked: set[tuple] = set()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                 scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
        if dropout_p:
            raise ModelError(f"ring attention does not implement attention dropout, got dropout_p={dropout_p} in "
                             f"training; build the model with dropout=0 for context parallelism")
        key = (tuple(q.shape), tuple(k.shape))
        out = ring_attention(q, k, v, group=self.group, causal=causal, scale=scale, layout=self.layout,
                             check_shapes=key not in self._checked, impl=self.impl)
        self._checked.add(key)
        return out

    def __deepcopy__(self, memo):
        return self  # a process group is a handle to shared state, not something to copy

    def __repr__(self) -> str:
        size = dist.get_world_size(self.group) if dist.is_initialized() else 1
        return f"RingAttention(world_size={size}, layout='{self.layout}', impl='{self.impl}')"
