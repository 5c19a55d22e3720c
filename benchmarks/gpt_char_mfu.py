"""Char GPT (configs/shakespeare_char_gpt.yaml shape): model FLOPs utilisation against this machine's measured
GEMM peak, and where a training step's time goes.

1. Peak: a 2048^3 matrix product in fp32 and in bf16, timed here (median of several), in GFLOP/s.
2. FLOPs per training step: counted by torch.utils.flop_counter.FlopCounterMode over one forward + backward of
   the real batch (matmuls and attention; elementwise work is not counted, as MFU conventionally does not).
3. ms per step of lamina's Trainer.train_step + backward + optimizer_step as the run uses them: the perf preset as
   `lamina train` applies it (bf16 autocast where native, fused AdamW, torch.compile for the config's 2000 steps),
   the preset without compile, and plain fp32 eager with a for-loop AdamW: MFU = FLOPs per step / step time / peak
   of the precision the matmuls run in.
4. A torch.profiler table of one set of steps, each op's self time put in a bucket: matmul (mm/addmm/bmm/linear),
   attention (SDPA kernels), optimizer (AdamW's kernel, grad clipping's norms), norms/activations/elementwise,
   casts (bf16 copies), and the rest; "Python, dispatch (and compiled fused kernels)" is the step's wall time
   minus the time spent inside aten ops (inductor's generated CPU kernels are not profiled one by one, so under
   compile they land in this bucket too).

    python benchmarks/gpt_char_mfu.py [--steps 50] [--threads N] [--allow-busy]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from _common import ROOT, busy, loadavg1, print_table, refuse_if_busy, write_result
import lamina
from lamina.data import load_dataset
from lamina.data.windows import RandomWindowLoader
from lamina.engine import Trainer
from lamina.engine.optim import build_optimizer
from lamina.models import create_model
from lamina.tasks import LanguageModelingTask

SHARED = ROOT.parent / "shared" / "data"
BUCKETS = [  # (bucket, substrings of op names), first match wins
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("optimizer", ("adamw", "adam_", "linalg_vector_norm", "clip_grad", "_foreach")),
    ("casts (bf16 copies)", ("aten::copy_", "aten::_to_copy", "aten::to")),
    ("norms, activations, elementwise", ("layer_norm", "gelu", "aten::add", "aten::mul", "softmax", "cross_entropy",
                                         "nll_loss", "log_softmax", "embedding", "aten::sum", "aten::div", "fill_",
                                         "aten::zero", "aten::sub", "aten::exp")),
]


def peak_gflops(dtype, n=2048, reps=5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def setup(perf: bool, bundle, cfg, compile_: str = "auto"):
    torch.manual_seed(0)
    m = cfg.model.options
    model = create_model("gpt", vocab_size=bundle.meta["vocab_size"], block_size=bundle.meta["block_size"], **m)
    opt = build_optimizer(model, cfg.optimizer if perf else cfg.optimizer.model_copy(update={"impl": "for_loop"}))
    pcfg = cfg.trainer.perf.model_copy(update={"enabled": perf, "compile": compile_})
    trainer = Trainer(cfg.trainer.model_copy(update={"perf": pcfg, "threads": None}), device="cpu")
    task = LanguageModelingTask(bundle.meta["vocab_size"])
    trainer.setup(model, opt, None, task, planned_steps=cfg.trainer.max_steps)  # as the run plans it
    data = RandomWindowLoader(bundle.train.tensors["ids"], bundle.meta["block_size"], cfg.data.batch_size, 10 ** 6,
                              seed=0)
    return trainer, iter(data)


def step(trainer, batches):
    loss, _ = trainer.train_step(next(batches))
    trainer.backward(loss)
    trainer.optimizer_step()
    return loss


def flops_per_step(trainer, batches) -> int:
    with FlopCounterMode(display=False) as fc:
        loss, _ = trainer.train_step(next(batches))
        trainer.backward(loss)
    trainer.optimizer.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def bucket(name: str) -> str:
    low = name.lower()
    for b, keys in BUCKETS:
        if any(k.lower() in low for k in keys):
            return b
    return "other ops"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--allow-busy", action="store_true")
    args = ap.parse_args()
    load0, _ = refuse_if_busy(args.allow_busy)
    torch.set_num_threads(args.threads)
    cfg = lamina.load_config(str(ROOT / "configs" / "shakespeare_char_gpt.yaml"), [])
    bundle = load_dataset("tiny_shakespeare", block_size=cfg.data.block_size,
                          path=SHARED / "tinyshakespeare" / "input.txt")
    peaks = {"fp32": peak_gflops(torch.float32), "bf16": peak_gflops(torch.bfloat16)}
    print(f"GEMM peak 2048^3: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")

    results, rows = {}, []
    variants = {"lamina perf preset (as `lamina train` runs it)": (True, "auto"),
                "perf preset without compile": (True, "never"), "fp32 eager, for-loop AdamW": (False, "never")}
    # counted once, eagerly: FlopCounterMode's global module hooks would keep dynamo from compiling the model
    flops = flops_per_step(*setup(False, bundle, cfg, "never"))
    for key, (perf, comp) in variants.items():
        trainer, batches = setup(perf, bundle, cfg, comp)
        for _ in range(10):  # warm-up: allocations, AdamW state
            step(trainer, batches)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for _ in range(args.steps):
                loss = step(trainer, batches)
            float(loss)
            times.append((time.perf_counter() - t) / args.steps)
        ms = statistics.median(times) * 1e3
        prec = trainer.perf.precision
        achieved = flops / (ms / 1e3) / 1e9
        mfu = achieved / peaks["bf16" if prec == "bf16" else "fp32"]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(20):
                step(trainer, batches)
            wall = (time.perf_counter() - t) / 20
        spent = defaultdict(float)
        for ev in prof.key_averages():
            if ev.key.startswith("aten::") or "flash" in ev.key:
                spent[bucket(ev.key)] += ev.self_cpu_time_total / 1e3 / 20  # ms per step
        in_ops = sum(spent.values())
        # inductor's CPU kernels are not profiled one by one: under compile this bucket holds them too
        spent["Python, dispatch (and compiled fused kernels)"] = max(0.0, wall * 1e3 - in_ops)
        results[key] = {"precision": prec, "ms_per_step": ms, "all_ms": [x * 1e3 for x in times],
                        "gflop_per_step": flops / 1e9, "achieved_gflops": achieved, "mfu": mfu,
                        "profile_ms_per_step": dict(spent), "profiled_wall_ms": wall * 1e3,
                        "perf": trainer.perf.to_dict()}
        rows.append([key, prec, ms, flops / 1e9, achieved, f"{mfu:.1%}"])
    load1 = loadavg1()
    print(f"\nchar GPT {cfg.model.options}, batch {cfg.data.batch_size} x block {cfg.data.block_size}, "
          f"{args.threads} threads, median of {args.repeats} x {args.steps} steps; load {load0:.2f} -> {load1:.2f}"
          f"{' BUSY' if busy(load0) else ''}")
    table = print_table(["runner", "matmul dtype", "ms/step", "GFLOP/step", "GFLOP/s", "MFU"], rows)
    names = sorted({b for r in results.values() for b in r["profile_ms_per_step"]},
                   key=lambda b: -next(iter(results.values()))["profile_ms_per_step"].get(b, 0))
    def cell(r, b):
        ms = r["profile_ms_per_step"].get(b, 0)
        return f"{ms:.2f} ({ms / r['profiled_wall_ms']:.0%})"

    prof_rows = [[b] + [cell(r, b) for r in results.values()] for b in names]
    print("\nwhere a step's time goes (ms per step under the profiler, share of its wall time)")
    ptable = print_table(["bucket", *results], prof_rows)
    write_result("gpt_char_mfu", {"peaks_gflops": peaks, "threads": args.threads, "steps": args.steps,
                                  "loadavg_before_after": [load0, load1], "busy": busy(load0), "table": table,
                                  "profile_table": ptable, "results": results})


if __name__ == "__main__":
    main()
