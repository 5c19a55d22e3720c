"""Parallel corpora for sequence-to-sequence tasks (translation): two aligned files, or one TSV / JSONL file.

A bundle holds, per split, padded token tensors and their lengths:

    src (N, Ls) int64   source ids, right-padded with <pad>=0, ending in </s>
    src_len (N,)
    tgt (N, Lt) int64   <s> target ids </s>, right-padded; the task shifts it for teacher forcing
    tgt_len (N,)

and `bundle.extras["text"][split] = (sources, references)`: the raw strings, so BLEU is computed on
detokenized text against the untouched references (sacrebleu's recommendation), not on token ids.

One tokenizer is trained on the *training* sources and targets together (a joint vocabulary, as T5 and most
translation setups use: shared embeddings, and names/numbers copy across languages). Passing `tokenizer=` a
saved tokenizer.json reuses it instead (evaluating a trained run must not retrain it). Training pairs longer
than `max_len` tokens are dropped (they are rare and would dominate padding); evaluation pairs are truncated,
never dropped, so test scores always cover the whole test set.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

from lamina.data.base import DataBundle, TensorData
from lamina.data.builtin import shared_data_dir
from lamina.data.files import PathLike, registered
from lamina.data.tokenizers import load_tokenizer, train_tokenizer
from lamina.errors import DataError


def read_lines(path: PathLike) -> list[str]:
    """UTF-8 lines (.gz read transparently), without line endings."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f]
    except (UnicodeDecodeError, OSError) as e:
        raise DataError(f"{p}: not a UTF-8 text file ({type(e).__name__})") from None


def read_parallel(src: PathLike | None = None, tgt: PathLike | None = None, pairs: PathLike | None = None,
                  src_field: str = "src", tgt_field: str = "tgt") -> tuple[list[str], list[str]]:
    """(sources, targets) from two aligned files (`src`, `tgt`), or from `pairs`: a .tsv (two columns) or a
    .jsonl file (one object per line with `src_field` and `tgt_field`)."""
    if pairs is not None:
        p = Path(pairs).expanduser()
        lines = read_lines(p)
        name = p.name.removesuffix(".gz")
        if name.endswith((".jsonl", ".json")):
            srcs, tgts = [], []
            for i, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    srcs.append(str(obj[src_field]))
                    tgts.append(str(obj[tgt_field]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{p}:{i}: expected a JSON object with keys '{src_field}' and '{tgt_field}'"
                                    ) from None
            return srcs, tgts
        if name.endswith((".tsv", ".txt")):
            rows = list(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))
            bad = next((i for i, r in enumerate(rows, 1) if len(r) != 2), None)
            if bad is not None:
                raise DataError(f"{p}:{bad}: expected 2 tab-separated columns (source, target), got {len(rows[bad - 1])}")
            return [r[0] for r in rows], [r[1] for r in rows]
        raise DataError(f"{p}: unsupported parallel-corpus format; use .tsv, .jsonl, or two files src= and tgt=")
    if src is None or tgt is None:
        raise DataError("a parallel corpus needs src= and tgt= (two aligned files) or pairs= (a .tsv/.jsonl file)")
    s, t = read_lines(src), read_lines(tgt)
    if len(s) != len(t):
        raise DataError(f"{src} has {len(s)} lines but {tgt} has {len(t)}; parallel files must align line by line")
    return s, t


def _encode_split(tok, srcs: list[str], tgts: list[str], max_len: int, drop_long: bool,
                  tgt_max_len: int | None = None) -> TensorData:
    tgt_max = tgt_max_len or max_len
    s_ids, t_ids = tok.encode_batch(srcs), tok.encode_batch(tgts)
    if drop_long:
        keep = [i for i in range(len(s_ids)) if len(s_ids[i]) + 1 <= max_len and len(t_ids[i]) + 2 <= tgt_max]
        s_ids, t_ids = [s_ids[i] for i in keep], [t_ids[i] for i in keep]
    src, src_len = tok.pad(s_ids, eos=True, max_len=max_len)
    tgt, tgt_len = tok.pad(t_ids, bos=True, eos=True, max_len=tgt_max)
    return TensorData(src=src, src_len=src_len, tgt=tgt, tgt_len=tgt_len)


def parallel_bundle(name: str, splits: dict[str, tuple[list[str], list[str]]], *, vocab_size: int = 8000,
                    tokenizer_kind: str = "bpe", max_len: int = 64, tokenizer: PathLike | None = None,
                    src_lang: str = "src", tgt_lang: str = "tgt", tgt_max_len: int | None = None,
                    drop_long: bool = True) -> DataBundle:
    """splits: {"train": (sources, targets), "val": ..., "test": ...} -> a seq2seq DataBundle.
    `tgt_max_len` caps targets separately (default: max_len, for both sides); `drop_long=False` truncates long
    training pairs instead of dropping them (summarization: a long abstract still has a usable start)."""
    train_src, train_tgt = splits["train"]
    if not train_src:
        raise DataError(f"data set '{name}': the training split is empty")
    if not isinstance(max_len, int) or max_len < 4:
        raise DataError(f"data set '{name}': max_len must be an integer >= 4, got {max_len!r}")
    tok = load_tokenizer(tokenizer) if tokenizer else train_tokenizer(tokenizer_kind, train_src + train_tgt, vocab_size)
    if tgt_max_len is not None and (not isinstance(tgt_max_len, int) or tgt_max_len < 4):
        raise DataError(f"data set '{name}': tgt_max_len must be an integer >= 4, got {tgt_max_len!r}")
    data = {k: _encode_split(tok, s, t, max_len, drop_long and k == "train", tgt_max_len)
            for k, (s, t) in splits.items()}
    meta = {"loader": name, "vocab_size": tok.vocab_size, "num_outputs": tok.vocab_size, "tokenizer": tok.kind,
            "pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "max_len": max_len,
            "tgt_max_len": tgt_max_len or max_len, "src_lang": src_lang, "tgt_lang": tgt_lang,
            "train_pairs": len(train_src),
            "train_pairs_kept": len(data["train"]),
            "pad_trim": {"src": "src_len", "tgt": "tgt_len"}, "bucket": "tgt_len"}
    bundle = DataBundle(name, data["train"], data.get("val"), data.get("test"), "seq2seq", (None,), None, None, meta)
    bundle.extras = {"tokenizer": tok, "text": dict(splits)}
    return bundle


@registered("multi30k", "Multi30k English-German image-caption translation, 29k/1k/1k pairs", "seq2seq",
            "../shared/data/multi30k (or $LAMINA_SHARED_DATA)")
def multi30k(*, path: PathLike | None = None, src_lang: str = "en", tgt_lang: str = "de", vocab_size: int = 8000,
             tokenizer_kind: str = "bpe", max_len: int = 64, test_split: str = "test_2016_flickr",
             limit: int | None = None, tokenizer: PathLike | None = None, seed: int = 0) -> DataBundle:
    """Multi30k task 1 (Elliott et al. 2016), the standard train / val / test_2016_flickr splits.
    `limit` keeps the first N training pairs (quick runs, CI)."""
    root = Path(path).expanduser() if path is not None else shared_data_dir() / "multi30k"
    langs = ("en", "de")
    if src_lang not in langs or tgt_lang not in langs or src_lang == tgt_lang:
        raise DataError(f"multi30k: src_lang/tgt_lang must be 'en' and 'de' (either direction), got {src_lang}->{tgt_lang}")
    if not (root / f"train.{src_lang}.gz").is_file():
        raise DataError(f"{root}: Multi30k files not found (train.{src_lang}.gz ...); pass path= or set "
                        "LAMINA_SHARED_DATA to the shared data folder")
    splits = {}
    for split, fname in (("train", "train"), ("val", "val"), ("test", test_split)):
        srcs, tgts = read_parallel(root / f"{fname}.{src_lang}.gz", root / f"{fname}.{tgt_lang}.gz")
        if split == "train" and limit is not None:
            srcs, tgts = srcs[:limit], tgts[:limit]
        splits[split] = (srcs, tgts)
    return parallel_bundle("multi30k", splits, vocab_size=vocab_size, tokenizer_kind=tokenizer_kind,
                           max_len=max_len, tokenizer=tokenizer, src_lang=src_lang, tgt_lang=tgt_lang)


@registered("parallel", "your own parallel corpus: aligned files or a TSV/JSONL file per split", "seq2seq",
            "paths: train_src= train_tgt= | train=pairs.tsv|.jsonl (val, test alike)")
def parallel(*, train: PathLike | None = None, train_src: PathLike | None = None, train_tgt: PathLike | None = None,
             val: PathLike | None = None, val_src: PathLike | None = None, val_tgt: PathLike | None = None,
             test: PathLike | None = None, test_src: PathLike | None = None, test_tgt: PathLike | None = None,
             src_field: str = "src", tgt_field: str = "tgt", val_fraction: float = 0.05, vocab_size: int = 8000,
             tokenizer_kind: str = "bpe", max_len: int = 64, tokenizer: PathLike | None = None,
             seed: int = 0) -> DataBundle:
    """Per split: `<split>=pairs.tsv|.jsonl` or `<split>_src=` + `<split>_tgt=`. Without a val split,
    `val_fraction` of the training pairs (seeded) is held out."""
    import random

    def read(pairs, s, t, split):
        if pairs is None and s is None and t is None:
            return None
        if pairs is not None and (s is not None or t is not None):
            raise DataError(f"data set 'parallel': give {split}= or {split}_src=/{split}_tgt=, not both")
        return read_parallel(s, t, pairs, src_field, tgt_field)

    splits = {"train": read(train, train_src, train_tgt, "train")}
    if splits["train"] is None:
        raise DataError("data set 'parallel': missing training data; pass train=pairs.tsv or train_src= and train_tgt=")
    v = read(val, val_src, val_tgt, "val")
    if v is None and val_fraction > 0:
        n = len(splits["train"][0])
        idx = list(range(n))
        random.Random(seed).shuffle(idx)
        k = max(1, int(round(n * val_fraction)))
        held, kept = sorted(idx[:k]), sorted(idx[k:])
        s, t = splits["train"]
        v = ([s[i] for i in held], [t[i] for i in held])
        splits["train"] = ([s[i] for i in kept], [t[i] for i in kept])
    if v is not None:
        splits["val"] = v
    te = read(test, test_src, test_tgt, "test")
    if te is not None:
        splits["test"] = te
    return parallel_bundle("parallel", splits, vocab_size=vocab_size, tokenizer_kind=tokenizer_kind,
                           max_len=max_len, tokenizer=tokenizer)
