"""`lamina qa RUN --question Q --context TEXT | --context-file F` and `lamina qa RUN --file squad.json`: answer
questions with an extractive-QA run (lamina.runs.qa)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lamina.errors import DataError

_EPILOG = """examples:
  lamina finetune configs/xquad_minilm.yaml
  lamina qa runs/xquad-minilm --question "Who designed the dome?" --context-file article.txt
  lamina qa runs/xquad-minilm --file my_questions.json --out predictions.json"""

MAX_CONTEXT_FILE_BYTES = 8 << 20


def add_parsers(sub) -> None:
    q = sub.add_parser("qa", help="answer questions from a context with an extractive-QA run, or score a run on a "
                                  "SQuAD-format file", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_EPILOG)
    q.add_argument("run", help="a run folder trained with task question_answering")
    q.add_argument("--question", help="the question to answer")
    src = q.add_mutually_exclusive_group()
    src.add_argument("--context", help="the text that holds the answer")
    src.add_argument("--context-file", help="a UTF-8 text file that holds the answer")
    src.add_argument("--file", help="a SQuAD v1.1-format JSON file: answer every question, print EM / F1")
    q.add_argument("--out", help="with --file: write the predictions ({id: answer}) to this JSON file")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def _read_context(path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: context file not found")
    if p.stat().st_size > MAX_CONTEXT_FILE_BYTES:
        raise DataError(f"{p}: larger than {MAX_CONTEXT_FILE_BYTES >> 20} MB; give the part that holds the answer")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{p}: not UTF-8 text") from None


def cmd_qa(a, console) -> int:
    from lamina.runs import qa

    if a.file:
        if a.question:
            raise DataError("--question goes with --context / --context-file; --file brings its own questions")
        from rich.progress import Progress

        with Progress(console=console, transient=True, disable=a.json) as bar:
            job = bar.add_task("answering", total=None)
            r = qa.answer_file(a.run, a.file, a.out, on_batch=lambda n: bar.update(job, advance=n))
        if a.json:
            print(json.dumps(r))
        else:
            console.print(f"{r['questions']} questions ({r['windows']} windows): exact match [bold]{r['exact_match']:.2f}"
                          f"[/], F1 [bold]{r['f1']:.2f}[/]" + (f"; predictions -> {r['predictions']}" if a.out else ""))
        return 0
    if a.out:
        raise DataError("--out goes with --file")
    if not a.question or not (a.context or a.context_file):
        raise DataError("give --question and a context (--context TEXT or --context-file FILE), or --file FILE.json")
    context = a.context if a.context is not None else _read_context(a.context_file)
    r = qa.answer(a.run, a.question, context)
    if a.json:
        print(json.dumps(r))
    else:
        console.print(f"[bold]{r['answer'] or '(no answer)'}[/]  (score {r['score']:.2f}, character {r['start_char']}, "
                      f"{r['windows']} window{'s' if r['windows'] != 1 else ''})")
    return 0


COMMANDS = {"qa": cmd_qa}
