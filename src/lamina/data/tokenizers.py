"""Tokenizers: character-level, and byte-level BPE trained with Hugging Face's `tokenizers` library.

Every lamina tokenizer reserves the same five special ids, so models and tasks can rely on them:

    0 <pad>   1 <unk>   2 <s> (bos)   3 </s> (eos)   4 <mask>

* `CharTokenizer`: one id per character seen in training (sorted, so the vocabulary does not depend on
  the order of the text); unseen characters map to <unk>. Fits small corpora and character LMs.
* `BPETokenizer`: byte-level BPE (GPT-2's scheme: bytes -> 256 base symbols, so nothing is ever <unk>;
  a leading space marks a word start, so decoding gives back the exact text, which is what sacrebleu's
  detokenized BLEU wants). Training, encoding and decoding run in the Rust library, not Python (50k
  sentences train in about a second); re-implementing BPE here would be slower and a second source of bugs.

Both save to one JSON file (`tokenizer.json`, written beside a run) and `load_tokenizer(path)` reads either.
`tokenizers` is an optional dependency (`pip install "lamina[text]"`), imported only when BPE is used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from lamina.errors import DataError, MissingDependencyError, unknown_name
from lamina.io import atomic_write_text

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<mask>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID = range(len(SPECIALS))
TOKENIZER_KINDS = ("char", "bpe")


class _Specials:
    pad_id, unk_id, bos_id, eos_id, mask_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID
    specials = SPECIALS

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode_batch(self, rows: Iterable[Sequence[int]]) -> list[str]:
        return [self.decode(r) for r in rows]

    def pad(self, rows: Sequence[Sequence[int]], bos: bool = False, eos: bool = False,
            max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids (N, L) int64 and lengths (N,), optionally wrapped in <s> ... </s>; rows longer
        than max_len (specials included) are truncated, keeping </s> last."""
        b_id, e_id = self.bos_id, self.eos_id
        rows = [([b_id] if bos else []) + list(r) + ([e_id] if eos else []) for r in rows]
        if max_len is not None:
            rows = [r if len(r) <= max_len else r[:max_len - 1] + [e_id] if eos else r[:max_len] for r in rows]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        out = torch.full((len(rows), int(lengths.max()) if rows else 0), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return out, lengths

    def _strip(self, ids) -> list[int]:
        """Drop specials; stop at the first </s> (what decoding emits after a sequence ends is padding)."""
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i == EOS_ID:
                break
            if i >= len(SPECIALS):
                out.append(int(i))
        return out


class CharTokenizer(_Specials):
    kind = "char"

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.index = {c: i + len(SPECIALS) for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        return cls(sorted(set().union(*(set(t) for t in texts))))

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, UNK_ID) for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i - len(SPECIALS)] for i in self._strip(ids))

    def to_json(self) -> str:
        return json.dumps({"lamina_tokenizer": "char", "specials": list(SPECIALS), "chars": self.chars})

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.to_json())


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise MissingDependencyError('the tokenizers package is needed for BPE; install it with '
                                     'pip install "lamina[text]"') from None
    return tokenizers


class BPETokenizer(_Specials):
    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok  # a tokenizers.Tokenizer
        for i, s in enumerate(SPECIALS):
            if tok.token_to_id(s) != i:
                raise DataError(f"BPE tokenizer: special token {s} must have id {i}, has {tok.token_to_id(s)}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2) -> "BPETokenizer":
        tk = _tokenizers()
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = tk.Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIALS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(list(texts), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts))]  # parallel in Rust

    def decode(self, ids) -> str:
        return self.tok.decode(self._strip(ids)).strip()  # strip: the prefix space of the first word

    def decode_batch(self, rows) -> list[str]:
        return [t.strip() for t in self.tok.decode_batch([self._strip(r) for r in rows])]

    def to_json(self) -> str:
        return self.tok.to_str()

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.to_json())


class PretrainedTokenizer(_Specials):
    """A pretrained model's own tokenizer.json (e.g. BERT's WordPiece: [PAD] [UNK] [CLS] [SEP] [MASK]), so text
    is cut into the ids the pretrained weights know. Its special ids are the file's: bos = [CLS] (or <s>),
    eos = [SEP] (or </s>); samples are `[CLS] tokens [SEP]` padded with [PAD], as BERT was trained."""

    kind = "pretrained"
    _NAMES = {"pad_id": ("[PAD]", "<pad>"), "unk_id": ("[UNK]", "<unk>"), "bos_id": ("[CLS]", "<s>"),
              "eos_id": ("[SEP]", "</s>"), "mask_id": ("[MASK]", "<mask>")}

    def __init__(self, tok):
        self.tok = tok
        tok.no_padding()
        tok.no_truncation()  # lamina pads and truncates (pad / max_len)
        for attr, names in self._NAMES.items():
            ids = [tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None]
            if not ids and attr != "mask_id":
                raise DataError(f"pretrained tokenizer: no {' or '.join(names)} token in its vocabulary")
            setattr(self, attr, ids[0] if ids else self.unk_id)
        self.specials = tuple(sorted({self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.mask_id}))

    @staticmethod
    def looks_like(tok) -> bool:
        return tok.token_to_id("[CLS]") is not None or tok.token_to_id("<s>") not in (None, BOS_ID)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.tok.decode([i for i in ids if i not in self.specials])

    def to_json(self) -> str:
        return self.tok.to_str()

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.to_json())


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2):
    """Train a tokenizer of `kind` ("char" | "bpe") on texts; vocab_size applies to BPE only."""
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        if not isinstance(vocab_size, int) or vocab_size <= 256 + len(SPECIALS):
            raise DataError(f"tokenizer vocab_size must be an integer > {256 + len(SPECIALS)} (the byte alphabet "
                            f"plus specials), got {vocab_size!r}")
        return BPETokenizer.train(texts, vocab_size, min_frequency)
    raise DataError(unknown_name("tokenizer", kind, TOKENIZER_KINDS))


def tokenizer_from_json(text: str):
    data = json.loads(text)
    if data.get("lamina_tokenizer") == "char":
        return CharTokenizer(data["chars"])
    tk = _tokenizers()
    tok = tk.Tokenizer.from_str(text)
    if tok.token_to_id("<s>") != BOS_ID and PretrainedTokenizer.looks_like(tok):  # not lamina's own layout
        return PretrainedTokenizer(tok)
    return BPETokenizer(tok)


def load_tokenizer(path: str | os.PathLike):
    """Read a tokenizer.json written by `save` (char or BPE)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: tokenizer file not found")
    try:
        return tokenizer_from_json(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, Exception) as e:  # tokenizers raises its own Exception subclass
        if isinstance(e, (DataError, MissingDependencyError)):
            raise
        raise DataError(f"{p}: not a tokenizer file ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
