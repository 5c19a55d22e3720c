"""Text data sets for encoder models: labelled texts (sequence classification) and corpora for masked-LM pre-training.

Registered data sets:

* `text_classification`: your own labelled texts, a .tsv / .csv / .jsonl file (optionally .gz) with a text
  column and a label column; one file split by `val_fraction` / `test_fraction` (stratified, seeded), or
  separate `train=`, `val=`, `test=` files.
* `shakespeare_speakers`: who speaks this speech? The speeches of the `top_k` (default 8) most frequent
  speakers of Tiny Shakespeare (1,288 speeches for k = 8). Why this one: it ships offline with the project
  (../shared/data), the labels are real (the play's own speaker headings), and it is non-trivial: majority
  class 16% of the test split, TF-IDF (char 2-4-grams or words) + logistic regression 45% (k = 8, seed 0); a
  model has to pick up vocabulary, style and whom a character addresses, and GLOUCESTER / KING RICHARD III are
  the same man in different plays. (Multi30k language identification is solved by any character n-gram, so it
  was not used.)
* `text_mlm`: a text corpus for masked-LM pre-training (default Tiny Shakespeare), cut into chunks of
  `max_len` tokens (RoBERTa's full-sentence packing: contiguous text, no padding) or one sample per line.

Every sample is `<s> tokens </s>` right-padded with <pad> (id 0), truncated to `max_len` tokens (specials
included; the data set's `block_size`). Splits hold `ids` (N, L) int64 and `lengths` (N,), plus `y` (N,) for
classification; `meta["pad_trim"]` lets the loader cut each batch to its longest row, and `meta["bucket"]`
batches similar lengths together. The tokenizer (lamina.data.tokenizers: char or byte-level BPE) is trained on
the *training* texts only; pass `tokenizer=` a saved tokenizer.json to reuse one (evaluating a run, or
fine-tuning on the vocabulary an MLM was pre-trained with). It is in `bundle.extras["tokenizer"]`.
"""

from __future__ import annotations

import collections
import csv
import gzip
import io
import json
from pathlib import Path

import torch

from lamina.data.base import DataBundle, TensorData
from lamina.data.builtin import shared_data_dir
from lamina.data.files import PathLike, registered
from lamina.data.splits import check_fraction, split_indices
from lamina.data.tokenizers import SPECIALS, load_tokenizer, train_tokenizer
from lamina.errors import DataError, did_you_mean

TEXT_FORMATS = (".tsv", ".csv", ".jsonl", ".json")


# ----- reading ---------------------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return raw.decode("utf-8")
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a UTF-8 text file ({type(e).__name__})") from None


def read_labelled_texts(path: PathLike, text_column: str = "text",
                        label_column: str = "label") -> tuple[list[str], list[str]]:
    """(texts, labels as strings) from a .tsv / .csv (header row naming the columns) or .jsonl file (one JSON
    object per line); .gz is read transparently. Rows with an empty text or label are a DataError."""
    p = Path(path).expanduser()
    name = p.name.removesuffix(".gz").lower()
    fmt = next((f for f in TEXT_FORMATS if name.endswith(f)), None)
    if fmt is None:
        raise DataError(f"{p}: unsupported text file format; use one of {', '.join(TEXT_FORMATS)} (optionally .gz)")
    text = _read_text(p)
    texts, labels = [], []
    if fmt in (".jsonl", ".json"):
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                t, y = obj[text_column], obj[label_column]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{p}:{i}: expected a JSON object with keys '{text_column}' and '{label_column}'"
                                ) from None
            texts.append(str(t))
            labels.append(str(y))
    else:
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if fmt == ".tsv" else ",")
        cols = reader.fieldnames or []
        for c in (text_column, label_column):
            if c not in cols:
                raise DataError(f"{p}: column '{c}' not found{did_you_mean(c, cols)}; columns: {', '.join(cols)}")
        for i, row in enumerate(reader, 2):
            t, y = row.get(text_column), row.get(label_column)
            if t is None or y is None:
                raise DataError(f"{p}:{i}: row has fewer columns than the header")
            texts.append(t)
            labels.append(y.strip())
    if not texts:
        raise DataError(f"{p}: no rows")
    for i, (t, y) in enumerate(zip(texts, labels)):
        if not t.strip() or not y:
            raise DataError(f"{p}: row {i + 1} has an empty {'text' if not t.strip() else 'label'}")
    return texts, labels


def shakespeare_speeches(path: PathLike) -> tuple[list[str], list[str]]:
    """(speeches, speakers) of Tiny Shakespeare: blocks separated by a blank line whose first line is 'NAME:'."""
    texts, speakers = [], []
    for block in _read_text(Path(path)).split("\n\n"):
        lines = block.strip("\n").split("\n")
        if len(lines) >= 2 and lines[0].endswith(":") and lines[0][:-1].strip():
            speakers.append(lines[0][:-1].strip())
            texts.append("\n".join(lines[1:]))
    if not texts:
        raise DataError(f"{path}: no speeches found (blocks of 'NAME:' followed by lines, separated by blank lines)")
    return texts, speakers


# ----- encoding --------------------------------------------------------------------------------------------
def _check_max_len(name: str, max_len) -> int:
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 3:
        raise DataError(f"data set '{name}': max_len must be an integer >= 3 (<s>, a token, </s>), got {max_len!r}")
    return max_len


def make_tokenizer(name: str, train_texts: list[str], tokenizer_kind: str, vocab_size: int,
                   tokenizer: PathLike | None):
    """A saved tokenizer (`tokenizer=` path) or a new one trained on the training texts."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if not train_texts:
        raise DataError(f"data set '{name}': the training split is empty")
    return train_tokenizer(tokenizer_kind, train_texts, vocab_size)


def encode_texts(tok, texts: list[str], max_len: int) -> tuple[TensorData, int]:
    """`<s> text </s>` per text, truncated to max_len (keeping </s>), right-padded -> (TensorData(ids, lengths),
    number of truncated texts)."""
    rows = tok.encode_batch(texts)
    truncated = sum(len(r) + 2 > max_len for r in rows)
    ids, lengths = tok.pad(rows, bos=True, eos=True, max_len=max_len)
    return TensorData(ids=ids, lengths=lengths), truncated


def token_meta(name: str, tok, max_len: int) -> dict:
    """What the model, the tasks and `predict` need: vocabulary size, special ids, block size, padding."""
    return {"loader": name, "tokenizer": tok.kind, "vocab_size": tok.vocab_size, "num_outputs": tok.vocab_size,
            "block_size": max_len, "pad_id": tok.pad_id, "unk_id": tok.unk_id, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "mask_id": tok.mask_id,
            "special_ids": list(tok.specials) if tok.kind == "pretrained" else list(range(len(SPECIALS))),
            "pad_trim": {"ids": "lengths"}, "bucket": "lengths"}


def classification_bundle(name: str, splits: dict[str, tuple[list[str], list[str]]], *, max_len: int,
                          tokenizer_kind: str, vocab_size: int, tokenizer: PathLike | None = None,
                          class_names: list[str] | None = None, meta_extra: dict | None = None) -> DataBundle:
    """splits {"train": (texts, labels), "val": ..., "test": ...} -> a sequence_classification DataBundle.
    Classes are the sorted training labels (or `class_names`, in that order); a val/test label not among them
    is a DataError."""
    max_len = _check_max_len(name, max_len)
    train_texts, train_labels = splits["train"]
    classes = list(class_names) if class_names is not None else sorted(set(train_labels))
    if len(classes) < 2:
        raise DataError(f"data set '{name}': labels have a single class ({classes[0] if classes else 'none'}); "
                        "classification needs at least 2")
    index = {c: i for i, c in enumerate(classes)}
    tok = make_tokenizer(name, train_texts, tokenizer_kind, vocab_size, tokenizer)
    data, truncated = {}, {}
    for split, (texts, labels) in splits.items():
        unknown = next((y for y in labels if y not in index), None)
        if unknown is not None:
            raise DataError(f"data set '{name}': {split} label '{unknown}' does not occur in the training split "
                            f"(classes: {', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''})")
        enc, truncated[split] = encode_texts(tok, texts, max_len)
        y = torch.tensor([index[v] for v in labels], dtype=torch.long)
        data[split] = TensorData(**enc.tensors, y=y)
    meta = {**token_meta(name, tok, max_len), "classes": classes, "truncated": truncated, **(meta_extra or {})}
    bundle = DataBundle(name, data["train"], data.get("val"), data.get("test"), "sequence_classification",
                        (None,), len(classes), classes, meta)
    bundle.extras = {"tokenizer": tok, "text": {k: v[0] for k, v in splits.items()}}
    return bundle


def _split_one(texts: list[str], labels: list[str], val_fraction: float, test_fraction: float,
               seed: int) -> dict[str, tuple[list[str], list[str]]]:
    """Stratified, seeded train/val/test split of one labelled list (empty val/test splits are left out)."""
    codes = {c: i for i, c in enumerate(sorted(set(labels)))}
    y = torch.tensor([codes[v] for v in labels])
    parts = split_indices(len(texts), val_fraction, test_fraction, seed, stratify=y)
    out = {}
    for split, idx in zip(("train", "val", "test"), parts):
        if len(idx):
            out[split] = ([texts[i] for i in idx.tolist()], [labels[i] for i in idx.tolist()])
    return out


# ----- registered data sets --------------------------------------------------------------------------------
@registered("text_classification", "your own labelled texts: a .tsv/.csv/.jsonl file (text + label columns)",
            "sequence_classification", "path: path= (split by fractions) | train= val= test=")
def text_classification(*, path: PathLike | None = None, train: PathLike | None = None,
                        val: PathLike | None = None, test: PathLike | None = None, text_column: str = "text",
                        label_column: str = "label", val_fraction: float = 0.1, test_fraction: float = 0.2,
                        tokenizer_kind: str = "bpe", vocab_size: int = 4000, max_len: int = 128,
                        tokenizer: PathLike | None = None, seed: int = 0) -> DataBundle:
    """`path=` one file, split by val_fraction / test_fraction (stratified by label, seeded); or `train=` (and
    optionally `val=`, `test=`) files, used as given. Texts become `<s> ... </s>` ids of at most max_len tokens."""
    if (path is None) == (train is None):
        raise DataError("data set 'text_classification': give path= (one file, split by fractions) or train= "
                        "(with optional val= and test=), not both")
    if path is not None:
        if val is not None or test is not None:
            raise DataError("data set 'text_classification': val= and test= go with train=, not with path=")
        texts, labels = read_labelled_texts(path, text_column, label_column)
        splits = _split_one(texts, labels, val_fraction, test_fraction, seed)
    else:
        splits = {"train": read_labelled_texts(train, text_column, label_column)}
        for split, p in (("val", val), ("test", test)):
            if p is not None:
                splits[split] = read_labelled_texts(p, text_column, label_column)
    return classification_bundle("text_classification", splits, max_len=max_len, tokenizer_kind=tokenizer_kind,
                                 vocab_size=vocab_size, tokenizer=tokenizer)


def _shakespeare_path(path: PathLike | None) -> Path:
    p = Path(path).expanduser() if path is not None else shared_data_dir() / "tinyshakespeare" / "input.txt"
    if not p.is_file():
        raise DataError(f"{p}: Tiny Shakespeare text not found; pass path= or set LAMINA_SHARED_DATA to the shared "
                        "data folder")
    return p


@registered("shakespeare_speakers", "Tiny Shakespeare speaker identification: who speaks this speech (top 8 speakers)",
            "sequence_classification", "../shared/data/tinyshakespeare/input.txt (or $LAMINA_SHARED_DATA)")
def shakespeare_speakers(*, path: PathLike | None = None, top_k: int = 8, speakers: list[str] | None = None,
                         val_fraction: float = 0.1, test_fraction: float = 0.2, tokenizer_kind: str = "bpe",
                         vocab_size: int = 2000, max_len: int = 128, tokenizer: PathLike | None = None,
                         seed: int = 0) -> DataBundle:
    """Speeches of the `top_k` most frequent speakers (ties by name), or of the listed `speakers`; stratified,
    seeded split (test 20%, val 10%). Class names are the speakers, most frequent first."""
    texts, who = shakespeare_speeches(_shakespeare_path(path))
    counts = collections.Counter(who)
    if speakers is not None:
        speakers = [str(s) for s in speakers]
        missing = next((s for s in speakers if s not in counts), None)
        if missing is not None:
            raise DataError(f"shakespeare_speakers: speaker '{missing}' not found{did_you_mean(missing, counts)}")
        if len(set(speakers)) < 2:
            raise DataError("shakespeare_speakers: speakers must name at least 2 different speakers")
        chosen = list(dict.fromkeys(speakers))
    else:
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 2 <= top_k <= len(counts):
            raise DataError(f"shakespeare_speakers: top_k must be an integer in [2, {len(counts)}], got {top_k!r}")
        chosen = [s for s, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]]
    keep = set(chosen)
    pairs = [(t, s) for t, s in zip(texts, who) if s in keep]
    splits = _split_one([t for t, _ in pairs], [s for _, s in pairs], val_fraction, test_fraction, seed)
    return classification_bundle("shakespeare_speakers", splits, max_len=max_len, tokenizer_kind=tokenizer_kind,
                                 vocab_size=vocab_size, tokenizer=tokenizer, class_names=chosen)


def _chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


@registered("text_mlm", "a text corpus for masked-LM pre-training, cut into chunks or lines (default Tiny Shakespeare)",
            "masked_lm", "path: path= (default ../shared/data/tinyshakespeare/input.txt)")
def text_mlm(*, path: PathLike | None = None, unit: str = "chunk", max_len: int = 128, val_fraction: float = 0.1,
             test_fraction: float = 0.0, tokenizer_kind: str = "bpe", vocab_size: int = 2000,
             tokenizer: PathLike | None = None, seed: int = 0) -> DataBundle:
    """unit "chunk": the text split contiguously (train = first 1 - val - test of the lines, then val, then
    test, as tiny_shakespeare; no shuffling, so no chunk straddles two splits), each split's token stream cut
    into pieces of max_len - 2 tokens; unit "line": one sample per non-empty line, truncated. `seed` is
    accepted for a uniform interface; nothing is drawn at random."""
    if unit not in ("chunk", "line"):
        raise DataError(f"data set 'text_mlm': unit must be 'chunk' or 'line', got {unit!r}")
    max_len = _check_max_len("text_mlm", max_len)
    p = _shakespeare_path(None) if path is None else Path(path).expanduser()
    lines = _read_text(p).splitlines()
    if unit == "line":
        lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise DataError(f"{p}: empty text file")
    vf, tf = check_fraction("val_fraction", val_fraction), check_fraction("test_fraction", test_fraction)
    if vf + tf >= 1.0:
        raise DataError(f"val_fraction + test_fraction must be < 1, got {vf} + {tf}")
    n = len(lines)
    n_val, n_test = round(n * vf), round(n * tf)
    bounds = {"train": (0, n - n_val - n_test), "val": (n - n_val - n_test, n - n_test), "test": (n - n_test, n)}
    parts = {k: lines[a:b] for k, (a, b) in bounds.items() if b > a}
    if "train" not in parts:
        raise DataError(f"{p}: no training text left with val_fraction={vf}, test_fraction={tf}")
    joined = {k: "\n".join(v) + "\n" for k, v in parts.items()}
    tok = make_tokenizer("text_mlm", [joined["train"]] if unit == "chunk" else parts["train"], tokenizer_kind,
                         vocab_size, tokenizer)
    data = {}
    for split, part in parts.items():
        rows = _chunks(tok.encode(joined[split]), max_len - 2) if unit == "chunk" else tok.encode_batch(part)
        rows = [r for r in rows if r]
        ids, lengths = tok.pad(rows, bos=True, eos=True, max_len=max_len)
        data[split] = TensorData(ids=ids, lengths=lengths)
    meta = {**token_meta("text_mlm", tok, max_len), "unit": unit, "path": str(p),
            "tokens": {k: int(v.tensors["lengths"].sum()) for k, v in data.items()}}
    bundle = DataBundle("text_mlm", data["train"], data.get("val"), data.get("test"), "masked_lm", (None,),
                        None, None, meta)
    bundle.extras = {"tokenizer": tok}
    return bundle


__all__ = ["read_labelled_texts", "shakespeare_speeches", "encode_texts", "classification_bundle",
           "text_classification", "shakespeare_speakers", "text_mlm"]
