"""Summarization data: SciTLDR (abstract -> one-sentence TLDR), read into the parallel corpus bundle.

SciTLDR-A (Cachola et al., Findings of EMNLP 2020) ships with the repository (datasets/scitldr_a, Apache-2.0):
one JSON object per line with `source` (the abstract as a list of sentences) and `target` (a list of TLDRs:
one per training paper, several per dev / test paper). The bundle is the seq2seq one of lamina.data.parallel
(src / tgt token tensors, a BPE tokenizer trained on the training split): source = the sentences joined by
spaces; tgt = the first TLDR (what is trained on, and the val loss); `extras["text"][split]` keeps, for val
and test, every TLDR of a paper as its references, so ROUGE takes the best one as SciTLDR's evaluation does.
Long abstracts are truncated to `max_len` tokens, never dropped (their first sentences carry most of the
content), and targets to `tgt_max_len`.
"""

from __future__ import annotations

import json
from pathlib import Path

from lamina.data.base import DataBundle
from lamina.data.builtin import datasets_root
from lamina.data.files import PathLike, registered
from lamina.data.parallel import parallel_bundle, read_lines
from lamina.errors import DataError


def read_scitldr(path: PathLike) -> tuple[list[str], list[list[str]]]:
    """(abstracts, references) from a SciTLDR jsonl file (.gz read transparently): each abstract is its
    sentences joined by spaces, each reference list holds that paper's TLDRs (at least one)."""
    p = Path(path).expanduser()
    sources, refs = [], []
    for i, line in enumerate(read_lines(p), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{p}:{i}: not a JSON object (SciTLDR jsonl: one object per line)") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}:{i}: expected a JSON object with 'source' and 'target', got {type(obj).__name__}")
        src, tgt = obj.get("source"), obj.get("target")
        src = [src] if isinstance(src, str) else src
        tgt = [tgt] if isinstance(tgt, str) else tgt
        if not isinstance(src, list) or not isinstance(tgt, list):
            raise DataError(f"{p}:{i}: 'source' and 'target' must be lists of strings (or strings)")
        text = " ".join(str(s).strip() for s in src if str(s).strip())
        tldrs = [str(t).strip() for t in tgt if str(t).strip()]
        if not text:
            raise DataError(f"{p}:{i}: empty source (no abstract sentence)")
        if not tldrs:
            raise DataError(f"{p}:{i}: empty target (no TLDR)")
        sources.append(text)
        refs.append(tldrs)
    if not sources:
        raise DataError(f"{p}: no examples")
    return sources, refs


def lead(sources_sentences: list[list[str]], k: int) -> list[str]:
    """Lead-k baseline: the first k sentences of each source."""
    return [" ".join(s.strip() for s in sents[:k]) for sents in sources_sentences]


@registered("scitldr", "SciTLDR-A: CS paper abstracts -> one-sentence TLDRs, 1992/619/618 papers", "seq2seq",
            "datasets/scitldr_a (shipped), or path= a folder with train/dev/test.jsonl[.gz]")
def scitldr(*, path: PathLike | None = None, vocab_size: int = 8000, tokenizer_kind: str = "bpe",
            max_len: int = 256, tgt_max_len: int = 48, limit: int | None = None, eval_limit: int | None = None,
            tokenizer: PathLike | None = None, seed: int = 0) -> DataBundle:
    """SciTLDR's train / dev (val) / test splits. `limit` keeps the first N training papers, `eval_limit`
    the first N val and test papers (quick runs, CI)."""
    root = Path(path).expanduser() if path is not None else datasets_root() / "scitldr_a"
    for n in ("limit", "eval_limit"):
        v = locals()[n]
        if v is not None and (not isinstance(v, int) or v < 1):
            raise DataError(f"data set 'scitldr': {n} must be a positive integer, got {v!r}")
    splits, refs = {}, {}
    for split, fname in (("train", "train"), ("val", "dev"), ("test", "test")):
        f = next((root / f"{fname}{ext}" for ext in (".jsonl.gz", ".jsonl") if (root / f"{fname}{ext}").is_file()),
                 None)
        if f is None:
            raise DataError(f"{root}: {fname}.jsonl(.gz) not found; pass path= a folder with SciTLDR's "
                            "train/dev/test.jsonl")
        srcs, tldrs = read_scitldr(f)
        cap = limit if split == "train" else eval_limit
        if cap is not None:
            srcs, tldrs = srcs[:cap], tldrs[:cap]
        splits[split] = (srcs, [t[0] for t in tldrs])
        refs[split] = tldrs
    bundle = parallel_bundle("scitldr", splits, vocab_size=vocab_size, tokenizer_kind=tokenizer_kind,
                             max_len=max_len, tokenizer=tokenizer, src_lang="abstract", tgt_lang="tldr",
                             tgt_max_len=tgt_max_len, drop_long=False)
    for split in ("val", "test"):  # every TLDR is a reference
        bundle.extras["text"][split] = (splits[split][0], refs[split])
    return bundle
