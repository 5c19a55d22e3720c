"""Plain helpers shared by the token-id language models (gpt, llama, t5): input checks, KV caches, the LM head.

Functions, not a base class: each family keeps its own forward and calls these where it checks or builds the
same thing (composition; see DESIGN.md). Error texts are part of the contract: tests match them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from lamina.errors import InputShapeError, ModelError
from lamina.nn import KVCache

INT_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding accepts


def check_token_ids(name: str, ids: torch.Tensor, what: str = "token ids", shape: str = "(B, T)") -> None:
    """ids must be a 2-d integer tensor: `model {name} expects {what} of shape {shape} and dtype int64, got ...`."""
    if ids.dim() != 2 or ids.dtype not in INT_DTYPES:
        got = f"{str(ids.dtype).removeprefix('torch.')} tensor of shape {tuple(ids.shape)}"
        raise InputShapeError(f"model {name} expects {what} of shape {shape} and dtype int64, got {got}")


def check_positions(name: str, positions: torch.Tensor, idx: torch.Tensor, block_size: int) -> None:
    """positions for token ids idx (B, T): integer (T,) or (B, T), every value in 0 .. block_size-1. One host
    read per forward (the layers skip their own range check off the CPU)."""
    B, T = idx.shape
    if positions.dtype not in INT_DTYPES or tuple(positions.shape) not in ((T,), (B, T)):
        raise InputShapeError(f"model {name}: positions must be an int64 tensor of shape (T,) or (B, T) = "
                              f"({B}, {T}), got {str(positions.dtype).removeprefix('torch.')} "
                              f"{tuple(positions.shape)}")
    if positions.numel():
        lo, hi = torch.stack(torch.aminmax(positions)).tolist()
        if lo < 0 or hi + 1 > block_size:
            raise InputShapeError(f"model {name} handles positions 0 .. {block_size - 1} (block_size={block_size}), "
                                  f"got positions {lo} .. {hi}")


def check_idx(name: str, idx: torch.Tensor, block_size: int, offset: int,
              positions: torch.Tensor | None = None) -> None:
    """Token ids (B, T) for a decoder-only LM: integer, and either valid `positions` or offset + T <= block_size."""
    check_token_ids(name, idx)
    if positions is not None:
        check_positions(name, positions, idx, block_size)
        return
    T = idx.shape[1]
    if offset + T > block_size:
        where = f"T={T}" if offset == 0 else f"T={T} after {offset} cached positions"
        raise InputShapeError(f"model {name} handles at most block_size={block_size} positions, "
                              f"got {where}; crop the context to the last {block_size} tokens")


def cache_offset(name: str, cache: list[KVCache] | None, n_layer: int, positions: torch.Tensor | None) -> int:
    """Check a per-block cache against the model (and against explicit positions); return its length (0: none)."""
    if cache is not None and len(cache) != n_layer:
        raise ModelError(f"{name}: cache has {len(cache)} layers, the model {n_layer}; "
                         f"make it with model.make_cache(batch_size)")
    if cache is not None and positions is not None:
        raise ModelError(f"{name}: pass either a cache (positions continue from its length) or "
                         f"positions, not both")
    return cache[0].length if cache else 0


def make_kv_caches(attns: Iterable[nn.Module], batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> list[KVCache]:
    """One KVCache per attention layer, each with room for max_len positions."""
    return [attn.make_cache(batch_size, max_len, dtype, device) for attn in attns]


def new_lm_head(num_features: int, num_classes: int, std: float = 0.02) -> nn.Module:
    """A fresh, untied (num_features -> num_classes) output layer, weights N(0, std^2), no bias;
    num_classes = 0 -> nn.Identity (the model returns hidden states)."""
    if num_classes <= 0:
        return nn.Identity()
    head = nn.Linear(num_features, num_classes, bias=False)
    nn.init.normal_(head.weight, mean=0.0, std=std)
    return head
