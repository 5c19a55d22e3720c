"""Llama: a decoder-only transformer language model (Touvron et al. 2023), the GPT recipe with Llama's parts.

    idx (B, T) -> wte (B, T, C)                                         (no absolute positions)
               -> n_layer x Block: x + attn(rms_1(x)), x + mlp(rms_2(x))
                    attn: causal grouped-query attention, RoPE on q and k, no biases
                    mlp:  SwiGLU, out_proj(silu(gate_proj(x)) * up_proj(x))
               -> ln_f (RMSNorm) -> lm_head -> logits (B, T, vocab_size)

What differs from lamina.models.gpt: RMSNorm instead of LayerNorm, rotary position embeddings (one
RotaryEmbedding shared by every layer; its cos/sin tables are non-persistent buffers, so nothing positional is
saved), n_kv_head < n_head key/value heads (GQA: a smaller KV cache), a SwiGLU MLP of width ~8/3 C (same cost
as GPT's 4 C GELU MLP), no biases anywhere, no embedding dropout. The residual block is gpt.Block itself, built
from these parts. Init: every Linear and Embedding N(0, 0.02^2) (HF's initializer_range), RMSNorm weights 1,
and the residual projections (`*.out_proj`) N(0, (0.02 / sqrt(2 * n_layer))^2) as in GPT-2, which torchtitan's
Llama also scales with depth.

Sequence contract: the same as GPT's (see lamina.models.gpt): `input_spec = (None,)`, `vocab_size`,
`block_size`, `num_features = n_embd`, `num_classes`, `forward_features` / `forward_head` / `reset_classifier`,
`make_cache(batch_size)` and `forward(idx, cache=None, positions=None)` with `idx` holding only the new tokens
when a cache is given. RoPE's positions start at the cache's length, so cached decoding equals recomputing the
prefix; explicit `positions` (T,) or (B, T) (a context-parallel rank's zigzag shard) go to RoPE instead.

Hugging Face weights: `hf_llama_key_map(n_layer)` maps every `LlamaForCausalLM` state-dict name to lamina's and
`llama_config_from_hf(config_dict)` turns a `config.json` into a LlamaConfig. HF's q_proj/k_proj rows are
already in the rotate-half RoPE layout lamina uses (HF's conversion script permuted Meta's interleaved
layout), so tensors copy one to one with no permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from lamina.errors import ModelError
from lamina.models._decoder import cache_offset, check_idx, make_kv_caches, new_lm_head
from lamina.models.contract import build_model
from lamina.models.gpt import Block
from lamina.models.registry import register_model
from lamina.nn import KVCache, MultiHeadAttention, RotaryEmbedding, SwiGLU, make_norm
from lamina.nn.init import init_transformer_


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@dataclass
class LlamaConfig:
    vocab_size: int = 65  # tiny-shakespeare's characters; Llama 2 has 32000 SentencePiece tokens, Llama 3 128256
    block_size: int = 64  # context length (RoPE tables are built for this many positions), as lamina's `gpt`
    n_layer: int = 4  # 4 x 4 heads x 128 is lamina's `gpt` default size, so the two families compare directly
    n_head: int = 4  # query heads; head size n_embd / n_head = 32 (must be even: RoPE rotates channel pairs)
    n_kv_head: int = 2  # key/value heads (GQA): each serves n_head / n_kv_head query heads, KV cache / 2
    n_embd: int = 128  # residual width C
    ffn_hidden: int | None = None  # SwiGLU width; None -> Llama's rule, 8/3 * n_embd rounded up to multiple_of
    multiple_of: int = 32  # Llama rounds to 256 at 4096 wide; 32 keeps the 8/3 ratio at 128 wide (341 -> 352)
    rope_base: float = 10000.0  # RoPE theta (HF rope_theta): 1e4 in Llama 1/2; Llama 3 uses 5e5 for long context
    norm_eps: float = 1e-5  # RMSNorm epsilon (HF rms_norm_eps): Llama 2/3's value (Llama 1: 1e-6)
    tie_weights: bool = True  # lm_head shares wte: V*C fewer params, better at small scale (Llama 3.2 1B/3B tie)
    dropout: float = 0.0  # attention + residual dropout; Llama trains without, 0.1-0.2 once a small corpus overfits

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "multiple_of"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ModelError(f"llama: {name} must be a positive integer, got {value!r}")
        if self.ffn_hidden is not None and not _positive_int(self.ffn_hidden):
            raise ModelError(f"llama: ffn_hidden must be a positive integer or None (Llama's rule), "
                             f"got {self.ffn_hidden!r}")
        if self.n_embd % self.n_head:
            raise ModelError(f"llama: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ModelError(f"llama: n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ModelError(f"llama: head size n_embd / n_head = {self.n_embd // self.n_head} must be even "
                             f"(rotary embeddings rotate channel pairs)")
        for name in ("rope_base", "norm_eps"):
            value = getattr(self, name)
            if not _positive_number(value):
                raise ModelError(f"llama: {name} must be a positive number, got {value!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"llama: dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden width: ffn_hidden, or Llama's int(8/3 * C) rounded up to multiple_of (4096 -> 11008)."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return self.multiple_of * math.ceil(int(8 * self.n_embd / 3) / self.multiple_of)


# Named sizes: registered factories below pick one; overrides apply on top.
LLAMA_SIZES: dict[str, LlamaConfig] = {
    "llama": LlamaConfig(),  # 746,752 params at vocab 65 (gpt: 809,856)
    "llama_mini": LlamaConfig(n_layer=6, n_head=6, n_kv_head=2, n_embd=192, block_size=128),  # ~2.4M params
}


def llama_block(cfg: LlamaConfig, rope: RotaryEmbedding) -> Block:
    """Llama's block: RMSNorm, causal GQA attention with RoPE, SwiGLU MLP; no biases."""
    C = cfg.n_embd
    return Block(
        attn=MultiHeadAttention(C, cfg.n_head, cfg.n_kv_head, dropout=cfg.dropout, bias=False, causal=True,
                                rope=rope),
        mlp=SwiGLU(C, cfg.ffn_dim, bias=False),
        ln_1=make_norm("rms", C, eps=cfg.norm_eps),
        ln_2=make_norm("rms", C, eps=cfg.norm_eps),
        dropout=cfg.dropout,
    )


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.input_spec = (None,)  # token ids of any length up to block_size
        self.vocab_size, self.block_size = cfg.vocab_size, cfg.block_size
        self.num_features = cfg.n_embd
        self.num_classes = cfg.vocab_size  # width of the head: next-token logits
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        rope = RotaryEmbedding(cfg.head_dim, cfg.block_size, base=cfg.rope_base)  # one table, shared by all layers
        self.blocks = nn.ModuleList(llama_block(cfg, rope) for _ in range(cfg.n_layer))
        self.ln_f = make_norm("rms", cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight  # one (V, C) tensor: embeds tokens and scores them
        self._init_weights()

    def _init_weights(self) -> None:
        # no biases; RMSNorm weights start at 1; attention o_proj and MLP down_proj (*.out_proj) are scaled
        init_transformer_(self, self.cfg.n_layer)

    @property
    def _name(self) -> str:
        return getattr(self, "model_name", "llama")

    def make_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> list[KVCache]:
        """One KVCache per block with room for `max_len` (default block_size) positions, n_kv_head heads wide."""
        max_len = self.block_size if max_len is None else min(int(max_len), self.block_size)
        return make_kv_caches((blk.attn for blk in self.blocks), batch_size, max_len, dtype, device)

    def forward_features(self, idx: torch.Tensor, cache: list[KVCache] | None = None,
                         positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> hidden states (B, T, C) after ln_f. With a cache, idx holds only the new tokens;
        positions (T,) or (B, T), long: the tokens' positions (for RoPE) instead of 0 .. T-1."""
        offset = cache_offset(self._name, cache, len(self.blocks), positions)
        check_idx(self._name, idx, self.block_size, offset, positions)
        x = self.wte(idx)  # (B, T, C); positions enter inside attention, through RoPE on q and k
        for i, blk in enumerate(self.blocks):
            x = blk(x, cache=None if cache is None else cache[i], positions=positions)  # (B, T, C)
        return self.ln_f(x)  # (B, T, C)

    def forward_head(self, h: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return h if pre_logits else self.lm_head(h)  # (B, T, num_classes)

    def forward(self, idx: torch.Tensor, cache: list[KVCache] | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, vocab_size); see lamina.models.gpt for `cache` and
        `positions`."""
        return self.forward_head(self.forward_features(idx, cache, positions))

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh (n_embd -> num_classes) head, untied from wte; 0 -> no head (forward returns h)."""
        self.num_classes = num_classes
        self.lm_head = new_lm_head(self.num_features, num_classes)


def hf_llama_key_map(n_layer: int) -> dict[str, str]:
    """Hugging Face LlamaForCausalLM state-dict name -> lamina Llama name, for n_layer layers.

    `lm_head.weight` is included; checkpoints saved with tie_word_embeddings=True usually omit it (load
    `model.embed_tokens.weight` into a tie_weights=True model, which fills both). Shapes match one to one."""
    keys = {
        "model.embed_tokens.weight": "wte.weight",
        "model.norm.weight": "ln_f.weight",
        "lm_head.weight": "lm_head.weight",
    }
    per_layer = {
        "input_layernorm.weight": "ln_1.weight",
        "self_attn.q_proj.weight": "attn.q_proj.weight",
        "self_attn.k_proj.weight": "attn.k_proj.weight",
        "self_attn.v_proj.weight": "attn.v_proj.weight",
        "self_attn.o_proj.weight": "attn.out_proj.weight",
        "post_attention_layernorm.weight": "ln_2.weight",
        "mlp.gate_proj.weight": "mlp.gate_proj.weight",
        "mlp.up_proj.weight": "mlp.up_proj.weight",
        "mlp.down_proj.weight": "mlp.out_proj.weight",
    }
    for i in range(n_layer):
        keys.update({f"model.layers.{i}.{hf}": f"blocks.{i}.{ours}" for hf, ours in per_layer.items()})
    return keys


def llama_config_from_hf(hf: dict) -> LlamaConfig:
    """A LlamaConfig from a Hugging Face Llama `config.json` (as a dict; transformers 4.x or 5.x layout).

    Rejects what this family does not implement (biases, other activations, RoPE scaling, a head_dim other
    than hidden_size / num_attention_heads) with a ModelError, rather than loading weights that compute
    something else."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})  # 5.x: rope_parameters; 4.x: rope_scaling
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelError(f"llama: RoPE scaling '{rope_type}' is not supported; only the default rotary embedding")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ModelError(f"llama: {flag}=true is not supported; lamina's Llama has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelError(f"llama: hidden_act '{hf['hidden_act']}' is not supported; expected silu (SwiGLU)")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, n_embd // n_head):
        raise ModelError(f"llama: head_dim {hf['head_dim']} != hidden_size / num_attention_heads "
                         f"({n_embd // n_head}) is not supported")
    return LlamaConfig(
        vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=n_embd, ffn_hidden=hf["intermediate_size"],
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_weights=bool(hf.get("tie_word_embeddings", False)),
    )  # dropout stays 0: HF's attention_dropout is attention-only, lamina's also drops residuals


@register_model("llama", input_kind="tokens")
def llama(**kwargs) -> Llama:
    """Llama decoder-only language model (RMSNorm, RoPE, GQA, SwiGLU): 4 layers x 4 heads (2 kv) x 128 wide."""
    return build_model("llama", Llama, LLAMA_SIZES["llama"], kwargs)


@register_model("llama", input_kind="tokens")
def llama_mini(**kwargs) -> Llama:
    """Llama decoder-only language model, mini: 6 layers x 6 heads (2 kv) x 192 wide, 128-token context."""
    return build_model("llama_mini", Llama, LLAMA_SIZES["llama_mini"], kwargs)
