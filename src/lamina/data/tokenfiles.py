"""Token streams on disk, memory-mapped: nanoGPT's train.bin / val.bin (raw little-endian uint16 or uint32 ids)
plus a meta.json naming the dtype, the vocabulary and each file's token count (nanoGPT's meta.pkl is a pickle,
which lamina never loads from a user).

    meta.json = {"format": "lamina-tokens", "dtype": "uint16", "vocab_size": 65,
                 "files": {"train": {"file": "train.bin", "tokens": 1003854}, "val": {...}},
                 "tokenizer": "char", "vocab": ["\\n", " ", ...]}        # or "bpe" + tokenizer.json beside it

`build_token_files` writes such a folder from a text file (char or BPE) without holding the text or the ids in
memory; `open_tokens` validates a folder (hostile files: the declared dtype, sizes and token counts are checked
against the files before anything is mapped, and every id against vocab_size, chunk by chunk) and maps it.
The `token_bin` data set feeds the mapped stream to the same window loaders (lamina.data.windows), which read
only the windows a batch needs. Only "format", "dtype" and "vocab_size" are required: a nanoGPT folder needs a
three-key meta.json next to its .bin files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lamina.data.base import DataBundle
from lamina.data.files import registered
from lamina.data.outofcore import human_bytes
from lamina.data.splits import check_fraction
from lamina.errors import DataError

FORMAT = "lamina-tokens"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_CHUNK = 1 << 22  # characters or ids per streamed chunk (~16 MB of ids as uint32)


class TokenStream:
    """A split that is a memory-mapped 1-D token stream: `tensors["ids"]` is the np.memmap (uint16/uint32).

    The window loaders gather from it directly; nothing reads the whole file."""

    def __init__(self, ids: np.ndarray):
        self.tensors = {"ids": ids}

    def __len__(self) -> int:
        return len(self.tensors["ids"])

    def subset(self, idx) -> TokenStream:  # train_fraction on token streams: a prefix
        return TokenStream(self.tensors["ids"][: int(idx[-1]) + 1 if len(idx) else 0])


# ------------------------------------------------------------------------------------------- reading

def _fail(where: Path, what: str):
    raise DataError(f"{where}: {what}")


def read_meta(folder: str | os.PathLike) -> dict:
    """meta.json of a token folder, checked field by field (one DataError line naming the field)."""
    root = Path(folder).expanduser()
    p = root / "meta.json"
    if not root.is_dir():
        _fail(root, "token folder not found (expected train.bin, val.bin and meta.json)")
    if not p.is_file():
        _fail(p, 'not found; a token folder needs {"format": "lamina-tokens", "dtype": "uint16", "vocab_size": N} '
                 "(lamina tokenize writes one)")
    if p.stat().st_size > 64 << 20:
        _fail(p, f"{p.stat().st_size} bytes is too large for a meta file (at most 64 MB)")
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        _fail(p, f"not valid JSON ({e})")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        _fail(p, f'expected a JSON object with "format": "{FORMAT}"')
    if meta.get("dtype") not in DTYPES:
        _fail(p, f"dtype: expected one of {', '.join(DTYPES)}, got {meta.get('dtype')!r}")
    v, limit = meta.get("vocab_size"), 1 << (8 * DTYPES[meta["dtype"]].itemsize)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= limit:
        _fail(p, f"vocab_size: expected an integer in 1..{limit} for dtype {meta['dtype']}, got {v!r}")
    files = meta.get("files", {"train": {"file": "train.bin"}, "val": {"file": "val.bin"}})
    if not isinstance(files, dict) or "train" not in files:
        _fail(p, 'files: expected a mapping with a "train" entry, e.g. {"train": {"file": "train.bin"}}')
    for split, entry in files.items():
        if split not in ("train", "val", "test") or not isinstance(entry, dict):
            _fail(p, f"files.{split}: expected train/val/test entries of the form {{\"file\": NAME, \"tokens\": N}}")
        name, n = entry.get("file"), entry.get("tokens")
        if not isinstance(name, str) or not name or Path(name).name != name or name.startswith("."):
            _fail(p, f"files.{split}.file: expected a plain file name inside the folder, got {name!r}")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            _fail(p, f"files.{split}.tokens: expected a non-negative integer, got {n!r}")
    vocab = meta.get("vocab")
    if vocab is not None and (not isinstance(vocab, list) or len(vocab) != v
                              or not all(isinstance(c, str) for c in vocab)):
        _fail(p, f"vocab: expected a list of {v} strings (one per id), got {type(vocab).__name__}"
                 f"{f' of {len(vocab)}' if isinstance(vocab, list) else ''}")
    meta["files"] = files
    return meta


def open_tokens(folder: str | os.PathLike, split: str, meta: dict | None = None, check_ids: bool = True):
    """The split's ids as a read-only np.memmap (None when meta lists no such split), after checking the file
    size against the declared token count and dtype, and (check_ids) every id against vocab_size."""
    root = Path(folder).expanduser()
    meta = meta or read_meta(root)
    entry = meta["files"].get(split)
    if entry is None:
        return None
    p, dtype = root / entry["file"], DTYPES[meta["dtype"]]
    if not p.is_file():
        _fail(p, f"token file for split '{split}' not found (named in meta.json)")
    size, n = p.stat().st_size, entry.get("tokens")
    if n is None:
        if size % dtype.itemsize:
            _fail(p, f"{size} bytes is not a whole number of {meta['dtype']} ids ({dtype.itemsize} bytes each)")
        n = size // dtype.itemsize
    elif n * dtype.itemsize != size:
        _fail(p, f"meta.json declares {n} {meta['dtype']} tokens ({n * dtype.itemsize} bytes) but the file has "
                 f"{size} bytes")
    if n == 0:
        return np.zeros(0, dtype)
    ids = np.memmap(p, dtype=dtype, mode="r", shape=(n,))
    if check_ids:  # an id >= vocab_size would index past the embedding table: refuse it here, naming the place
        v = meta["vocab_size"]
        for s in range(0, n, _CHUNK):
            chunk = ids[s:s + _CHUNK]
            if int(chunk.max()) >= v:
                i = s + int(np.argmax(chunk >= v))
                _fail(p, f"token {i} is id {int(ids[i])}, not below vocab_size {v}")
    return ids


@registered("token_bin", "a memory-mapped token stream: train.bin/val.bin (uint16/uint32) + meta.json",
            "language_modeling", "path: path= (a folder written by `lamina tokenize`)")
def token_bin(*, path: str | os.PathLike, block_size: int = 64, seed: int = 0) -> DataBundle:
    """Splits hold {"ids": np.memmap}, read window by window; meta: vocab_size, block_size (+ vocab for char)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise DataError(f"block_size: expected a positive integer, got {block_size!r}")
    root = Path(path).expanduser()
    meta_in = read_meta(root)
    splits = {}
    for split in ("train", "val", "test"):
        ids = open_tokens(root, split, meta_in)
        if ids is not None and (split == "train" or len(ids)) and len(ids) <= block_size:
            raise DataError(f"{root}: the {split} split has {len(ids)} tokens, needs more than "
                            f"block_size={block_size}; use a smaller data.block_size or more text")
        splits[split] = TokenStream(ids) if ids is not None and len(ids) else None
    meta = {"loader": "token_bin", "vocab_size": meta_in["vocab_size"], "block_size": block_size,
            "tokenizer": meta_in.get("tokenizer")}
    if meta_in.get("vocab") is not None:
        meta["vocab"] = meta_in["vocab"]  # char streams: what `lamina generate` decodes with
    bundle = DataBundle("token_bin", splits["train"], splits["val"], splits["test"], "language_modeling",
                        (block_size,), None, None, meta)
    if (root / "tokenizer.json").is_file():  # BPE: the tokenizer travels with the run
        from lamina.data.tokenizers import load_tokenizer

        bundle.extras["tokenizer"] = load_tokenizer(root / "tokenizer.json")
    n = sum(len(s) for s in (splits["train"], splits["val"], splits["test"]) if s is not None)
    bundle.extras["data_path"] = (f"memory-mapped token files: {n} {meta_in['dtype']} tokens "
                                  f"({human_bytes(n * DTYPES[meta_in['dtype']].itemsize)}) read window by window")
    return bundle


# ------------------------------------------------------------------------------------------- writing

def _text_chunks(path: Path, lines: bool = False):
    """The file's text in pieces of about _CHUNK characters (whole lines when `lines`), never all at once."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if not lines:
                while piece := f.read(_CHUNK):
                    yield piece
                return
            buf, size = [], 0
            for line in f:
                buf.append(line)
                size += len(line)
                if size >= _CHUNK:
                    yield "".join(buf)
                    buf, size = [], 0
            if buf:
                yield "".join(buf)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _counted(chunks, size: int, progress):
    """The chunks as they are, with progress(characters read, file size in bytes): exact for ASCII text, behind
    for multi-byte text (so it never overshoots), and set to the size at the end."""
    if progress is None:
        yield from chunks
        return
    done = 0
    progress(0, size)
    for piece in chunks:
        yield piece
        done = min(done + len(piece), size)
        progress(done, size)
    if done < size:
        progress(size, size)


def build_token_files(text: str | os.PathLike, out: str | os.PathLike, tokenizer: str = "char",
                      vocab_size: int = 8000, val_fraction: float = 0.1, bpe_train_chars: int = 50_000_000,
                      progress=None) -> dict:
    """Tokenize a UTF-8 text file into `out`/train.bin, val.bin, meta.json (+ tokenizer.json for BPE), streaming.

    char: the vocabulary is the file's sorted distinct characters and the split is the `text` data set's
    (train = the first 1 - val_fraction of the tokens), so token_bin and text give the same windows.
    bpe: a byte-level BPE of `vocab_size` trained on the first `bpe_train_chars` characters; a path: that saved
    tokenizer.json (char or BPE), copied into the folder. The dtype is uint16 when the vocabulary
    fits, else uint32. Returns the meta written. `progress(done, total)` counts the file's bytes read by each pass
    over it: char: the alphabet, then (from 0) the ids; otherwise the ids (BPE training reads only its head)."""
    from lamina.io import atomic_write_text

    src = Path(text).expanduser()
    if not src.is_file():
        raise DataError(f"{src}: text file not found")
    vf = check_fraction("val_fraction", val_fraction)
    root = Path(out).expanduser()
    nbytes = src.stat().st_size  # progress's total for each pass
    if tokenizer == "char":  # pass 1: the alphabet
        uniq = np.zeros(0, np.uint32)
        for piece in _counted(_text_chunks(src), nbytes, progress):
            uniq = np.union1d(uniq, np.frombuffer(piece.encode("utf-32-le"), "<u4"))
        vocab, tok, v = [chr(c) for c in uniq.tolist()], None, len(uniq)

        def encode(piece: str) -> np.ndarray:
            return np.searchsorted(uniq, np.frombuffer(piece.encode("utf-32-le"), "<u4"))
    else:
        from lamina.data.tokenizers import load_tokenizer, train_tokenizer

        if tokenizer == "bpe":  # trained on the first bpe_train_chars characters (BPE training holds its text)
            head, size = [], 0
            for piece in _text_chunks(src, lines=True):
                head += piece.splitlines()
                size += len(piece)
                if size >= bpe_train_chars:
                    break
            tok = train_tokenizer("bpe", head, vocab_size=vocab_size)
            del head
        elif Path(tokenizer).expanduser().is_file():
            tok = load_tokenizer(tokenizer)
        else:
            raise DataError(f"tokenizer: expected char, bpe or a tokenizer.json file, got {tokenizer!r}")
        v, vocab = tok.vocab_size, None

        def encode(piece: str) -> np.ndarray:
            return np.asarray(tok.encode(piece), np.int64)
    root.mkdir(parents=True, exist_ok=True)
    if v == 0:
        raise DataError(f"{src}: empty text file")
    dtype_name = "uint16" if v <= 1 << 16 else "uint32"
    dtype = DTYPES[dtype_name]
    tmp = root / "tokens.tmp"
    n = 0
    with open(tmp, "wb") as f:  # pass 2: ids, chunk by chunk
        for piece in _counted(_text_chunks(src, lines=tok is not None), nbytes, progress):
            ids = encode(piece).astype(dtype)
            f.write(ids.tobytes())
            n += len(ids)
    n_val = round(n * vf)
    n_train = n - n_val
    with open(tmp, "rb") as f:
        for name, count in (("train.bin", n_train), ("val.bin", n_val)):
            with open(root / name, "wb") as g:
                left = count * dtype.itemsize
                while left:
                    buf = f.read(min(left, _CHUNK * dtype.itemsize))
                    g.write(buf)
                    left -= len(buf)
    tmp.unlink()
    meta = {"format": FORMAT, "dtype": dtype_name, "vocab_size": v, "tokenizer": tok.kind if tok else "char",
            "files": {"train": {"file": "train.bin", "tokens": n_train}, "val": {"file": "val.bin", "tokens": n_val}}}
    if vocab is not None:
        meta["vocab"] = vocab
    else:
        tok.save(root / "tokenizer.json")
    atomic_write_text(root / "meta.json", json.dumps(meta, ensure_ascii=False))  # last: marks a complete folder
    return meta
