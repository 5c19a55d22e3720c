"""Training throughput of a seq2seq config: lamina's Trainer against a hand-written PyTorch loop of the same model,
data, optimizer and loss, interleaved A/B in one process (the Trainer's overhead, measured, not assumed).

Both loops: the config's T5 on the config's training pairs, batches of data.batch_size cut to their longest source
and target, teacher forcing, label-smoothed cross-entropy ignoring padding, AdamW, gradient clipping, one thread.

    python benchmarks/seq2seq_throughput.py [--config configs/scitldr_t5.yaml] [--epochs 1] [--repeats 3]

Prints the samples/s of every run and the median ratio; writes benchmarks/results/seq2seq_throughput_<config>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, interleave, loadavg1, start_work, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "scitldr_t5.yaml"))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    _, load0 = start_work("/tmp/seq2seq-throughput")

    from lamina.config import load_config
    from lamina.data import make_loader
    from lamina.engine import Trainer
    from lamina.runs.build import build_run_model, data_facts, load_data, make_task
    from lamina.tasks import TASKS

    cfg = load_config(a.config, ["trainer.progress=false", f"trainer.max_epochs={a.epochs}", "schedule.name=constant",
                                 f"trainer.threads={a.threads}"])
    bundle = load_data(cfg)
    facts = data_facts(bundle, TASKS["seq2seq"])
    task = make_task(cfg, facts)
    tr = bundle.train
    bs, o = cfg.data.batch_size, cfg.optimizer
    pad = int(facts.meta.get("pad_id", 0))
    smoothing = float(task.label_smoothing)

    def optimizer(model):
        return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)

    def lamina_run() -> float:
        torch.manual_seed(0)
        model = build_run_model(cfg, facts)
        trainer = Trainer(cfg.trainer.model_copy(update={"device": "cpu", "log_every": 10_000}))
        loader = make_loader(tr, bs, shuffle=True, seed=0, device="cpu", trim=bundle.meta.get("pad_trim"),
                             bucket=bundle.meta.get("bucket"))
        trainer.fit(model, task, loader, None, optimizer(model), None)
        return trainer.samples_seen / trainer.train_time

    def hand_run() -> float:
        torch.manual_seed(0)
        model = build_run_model(cfg, facts).train()
        opt = optimizer(model)
        src_all, tgt_all = tr.tensors["src"], tr.tensors["tgt"]
        g = torch.Generator().manual_seed(0)
        n, seen = len(src_all), 0
        t0 = time.perf_counter()
        for _ in range(a.epochs):
            for idx in torch.randperm(n, generator=g).split(bs):
                src, tgt = src_all[idx], tgt_all[idx]
                src = src[:, :int((src != pad).sum(1).max())]
                tgt = tgt[:, :int((tgt != pad).sum(1).max())]
                out = model(src, tgt[:, :-1], src != pad)
                loss = F.cross_entropy(out.float().reshape(-1, out.size(-1)), tgt[:, 1:].reshape(-1),
                                       ignore_index=pad, label_smoothing=smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
                opt.step()
                seen += len(idx)
        return seen / (time.perf_counter() - t0)

    ab = interleave({"lamina Trainer": lamina_run, "hand-written loop": hand_run}, a.repeats)
    rows, med = ab["runs"], ab["median_samples_per_s"]
    ratio = med["lamina Trainer"] / med["hand-written loop"]
    print(f"median samples/s: lamina {med['lamina Trainer']:.1f}, hand-written {med['hand-written loop']:.1f}; "
          f"ratio {ratio:.3f}")
    write_result(f"seq2seq_throughput_{Path(a.config).stem}",
                 {"config": a.config, "epochs": a.epochs, "threads": a.threads, "train_pairs": len(tr),
                  "load_start": load0, "load_end": loadavg1(), "rows": rows, "median": med, "ratio": round(ratio, 3)})


if __name__ == "__main__":
    main()
