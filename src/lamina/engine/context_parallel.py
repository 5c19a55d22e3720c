"""Context parallelism: one long sequence split over the ranks of a process group, applied from outside the model.

As in torchtitan, the model knows nothing of it. Two things change, both from here:

* `apply_context_parallel(model, group, layout)` swaps a `RingAttention` kernel (lamina.nn.ring_attention)
  into every causal self-attention `MultiHeadAttention` of a decoder-only language model (the `gpt` and `llama`
  families); `remove_context_parallel(model)` puts SDPA back.
* `shard_batch(batch, group)` cuts the batch's token tensors (`x`, `y`: (B, L)) along the sequence into this
  rank's zigzag shard (B, L / N) and adds `positions` (L / N,), the shard's global positions, which
  LanguageModelingTask passes to `model(x, positions=...)` (learned position table or RoPE).

Every other layer (embeddings, norms, MLPs, the head, the per-token loss) works token by token and runs
unchanged on the shard. Each rank's loss is the mean over its L / N tokens of every sequence; with equal
shards (and no ignore_index tokens) the global mean loss is the average over the group, and its gradient is
the average of the ranks' gradients: what DDP's all-reduce over the group computes. With ignore_index
padding the token counts differ per rank and that average is only approximately the global mean.

Apply it before wrapping the model in DDP or torch.compile. While it is applied every full-sequence forward
must get sharded inputs (evaluation too: shard the batch, or remove it for single-process evaluation);
cached decoding (generation) runs SDPA on the local tokens as before.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.distributed as dist
import torch.nn as nn

from lamina.errors import DataError, ModelError
from lamina.nn.attention import MultiHeadAttention
from lamina.nn.ring_attention import RingAttention, check_sequence_length, shard_positions, shard_sequence

SUPPORTED_FAMILIES = ("gpt", "llama")  # decoder-only: causal self-attention only, forward(idx, positions=)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (.module) / torch.compile (._orig_mod) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def _rank_size(group) -> tuple[int, int]:
    if group is None and not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def apply_context_parallel(model: nn.Module, group=None, layout: str = "zigzag") -> nn.Module:
    """Swap ring attention over `group` (None: the default group) into every attention of `model`; returns it.

    Raises ModelError unless the model is a decoder-only LM whose attentions are all causal self-attention and
    whose forward takes `positions`, or if its attention has dropout (the ring kernel has none)."""
    inner = _unwrap(model)
    name = getattr(inner, "model_name", type(inner).__name__)
    attns = [(n, m) for n, m in inner.named_modules() if isinstance(m, MultiHeadAttention)]
    other = [n for n, m in attns if not m.causal]
    takes_positions = "positions" in inspect.signature(inner.forward).parameters
    if not attns or other or not takes_positions:
        why = ("has no MultiHeadAttention" if not attns else
               f"has non-causal attention ({', '.join(other[:3])})" if other else
               "its forward takes no `positions`")
        raise ModelError(f"context parallel: model {name} is not supported ({why}); it applies to decoder-only "
                         f"language models with causal self-attention: the {', '.join(SUPPORTED_FAMILIES)} families")
    dropped = [n for n, m in attns if m.dropout > 0]
    if dropped:
        p = inner.get_submodule(dropped[0]).dropout
        raise ModelError(f"context parallel: model {name} has attention dropout {p} ({dropped[0]}), which ring "
                         f"attention does not implement; build it with dropout=0")
    kernel = RingAttention(group, layout)  # one for all layers: the ranks' shapes are checked once per shape
    for _, m in attns:
        m.kernel = kernel
    return model


def remove_context_parallel(model: nn.Module) -> nn.Module:
    """Put SDPA back in every attention that apply_context_parallel changed; returns the model."""
    for m in _unwrap(model).modules():
        if isinstance(m, MultiHeadAttention) and isinstance(m.kernel, RingAttention):
            m.kernel = None
    return model


def shard_batch(batch: dict, group=None, seq_keys=("x", "y"), layout: str = "zigzag",
                ) -> tuple[dict, torch.Tensor]:
    """This rank's part of a language-modeling batch: (local_batch, positions).

    Every key in `seq_keys` (B, L, ...) becomes (B, L / N, ...) in `layout`; other keys pass through. The local
    batch also carries `positions`, the shard's global positions (L / N,) (or, when the batch already had
    `positions` (L,) / (B, L), their shard). L must cut into 2N equal chunks (zigzag) or N (contiguous)."""
    rank, size = _rank_size(group)
    missing = [k for k in seq_keys if k not in batch]
    if missing:
        raise DataError(f"context parallel: batch has no {missing[0]!r} to shard along the sequence; "
                        f"its keys: {', '.join(map(str, batch))}")
    lengths = {k: batch[k].shape[1] if batch[k].dim() >= 2 else None for k in seq_keys}
    L = lengths[seq_keys[0]]
    if L is None or any(n != L for n in lengths.values()):
        raise DataError("context parallel: sequence tensors must be (B, L, ...) with one L, got "
                        + ", ".join(f"{k} {tuple(batch[k].shape)}" for k in seq_keys))
    check_sequence_length(L, size, layout)
    local = dict(batch)
    for k in seq_keys:
        local[k] = shard_sequence(batch[k], 1, rank, size, layout)
    if batch.get("positions") is not None:
        positions = shard_sequence(batch["positions"], -1, rank, size, layout)
    else:
        positions = shard_positions(L, rank, size, layout, device=batch[seq_keys[0]].device)
    local["positions"] = positions
    return local, positions


@contextlib.contextmanager
def context_parallel_disabled(model: nn.Module):
    """SDPA for the duration (e.g. evaluation on whole sequences), the ring kernels back afterwards."""
    saved = [(m, m.kernel) for m in _unwrap(model).modules()
             if isinstance(m, MultiHeadAttention) and isinstance(m.kernel, RingAttention)]
    for m, _ in saved:
        m.kernel = None
    try:
        yield model
    finally:
        for m, k in saved:
            m.kernel = k
