"""Compression benchmark: one table per trained run, every variant against fp32 eager in the same process.

    python benchmarks/compress.py                      # runs/fashion-mnist-cnn and runs/shakespeare-char-gpt
    python benchmarks/compress.py --threads 1 --prune-epochs 1

Variants: fp32 eager; dynamic int8 (torch.ao, Linear/LSTM); static int8 (torch.ao FX, calibrated; CNN only);
weight-only int8 / int4 (torchao; LM only); 50% structured channel pruning (torch-pruning + exact head pruning,
fine-tuned --prune-epochs on the run's training data); ONNX Runtime fp32 and int8 (onnxruntime.quantization:
static QDQ per-channel for the CNN, dynamic for the LM). Size is the serialized state dict (eager) or the .onnx
file; latency is the median of timed repeats at batch 1 and 32 with --threads intra-op threads for torch and
onnxruntime alike; the metric is test accuracy (CNN) or validation loss/perplexity (LM: Tiny Shakespeare has no
test split). Needs the runs: `lamina train configs/fashion_mnist.yaml` and `lamina train
configs/shakespeare_char_gpt.yaml`. Writes benchmarks/results/compress.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result  # noqa: E402


class OrtModule(torch.nn.Module):
    """An onnxruntime session behind the nn.Module call the measuring code uses (numpy in, torch out)."""

    def __init__(self, path: Path, threads: int):
        super().__init__()
        from lamina.deploy.runtime import OnnxRunner

        self.runner = OnnxRunner(path, threads=threads)

    def forward(self, x):
        return torch.from_numpy(np.asarray(self.runner.run(x.numpy())))


def bench_run(run: str, threads: int, repeats: int, prune_epochs: float, prune_amount: float, tmp: Path) -> dict:
    from lamina.compress import quantize as q
    from lamina.compress.prune import channel_prune
    from lamina.compress.run import (calibration_batches, example_batch, finetune, measure, open_context, with_ratios)
    from lamina.deploy.export import export_onnx, int8_method, quantize_onnx

    ctx = open_context(run)
    lm = ctx.task_name == "language_modeling"
    torch.manual_seed(ctx.cfg.seed)
    model = ctx.model.eval()
    rows, notes = [], {}

    def add(name, m, nbytes=None):
        t0 = time.perf_counter()
        rows.append(measure(name, m, ctx, repeats, nbytes=nbytes))
        print(f"  {name:<22} measured in {time.perf_counter() - t0:.1f}s", flush=True)

    print(f"{run}: {ctx.cfg.model.name}, {sum(p.numel() for p in model.parameters()):,} params", flush=True)
    add("fp32", model)
    add("dynamic int8", q.dynamic_int8(model))
    if not lm:
        add("static int8", q.static_int8(model, calibration_batches(ctx, 512)))
    else:
        add("weight-only int8", q.weight_only(model, 8))
        add("weight-only int4", q.weight_only(model, 4, group_size=32))
    t0 = time.perf_counter()
    pruned = channel_prune(model, example_batch(ctx, 2, "train"), prune_amount)
    if prune_epochs > 0:
        finetune(ctx, pruned, prune_epochs)
    notes["prune_finetune_s"] = time.perf_counter() - t0
    add(f"pruned {prune_amount:.0%} structured", pruned)

    onnx_path = tmp / f"{Path(run).name}.onnx"
    info = export_onnx(model, example_batch(ctx, 2), onnx_path, metadata={"model": ctx.cfg.model.name})
    notes["onnx_exporter"] = info["exporter"]
    add("onnxruntime fp32", OrtModule(onnx_path, threads), nbytes=onnx_path.stat().st_size)
    method = int8_method(model)
    calib = [{info["input_name"]: b.numpy()} for b in calibration_batches(ctx, 512)] if method == "static" else None
    q_path = tmp / f"{Path(run).name}.int8.onnx"
    quantize_onnx(onnx_path, q_path, method, calibration=calib)
    notes["onnx_int8_method"] = method
    add(f"onnxruntime int8 ({method})", OrtModule(q_path, threads), nbytes=q_path.stat().st_size)
    return {"run": run, "model": ctx.cfg.model.name, "task": ctx.task_name, "rows": with_ratios(rows), **notes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", default=["runs/fashion-mnist-cnn", "runs/shakespeare-char-gpt"])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and onnxruntime")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--prune-epochs", type=float, default=1.0, help="fine-tuning after structured pruning")
    ap.add_argument("--prune-amount", type=float, default=0.5)
    ap.add_argument("--name", default="compress", help="results/<name>.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in a.runs:
            if not (Path(run) / "checkpoints").is_dir():
                print(f"skip {run}: no such trained run (train it first, see the docstring)")
                continue
            results.append(bench_run(run, a.threads, a.repeats, a.prune_epochs, a.prune_amount, Path(tmp)))
    for res in results:
        lm = res["task"] == "language_modeling"
        print(f"\n{res['run']} ({res['model']}), ratios vs fp32 eager, {a.threads} thread(s)")
        print_table(["variant", "size MB", "smaller x", "b1 ms", "b1 speedup", "b32 ms", "b32 speedup",
                     "val loss" if lm else "test acc", "ppl" if lm else "delta pts"],
                    [[r["variant"], r["bytes"] / 1e6, r["size_x"], r["latency_b1_ms"], r["speedup_b1"],
                      r["latency_b32_ms"], r["speedup_b32"], r["test_loss"] if lm else r["test_acc"],
                      r["test_ppl"] if lm else r["acc_delta_points"]] for r in res["rows"]])
    write_result(a.name, {"threads": a.threads, "repeats": a.repeats, "prune_epochs": a.prune_epochs,
                          "results": results})


if __name__ == "__main__":
    main()
