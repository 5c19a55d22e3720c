"""Cost of tracking: the same short training (digits, Trainer.fit with validation every epoch) with no logger, the
CSV files alone (metrics.csv + steps.csv, what every run writes), CSV + TensorBoard, CSV + MLflow (a local sqlite
store) and CSV + both, all in one process. The variants alternate within each repeat (order rotated from repeat to
repeat) so drifts of the machine hit them alike. The table shows the median time per optimizer step of the whole
fit (training, validation, every logger call and flush) over the repeats, its ratio to no logger, and the median
time to construct the loggers (MLflow: a new run in an already open store; opening a new sqlite store, about 3 s
once, and the end-of-run hparams, figures and artifacts are outside fit and not timed here).

    python benchmarks/tracking_overhead.py [--epochs 3] [--repeats 7] [--log-every 20,1] [--model small_cnn]

--log-every takes a list: 20 is the runs' default, 1 logs every step (the worst case for the per-step sinks).

Needs lamina[track] for the MLflow rows (skipped without it). Refuses to start on a busy machine unless
--allow-busy (then every row carries the load average before/after and a busy flag).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from _common import busy, loadavg1, median, print_table, refuse_if_busy, write_result
from lamina.data import InMemoryLoader, load_dataset
from lamina.engine import Trainer
from lamina.engine.loggers import CSVLogger, MLflowStore, TensorBoardLogger
from lamina.models import create_model
from lamina.tasks import ClassificationTask


def make_loggers(kind: str, work: Path, store) -> list:
    out = []
    if kind != "none":
        out.append(CSVLogger(work / "metrics.csv", steps=work / "steps.csv"))
    if "tensorboard" in kind:
        out.append(TensorBoardLogger(work / "tb"))
    if "mlflow" in kind:
        out.append(store.start(work.name, {"benchmark": "tracking_overhead"}, {"lamina.benchmark": "true"}))
    return out


def run_once(kind: str, log_every: int, bundle, args, seed: int, root: Path, store) -> dict:
    work = root / f"{kind}-{log_every}-{seed}"
    work.mkdir(parents=True)
    torch.manual_seed(seed)
    model = create_model(args.model, num_classes=10, in_chans=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = InMemoryLoader(bundle.train, args.batch_size, shuffle=True, seed=seed)
    val = InMemoryLoader(bundle.val, 1024)
    t0 = time.perf_counter()
    loggers = make_loggers(kind, work, store)
    setup = time.perf_counter() - t0
    trainer = Trainer(max_epochs=args.epochs, device="cpu", log_every=log_every, loggers=loggers)
    t0 = time.perf_counter()
    trainer.fit(model, ClassificationTask(10), train, val, optimizer=opt)
    fit = time.perf_counter() - t0
    for lg in loggers:
        if hasattr(lg, "finish"):
            lg.finish()
    shutil.rmtree(work, ignore_errors=True)
    return {"setup_s": setup, "fit_s": fit, "steps": trainer.global_step, "ms_per_step": 1e3 * fit / trainer.global_step}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--log-every", default="20,1", help="trainer.log_every values, comma-separated (runs: 20)")
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--allow-busy", action="store_true", help="run on a loaded machine; rows are flagged busy")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    load0, _ = refuse_if_busy(args.allow_busy)
    every = [int(x) for x in str(args.log_every).split(",")]

    bundle = load_dataset("digits", seed=0)
    root = Path(tempfile.mkdtemp(prefix="lamina-tracking-"))
    kinds = ["none", "csv", "csv+tensorboard"]
    store = None
    try:
        store = MLflowStore(f"sqlite:///{root / 'mlflow.db'}", "tracking_overhead",
                            artifact_location=(root / "mlartifacts").as_uri())
        kinds += ["csv+mlflow", "csv+tensorboard+mlflow"]
    except ImportError as e:  # MissingDependencyError
        print(f"{e}: skipping the MLflow rows")
    try:
        for k in kinds:  # warm-up: lazy imports (tensorboard, mlflow), first-call allocations
            run_once(k, every[0], bundle, argparse.Namespace(**{**vars(args), "epochs": 1}), 100, root, store)
        runs = []
        combos = [(k, e) for e in every for k in kinds]
        for r in range(args.repeats):
            order = combos[r % len(combos):] + combos[:r % len(combos)]
            for k, e in order:
                before = loadavg1()
                out = run_once(k, e, bundle, args, r, root, store)
                out.update({"logger": k, "log_every": e, "repeat": r, "load_before": before,
                            "load_after": loadavg1(), "busy": busy(before)})
                runs.append(out)
                print(f"{k:24s} log_every {e:3d} repeat {r}: {out['ms_per_step']:.3f} ms/step, setup "
                      f"{out['setup_s'] * 1e3:.1f} ms (load {before:.2f} -> {out['load_after']:.2f})", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def pick(k, e, key):
        return median([x[key] for x in runs if x["logger"] == k and x["log_every"] == e])

    med = {f"{k} @{e}": pick(k, e, "ms_per_step") for k, e in combos}
    ratio = {f"{k} @{e}": pick(k, e, "ms_per_step") / pick("none", e, "ms_per_step") for k, e in combos}
    fastest = {f"{k} @{e}": min(x["ms_per_step"] for x in runs if x["logger"] == k and x["log_every"] == e)
               for k, e in combos}  # what another job's burst cannot inflate
    rows = [[k, e, med[f"{k} @{e}"], ratio[f"{k} @{e}"], fastest[f"{k} @{e}"],
             fastest[f"{k} @{e}"] / fastest[f"none @{e}"], pick(k, e, "setup_s") * 1e3,
             sum(x["busy"] for x in runs if x["logger"] == k and x["log_every"] == e)] for k, e in combos]
    steps = runs[0]["steps"]
    print(f"\n{args.model} on digits ({len(bundle.train)} train), batch {args.batch_size}, {args.epochs} epochs = "
          f"{steps} steps, validation every epoch; median of {args.repeats}; "
          f"load {load0:.2f} at the start, {loadavg1():.2f} at the end")
    table = print_table(["loggers", "log_every", "median ms/step", "x no logger", "min ms/step", "x (min)",
                         "setup ms", "busy runs"], rows)
    write_result("tracking_overhead", {
        "config": vars(args), "steps": steps, "load_start": load0, "load_end": loadavg1(),
        "busy": any(x["busy"] for x in runs), "table": table,
        "median_ms_per_step": med, "ratio_vs_none": ratio, "min_ms_per_step": fastest, "runs": runs})


if __name__ == "__main__":
    main()
