"""`lamina tokenize TEXT OUT`: a text file -> memory-mapped token files (lamina.data.tokenfiles) for token_bin."""

from __future__ import annotations

import argparse


def add_parsers(sub) -> None:
    t = sub.add_parser("tokenize", help="write train.bin/val.bin + meta.json from a text file (data.name=token_bin)")
    t.add_argument("text", help="a UTF-8 text file (read in chunks, never whole)")
    t.add_argument("out", help="the folder to write")
    t.add_argument("--tokenizer", default="char", help="char (default), bpe, or a saved tokenizer.json")
    t.add_argument("--vocab-size", type=int, default=8000, help="bpe: vocabulary size (default 8000)")
    t.add_argument("--val-fraction", type=float, default=0.1, help="the last fraction of tokens (default 0.1)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (bytes read per pass)")
    t.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def cmd_tokenize(a, console) -> int:
    from lamina.cli.progress import progress_bar
    from lamina.data.tokenfiles import build_token_files

    with progress_bar(console, "tokenize", a.no_progress) as progress:
        meta = build_token_files(a.text, a.out, a.tokenizer, a.vocab_size, a.val_fraction, progress=progress)
    files = meta["files"]
    console.print(f"{a.out}: {files['train']['tokens']} train + {files['val']['tokens']} val tokens, "
                  f"{meta['dtype']}, vocab {meta['vocab_size']} ({meta['tokenizer']}); train with "
                  f"data.name=token_bin data.path={a.out}", markup=False)
    return 0


COMMANDS = {"tokenize": cmd_tokenize}
