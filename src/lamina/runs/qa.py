"""Answer questions with a trained extractive-QA run (task question_answering).

* answer(run, question, context): the best span of the context, over all its windows, with its score (start +
  end logit) and character position. Contexts longer than the run's windows are read window by window, exactly
  as in training and testing (lamina.data.qa).
* answer_file(run, path): every question of a SQuAD v1.1-format file, exact match and F1 against its answers
  (the official definitions, through torchmetrics), and the predictions as {id: text}, the file the official
  evaluate-v1.1.py reads. A run trained on one QA set can so be scored on another.

What one call may cost is bounded: at most MAX_CONTEXT_CHARS characters of context and MAX_QUESTIONS questions.
"""

from __future__ import annotations

import json
from pathlib import Path

from lamina.errors import DataError
from lamina.io import atomic_write_text

MAX_CONTEXT_CHARS = 1_000_000  # ~150k words: a long report, a few thousand windows
MAX_QUESTIONS = 20_000  # SQuAD's dev set has 10,570


def _qa_run(path):
    from lamina.runs.open import open_task_run
    from lamina.tasks.qa import QuestionAnsweringTask

    return open_task_run(path, QuestionAnsweringTask, "a question-answering run (task question_answering)",
                         "configs/xquad_minilm.yaml")


def _windows(run, examples):
    from lamina.data.qa import encode_windows
    from lamina.data.tokenizers import load_tokenizer

    meta = run.facts.meta
    tok = load_tokenizer(run.folder.tokenizer)
    return encode_windows(tok, examples, int(meta["block_size"]), int(meta["doc_stride"]), int(meta["max_query_len"]))


def answer(path, question: str, context: str) -> dict:
    """{"answer", "score", "start_char", "windows"} for one question about one context."""
    from lamina.data.qa import QAExample

    if not question.strip():
        raise DataError("question: empty; ask something, e.g. --question 'Who founded the company?'")
    if not context.strip():
        raise DataError("context: empty; give the text that holds the answer (--context or --context-file)")
    if len(context) > MAX_CONTEXT_CHARS:
        raise DataError(f"context: {len(context):,} characters; at most {MAX_CONTEXT_CHARS:,} per call")
    run = _qa_run(path)
    ex = QAExample("q", question, context, [])
    windows = _windows(run, [ex])
    pred = run.task.decode(run.model, [ex], windows, run.device)[0]
    return {"answer": pred["text"], "score": round(pred["score"], 4), "start_char": pred["start_char"],
            "windows": len(windows.tensors["ids"])}


def answer_file(path, qa_file, out: str | Path | None = None, on_batch=None) -> dict:
    """Exact match / F1 of the run on a SQuAD v1.1-format file; predictions written to `out` ({id: text})."""
    from lamina.data.qa import read_squad

    run = _qa_run(path)
    examples = read_squad(qa_file)
    if len(examples) > MAX_QUESTIONS:
        raise DataError(f"{qa_file}: {len(examples):,} questions; at most {MAX_QUESTIONS:,} per call")
    windows = _windows(run, examples)
    preds = run.task.decode(run.model, examples, windows, run.device, on_batch=on_batch)
    scores = run.task.squad_scores(preds, examples)
    if out is not None:
        atomic_write_text(out, json.dumps({p["id"]: p["text"] for p in preds}, ensure_ascii=False, indent=1) + "\n")
    return {"file": str(qa_file), "questions": len(examples), "windows": len(windows.tensors["ids"]),
            "exact_match": round(scores["exact_match"], 2), "f1": round(scores["f1"], 2),
            "predictions": str(out) if out is not None else None}
