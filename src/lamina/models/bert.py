"""BERT: a bidirectional transformer encoder (Devlin et al. 2019): masked-LM head, sequence classifier, span QA head.

    ids (B, T) -> wte(ids) + wtt(token_type_ids) + wpe[:T] -> LayerNorm -> dropout              (embeddings)
               -> n_layer x block: x = ln_1(x + attn(x, key mask)), x = ln_2(x + ffn(x))      (post-LN, as BERT)
               -> token states h (B, T, C)
    BertMaskedLM:  h -> dense -> GELU -> LayerNorm -> lm_head (tied to wte, own bias) -> logits (B, T, V)
    BertClassifier: h -> pool (B, C) -> dropout -> head -> logits (B, num_classes)
                       pool "cls":  tanh(pooler(h[:, 0]))       (BERT's pooler; the first token must be [CLS])
                       pool "mean": mean of h over the real (unmasked) tokens  (sentence-transformers, MiniLM)
    BertSpanQA:     h -> qa_head (C -> 2) -> start / end logits (B, T, 2)       (extractive QA, as BERT on SQuAD)

Attention is lamina.nn.MultiHeadAttention (SDPA) without a causal mask: every token sees every other real token.
Padding never enters: keys at padded positions are masked out, so a padded sequence's states at its real
positions equal those of the same sequence run alone. Init is BERT's: Linear and Embedding N(0, 0.02^2), biases
0, LayerNorm 1/0, the `pad_id` row of wte 0 (it also gets no gradient, as HF's `padding_idx`). Unlike GPT there is
no 1/sqrt(2 n_layer) residual scaling: the post-LN blocks renormalise the residual stream after every sublayer.

Sequence contract (lamina.models.contract, read per sequence):
* `input_spec = (None,)`: token ids (B, T), integer dtype, 1 <= T <= `block_size`, each id in [0, vocab_size)
* `forward(ids, attention_mask=None, token_type_ids=None, lengths=None)`. Padding is given either as
  `attention_mask` (B, T) (HF's convention: bool, or 0/1 ints; True / 1 = a real token) or, for right-padded
  batches, as `lengths` (B,) (lamina's sequence-model convention, as lstm_classifier); not both. Neither: every
  position is a real token. `token_type_ids` (B, T) in [0, type_vocab_size), zeros when absent (segment A).
* `forward_features(ids, ...)` -> token states h (B, T, C) (the encoder's last hidden state);
  `num_features = n_embd`; `vocab_size`, `block_size`; `output_kind`: "masked_lm", "sequence" or "span".
* BertMaskedLM: `forward_head(h, pre_logits=False)` is position-wise (any leading shape, so a task can score
  only the masked positions): logits (..., V), or the transformed states (..., C) with `pre_logits=True`;
  `reset_classifier(n)` puts a fresh untied (C -> n) token head in place of lm_head (n = 0: none).
* BertClassifier: `forward_head(h, pre_logits=False, attention_mask=None)` pools then classifies; mean pooling
  needs the padding mask (bool (B, T), True = real token) when the batch is padded; `pre_logits=True` returns the
  pooled (B, C) vector, which is also what forward returns after `reset_classifier(0)` (sentence embeddings).

* BertSpanQA: `forward_head(h)` is position-wise: (..., C) -> (..., 2), [..., 0] the start and [..., 1] the end
  logit of the answer span (HF BertForQuestionAnswering's qa_outputs); `reset_classifier(n)` puts a fresh (C -> n)
  token head in its place (n = 0: none), as BertMaskedLM's.

`hf_bert_key_map(n_layer)` maps HF BertModel / BertForMaskedLM / BertForSequenceClassification / ForQuestionAnswering
parameter names
to ours; `load_hf_state_dict(model, state_dict)` copies an HF-layout state dict in, asserting every shape (the
parity tests use it, and so does loading all-MiniLM-L6-v2 into `bert_minilm_l6`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lamina.errors import InputShapeError, ModelError
from lamina.models.contract import build_model
from lamina.models.registry import register_model
from lamina.nn import FeedForward, LearnedPositionalEmbedding, MultiHeadAttention, get_activation
from lamina.nn.init import init_transformer_

_INT_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding accepts
_POOLS = ("cls", "mean")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class BertConfig:
    """The encoder; defaults are BERT-base (Devlin et al. 2019, table/appendix A)."""

    vocab_size: int = 30522  # BERT's uncased WordPiece vocabulary; a data set's tokenizer overrides it
    block_size: int = 512  # max_position_embeddings: longest input; attention costs grow as T^2
    n_layer: int = 12  # BERT-base depth
    n_head: int = 12  # head size n_embd / n_head = 64, BERT's at every size
    n_embd: int = 768  # hidden width C
    ffn_hidden: int = 3072  # intermediate_size: 4 x n_embd, as in every BERT size
    dropout: float = 0.1  # BERT's hidden and attention-probability dropout; 0 for parity tests and inference
    type_vocab_size: int = 2  # segments A/B of sentence-pair inputs ([CLS] A [SEP] B [SEP])
    layer_norm_eps: float = 1e-12  # BERT's (TF's) epsilon; checkpoints were trained with it, so keep it
    pad_id: int = 0  # the padding token: its embedding row starts at 0 and gets no gradient (HF's padding_idx)

    def _check(self, family: str = "bert") -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "ffn_hidden", "type_vocab_size"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ModelError(f"{family}: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ModelError(f"{family}: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ModelError(f"{family}: dropout must be in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ModelError(f"{family}: layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")
        if not (isinstance(self.pad_id, int) and 0 <= self.pad_id < self.vocab_size):
            raise ModelError(f"{family}: pad_id must be an id in [0, vocab_size={self.vocab_size}), "
                             f"got {self.pad_id!r}")

    def __post_init__(self):
        self._check()


@dataclass
class BertClassifierConfig(BertConfig):
    num_classes: int = 2  # sentence-pair / sentiment-style default; pass the data set's class count
    pool: str = "cls"  # "cls": BERT's tanh pooler over [CLS]; "mean": masked mean of the tokens (MiniLM, SBERT)

    def __post_init__(self):
        self._check()
        n = self.num_classes
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
            raise ModelError(f"bert: num_classes must be a non-negative integer, got {n!r}")
        if self.pool not in _POOLS:
            raise ModelError(f"bert: unknown pool {self.pool!r}; valid: {', '.join(_POOLS)}")


@dataclass
class BertMLMConfig(BertConfig):
    tie_weights: bool = True  # the decoder shares wte (as BERT): V*C fewer params, better at small scale

    def __post_init__(self):
        self._check()


@dataclass
class BertSpanQAConfig(BertConfig):
    num_classes: int = 2  # start and end logit per token; the token-head contract allows other widths (tagging)

    def __post_init__(self):
        self._check()
        n = self.num_classes
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
            raise ModelError(f"bert: num_classes must be a non-negative integer, got {n!r}")


# Named sizes: registered factories below pick one; overrides apply on top.
_MINI = dict(n_layer=4, n_head=4, n_embd=256, ffn_hidden=1024)  # Google's BERT-Mini (Turc et al. 2019): L4 H256 A4
BERT_SIZES: dict[str, BertConfig] = {
    "bert_mini": BertClassifierConfig(**_MINI),
    "bert_mlm_mini": BertMLMConfig(**_MINI),
    # all-MiniLM-L6-v2's shape (HF config.json): 6 x 384, 12 heads of 32, 1536 ffn, BERT uncased vocab, mean pooling
    "bert_minilm_l6": BertClassifierConfig(n_layer=6, n_head=12, n_embd=384, ffn_hidden=1536, pool="mean"),
    "bert_qa_mini": BertSpanQAConfig(**_MINI),
    "bert_qa_minilm_l6": BertSpanQAConfig(n_layer=6, n_head=12, n_embd=384, ffn_hidden=1536),
}


# ----- parts ---------------------------------------------------------------------------------------------
class PostNormBlock(nn.Module):
    """BERT's (and the original Transformer's) post-norm block: ln_1(x + drop(attn(x))), ln_2(x + drop(mlp(x)))."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, ln_1: nn.Module, ln_2: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.attn, self.ln_1, self.mlp, self.ln_2 = attn, ln_1, mlp, ln_2
        self.drop = nn.Dropout(dropout)  # HF's BertSelfOutput / BertOutput dropout, before the residual add

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.ln_1(x + self.drop(self.attn(x, key_padding_mask=key_padding_mask)))  # (B, T, C)
        return self.ln_2(x + self.drop(self.mlp(x)))  # (B, T, C)


def bert_block(cfg: BertConfig) -> PostNormBlock:
    """BERT's layer: bidirectional multi-head attention, exact (erf) GELU feed-forward, post-LN."""
    C, eps = cfg.n_embd, cfg.layer_norm_eps
    return PostNormBlock(
        attn=MultiHeadAttention(C, cfg.n_head, dropout=cfg.dropout, causal=False),  # dropout on the attention map
        mlp=FeedForward(C, cfg.ffn_hidden, activation="gelu", dropout=0.0),  # the block applies the dropout
        ln_1=nn.LayerNorm(C, eps=eps),
        ln_2=nn.LayerNorm(C, eps=eps),
        dropout=cfg.dropout,
    )


class MLMTransform(nn.Module):
    """BERT's prediction-head transform: dense (C -> C) -> GELU -> LayerNorm, applied before the decoder."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = get_activation("gelu")
        self.ln = nn.LayerNorm(dim, eps=eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.ln(self.act(self.dense(h)))


def masked_mean(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of h (B, T, C) over the positions where mask (B, T) is True -> (B, C); all positions when None."""
    if mask is None:
        return h.mean(dim=1)
    m = mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # (B, C); an all-padding row gives 0, not NaN


# ----- the encoder ---------------------------------------------------------------------------------------
class _BertBase(nn.Module):
    """Embeddings + encoder blocks; subclasses add their head (`forward_head`, `reset_classifier`)."""

    default_name = "bert"

    def __init__(self, cfg: BertConfig, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.input_spec = (None,)  # token ids (B, T)
        self.vocab_size, self.block_size = cfg.vocab_size, cfg.block_size
        self.num_features = cfg.n_embd
        self.num_classes = num_classes
        C = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, C, padding_idx=cfg.pad_id)  # word embeddings
        self.wpe = LearnedPositionalEmbedding(cfg.block_size, C)  # absolute positions 0 .. block_size-1
        self.wtt = nn.Embedding(cfg.type_vocab_size, C)  # token types (segments)
        self.ln_emb = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(bert_block(cfg) for _ in range(cfg.n_layer))

    def _init_weights(self) -> None:
        """BERT's init (HF BertPreTrainedModel._init_weights): N(0, 0.02^2), zero biases, LayerNorm 1/0."""
        init_transformer_(self, layer_norms=True)  # no residual scaling: post-LN renormalises (module docstring)
        with torch.no_grad():
            self.wte.weight[self.cfg.pad_id].zero_()

    @property
    def _name(self) -> str:
        return getattr(self, "model_name", self.default_name)

    def _new_head(self, n: int) -> nn.Module:
        """A fresh (C -> n) linear head with BERT's init; n = 0: none (identity)."""
        if n == 0:
            return nn.Identity()
        head = nn.Linear(self.num_features, n)
        nn.init.normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    # -- input checks: one line, naming the argument and what is accepted --
    def _check_ids(self, ids: torch.Tensor) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in _INT_DTYPES:
            got = (f"{str(ids.dtype).removeprefix('torch.')} tensor of shape {tuple(ids.shape)}"
                   if isinstance(ids, torch.Tensor) else type(ids).__name__)
            raise InputShapeError(f"model {self._name} expects token ids of shape (B, T) and dtype int64, got {got}")
        T = ids.shape[1]
        if T < 1:
            raise InputShapeError(f"model {self._name} expects at least one token per sequence, got T=0")
        if T > self.block_size:
            raise InputShapeError(f"model {self._name} handles at most block_size={self.block_size} positions, "
                                  f"got T={T}; truncate the sequences to {self.block_size} tokens")
        lo, hi = int(ids.min()), int(ids.max())  # one host sync; an out-of-range id would crash inside Embedding
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputShapeError(f"model {self._name}: token id {bad} is outside the vocabulary [0, "
                                  f"{self.vocab_size}); the tokenizer and the model's vocab_size disagree")

    def key_mask(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 lengths: torch.Tensor | None = None) -> torch.Tensor | None:
        """The (B, T) bool mask of real tokens (True = keep) from attention_mask or lengths; None if neither."""
        B, T = ids.shape
        if attention_mask is not None and lengths is not None:
            raise InputShapeError(f"model {self._name}: pass attention_mask or lengths, not both")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, T):
                got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
                raise InputShapeError(f"model {self._name}: attention_mask must have the shape of the ids "
                                      f"({B}, {T}) (True/1 = real token), got {got}")
            return attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
        if lengths is None:
            return None
        lengths = torch.as_tensor(lengths, device=ids.device)
        if lengths.shape != (B,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise InputShapeError(f"model {self._name} expects lengths as integers of shape ({B},), got "
                                  f"{str(lengths.dtype).removeprefix('torch.')} of shape {tuple(lengths.shape)}")
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > T:
            raise InputShapeError(f"model {self._name}: lengths must be in [1, T={T}], got values in [{lo}, {hi}]")
        if lo == T:
            return None  # no padding in this batch: no mask, so SDPA may pick its fused kernels
        return torch.arange(T, device=ids.device)[None, :] < lengths[:, None]  # (B, T)

    def _token_types(self, ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        if token_type_ids is None:
            return torch.zeros_like(ids)
        if not isinstance(token_type_ids, torch.Tensor) or token_type_ids.shape != ids.shape \
                or token_type_ids.dtype not in _INT_DTYPES:
            raise InputShapeError(f"model {self._name}: token_type_ids must be integers of the shape of the ids "
                                  f"{tuple(ids.shape)}")
        lo, hi = int(token_type_ids.min()), int(token_type_ids.max())
        if lo < 0 or hi >= self.cfg.type_vocab_size:
            raise InputShapeError(f"model {self._name}: token_type_ids must be in [0, type_vocab_size="
                                  f"{self.cfg.type_vocab_size}), got values in [{lo}, {hi}]")
        return token_type_ids

    def encode(self, ids: torch.Tensor, mask: torch.Tensor | None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Checked ids (B, T) + a bool key mask (B, T) or None -> token states (B, T, C)."""
        x = self.wte(ids) + self.wtt(self._token_types(ids, token_type_ids))  # (B, T, C)
        x = self.drop(self.ln_emb(self.wpe(x)))  # + positions 0 .. T-1, (B, T, C)
        for blk in self.blocks:
            x = blk(x, key_padding_mask=mask)  # (B, T, C)
        return x

    def forward_features(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         token_type_ids: torch.Tensor | None = None,
                         lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) (+ padding as attention_mask or lengths) -> token states (B, T, C)."""
        self._check_ids(ids)
        return self.encode(ids, self.key_mask(ids, attention_mask, lengths), token_type_ids)


class BertMaskedLM(_BertBase):
    """BERT with its masked-language-model head: logits over the vocabulary at every position."""

    default_name = "bert_mlm_mini"
    output_kind = "masked_lm"  # (B, T, V) like a language model, but each position sees the whole sequence

    def __init__(self, cfg: BertMLMConfig):
        super().__init__(cfg, cfg.vocab_size)
        self.mlm_transform = MLMTransform(cfg.n_embd, cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)  # the decoder, with BERT's per-token output bias
        self._init_weights()
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight  # one (V, C) tensor: embeds tokens and scores them

    def forward_head(self, h: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Position-wise: h (..., C) -> logits (..., num_classes), or the transformed states with pre_logits."""
        t = self.mlm_transform(h)
        return t if pre_logits else self.lm_head(t)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> vocabulary logits (B, T, vocab_size) at every position."""
        return self.forward_head(self.forward_features(ids, attention_mask, token_type_ids, lengths))

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh untied (C -> num_classes) token head after the transform; 0 -> none (forward gives the states)."""
        self.num_classes = num_classes
        self.lm_head = self._new_head(num_classes)


class BertClassifier(_BertBase):
    """BERT sequence classifier: pooled [CLS] (tanh pooler) or masked mean of the tokens -> dropout -> linear."""

    default_name = "bert_mini"
    output_kind = "sequence"  # one distribution per sequence: (B, num_classes)

    def __init__(self, cfg: BertClassifierConfig):
        super().__init__(cfg, cfg.num_classes)
        self.pooler = nn.Linear(cfg.n_embd, cfg.n_embd) if cfg.pool == "cls" else None  # HF's pooler.dense
        self.head_drop = nn.Dropout(cfg.dropout)  # HF's classifier dropout (hidden_dropout_prob)
        self.head = self._new_head(cfg.num_classes)
        self._init_weights()

    def pool(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token states (B, T, C) -> (B, C): tanh(pooler(h[:, 0])) for "cls", masked mean for "mean"."""
        if self.pooler is not None:
            return torch.tanh(self.pooler(h[:, 0]))  # the [CLS] position; padding is on the right
        return masked_mean(h, mask)

    def forward_head(self, h: torch.Tensor, pre_logits: bool = False,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """h (B, T, C) -> class logits (B, num_classes), or the pooled (B, C) with pre_logits (or no head).
        attention_mask (B, T) bool marks the real tokens for mean pooling of a padded batch."""
        pooled = self.pool(h, attention_mask)  # (B, C)
        if pre_logits or self.num_classes == 0:
            return pooled
        return self.head(self.head_drop(pooled))  # (B, num_classes)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) (+ padding as attention_mask or lengths) -> class logits (B, num_classes)."""
        self._check_ids(ids)
        mask = self.key_mask(ids, attention_mask, lengths)
        return self.forward_head(self.encode(ids, mask, token_type_ids), attention_mask=mask)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh (C -> num_classes) head; 0 -> no head (forward returns the pooled features)."""
        self.num_classes = num_classes
        self.head = self._new_head(num_classes)


def classifier_from_mlm(mlm: BertMaskedLM, num_classes: int, pool: str = "cls") -> BertClassifier:
    """A sequence classifier on a masked-LM model's embeddings and encoder blocks (every tensor copied, shapes
    asserted); its MLM head is dropped, the pooler and the (C -> num_classes) head are new. How a `lamina train`
    MLM run becomes the encoder of a text classifier (model.pretrained=<run folder>)."""
    fields = {k: getattr(mlm.cfg, k) for k in BertConfig.__dataclass_fields__}
    clf = bert_mini(**fields, num_classes=num_classes, pool=pool)
    body = {k: v for k, v in mlm.state_dict().items() if not k.startswith(("mlm_transform.", "lm_head."))}
    missing, unexpected = clf.load_state_dict(body, strict=False)
    new = {k for k in missing if not k.startswith(("pooler.", "head."))}
    if new or unexpected:
        raise ModelError(f"bert: the masked-LM encoder does not fit a classifier: missing {sorted(new)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    return clf


class BertSpanQA(_BertBase):
    """BERT for extractive question answering: a start and an end logit per token (Devlin et al. 2019, sec. 4.2).
    Which positions may hold an answer (the context's, not the question's or padding) is the task's business."""

    default_name = "bert_qa_mini"
    output_kind = "span"  # (B, T, 2): start / end logits at every position

    def __init__(self, cfg: BertSpanQAConfig):
        super().__init__(cfg, cfg.num_classes)
        self.qa_head = self._new_head(cfg.num_classes)  # HF's qa_outputs
        self._init_weights()

    def forward_head(self, h: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Position-wise: h (..., C) -> (..., 2) start / end logits (h itself with pre_logits or no head)."""
        return h if pre_logits else self.qa_head(h)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) ([CLS] question [SEP] context [SEP], padded) -> start / end logits (B, T, 2)."""
        return self.forward_head(self.forward_features(ids, attention_mask, token_type_ids, lengths))

    def reset_classifier(self, num_classes: int = 2) -> None:
        """A fresh position-wise head of num_classes outputs (2 for answer spans; 0: none, forward gives h)."""
        self.num_classes = num_classes
        self.qa_head = self._new_head(num_classes)


def span_qa_from(encoder: _BertBase) -> BertSpanQA:
    """A span-QA model on any BERT model's embeddings and encoder blocks (every tensor copied, shapes asserted);
    its own head (pooler, classifier, MLM) is dropped and the span head is new. How all-MiniLM-L6-v2 or a
    `lamina train` MLM run becomes a question answerer."""
    if not isinstance(encoder, _BertBase):
        raise ModelError(f"bert: question answering fine-tunes a BERT encoder, got {type(encoder).__name__}")
    fields = {k: getattr(encoder.cfg, k) for k in BertConfig.__dataclass_fields__}
    qa = BertSpanQA(BertSpanQAConfig(**fields))
    body = {k: v for k, v in encoder.state_dict().items()
            if k.split(".")[0] in ("wte", "wpe", "wtt", "ln_emb", "blocks")}
    missing, unexpected = qa.load_state_dict(body, strict=False)
    new = {k for k in missing if not k.startswith("qa_head.")}
    if new or unexpected:
        raise ModelError(f"bert: the encoder does not fit a span-QA model: missing {sorted(new)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    return qa


# ----- HF weights ----------------------------------------------------------------------------------------
def hf_bert_key_map(n_layer: int) -> dict[str, str]:
    """HF BERT parameter name -> lamina name, for BertModel names (without the "bert." prefix of the task
    models) plus the heads of BertForMaskedLM ("cls.predictions.*") and BertForSequenceClassification
    ("classifier.*"). Both HF names of the MLM output bias map to lm_head.bias (HF ties them)."""
    m = {
        "embeddings.word_embeddings.weight": "wte.weight",
        "embeddings.position_embeddings.weight": "wpe.weight",
        "embeddings.token_type_embeddings.weight": "wtt.weight",
        "embeddings.LayerNorm.weight": "ln_emb.weight",
        "embeddings.LayerNorm.bias": "ln_emb.bias",
        "pooler.dense.weight": "pooler.weight",
        "pooler.dense.bias": "pooler.bias",
        "cls.predictions.transform.dense.weight": "mlm_transform.dense.weight",
        "cls.predictions.transform.dense.bias": "mlm_transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight": "mlm_transform.ln.weight",
        "cls.predictions.transform.LayerNorm.bias": "mlm_transform.ln.bias",
        "cls.predictions.decoder.weight": "lm_head.weight",
        "cls.predictions.decoder.bias": "lm_head.bias",
        "cls.predictions.bias": "lm_head.bias",
        "classifier.weight": "head.weight",
        "classifier.bias": "head.bias",
        "qa_outputs.weight": "qa_head.weight",
        "qa_outputs.bias": "qa_head.bias",
    }
    parts = {
        "attention.self.query": "attn.q_proj", "attention.self.key": "attn.k_proj",
        "attention.self.value": "attn.v_proj", "attention.output.dense": "attn.out_proj",
        "attention.output.LayerNorm": "ln_1", "intermediate.dense": "mlp.fc",
        "output.dense": "mlp.out_proj", "output.LayerNorm": "ln_2",
    }
    for i in range(n_layer):
        for hf, ours in parts.items():
            for p in ("weight", "bias"):
                m[f"encoder.layer.{i}.{hf}.{p}"] = f"blocks.{i}.{ours}.{p}"
    return m


def hf_name(key: str) -> str:
    """Normalise an HF checkpoint key: drop the task models' "bert." prefix and old TF-era LayerNorm names."""
    key = key.removeprefix("bert.")
    if key.endswith(".gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith(".beta"):
        key = key[: -len("beta")] + "bias"
    return key


def load_hf_state_dict(model: _BertBase, state_dict: dict[str, torch.Tensor],
                       source: str = "HF state dict") -> list[str]:
    """Copy an HF-layout BERT state dict into `model`, asserting every shape; returns the model's parameter
    names it did not provide (e.g. a fresh classifier head). A missing encoder weight is a ModelError;
    HF entries with no place in this model (buffers like position_ids, the NSP head, an unused pooler) are skipped."""
    key_map = hf_bert_key_map(model.cfg.n_layer)
    ours = model.state_dict()
    loaded: set[str] = set()
    with torch.no_grad():
        for key, value in state_dict.items():
            name = key_map.get(hf_name(key))
            if name is None or name not in ours:
                continue
            if tuple(value.shape) != tuple(ours[name].shape):
                raise ModelError(f"{source}: {key} has shape {tuple(value.shape)}, model {model._name} expects "
                                 f"{tuple(ours[name].shape)} for {name}")
            ours[name].copy_(value.to(ours[name].dtype))  # state_dict tensors share storage with the parameters
            loaded.add(name)
    tied = {"lm_head.weight"} if getattr(model.cfg, "tie_weights", False) else set()  # loaded with wte
    missing = [k for k in ours if k not in loaded and k not in tied]
    encoder = [k for k in missing if k.split(".")[0] in ("wte", "wpe", "wtt", "ln_emb", "blocks")]
    if encoder:
        raise ModelError(f"{source}: no weight for {encoder[0]} (and {len(encoder) - 1} more encoder tensors); "
                         f"is it a BERT checkpoint with {model.cfg.n_layer} layers?")
    return missing


# ----- registered models ---------------------------------------------------------------------------------
@register_model("bert", input_kind="tokens")
def bert_mini(**kwargs) -> BertClassifier:
    """BERT-Mini sequence classifier: 4 layers x 4 heads x 256 wide, [CLS] tanh pooler -> linear head."""
    return build_model("bert_mini", BertClassifier, BERT_SIZES["bert_mini"], kwargs)


@register_model("bert", input_kind="tokens")
def bert_mlm_mini(**kwargs) -> BertMaskedLM:
    """BERT-Mini masked language model: 4 layers x 4 heads x 256 wide, MLM head tied to the word embeddings."""
    return build_model("bert_mlm_mini", BertMaskedLM, BERT_SIZES["bert_mlm_mini"], kwargs)


@register_model("bert", input_kind="tokens")
def bert_minilm_l6(**kwargs) -> BertClassifier:
    """MiniLM-L6-shaped BERT (all-MiniLM-L6-v2): 6 layers x 12 heads x 384 wide, mean pooling -> linear head."""
    return build_model("bert_minilm_l6", BertClassifier, BERT_SIZES["bert_minilm_l6"], kwargs)


@register_model("bert", input_kind="tokens")
def bert_qa_mini(**kwargs) -> BertSpanQA:
    """BERT-Mini for extractive QA: 4 layers x 4 heads x 256 wide, start / end logits per token."""
    return build_model("bert_qa_mini", BertSpanQA, BERT_SIZES["bert_qa_mini"], kwargs)


@register_model("bert", input_kind="tokens")
def bert_qa_minilm_l6(**kwargs) -> BertSpanQA:
    """MiniLM-L6-shaped BERT for extractive QA (fine-tune from all-MiniLM-L6-v2): start / end logits per token."""
    return build_model("bert_qa_minilm_l6", BertSpanQA, BERT_SIZES["bert_qa_minilm_l6"], kwargs)
