"""Data-parallel scaling: training samples/s of 1 process vs 2 processes (DDP, FSDP) on the same global batch.

Every row is a real `lamina train` run (the CLI, launched by torchrun for the multi-process rows), so the
numbers include everything a user pays: DDP's gradient all-reduce (gloo on CPU), the per-batch split of the
global batch, the epoch-end reductions. Throughput is the median over epochs 2..N of the epoch's training
samples/s (`train/samples_per_s` in metrics.csv; evaluation is not timed, the first epoch is warm-up).

Rows per workload, all with the same global batch (data.batch_size), so the same number of optimizer steps:
* 1 process, 1 thread   the baseline
* 1 process, 2 threads  what one process gets from the second core (intra-op parallelism)
* DDP 2 x 1 thread      two processes on the two cores, each half of every batch, gradients all-reduced
* FSDP 2 x 1 thread     (GPT only) parameters, gradients and optimizer state sharded over the 2 processes

What the CPU numbers mean: this machine has 2 cores, so 2 processes can at best double the work per second,
and gloo's all-reduce goes through loopback TCP and shares those same cores with the compute (no separate
communication engine). Small models (digits CNN) are dominated by per-step overheads and the all-reduce;
bigger per-step compute (the GPT) amortizes them. On GPUs the picture differs in kind: each process owns a
GPU, NCCL all-reduces over NVLink/InfiniBand while the backward pass is still running (DDP buckets overlap
communication with compute), and near-linear scaling is the usual result for models whose step takes more
than a few milliseconds. FSDP trades extra all-gathers for memory: it pays off when the model (or its
optimizer state) does not fit one device, which is not the case for these small models.

    python benchmarks/ddp_scaling.py [--workloads digits gpt fashion] [--epochs 6]

Writes benchmarks/results/ddp_scaling.json.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import machine, print_table, write_result

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LAMINA_SHARED_DATA", ROOT.parent / "shared" / "data"))

WORKLOADS = {
    # name: (description, overrides)
    "digits": ("digits small_cnn, batch 64", ["data.name=digits", "model.name=small_cnn", "data.batch_size=64"]),
    "fashion": ("Fashion-MNIST small_cnn, batch 128", ["data.name=fashion_mnist", "model.name=small_cnn",
                                                        "data.batch_size=128", "data.steps_per_epoch=60"]),
    "gpt": ("char GPT 4x4x128 (0.8M), batch 32 x 64 tokens",
            [str(ROOT / "configs" / "shakespeare_char_gpt.yaml"), "data.batch_size=32", "data.steps_per_epoch=40",
             "trainer.max_steps=100000"]),
}


def run(workload: list[str], nproc: int, threads: int, epochs: int, strategy: str, work: Path, name: str) -> dict:
    args = [*workload, f"trainer.max_epochs={epochs}", f"trainer.val_every={epochs}", f"name={name}",
            "logging.tensorboard=false", "logging.plots=false", f"trainer.threads={threads}"]
    env = {**os.environ, "LAMINA_SHARED_DATA": str(SHARED), "OMP_NUM_THREADS": str(threads)}
    if nproc == 1:
        cmd = [sys.executable, "-m", "lamina.cli.main", "train", *args, "--no-progress"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
               "lamina.cli.main", "train", *args, f"trainer.strategy={strategy}", "--no-progress"]
    p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{name} failed:\n{(p.stdout + p.stderr)[-3000:]}")
    with open(work / "runs" / name / "metrics.csv") as f:
        sps = [float(r["train/samples_per_s"]) for r in csv.DictReader(f)]
    return {"samples_per_s": statistics.median(sps[1:]) if len(sps) > 1 else sps[0], "epochs": sps}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["digits", "gpt", "fashion"], choices=list(WORKLOADS))
    ap.add_argument("--epochs", type=int, default=6)
    a = ap.parse_args(argv)
    if "fashion" in a.workloads and not Path("/usr/share/datasets/fashion-mnist").exists():
        print("note: Fashion-MNIST is not installed (apt install dataset-fashion-mnist); skipping it")
        a.workloads = [w for w in a.workloads if w != "fashion"]
    work = Path(tempfile.mkdtemp(prefix="lamina-ddp-bench-"))
    load0 = os.getloadavg()[0]
    rows, results = [], []
    for wl in a.workloads:
        desc, over = WORKLOADS[wl]
        setups = [("1 process, 1 thread", 1, 1, "none"), ("1 process, 2 threads", 1, 2, "none"),
                  ("DDP 2 x 1 thread", 2, 1, "ddp")]
        if wl == "gpt":
            setups.append(("FSDP 2 x 1 thread", 2, 1, "fsdp"))
        base = None
        for label, nproc, threads, strategy in setups:
            r = run(over, nproc, threads, a.epochs, strategy, work, f"{wl}-{nproc}-{threads}-{strategy}")
            base = base or r["samples_per_s"]
            ratio = r["samples_per_s"] / base
            results.append({"workload": wl, "description": desc, "setup": label, "processes": nproc,
                            "threads_per_process": threads, "strategy": strategy, **r, "speedup_vs_1x1": ratio})
            rows.append([desc if label.startswith("1 process, 1") else "", label, f"{r['samples_per_s']:.0f}",
                         f"{ratio:.2f}x"])
            print(f"  {wl:<8} {label:<22} {r['samples_per_s']:>9.0f} samples/s  {ratio:.2f}x", flush=True)
    load1 = os.getloadavg()[0]
    print()
    print_table(["workload", "setup", "samples/s", "vs 1 process 1 thread"], rows)
    print(f"\nload average {load0:.2f} -> {load1:.2f} on {os.cpu_count()} cores")
    write_result("ddp_scaling", {"machine": machine(), "epochs": a.epochs, "load_average": [load0, load1],
                                 "results": results})


if __name__ == "__main__":
    main()
