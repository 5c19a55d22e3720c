"""Recurrent networks (Elman RNN, LSTM, GRU) on torch.nn.RNN / LSTM / GRU, so cuDNN's fused kernels run on GPU.

Three models share one embedding -> recurrent-stack layout and differ only in what they read off it:

    RNNLanguageModel (char_rnn, char_lstm, char_gru)   causal, unidirectional
        idx (B, T) -> wte (B, T, E) -> dropout -> rnn (B, T, H) -> dropout -> lm_head -> logits (B, T, V)
    RNNClassifier (lstm_classifier)                    one label per sequence, padding-aware
        idx (B, T), lengths (B,) -> wte -> dropout -> rnn over the packed batch -> pool (B, D) -> dropout -> head
    RNNTagger (lstm_tagger)                            one label per token, bidirectional by default
        idx (B, T), lengths (B,) -> wte -> dropout -> rnn over the packed batch (B, T, D) -> dropout -> head

D = hidden_size x 2 when bidirectional. `dropout` is Zaremba et al. (2014)'s: on the non-recurrent connections
only (embeddings, between layers via the torch module's own `dropout`, and before the head), never on the
recurrent state. Init is PyTorch's (uniform +-1/sqrt(H)) except the LSTM forget-gate bias, which starts at 1
(Gers et al. 2000; Jozefowicz et al. 2015) so the cell remembers by default early in training.

Language-model contract (the same as GPT's, see lamina.models.gpt):
* `input_spec = (None,)`: token ids (B, T), integer dtype; `vocab_size`, `block_size`, `num_features = H`,
  `num_classes` (= vocab_size until `reset_classifier`)
* `forward(idx, cache=None)` -> (B, T, V); `forward_features` -> (B, T, H); `forward_head(h, pre_logits=False)`
* `block_size` is only the training window: without a cache, forward takes at most block_size tokens (so a
  model is never silently run on windows longer than it was trained on). The recurrence itself has no position
  limit: with a cache, tokens can be streamed one call at a time for as long as wanted.

Incremental decoding (what `lamina.models.generation.generate` uses; it never looks inside the cache):

    cache = model.make_cache(batch_size)            # RNNCache: recurrent state (None = zeros) + length
    logits = model(prompt, cache=cache)             # (B, T0, V); the cache now holds the state after T0 tokens
    logits = model(next_tok[:, None], cache=cache)  # (B, 1, V); one recurrent step, O(1) per token

Cached decoding gives the same logits as recomputing from the start. `generate` uses the cache for the first
block_size positions and then recomputes the last block_size tokens from a zero state for each new token,
as its uncached path does; so generation beyond block_size works, and with or without the cache gives the
same tokens. To carry state across windows yourself (streaming, truncated BPTT) call the model with one cache
and `cache.detach_()` between windows.

Every model states `output_kind`: "next_token" (the language models; GPT's kind, assumed when absent), "token"
(the tagger: (B, T, num_classes), each position may see the whole sequence) or "sequence" (the classifier:
(B, num_classes)), so tools and tests need not know which model they hold.

Classifier / tagger contract: `forward(idx, lengths=None)`. With `lengths` (B,) the batch is right-padded and
goes through `pack_padded_sequence` (enforce_sorted=False), so padding never enters the recurrence and each
sequence's output equals running it alone. Classifier pooling: "last" = the final state of each sequence (the
forward direction at its last real token, concatenated with the backward direction at its first token when
bidirectional), "mean" = the mean of the outputs over the real tokens. Because pooling needs the lengths,
the classifier's `forward_features(idx, lengths)` returns the pooled (B, num_features) vector and
`forward_head` is the dropout + linear head alone; the tagger's `forward_features` returns (B, T, D), zero at
padded positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lamina.errors import InputShapeError, ModelError
from lamina.models.contract import build_model
from lamina.models.registry import register_model

_INT_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding accepts
_CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
_POOLINGS = ("last", "mean")

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # h (L*dirs, B, H), or (h, c) for an LSTM


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class RNNConfig:
    cell: str = "lstm"  # "rnn" | "lstm" | "gru"; LSTM/GRU gates keep gradients alive over long spans, Elman's don't
    vocab_size: int = 65  # tiny-shakespeare's characters
    block_size: int = 64  # training window (longest uncached input); the recurrence itself has no length limit
    embed_dim: int = 64  # a char vocabulary is tiny: 64 dims is plenty and keeps the first layer's input matmul cheap
    hidden_size: int = 256  # Karpathy's char-rnn range (128-512); 2 x 256 LSTM is ~0.88M params, GPT-CPU sized
    num_layers: int = 2  # a second layer helps char LMs clearly; a third rarely pays for its time at this size
    dropout: float = 0.0  # off while underfitting (short CPU runs); 0.2-0.5 once a small corpus starts to overfit
    bidirectional: bool = False  # classifiers/taggers only: a language model must not read the future
    tie_weights: bool = False  # lm_head shares wte (needs embed_dim == hidden_size); saves little on a char vocab

    def __post_init__(self):
        if self.cell not in _CELLS:
            raise ModelError(f"rnn: unknown cell {self.cell!r}; valid: {', '.join(_CELLS)}")
        for name in ("vocab_size", "block_size", "embed_dim", "hidden_size", "num_layers"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ModelError(f"rnn: {name} must be a positive integer, got {value!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ModelError(f"rnn: dropout must be in [0, 1), got {self.dropout!r}")
        if self.tie_weights and self.embed_dim != self.hidden_size:
            raise ModelError(f"rnn: tie_weights needs embed_dim == hidden_size, got {self.embed_dim} and "
                             f"{self.hidden_size}")


def _check_head_config(cfg: RNNConfig) -> None:
    """What classifier and tagger configs add to RNNConfig's checks."""
    RNNConfig.__post_init__(cfg)
    n = cfg.num_classes
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
        raise ModelError(f"rnn: num_classes must be a non-negative integer, got {n!r}")
    if cfg.tie_weights:
        raise ModelError("rnn: tie_weights applies to language models only (char_rnn, char_lstm, char_gru)")


@dataclass
class RNNClassifierConfig(RNNConfig):
    block_size: int = 512  # longest sequence accepted; sentences and short documents fit
    bidirectional: bool = True  # a classifier sees the whole sequence: read it both ways
    num_classes: int = 2  # sentiment-style default; pass the data set's class count
    pooling: str = "last"  # "last" (final states) | "mean" (masked mean of outputs; steadier on long inputs)

    def __post_init__(self):
        _check_head_config(self)
        if self.pooling not in _POOLINGS:
            raise ModelError(f"rnn: unknown pooling {self.pooling!r}; valid: {', '.join(_POOLINGS)}")


@dataclass
class RNNTaggerConfig(RNNConfig):
    block_size: int = 512  # longest sequence accepted
    bidirectional: bool = True  # a tag depends on the words after it as much as on those before
    num_classes: int = 17  # Universal Dependencies' 17 POS tags; pass the data set's tag count

    def __post_init__(self):
        _check_head_config(self)


@dataclass
class RNNCache:
    """Recurrent state for incremental decoding: `state` None means zeros; `length` tokens consumed so far."""

    batch_size: int
    state: State | None = None
    length: int = 0

    def detach_(self) -> "RNNCache":
        """Cut the autograd graph at the current state (truncated backprop through time)."""
        if isinstance(self.state, tuple):
            self.state = tuple(s.detach() for s in self.state)
        elif self.state is not None:
            self.state = self.state.detach()
        return self


# ----- shared parts ---------------------------------------------------------------------------------
def make_rnn(cfg: RNNConfig) -> nn.RNNBase:
    """The torch recurrent stack (batch_first), with the LSTM forget-gate bias set to 1."""
    rnn = _CELLS[cfg.cell](cfg.embed_dim, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True,
                           dropout=cfg.dropout if cfg.num_layers > 1 else 0.0, bidirectional=cfg.bidirectional)
    if cfg.cell == "lstm":
        H = cfg.hidden_size
        with torch.no_grad():
            for name, p in rnn.named_parameters():
                if name.startswith("bias_ih"):  # gates i, f, g, o; b_ih + b_hh is the effective bias
                    p[H:2 * H].fill_(1.0)
                elif name.startswith("bias_hh"):
                    p[H:2 * H].zero_()
    return rnn


def _final_hidden(state: State) -> torch.Tensor:
    return state[0] if isinstance(state, tuple) else state  # (L * dirs, B, H): an LSTM's h, not its cell c


def _check_idx(name: str, idx: torch.Tensor, block_size: int | None) -> None:
    if idx.dim() != 2 or idx.dtype not in _INT_DTYPES:
        got = f"{str(idx.dtype).removeprefix('torch.')} tensor of shape {tuple(idx.shape)}"
        raise InputShapeError(f"model {name} expects token ids of shape (B, T) and dtype int64, got {got}")
    if idx.shape[1] < 1:
        raise InputShapeError(f"model {name} expects at least one token per sequence, got T=0")
    if block_size is not None and idx.shape[1] > block_size:
        raise InputShapeError(f"model {name} handles at most block_size={block_size} positions, got "
                              f"T={idx.shape[1]}; crop to the last {block_size} tokens (or stream with a cache)")


def _check_lengths(name: str, lengths, B: int, T: int) -> torch.Tensor:
    lengths = torch.as_tensor(lengths)
    if lengths.shape != (B,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise InputShapeError(f"model {name} expects lengths as integers of shape ({B},), got "
                              f"{str(lengths.dtype).removeprefix('torch.')} of shape {tuple(lengths.shape)}")
    lengths = lengths.to("cpu", torch.int64)  # pack_padded_sequence wants them on the CPU
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > T:
        raise InputShapeError(f"model {name}: lengths must be in [1, T={T}], got values in [{lo}, {hi}]")
    return lengths


def run_rnn(rnn: nn.RNNBase, x: torch.Tensor, lengths: torch.Tensor | None = None,
            state: State | None = None) -> tuple[torch.Tensor, State]:
    """x (B, T, E) -> outputs (B, T, D), final state. With lengths (CPU int64), padding is packed away:
    outputs are zero past each length and the final state is each sequence's own (backward: at its step 0)."""
    if lengths is None:
        return rnn(x, state)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, state = rnn(packed, state)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])  # (B, T, D)
    return out, state


class _RNNBase(nn.Module):
    """What the three models share: config, embedding, recurrent stack, dropout; subclasses add their head."""

    default_name = "rnn"

    def __init__(self, cfg: RNNConfig, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.input_spec = (None,)  # token ids (B, T)
        self.vocab_size, self.block_size = cfg.vocab_size, cfg.block_size
        self.num_features = cfg.hidden_size * (2 if cfg.bidirectional else 1)
        self.num_classes = num_classes
        self.wte = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.drop = nn.Dropout(cfg.dropout)  # shared by the embedding output and the head input (stateless)
        self.rnn = make_rnn(cfg)

    def _new_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @property
    def _name(self) -> str:
        return getattr(self, "model_name", self.default_name)

    def forward_head(self, h: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return h if pre_logits else self.head(self.drop(h))

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh (num_features -> num_classes) head; 0 -> no head (forward returns the features)."""
        self.num_classes = num_classes
        self.head = self._new_head(num_classes)


# ----- language model -------------------------------------------------------------------------------
class RNNLanguageModel(_RNNBase):
    """Causal recurrent language model: next-token logits at every position."""

    default_name = "char_lstm"
    output_kind = "next_token"  # causal logits (B, T, V): what generate and the language-modeling task expect

    def __init__(self, cfg: RNNConfig):
        if cfg.bidirectional:
            raise ModelError("rnn language model: bidirectional=True would let each position see the tokens it "
                             "must predict; use bidirectional=False (or lstm_classifier / lstm_tagger)")
        super().__init__(cfg, cfg.vocab_size)
        self.lm_head = self._new_head(cfg.vocab_size)  # with a bias: the unigram distribution costs V params
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight  # one (V, H) tensor: embeds tokens and scores them

    def make_cache(self, batch_size: int) -> RNNCache:
        """An empty RNNCache: no state yet, so the first call starts from zeros on its input's device and dtype."""
        if not _positive_int(batch_size):
            raise ModelError(f"{self._name}: make_cache batch_size must be a positive integer, got {batch_size!r}")
        return RNNCache(batch_size)

    def forward_features(self, idx: torch.Tensor, cache: RNNCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> top-layer outputs (B, T, H). With a cache, idx holds only the new tokens."""
        _check_idx(self._name, idx, None if cache is not None else self.block_size)
        if cache is not None and cache.batch_size != idx.shape[0]:
            raise ModelError(f"{self._name}: cache was made for batch size {cache.batch_size}, got a batch of "
                             f"{idx.shape[0]}; make it with model.make_cache({idx.shape[0]})")
        x = self.drop(self.wte(idx))  # (B, T, E)
        out, state = self.rnn(x, None if cache is None else cache.state)  # (B, T, H)
        if cache is not None:
            cache.state, cache.length = state, cache.length + idx.shape[1]
        return out

    def forward(self, idx: torch.Tensor, cache: RNNCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, vocab_size); see the module docstring for `cache`."""
        return self.forward_head(self.forward_features(idx, cache))

    def forward_head(self, h: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return h if pre_logits else self.lm_head(self.drop(h))  # (B, T, num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh (hidden_size -> num_classes) head, untied from wte; 0 -> no head (forward returns h)."""
        self.num_classes = num_classes
        self.lm_head = self._new_head(num_classes)


# ----- sequence classifier and tagger -----------------------------------------------------------------
class RNNClassifier(_RNNBase):
    """One label per (padded) token sequence: pooled final states or masked mean of the outputs."""

    default_name = "lstm_classifier"
    output_kind = "sequence"  # one distribution per sequence: (B, num_classes)

    def __init__(self, cfg: RNNClassifierConfig):
        super().__init__(cfg, cfg.num_classes)
        self.head = self._new_head(cfg.num_classes)

    def forward_features(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) (+ lengths (B,) for right-padded batches) -> pooled features (B, num_features)."""
        _check_idx(self._name, idx, self.block_size)
        B, T = idx.shape
        lens = None if lengths is None else _check_lengths(self._name, lengths, B, T)
        out, state = run_rnn(self.rnn, self.drop(self.wte(idx)), lens)  # (B, T, D)
        if self.cfg.pooling == "last":
            h = _final_hidden(state)  # (L * dirs, B, H)
            return torch.cat(list(h[-2:]), dim=-1) if self.cfg.bidirectional else h[-1]  # (B, D)
        if lens is None:
            return out.mean(dim=1)  # (B, D)
        return out.sum(dim=1) / lens.to(out.device, out.dtype)[:, None]  # padded outputs are zero: (B, D)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T), optional lengths (B,) -> class logits (B, num_classes)."""
        return self.forward_head(self.forward_features(idx, lengths))


class RNNTagger(_RNNBase):
    """One label per token of a (padded) sequence."""

    default_name = "lstm_tagger"
    output_kind = "token"  # one distribution per position, not causal: (B, T, num_classes)

    def __init__(self, cfg: RNNTaggerConfig):
        super().__init__(cfg, cfg.num_classes)
        self.head = self._new_head(cfg.num_classes)

    def forward_features(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) (+ lengths (B,)) -> per-token features (B, T, num_features), zero past each length."""
        _check_idx(self._name, idx, self.block_size)
        lens = None if lengths is None else _check_lengths(self._name, lengths, *idx.shape)
        return run_rnn(self.rnn, self.drop(self.wte(idx)), lens)[0]  # (B, T, D)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T), optional lengths (B,) -> tag logits (B, T, num_classes)."""
        return self.forward_head(self.forward_features(idx, lengths))


# ----- registered models -------------------------------------------------------------------------------
RNN_SIZES: dict[str, RNNConfig] = {
    "char_rnn": RNNConfig(cell="rnn"),
    "char_lstm": RNNConfig(cell="lstm"),
    "char_gru": RNNConfig(cell="gru"),
    "lstm_classifier": RNNClassifierConfig(cell="lstm", embed_dim=128, hidden_size=128, num_layers=1),
    "lstm_tagger": RNNTaggerConfig(cell="lstm", embed_dim=128, hidden_size=128, num_layers=1),
}


@register_model("rnn", input_kind="tokens")
def char_rnn(**kwargs) -> RNNLanguageModel:
    """Elman (tanh) RNN language model: embedding 64 -> 2 x 256 RNN -> vocab logits."""
    return build_model("char_rnn", RNNLanguageModel, RNN_SIZES["char_rnn"], kwargs)


@register_model("rnn", input_kind="tokens")
def char_lstm(**kwargs) -> RNNLanguageModel:
    """LSTM language model (char-rnn): embedding 64 -> 2 x 256 LSTM -> vocab logits."""
    return build_model("char_lstm", RNNLanguageModel, RNN_SIZES["char_lstm"], kwargs)


@register_model("rnn", input_kind="tokens")
def char_gru(**kwargs) -> RNNLanguageModel:
    """GRU language model: embedding 64 -> 2 x 256 GRU -> vocab logits."""
    return build_model("char_gru", RNNLanguageModel, RNN_SIZES["char_gru"], kwargs)


@register_model("rnn", input_kind="tokens")
def lstm_classifier(**kwargs) -> RNNClassifier:
    """Bidirectional LSTM sequence classifier over padded token ids (lengths -> packed), last or mean pooling."""
    return build_model("lstm_classifier", RNNClassifier, RNN_SIZES["lstm_classifier"], kwargs)


@register_model("rnn", input_kind="tokens")
def lstm_tagger(**kwargs) -> RNNTagger:
    """Bidirectional LSTM tagger: one label per token of a padded token sequence."""
    return build_model("lstm_tagger", RNNTagger, RNN_SIZES["lstm_tagger"], kwargs)
