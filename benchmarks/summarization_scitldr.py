"""Abstractive summarization on SciTLDR-A (datasets/scitldr_a): a small T5 from scratch against lead baselines.

On the 618 test papers, ROUGE-1/2/L F (rouge-score, Porter stemming) against every reference TLDR of a paper,
the reference with the best ROUGE-1 giving that paper's numbers (SciTLDR's scripts/cal-rouge.py "multi-max"):
* lead-1 / lead-3: the abstract's first 1 / 3 sentences (extractive baselines, no training);
* lamina: `configs/scitldr_t5.yaml` (t5_mini narrowed, from scratch on 1,992 pairs, beam 4, length penalty,
  no repeated trigram), the ROUGE its run reports (test_extras; summaries in the run's summaries_test.txt);
* the same trained model decoded without the no-repeat rule and greedily (what those decoding options add).

    python benchmarks/summarization_scitldr.py [--threads 1] [--work /tmp/summ-bench] [--smoke]
    python benchmarks/summarization_scitldr.py --run /tmp/summ-bench/scitldr-t5   # reuse a trained run

Prints a table, writes benchmarks/results/summarization_scitldr.json. Records the 1-min load average before
and after every step (a step started above the core count is flagged busy: its times include other jobs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, print_table, start_work, timed_step, write_result  # noqa: E402

CONFIG = ROOT / "configs" / "scitldr_t5.yaml"


def test_papers(limit: int | None):
    import gzip
    import json

    with gzip.open(ROOT / "datasets" / "scitldr_a" / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit]


def lead_run(k: int, limit: int | None) -> dict:
    from lamina.data.summarization import lead
    from lamina.tasks.seq2seq import rouge_scores

    papers = test_papers(limit)
    hyps = lead([p["source"] for p in papers], k)
    refs = [[t.strip() for t in p["target"]] for p in papers]
    sc = rouge_scores(hyps, refs)
    return {**sc, "papers": len(papers), "mean_words": round(sum(len(h.split()) for h in hyps) / len(hyps), 1)}


def lamina_run(threads: int, work: Path, extra: list[str], run_dir: Path | None = None) -> dict:
    import json

    from lamina import runs
    from lamina.config import load_config

    if run_dir is None:
        cfg = load_config(CONFIG, [f"trainer.threads={threads}", f"logging.root={work}", "name=scitldr-t5",
                                   "trainer.progress=false", "logging.tensorboard=false", "cost.energy=false",
                                   *extra])
        run_dir = Path(runs.train(cfg).run_dir)
    s = json.loads((run_dir / "summary.json").read_text())
    t = s["test"]
    hyps = (run_dir / "summaries_test.txt").read_text(encoding="utf-8").splitlines()
    return {"rouge1": t["test/rouge1"], "rouge2": t["test/rouge2"], "rougeL": t["test/rougeL"],
            "papers": s["data"]["test"], "mean_words": round(sum(len(h.split()) for h in hyps) / max(len(hyps), 1), 1),
            "params": s["params"], "epochs": s["epochs"], "train_s": round(s["train_time_s"], 1),
            "samples_per_s": round(s["train_samples_per_s"], 2), "val_loss": round(s["best_monitor"], 4),
            "test_ppl": round(t["test/ppl"], 1), "run_dir": str(run_dir), "examples": hyps[:10]}


def decode_variant(run_dir: Path, threads: int, **task_options) -> dict:
    """The trained run's test ROUGE with other decoding options (e.g. no_repeat_ngram=0, beam_size=1)."""
    from lamina.runs import open_run

    torch.set_num_threads(threads)
    run = open_run(run_dir)
    for k, v in task_options.items():
        setattr(run.task, k, v)
    t = run.task.test_extras(run.model, run.data(), "test", torch.device("cpu"))
    return {"rouge1": t["test/rouge1"], "rouge2": t["test/rouge2"], "rougeL": t["test/rougeL"],
            "papers": len(run.data().test), "mean_words": None, "decoding": task_options}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/summ-bench")
    ap.add_argument("--smoke", action="store_true", help="200 training / 20 test papers, 1 epoch; writes nothing")
    ap.add_argument("--run", type=Path, default=None, help="a trained scitldr_t5 run folder: skip training")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work, load0 = start_work(a.work)
    limit = 20 if a.smoke else None
    extra = ["data.limit=200", "data.eval_limit=20", "trainer.max_epochs=1"] if a.smoke else []
    rows: list[dict] = []
    timed_step(rows, "lead-1", lambda: lead_run(1, limit))
    timed_step(rows, "lead-3", lambda: lead_run(3, limit))
    t5 = timed_step(rows, "t5 (lamina, from scratch)", lambda: lamina_run(a.threads, work, extra, a.run))
    run_dir = Path(t5["run_dir"])
    timed_step(rows, "t5, no_repeat_ngram 0", lambda: decode_variant(run_dir, a.threads, no_repeat_ngram=0))
    timed_step(rows, "t5, greedy + no_repeat 3", lambda: decode_variant(run_dir, a.threads, beam_size=1))
    print_table(["method", "ROUGE-1", "ROUGE-2", "ROUGE-L", "words", "wall s", "load before/after"],
                [[r["method"], r["rouge1"], r["rouge2"], r["rougeL"], r["mean_words"] or "-", r["wall_s"],
                  f"{r['load_before']:.2f}/{r['load_after']:.2f}"] for r in rows])
    if not a.smoke:
        write_result("summarization_scitldr", {
            "config": str(CONFIG.relative_to(ROOT)), "threads": a.threads, "load_start": load0,
            "protocol": "SciTLDR-A test (618 papers), ROUGE F x100 via rouge-score with stemming; several "
                        "references per paper: the one with the best ROUGE-1 gives all three numbers",
            "rows": rows})


if __name__ == "__main__":
    main()
