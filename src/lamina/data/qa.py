"""Extractive question answering data: SQuAD v1.1-format JSON -> sliding windows of token ids with answer spans.

A file is `{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers": [{"text",
"answer_start"}]}]}]}]}` (SQuAD v1.1, XQuAD, MLQA, most in-house QA sets). Every answer is checked against its
context before anything is tokenized: `context[answer_start : answer_start + len(text)] == text`, else one
DataError naming the question id ("answer span outside its context").

Each question becomes one or more windows, as BERT did on SQuAD (Devlin et al. 2019, sec. 4.2):

    [CLS] question (<= max_query_len tokens) [SEP] context tokens [s, s + room) [SEP]   (<= max_len tokens)

with window starts s = 0, doc_stride, 2 doc_stride, ... (doc_stride is BERT's: the step between window starts,
so consecutive windows overlap by room - doc_stride tokens) until the context's last token is inside one.
token_type_ids are 0 up to the first [SEP] and 1 after it. A window that holds the whole first answer is labelled
with its start / end token positions; one that does not points both at [CLS] (position 0), BERT's label for
"not in this window". Evaluation decodes every window of a question and keeps the best-scoring span
(lamina.tasks.qa), so answers near a window edge are found in the window that has them whole.

Character offsets come from the tokenizer (Hugging Face `tokenizers`: a pretrained tokenizer.json, or a BPE one
trained on the training contexts and questions), so the answer is cut from the original context text, never
re-assembled from tokens.

Splits: `path=` one file split by article (so no paragraph is seen in training and asked about in testing), seeded;
or `train=` / `val=` / `test=` files as given. The default file is XQuAD's English set (datasets/xquad_en:
1,190 questions on 240 paragraphs of 48 Wikipedia articles, from the SQuAD v1.1 dev set; CC BY-SA 4.0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lamina.data.base import DataBundle, TensorData
from lamina.data.builtin import datasets_root
from lamina.data.files import PathLike, registered
from lamina.data.splits import split_indices
from lamina.data.text_classification import make_tokenizer, token_meta
from lamina.errors import DataError

MAX_FILE_BYTES = 512 << 20  # SQuAD v1.1 train is 30 MB; a bigger "QA file" is a mistake, not data to json.load


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]  # (text, answer_start) pairs; SQuAD dev has up to 3 (and 6) per question
    article: int = 0


@dataclass
class QAWindows:
    """The windows of a list of examples: model inputs + what decoding needs to map tokens back to text."""

    tensors: dict[str, torch.Tensor]
    offsets: list[list[tuple[int, int]]] = field(default_factory=list)  # per example: char span of each ctx token


# ----- reading ---------------------------------------------------------------------------------------------
def _fail(path, where: str, what: str) -> DataError:
    return DataError(f"{path}: {where}: {what}")


def read_squad(path: PathLike) -> list[QAExample]:
    """Every question of a SQuAD v1.1-format file, checked (see the module docstring)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: QA file not found (a SQuAD v1.1-format .json)")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataError(f"{p}: {size / 2**20:.0f} MB; QA files are read whole, at most {MAX_FILE_BYTES >> 20} MB")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: not a JSON file ({type(e).__name__}: {str(e)[:100]})") from None
    articles = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(articles, list) or not articles:
        raise DataError(f"{p}: expected SQuAD format, an object with a non-empty 'data' list of articles")
    examples: list[QAExample] = []
    seen: set[str] = set()
    for a, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise _fail(p, f"data[{a}]", "an article needs a 'paragraphs' list")
        for g, para in enumerate(paragraphs):
            where = f"data[{a}].paragraphs[{g}]"
            context = para.get("context") if isinstance(para, dict) else None
            if not isinstance(context, str) or not context.strip():
                raise _fail(p, where, "a paragraph needs a non-empty 'context' string")
            if not isinstance(para.get("qas"), list):
                raise _fail(p, where, "a paragraph needs a 'qas' list")
            for qa in para["qas"]:
                qid = str(qa.get("id", "")) if isinstance(qa, dict) else ""
                if not qid or not isinstance(qa.get("question"), str) or not qa["question"].strip():
                    raise _fail(p, where, "each entry of 'qas' needs an 'id' and a non-empty 'question'")
                if qid in seen:
                    raise _fail(p, f"question {qid}", "duplicate id; ids must be unique")
                seen.add(qid)
                answers = qa.get("answers")
                if not isinstance(answers, list) or not answers:
                    raise _fail(p, f"question {qid}", "needs a non-empty 'answers' list (SQuAD v1.1 has no "
                                "unanswerable questions)")
                pairs = []
                for ans in answers:
                    text, start = (ans.get("text"), ans.get("answer_start")) if isinstance(ans, dict) else (None, None)
                    if not isinstance(text, str) or not text or not isinstance(start, int) or isinstance(start, bool):
                        raise _fail(p, f"question {qid}", "each answer needs a non-empty 'text' and an integer "
                                    "'answer_start'")
                    if start < 0 or start + len(text) > len(context) or context[start:start + len(text)] != text:
                        raise _fail(p, f"question {qid}", f"answer span outside its context: answer_start {start} "
                                    f"+ {len(text)} characters does not give {text[:40]!r} in a context of "
                                    f"{len(context)} characters")
                    pairs.append((text, start))
                examples.append(QAExample(qid, qa["question"], context, pairs, a))
    if not examples:
        raise DataError(f"{p}: no questions found")
    return examples


# ----- windows ---------------------------------------------------------------------------------------------
def _hf_tokenizer(tok):
    """The `tokenizers.Tokenizer` behind a lamina tokenizer: QA needs character offsets, which it gives."""
    inner = getattr(tok, "tok", None)
    if inner is None:
        raise DataError("question answering needs a subword tokenizer with character offsets: a pretrained "
                        "tokenizer.json or tokenizer_kind=bpe, not a character tokenizer")
    return inner


def answer_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """First and last context token overlapping the characters [start, end); None if no token does."""
    hit = [i for i, (s, e) in enumerate(offsets) if e > start and s < end and e > s]
    return (hit[0], hit[-1]) if hit else None


def window_starts(n_tokens: int, room: int, doc_stride: int) -> list[int]:
    """Starts of the windows of `room` context tokens that cover n_tokens, one doc_stride apart."""
    starts = [0]
    while starts[-1] + room < n_tokens:
        starts.append(starts[-1] + doc_stride)
    return starts


def encode_windows(tok, examples: list[QAExample], max_len: int, doc_stride: int,
                   max_query_len: int) -> QAWindows:
    """Every example's windows (module docstring), right-padded to max_len. Tensors: ids, token_type_ids,
    lengths, start, end (labels; [CLS] = 0 when the first answer is not whole in the window), example (its index),
    ctx_offset (where the context starts in the window), window_start (its first context token)."""
    inner = _hf_tokenizer(tok)
    cls_id, sep_id, pad_id = tok.bos_id, tok.eos_id, tok.pad_id
    questions = inner.encode_batch([e.question for e in examples], add_special_tokens=False)
    contexts: dict[str, object] = {}
    for e in examples:  # paragraphs repeat for every question asked about them: tokenize each once
        contexts.setdefault(e.context, None)
    ctx_list = list(contexts)
    for text, enc in zip(ctx_list, inner.encode_batch(ctx_list, add_special_tokens=False)):
        contexts[text] = enc
    rows, types, labels, meta, offsets = [], [], [], [], []
    for k, (ex, q) in enumerate(zip(examples, questions)):
        q_ids = q.ids[:max_query_len]
        enc = contexts[ex.context]
        c_ids, c_off = enc.ids, [tuple(o) for o in enc.offsets]
        offsets.append(c_off)
        room = max_len - len(q_ids) - 3
        span = None  # a question to answer (no gold answer) gets [CLS] labels, unused
        if ex.answers:
            text, char_start = ex.answers[0]
            span = answer_tokens(c_off, char_start, char_start + len(text))
        for ws in window_starts(len(c_ids), room, min(doc_stride, room)):
            window = c_ids[ws:ws + room]
            row = [cls_id, *q_ids, sep_id, *window, sep_id]
            base = len(q_ids) + 2  # position of the window's first context token
            inside = span is not None and span[0] >= ws and span[1] < ws + len(window)
            labels.append((span[0] - ws + base, span[1] - ws + base) if inside else (0, 0))
            rows.append(row)
            types.append([0] * base + [1] * (len(window) + 1))
            meta.append((k, base, ws))
    n = len(rows)
    ids = torch.full((n, max_len), pad_id, dtype=torch.long)
    tt = torch.zeros((n, max_len), dtype=torch.long)
    for i, (row, ty) in enumerate(zip(rows, types)):
        ids[i, :len(row)] = torch.tensor(row)
        tt[i, :len(ty)] = torch.tensor(ty)
    lab = torch.tensor(labels, dtype=torch.long).reshape(n, 2)
    m = torch.tensor(meta, dtype=torch.long).reshape(n, 3)
    tensors = {"ids": ids, "token_type_ids": tt, "lengths": torch.tensor([len(r) for r in rows]),
               "start": lab[:, 0], "end": lab[:, 1], "example": m[:, 0], "ctx_offset": m[:, 1],
               "window_start": m[:, 2]}
    return QAWindows(tensors, offsets)


def _check_sizes(max_len, doc_stride, max_query_len) -> None:
    for name, v, lo in (("max_len", max_len, 16), ("doc_stride", doc_stride, 1), ("max_query_len", max_query_len, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise DataError(f"data set 'squad': {name} must be an integer >= {lo}, got {v!r}")
    if max_query_len + 3 + 8 > max_len:
        raise DataError(f"data set 'squad': max_query_len ({max_query_len}) + 3 special tokens leaves fewer than 8 "
                        f"context tokens in max_len ({max_len}); raise max_len or lower max_query_len")


def split_by_article(examples: list[QAExample], val_fraction: float, test_fraction: float,
                     seed: int) -> dict[str, list[QAExample]]:
    """Seeded train/val/test split of whole articles (an empty val/test split is left out)."""
    n_articles = max(e.article for e in examples) + 1
    if n_articles < 3 and (val_fraction or test_fraction):
        raise DataError(f"data set 'squad': {n_articles} article(s); splitting by article needs at least 3, or "
                        "give train= and test= files")
    parts = split_indices(n_articles, val_fraction, test_fraction, seed)
    out = {}
    for split, idx in zip(("train", "val", "test"), parts):
        keep = set(idx.tolist())
        chosen = [e for e in examples if e.article in keep]
        if chosen:
            out[split] = chosen
    return out


# ----- the registered data set ------------------------------------------------------------------------------
@registered("squad", "extractive QA from SQuAD v1.1-format JSON (default: XQuAD English, 1,190 questions)",
            "question_answering", "datasets/xquad_en/xquad.en.json, or path= | train= val= test=")
def squad(*, path: PathLike | None = None, train: PathLike | None = None, val: PathLike | None = None,
          test: PathLike | None = None, val_fraction: float = 0.1, test_fraction: float = 0.25,
          max_len: int = 256, doc_stride: int = 128, max_query_len: int = 64, tokenizer: PathLike | None = None,
          tokenizer_kind: str = "bpe", vocab_size: int = 8000, limit: int | None = None,
          seed: int = 0) -> DataBundle:
    """Questions of one file split by article (`path=`, default XQuAD English), or of train= / val= / test=
    files; windows as in the module docstring. `limit`: keep the first N training questions (learning curves)."""
    _check_sizes(max_len, doc_stride, max_query_len)
    if path is not None and train is not None:
        raise DataError("data set 'squad': give path= (one file, split by article) or train= (with optional val= "
                        "and test=), not both")
    if train is not None:
        splits = {"train": read_squad(train)}
        for split, p in (("val", val), ("test", test)):
            if p is not None:
                splits[split] = read_squad(p)
    else:
        if val is not None or test is not None:
            raise DataError("data set 'squad': val= and test= go with train=, not with path=")
        source = Path(path).expanduser() if path is not None else datasets_root() / "xquad_en" / "xquad.en.json"
        splits = split_by_article(read_squad(source), val_fraction, test_fraction, seed)
    if "train" not in splits:
        raise DataError("data set 'squad': the training split is empty; lower val_fraction / test_fraction")
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise DataError(f"data set 'squad': limit must be a positive integer, got {limit!r}")
        splits["train"] = splits["train"][:limit]
    train_texts = [t for e in splits["train"] for t in (e.question, e.context)]
    tok = make_tokenizer("squad", list(dict.fromkeys(train_texts)), tokenizer_kind, vocab_size, tokenizer)
    _hf_tokenizer(tok)
    data, windows = {}, {}
    for split, examples in splits.items():
        w = encode_windows(tok, examples, max_len, doc_stride, max_query_len)
        data[split], windows[split] = TensorData(**w.tensors), w
    meta = {**token_meta("squad", tok, max_len), "num_outputs": 2, "doc_stride": doc_stride,
            "max_query_len": max_query_len, "questions": {k: len(v) for k, v in splits.items()},
            "windows": {k: len(v) for k, v in data.items()},
            "pad_trim": {"ids": "lengths", "token_type_ids": "lengths"}}
    bundle = DataBundle("squad", data["train"], data.get("val"), data.get("test"), "question_answering", (None,),
                        None, None, meta)
    bundle.extras = {"tokenizer": tok, "qa": {k: (splits[k], windows[k]) for k in splits}}
    return bundle
