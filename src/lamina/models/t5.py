"""T5: an encoder-decoder transformer (Raffel et al. 2020), v1.1 flavour by default, laid out top to bottom.

    src (B, S) -> shared embedding -> dropout
               -> n_enc_layer x [x + drop(attn(rms(x), bias_enc)), x + drop(ffn(rms(x)))] -> rms -> dropout
               = memory (B, S, C)
    tgt (B, T) -> shared embedding -> dropout
               -> n_dec_layer x [x + drop(causal_attn(rms(x), bias_dec)), x + drop(cross_attn(rms(x), memory)),
                                 x + drop(ffn(rms(x)))] -> rms -> dropout
               -> lm_head(x * C^-0.5 when tied) -> logits (B, T, vocab_size)

What makes it T5 rather than the 2017 Transformer:
* no absolute positions: each stack has one learned relative position bias (bucketed key - query offsets,
  lamina.nn.RelativePositionBias), computed once and added to the scores of every self-attention layer;
  cross-attention has none
* RMSNorm without bias, pre-norm; no bias in any Linear; attention scores are not scaled by 1/sqrt(d)
  (the scale lives in the init: q ~ N(0, (C * d_kv)^-1))
* one embedding shared by encoder, decoder and (tied) output layer; v1.1's gated-GELU feed-forward
  (`ffn="gated-gelu"`; `"relu"` is the original T5's)

Module names follow Hugging Face's T5 closely enough for a one-to-one name map (`hf_t5_key_map`), which the
parity test uses: lamina's T5 and `transformers.T5ForConditionalGeneration` give the same logits.

Sequence-to-sequence contract (what lamina.tasks.seq2seq and lamina.models.generation use):
* `forward(src, tgt, src_mask=None)` -> logits (B, T, vocab_size), teacher forcing: tgt is the decoder input
  (<s> y_1 ... y_{n-1}); src_mask (B, S) bool, True = real token (default: src != pad_id)
* `encode(src, src_mask)` -> memory (B, S, C); `decode(tgt, memory, src_mask, cache=None)` -> logits;
  with a cache (`make_cache(batch_size, max_len)`), tgt holds only the new tokens
* `vocab_size`, `block_size` (longest target it decodes), `pad_id`, `bos_id` (decoder start), `eos_id`,
  `output_kind = "seq2seq"`, `input_spec = (None,)`, `num_features = d_model`
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lamina.errors import InputShapeError, ModelError
from lamina.models._decoder import check_token_ids, make_kv_caches, new_lm_head
from lamina.models.contract import build_model
from lamina.models.registry import register_model
from lamina.nn import FeedForward, KVCache, MultiHeadAttention, RMSNorm, SwiGLU
from lamina.nn.positional import RelativePositionBias

FFN_KINDS = ("gated-gelu", "relu")


@dataclass
class T5Config:
    vocab_size: int = 8000  # joint BPE over both languages (Multi30k: 8k covers 29k pairs with ~16 tokens each)
    d_model: int = 256  # width C; 256 x 3+3 layers trains Multi30k on a 2-core CPU within an hour
    n_head: int = 4  # head size d_model / n_head = 64, T5's d_kv
    d_ff: int = 1024  # feed-forward width (gated: two of these)
    n_enc_layer: int = 3
    n_dec_layer: int = 3
    rel_buckets: int = 32  # T5's relative-position buckets and horizon
    rel_max_distance: int = 128
    dropout: float = 0.1  # small data (29k pairs) overfits quickly without it
    ffn: str = "gated-gelu"  # T5 v1.1; "relu" is the original T5 feed-forward
    tie_weights: bool = True  # lm_head = shared embedding (scaled by d_model^-0.5), as T5 v1.0
    norm_eps: float = 1e-6  # T5's layer_norm_epsilon
    # T5 inits embeddings N(0, 1) for Adafactor, whose updates scale with each tensor's RMS; under Adam(W) an
    # N(0, 1) table moves ~50x slower relative to its size than the rest of the net: give a smaller std there
    embed_std: float = 1.0
    # T5 scores q.k unscaled and puts 1/sqrt(d_kv) into q's init (std (C * d_kv)^-0.5, ~0.008 at C=256). That
    # is built for Adafactor's relative updates; AdamW's absolute steps of ~1e-3 move such a q by >10% per step
    # and training goes unstable. True: the usual 1/sqrt(d_kv) score scale and q init C^-0.5, the same function
    # family, well conditioned for Adam. False keeps T5's exact parameterization (pretrained T5 weights).
    scaled_attention: bool = False
    block_size: int = 128  # longest target sequence the decoder produces (relative positions have no hard limit)
    pad_id: int = 0  # lamina tokenizers: <pad>=0, <s>=2, </s>=3
    bos_id: int = 2  # decoder start token (HF T5 uses pad=0; any id works as long as training agrees)
    eos_id: int = 3

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_head", "d_ff", "n_enc_layer", "n_dec_layer", "rel_buckets",
                     "rel_max_distance", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelError(f"t5: {name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ModelError(f"t5: d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.ffn not in FFN_KINDS:
            raise ModelError(f"t5: unknown ffn '{self.ffn}'; valid: {', '.join(FFN_KINDS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"t5: dropout must be in [0, 1), got {self.dropout}")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ModelError(f"t5: {name} must be a token id below vocab_size={self.vocab_size}, "
                                 f"got {getattr(self, name)}")


T5_SIZES: dict[str, T5Config] = {
    "t5_mini": T5Config(),  # 9.1M params at vocab 8000 (2M of them the shared embedding)
    # google-t5/t5-small's shape (v1.0: ReLU feed-forward, tied output): 60,506,624 parameters
    "t5_small": T5Config(d_model=512, n_head=8, d_ff=2048, n_enc_layer=6, n_dec_layer=6, ffn="relu",
                         vocab_size=32128, block_size=512),
}


def _ffn(cfg: T5Config) -> nn.Module:
    if cfg.ffn == "gated-gelu":
        return SwiGLU(cfg.d_model, cfg.d_ff, bias=False, activation="gelu_tanh", dropout=cfg.dropout)
    return FeedForward(cfg.d_model, cfg.d_ff, activation="relu", dropout=0.0, bias=False)


class T5Block(nn.Module):
    """Pre-RMSNorm residual block: self-attention, [cross-attention], feed-forward."""

    def __init__(self, cfg: T5Config, decoder: bool):
        super().__init__()
        C, nh = cfg.d_model, cfg.n_head
        # T5: no 1/sqrt(d) (it is in the init), unless scaled_attention (see T5Config)
        attn = dict(dropout=cfg.dropout, bias=False, scale=None if cfg.scaled_attention else 1.0)
        self.ln_self = RMSNorm(C, eps=cfg.norm_eps)
        self.self_attn = MultiHeadAttention(C, nh, causal=decoder, **attn)
        if decoder:
            self.ln_cross = RMSNorm(C, eps=cfg.norm_eps)
            self.cross_attn = MultiHeadAttention(C, nh, **attn)
        self.ln_ff = RMSNorm(C, eps=cfg.norm_eps)
        self.ff = _ffn(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.ln_self(x), key_padding_mask=mask, attn_bias=bias, cache=cache))
        if memory is not None:
            x = x + self.drop(self.cross_attn(self.ln_cross(x), kv=memory, key_padding_mask=memory_mask))
        return x + self.drop(self.ff(self.ln_ff(x)))  # (B, T, C)


class T5Stack(nn.Module):
    """Encoder (bidirectional) or decoder (causal, cross-attending) stack sharing one position bias."""

    def __init__(self, cfg: T5Config, decoder: bool):
        super().__init__()
        n = cfg.n_dec_layer if decoder else cfg.n_enc_layer
        self.rel_bias = RelativePositionBias(cfg.n_head, cfg.rel_buckets, cfg.rel_max_distance,
                                             bidirectional=not decoder)
        self.blocks = nn.ModuleList(T5Block(cfg, decoder) for _ in range(n))
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, cache: list[KVCache] | None = None) -> torch.Tensor:
        offset = cache[0].length if cache else 0
        T = x.shape[1]
        bias = self.rel_bias(T, offset + T, offset)  # (1, nh, T, offset + T)
        x = self.drop(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x, bias, mask, memory, memory_mask, None if cache is None else cache[i])
        return self.drop(self.final_norm(x))  # (B, T, C)


class T5(nn.Module):
    output_kind = "seq2seq"

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.input_spec = (None,)
        self.vocab_size, self.block_size = cfg.vocab_size, cfg.block_size
        self.pad_id, self.bos_id, self.eos_id = cfg.pad_id, cfg.bos_id, cfg.eos_id
        self.num_features = cfg.d_model
        self.num_classes = cfg.vocab_size
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, decoder=False)
        self.decoder = T5Stack(cfg, decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.shared.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """T5's init (Mesh TensorFlow): the 1/sqrt(fan_in) scales that make unscaled attention work."""
        C, hs, ff = self.cfg.d_model, self.cfg.d_model // self.cfg.n_head, self.cfg.d_ff
        nn.init.normal_(self.shared.weight, std=self.cfg.embed_std)
        if not self.cfg.tie_weights:
            nn.init.normal_(self.lm_head.weight, std=C ** -0.5)
        for name, m in self.named_modules():
            if isinstance(m, MultiHeadAttention):
                nn.init.normal_(m.q_proj.weight, std=C ** -0.5 if self.cfg.scaled_attention else (C * hs) ** -0.5)
                nn.init.normal_(m.k_proj.weight, std=C ** -0.5)
                nn.init.normal_(m.v_proj.weight, std=C ** -0.5)
                nn.init.normal_(m.out_proj.weight, std=C ** -0.5)
            elif isinstance(m, (SwiGLU, FeedForward)):
                for lin in m.children():
                    if isinstance(lin, nn.Linear):
                        nn.init.normal_(lin.weight, std=(ff if lin is m.out_proj else C) ** -0.5)
            elif isinstance(m, RelativePositionBias):
                nn.init.normal_(m.relative_attention_bias.weight, std=C ** -0.5)

    @property
    def _name(self) -> str:
        return getattr(self, "model_name", "t5")

    def _check_ids(self, ids: torch.Tensor, what: str) -> None:
        check_token_ids(self._name, ids, f"{what} token ids", "(B, L)")

    def make_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> list[KVCache]:
        """One self-attention KVCache per decoder block (cross-attention keys are recomputed from memory)."""
        max_len = self.block_size if max_len is None else int(max_len)
        return make_kv_caches((blk.self_attn for blk in self.decoder.blocks), batch_size, max_len, dtype, device)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids (B, S) -> memory (B, S, C)."""
        self._check_ids(src, "source")
        if src_mask is None:
            src_mask = src != self.pad_id
        return self.encoder(self.shared(src), mask=src_mask)

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor | None = None,
               cache: list[KVCache] | None = None) -> torch.Tensor:
        """Decoder input ids (B, T) + memory -> logits (B, T, V); with a cache, tgt holds the new tokens only."""
        return self.forward_head(self.decode_features(tgt, memory, src_mask, cache))

    def decode_features(self, tgt, memory, src_mask=None, cache=None) -> torch.Tensor:
        self._check_ids(tgt, "target")
        offset = cache[0].length if cache else 0
        if offset + tgt.shape[1] > self.block_size and cache is None:
            raise InputShapeError(f"model {self._name} decodes at most block_size={self.block_size} target "
                                  f"positions, got {offset + tgt.shape[1]}")
        return self.decoder(self.shared(tgt), memory=memory, memory_mask=src_mask, cache=cache)  # (B, T, C)

    def forward_features(self, src: torch.Tensor, tgt: torch.Tensor,
                         src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(src (B, S), decoder input tgt (B, T)) -> decoder states (B, T, C)."""
        if src_mask is None:
            self._check_ids(src, "source")
            src_mask = src != self.pad_id
        return self.decode_features(tgt, self.encode(src, src_mask), src_mask)

    def forward_head(self, h: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits or isinstance(self.lm_head, nn.Identity):
            return h
        if self.cfg.tie_weights and self.lm_head.weight is self.shared.weight:
            h = h * self.cfg.d_model ** -0.5  # tied output: rescale, as T5 does
        return self.lm_head(h)  # (B, T, num_classes)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(src, tgt, src_mask))

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh untied (d_model -> num_classes) output layer; 0 -> none (forward returns decoder states)."""
        self.num_classes = num_classes
        self.lm_head = new_lm_head(self.num_features, num_classes, std=self.num_features ** -0.5)


def hf_t5_key_map(cfg: T5Config) -> dict[str, str]:
    """Hugging Face T5ForConditionalGeneration parameter name -> lamina T5 name."""
    m = {"shared.weight": "shared.weight", "encoder.final_layer_norm.weight": "encoder.final_norm.weight",
         "decoder.final_layer_norm.weight": "decoder.final_norm.weight"}
    if not cfg.tie_weights:
        m["lm_head.weight"] = "lm_head.weight"
    ff = {"wi_0": "gate_proj", "wi_1": "up_proj", "wo": "out_proj"} if cfg.ffn == "gated-gelu" else \
        {"wi": "fc", "wo": "out_proj"}
    for stack, n in (("encoder", cfg.n_enc_layer), ("decoder", cfg.n_dec_layer)):
        m[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = \
            f"{stack}.rel_bias.relative_attention_bias.weight"
        for i in range(n):
            hf, lm = f"{stack}.block.{i}.layer", f"{stack}.blocks.{i}"
            attns = [("0.SelfAttention", "self_attn", "0", "ln_self")]
            if stack == "decoder":
                attns.append(("1.EncDecAttention", "cross_attn", "1", "ln_cross"))
            for hf_a, lm_a, ln_i, lm_ln in attns:
                for p, q in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
                    m[f"{hf}.{hf_a}.{p}.weight"] = f"{lm}.{lm_a}.{q}.weight"
                m[f"{hf}.{ln_i}.layer_norm.weight"] = f"{lm}.{lm_ln}.weight"
            f_i = 2 if stack == "decoder" else 1
            for p, q in ff.items():
                m[f"{hf}.{f_i}.DenseReluDense.{p}.weight"] = f"{lm}.ff.{q}.weight"
            m[f"{hf}.{f_i}.layer_norm.weight"] = f"{lm}.ln_ff.weight"
    return m


@register_model("t5", input_kind="seq2seq")
def t5_mini(**kwargs) -> T5:
    """T5 encoder-decoder (v1.1 style), mini: 3+3 layers x 4 heads x 256 wide, gated-GELU, relative positions."""
    return build_model("t5_mini", T5, T5_SIZES["t5_mini"], kwargs)


@register_model("t5", input_kind="seq2seq")
def t5_small(**kwargs) -> T5:
    """T5 encoder-decoder in t5-small's shape: 6+6 layers x 8 heads x 512 wide, ReLU FFN, vocab 32128."""
    return build_model("t5_small", T5, T5_SIZES["t5_small"], kwargs)
