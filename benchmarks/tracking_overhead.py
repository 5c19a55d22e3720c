"""Cost of tracking: the same short training (digits, Trainer.fit with validation every epoch) with no logger, the
CSV files alone (metrics.csv + steps.csv, what every run writes), CSV + TensorBoard, CSV + MLflow (a local sqlite
store) and CSV + both, all in one process. The variants alternate within each repeat (order rotated from repeat to
repeat) so drifts of the machine hit them alike. The table shows the median time per optimizer step of the whole
fit (training, validation, every logger call and flush) over the repeats, its ratio to no logger, and the median
time to construct the loggers (MLflow: a new run in an already open store; opening a new sqlite store, about 3 s
once, and the end-of-run hparams, figures and artifacts are outside fit and not timed here).

    python benchmarks/tracking_overhead.py [--epochs 3] [--repeats 7] [--log-every 20] [--model small_cnn]

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


def run_once(kind: str, bundle, args, seed: int, root: Path, store) -> dict:
    work = root / f"{kind}-{seed}"
    work.mkdir(parents=True)
    torch.manual_seed(seed)
    model = create_model(args.model, num_classes=10, in_chans=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = InMemoryLoader(bundle.train, args.batch_size, shuffle=True, seed=seed)
    val = InMemoryLoader(bundle.val, 1024)
    t0 = time.perf_counter()
    loggers = make_loggers(kind, work, store)
    setup = time.perf_counter() - t0
    trainer = Trainer(max_epochs=args.epochs, device="cpu", log_every=args.log_every, loggers=loggers)
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
    ap.add_argument("--log-every", type=int, default=20, help="trainer.log_every (runs default: 20)")
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--allow-busy", action="store_true", help="run on a loaded machine; rows are flagged busy")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    load0, _ = refuse_if_busy(args.allow_busy)

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
            run_once(k, bundle, argparse.Namespace(**{**vars(args), "epochs": 1}), 100, root, store)
        runs = []
        for r in range(args.repeats):
            order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
            for k in order:
                before = loadavg1()
                out = run_once(k, bundle, args, r, root, store)
                out.update({"logger": k, "repeat": r, "load_before": before, "load_after": loadavg1(),
                            "busy": busy(before)})
                runs.append(out)
                print(f"{k:24s} repeat {r}: {out['ms_per_step']:.3f} ms/step, setup {out['setup_s'] * 1e3:.1f} ms "
                      f"(load {before:.2f} -> {out['load_after']:.2f})", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    med = {k: median([x["ms_per_step"] for x in runs if x["logger"] == k]) for k in kinds}
    setup = {k: median([x["setup_s"] for x in runs if x["logger"] == k]) for k in kinds}
    steps = runs[0]["steps"]
    rows = [[k, med[k], med[k] / med["none"], setup[k] * 1e3,
             sum(x["busy"] for x in runs if x["logger"] == k)] for k in kinds]
    print(f"\n{args.model} on digits ({len(bundle.train)} train), batch {args.batch_size}, {args.epochs} epochs = "
          f"{steps} steps, log_every {args.log_every}, validation every epoch; median of {args.repeats}; "
          f"load {load0:.2f} at the start, {loadavg1():.2f} at the end")
    table = print_table(["loggers", "ms/step", "x no logger", "setup ms", "busy runs"], rows)
    write_result("tracking_overhead", {
        "config": vars(args), "steps": steps, "load_start": load0, "load_end": loadavg1(),
        "busy": any(x["busy"] for x in runs), "table": table,
        "median_ms_per_step": med, "ratio_vs_none": {k: med[k] / med["none"] for k in kinds},
        "median_setup_s": setup, "runs": runs})


if __name__ == "__main__":
    main()
