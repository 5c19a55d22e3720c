"""GPT: a decoder-only transformer language model (Radford et al. 2018/2019), laid out as nanoGPT's model.py.

    idx (B, T) -> wte (B, T, C) + wpe[offset : offset + T] -> dropout
               -> n_layer x Block: x + attn(ln_1(x)), x + mlp(ln_2(x))   (pre-LN, causal self-attention)
               -> ln_f -> lm_head -> logits (B, T, vocab_size)

lm_head shares its weight with wte (`tie_weights`). Init follows GPT-2 / nanoGPT: every Linear and Embedding
N(0, 0.02^2), biases 0, and the projections that write into the residual stream (`*.out_proj`) N(0, (0.02 /
sqrt(2 * n_layer))^2), so the residual stream's variance does not grow with depth.

Sequence contract (the classifier contract of lamina.models.contract, read per position):
* `input_spec = (None,)`: token ids (B, T), integer dtype, any T up to `block_size`
* `vocab_size`, `block_size`, `num_features = n_embd`, `num_classes` (= width of lm_head, vocab_size at first)
* `forward_features(idx)` -> hidden states (B, T, C) after ln_f; `forward_head(h, pre_logits=False)` ->
  logits (B, T, num_classes), or h with `pre_logits=True`; `reset_classifier(n)` puts a fresh, untied
  (n_embd -> n) head in place of lm_head (n = 0: no head, forward returns h)

Incremental decoding with a KV cache (what `lamina.models.generation.generate` uses):

    cache = model.make_cache(batch_size)           # list of KVCache, one per block, room for block_size positions
    logits = model(prompt, cache=cache)            # (B, T0, V); fills positions 0 .. T0-1
    logits = model(next_tok[:, None], cache=cache) # (B, 1, V); position T0, attends to everything cached

With a cache, `idx` holds only the new tokens; their positions start at the cache's length (no `start_pos`
to pass, so the two cannot disagree). Cached decoding gives the same logits as recomputing the whole prefix.

`forward(idx, positions=p)` takes the tokens' global positions, long (T,) or (B, T) (HF's `position_ids`),
instead of 0 .. T-1: a context-parallel rank holds a zigzag shard of the sequence (lamina.engine.
context_parallel swaps ring attention into the blocks from outside; the model itself knows nothing of it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lamina.errors import ModelError
from lamina.models._decoder import (
    cache_offset,
    check_idx,
    check_positions,  # noqa: F401  (re-exported: lamina.models.gpt.check_positions, as before)
    make_kv_caches,
    new_lm_head,
)
from lamina.models.contract import build_model
from lamina.models.registry import register_model
from lamina.nn import FeedForward, KVCache, LearnedPositionalEmbedding, MultiHeadAttention, make_norm
from lamina.nn.init import init_transformer_


@dataclass
class GPTConfig:
    vocab_size: int = 65  # tiny-shakespeare's characters; GPT-2's BPE has 50257 (pad to 50304 for fast matmuls)
    block_size: int = 64  # context length; attention costs grow as T^2, 64 is nanoGPT's CPU shakespeare setting
    n_layer: int = 4  # 4 x 4 heads x 128 (~0.8M params) trains on a laptop CPU in minutes (nanoGPT's CPU recipe)
    n_head: int = 4  # head size n_embd / n_head = 32: fewer, wider heads learn faster at this scale
    n_embd: int = 128  # residual width C
    dropout: float = 0.0  # off when data is plentiful; 0.1-0.2 once a small corpus starts to overfit
    bias: bool = True  # GPT-2 checkpoints have biases in Linear and LayerNorm; False is slightly faster, as good
    tie_weights: bool = True  # lm_head shares wte (Press & Wolf 2017): V*C fewer params, better at small scale
    activation: str = "gelu"  # MLP activation (lamina.nn.get_activation); GPT-2 checkpoints use "gelu_tanh" (gelu_new)
    norm_eps: float = 1e-5  # LayerNorm epsilon (HF layer_norm_epsilon); GPT-2's and torch's default

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelError(f"gpt: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ModelError(f"gpt: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"gpt: dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.norm_eps, (int, float)) or isinstance(self.norm_eps, bool) or self.norm_eps <= 0:
            raise ModelError(f"gpt: norm_eps must be a positive number, got {self.norm_eps!r}")


# Named sizes: registered factories below pick one; overrides apply on top.
GPT_SIZES: dict[str, GPTConfig] = {
    "gpt": GPTConfig(),
    "gpt_mini": GPTConfig(n_layer=6, n_head=6, n_embd=192, block_size=128),  # ~2.7M params, 128-token context
}


class Block(nn.Module):
    """Pre-norm residual block, built from parts: x + drop(attn(ln_1(x))), then x + drop(mlp(ln_2(x)))."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, ln_1: nn.Module, ln_2: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = ln_1, attn, ln_2, mlp
        self.drop = nn.Dropout(dropout)  # residual dropout on both branches (nanoGPT's resid_dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), key_padding_mask=key_padding_mask, cache=cache,
                                    positions=positions))  # (B, T, C)
        return x + self.drop(self.mlp(self.ln_2(x)))  # (B, T, C)


def gpt_block(cfg: GPTConfig) -> Block:
    """GPT-2's block: LayerNorm, causal multi-head attention, 4x GELU MLP."""
    C = cfg.n_embd
    return Block(
        attn=MultiHeadAttention(C, cfg.n_head, dropout=cfg.dropout, bias=cfg.bias, causal=True),
        mlp=FeedForward(C, 4 * C, activation=cfg.activation, dropout=0.0, bias=cfg.bias),  # Block drops out
        ln_1=make_norm("layer", C, eps=cfg.norm_eps, bias=cfg.bias),
        ln_2=make_norm("layer", C, eps=cfg.norm_eps, bias=cfg.bias),
        dropout=cfg.dropout,
    )


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.input_spec = (None,)  # token ids of any length up to block_size
        self.vocab_size, self.block_size = cfg.vocab_size, cfg.block_size
        self.num_features = cfg.n_embd
        self.num_classes = cfg.vocab_size  # width of the head: next-token logits
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = LearnedPositionalEmbedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(gpt_block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm("layer", cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight  # one (V, C) tensor: embeds tokens and scores them
        self._init_weights()

    def _init_weights(self) -> None:
        init_transformer_(self, self.cfg.n_layer)  # residual projections *.out_proj scaled (GPT-2, section 2.3)

    @property
    def _name(self) -> str:
        return getattr(self, "model_name", "gpt")

    def make_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> list[KVCache]:
        """One KVCache per block with room for `max_len` (default block_size) positions."""
        max_len = self.block_size if max_len is None else min(int(max_len), self.block_size)
        return make_kv_caches((blk.attn for blk in self.blocks), batch_size, max_len, dtype, device)

    def forward_features(self, idx: torch.Tensor, cache: list[KVCache] | None = None,
                         positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> hidden states (B, T, C) after ln_f. With a cache, idx holds only the new tokens;
        positions (T,) or (B, T), long: the tokens' positions instead of 0 .. T-1."""
        offset = cache_offset(self._name, cache, len(self.blocks), positions)
        check_idx(self._name, idx, self.block_size, offset, positions)
        x = self.drop(self.wpe(self.wte(idx), offset, positions=positions))  # (B, T, C)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cache=None if cache is None else cache[i])  # (B, T, C); wpe placed the positions
        return self.ln_f(x)  # (B, T, C)

    def forward_head(self, h: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return h if pre_logits else self.lm_head(h)  # (B, T, num_classes)

    def forward(self, idx: torch.Tensor, cache: list[KVCache] | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, vocab_size); see the module docstring for `cache` and
        `positions`."""
        return self.forward_head(self.forward_features(idx, cache, positions))

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh (n_embd -> num_classes) head, untied from wte; 0 -> no head (forward returns h)."""
        self.num_classes = num_classes
        self.lm_head = new_lm_head(self.num_features, num_classes)


@register_model("gpt", input_kind="tokens")
def gpt(**kwargs) -> GPT:
    """GPT decoder-only language model, nanoGPT's CPU size: 4 layers x 4 heads x 128 wide, 64-token context."""
    return build_model("gpt", GPT, GPT_SIZES["gpt"], kwargs)


@register_model("gpt", input_kind="tokens")
def gpt_mini(**kwargs) -> GPT:
    """GPT decoder-only language model, mini: 6 layers x 6 heads x 192 wide, 128-token context."""
    return build_model("gpt_mini", GPT, GPT_SIZES["gpt_mini"], kwargs)
