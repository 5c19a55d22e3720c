"""Time to a quality target, side by side in one process: lamina's defaults (a shipped config, run as `lamina train`
runs it, so with the perf preset) against the plain hand-written PyTorch loop of the same model, data and
hyperparameters (and PyTorch Lightning for the digits CNN).

Workloads (target; lamina config):
* digits  - small_cnn on the 8x8 digits, test accuracy >= 98.5% (the default job: RunConfig defaults)
* fashion - cnn_medium on Fashion-MNIST, test accuracy >= 93.7% (configs/fashion_mnist.yaml)
* gpt     - char GPT 4x4x128 on Tiny Shakespeare, val loss <= 1.88 (configs/shakespeare_char_gpt.yaml)

What is the same on both sides: the model (built by lamina's factory from the config, same seed, same initial
weights), the data tensors and batch size, the augmentation (hflip), the loss (label smoothing 0.1 for the
classifiers), the optimizer and its hyperparameters (AdamW, decay on 2-D weights only), the schedule (one-cycle, or
warmup + cosine for the GPT), gradient clipping, and the evaluation (the test set after each epoch for the
classifiers; for the GPT lamina's own exact val loss every 250 iterations, the same windows for the hand loop).
What differs is what lamina applies by default and a hand loop typically does not: bf16 autocast (on CPUs with
native bf16), channels_last, fused AdamW, batched in-memory data, and whatever its Trainer costs per step.
The hand loop is written the way a competent user writes one: in-memory tensors indexed by a permutation per epoch
(no per-sample DataLoader), fp32, torch's default AdamW.

Time to target is the training time summed over epochs until the first evaluation that meets the target
(evaluation itself is not counted on either side; a compile, where the preset compiles, is counted, cold: every
lamina run starts with an empty inductor cache); lamina's wall time to target (from the `lamina.train` call,
data loading and set-up included, our extra evaluations excluded) is reported too. Each side stops at its target.
The 1-min load average also counts this benchmark's own previous run for a minute, so each run is flagged busy by
what other processes used in the second before it started (more than half a core), recorded beside the load.
Repeats alternate which side runs first, and go on past --repeats (up to --max-repeats) while any runner's times
spread by more than --spread of their median; the table shows medians and the ratio lamina / hand loop. The 1-min load
average is recorded before and after every run, and the script refuses to start when it is above the core count or
other jobs are using the CPU (unless --allow-busy).

    python benchmarks/time_to_target.py {digits,fashion,gpt} [--repeats 3] [--threads N] [--allow-busy]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import ROOT, cli_step, loadavg1, other_cpu_cores, print_table, refuse_if_busy, write_result
import lamina
from lamina.data import InMemoryLoader, load_dataset
from lamina.data.windows import RandomWindowLoader, SequentialWindowLoader
from lamina.engine.callbacks import Callback
from lamina.models import create_model

SHARED = ROOT.parent / "shared" / "data"
BUSY_CORES = 0.5  # a run is flagged busy when other jobs used more than half a core in the second before it
WORKLOADS = {
    "digits": {"config": None, "target": 0.985, "metric": "test/acc", "mode": "max", "epochs": 20},
    "fashion": {"config": ROOT / "configs" / "fashion_mnist.yaml", "target": 0.937, "metric": "test/acc",
                "mode": "max"},
    "gpt": {"config": ROOT / "configs" / "shakespeare_char_gpt.yaml", "target": 1.88, "metric": "val/loss",
            "mode": "min"},
}


def met(w, value) -> bool:
    return value >= w["target"] if w["mode"] == "max" else value <= w["target"]


def run_config(name: str, threads: int, extra: list[str] = ()):
    w = WORKLOADS[name]
    args = [f"trainer.threads={threads}", "trainer.progress=false", "logging.tensorboard=false", "cost.energy=false",
            "cost.flops=false", "logging.plots=false", *extra]
    if name == "gpt":
        args.append(f"data.path={SHARED / 'tinyshakespeare' / 'input.txt'}")
    return lamina.load_config(str(w["config"]) if w["config"] else None, args)


# ----------------------------------------------------------------------------------------------- lamina
class _Target(Callback):
    """After each epoch: the target metric (test accuracy by lamina's own evaluate, untimed, or the run's val
    loss), the training time so far, and the wall time minus our own evaluations; stops the run at the target."""

    def __init__(self, w, test_loader, t0):
        self.w, self.test_loader, self.t0, self.extra, self.curve = w, test_loader, t0, 0.0, []

    def on_epoch_end(self, trainer, row):
        t = time.perf_counter()
        if self.w["metric"] == "test/acc":
            value = trainer.evaluate(trainer.model, trainer.task, self.test_loader, prefix="test")["test/acc"]
        else:
            value = row[self.w["metric"]]
        self.extra += time.perf_counter() - t
        self.curve.append({"epoch": trainer.epoch, "step": trainer.global_step, "train_s": trainer.train_time,
                           "wall_s": time.perf_counter() - self.t0 - self.extra, "value": value})
        if met(self.w, value):
            trainer.should_stop = True


def cold_compile_cache(tmp: Path) -> None:
    """A fresh inductor cache and no dynamo state: a run that compiles pays the full (cold) compile, as a user's
    first run does."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / f"inductor-{time.time_ns()}")
    torch._dynamo.reset()


def run_lamina(name, bundle, threads, seed, tmp: Path, extra=()):
    w = WORKLOADS[name]
    cold_compile_cache(tmp)
    cfg = run_config(name, threads, [f"seed={seed}", f"logging.root={tmp}", f"name={name}-lamina-{seed}", *extra])
    test = InMemoryLoader(bundle.test, 1000, shuffle=False) if w["metric"] == "test/acc" else None
    t0 = time.perf_counter()
    cb = _Target(w, test, t0)
    res = lamina.train(cfg, callbacks=[cb])
    return {"curve": cb.curve, "perf": res.summary.get("perf"), "precision": res.summary["precision"]}


# ----------------------------------------------------------------------------------------------- hand loops
def _groups(model, wd):
    ps = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in ps if p.ndim > 1], "weight_decay": wd},
            {"params": [p for p in ps if p.ndim <= 1], "weight_decay": 0.0}]


def _model(cfg, bundle):
    torch.manual_seed(cfg.seed)  # lamina seeds the same way before building the model
    opts = dict(cfg.model.options)
    if bundle.meta.get("vocab_size"):
        return create_model(cfg.model.name, vocab_size=bundle.meta["vocab_size"], block_size=bundle.meta["block_size"],
                            **opts)
    return create_model(cfg.model.name, num_classes=10, in_chans=bundle.train.x.shape[1], **opts)


@torch.no_grad()
def _accuracy(model, data) -> float:
    model.eval()
    correct = sum(int((model(data.x[i:i + 1000]).argmax(1) == data.y[i:i + 1000]).sum())
                  for i in range(0, len(data), 1000))
    model.train()
    return correct / len(data)


def run_hand_classifier(name, bundle, threads, seed, tmp=None):
    """The loop a user writes for the config: AdamW + one-cycle + label smoothing (+ hflip), fp32, NCHW."""
    w = WORKLOADS[name]
    cfg = run_config(name, threads, [f"seed={seed}"])
    torch.set_num_threads(threads)
    model = _model(cfg, bundle)
    o, bs = cfg.optimizer, cfg.data.batch_size
    opt = torch.optim.AdamW(_groups(model, o.weight_decay), lr=o.lr, betas=o.betas)
    x, y, n = bundle.train.x, bundle.train.y, len(bundle.train)
    steps_per_epoch = -(-n // bs)
    epochs = cfg.trainer.max_epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=o.lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=cfg.schedule.pct_start)
    flip = any(a.get("name") == "hflip" for a in cfg.data.augment)
    g = torch.Generator().manual_seed(seed)
    curve, train_s = [], 0.0
    for epoch in range(epochs):
        t = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            xb, yb = x[idx], y[idx]
            if flip:
                xb = torch.where((torch.rand(len(idx), generator=g) < 0.5)[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=cfg.task.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        train_s += time.perf_counter() - t
        acc = _accuracy(model, bundle.test)
        curve.append({"epoch": epoch + 1, "train_s": train_s, "value": acc})
        if met(w, acc):
            break
    return {"curve": curve}


def run_hand_gpt(name, bundle, threads, seed, tmp=None):
    """nanoGPT's train.py loop on lamina's GPT: AdamW (decay on 2-D tensors), warmup + cosine to min_lr, clip
    1.0, fp32; the same random windows as lamina (RandomWindowLoader, same seed) and its exact val loss."""
    w = WORKLOADS[name]
    cfg = run_config(name, threads, [f"seed={seed}"])
    torch.set_num_threads(threads)
    model = _model(cfg, bundle)
    o, s = cfg.optimizer, cfg.schedule
    opt = torch.optim.AdamW(_groups(model, o.weight_decay), lr=o.lr, betas=o.betas)
    max_steps, every = cfg.trainer.max_steps, cfg.data.steps_per_epoch
    block, V = bundle.meta["block_size"], bundle.meta["vocab_size"]

    def lr_at(it):  # nanoGPT's get_lr
        if it < s.warmup_steps:
            return o.lr * (it + 1) / s.warmup_steps
        ratio = (it - s.warmup_steps) / (max_steps - s.warmup_steps)
        return s.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (o.lr - s.min_lr)

    @torch.no_grad()
    def val_loss():
        model.eval()
        tot, cnt = 0.0, 0
        for b in SequentialWindowLoader(bundle.val.tensors["ids"], block, cfg.data.eval_batch_size):
            logits = model(b["x"])
            tot += float(F.cross_entropy(logits.reshape(-1, V), b["y"].reshape(-1), reduction="sum"))
            cnt += b["y"].numel()
        model.train()
        return tot / cnt

    batches = RandomWindowLoader(bundle.train.tensors["ids"], block, cfg.data.batch_size, every, seed=seed)
    curve, train_s, it = [], 0.0, 0
    while it < max_steps:
        t = time.perf_counter()
        for b in batches:
            for group in opt.param_groups:
                group["lr"] = lr_at(it)
            logits = model(b["x"])
            loss = F.cross_entropy(logits.reshape(-1, V), b["y"].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            it += 1
        train_s += time.perf_counter() - t
        v = val_loss()
        curve.append({"epoch": it // every, "step": it, "train_s": train_s, "value": v})
        if met(w, v):
            break
    return {"curve": curve}


def run_lightning_digits(name, bundle, threads, seed, tmp=None):
    """The same hand loop as a LightningModule (same model, AdamW, one-cycle, label smoothing), fp32."""
    import lightning.pytorch as pl

    w = WORKLOADS[name]
    cfg = run_config(name, threads, [f"seed={seed}"])
    torch.set_num_threads(threads)
    o, bs = cfg.optimizer, cfg.data.batch_size
    total = cfg.trainer.max_epochs * -(-len(bundle.train) // bs)

    class Lit(pl.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, i):
            return F.cross_entropy(self.model(batch["x"]), batch["y"], label_smoothing=cfg.task.label_smoothing)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(_groups(self.model, o.weight_decay), lr=o.lr, betas=o.betas)
            sch = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=o.lr, total_steps=total,
                                                      pct_start=cfg.schedule.pct_start)
            return [opt], [{"scheduler": sch, "interval": "step"}]

    class Stop(pl.Callback):
        def __init__(self):
            self.curve, self.train_s, self.t = [], 0.0, 0.0

        def on_train_epoch_start(self, trainer, module):
            self.t = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            self.train_s += time.perf_counter() - self.t
            acc = _accuracy(module.model, bundle.test)
            self.curve.append({"epoch": trainer.current_epoch + 1, "train_s": self.train_s, "value": acc})
            if met(w, acc):
                trainer.should_stop = True

    stop = Stop()
    lit = Lit(_model(cfg, bundle))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer = pl.Trainer(max_epochs=cfg.trainer.max_epochs, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, callbacks=[stop])
        trainer.fit(lit, train_dataloaders=InMemoryLoader(bundle.train, bs, shuffle=True, seed=seed))
    return {"curve": stop.curve}


# ----------------------------------------------------------------------------------------------- main
def reached(w, curve):
    hit = next((c for c in curve if met(w, c["value"])), None)
    return hit


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-repeats", type=int, default=5, help="repeat past --repeats while the spread is large")
    ap.add_argument("--spread", type=float, default=0.10,
                    help="stop repeating once (max - min) / median of every runner's time to target is below this")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--allow-busy", action="store_true", help="run even if the load average is above the core count")
    ap.add_argument("--work", default="/tmp/lamina_time_to_target")
    ap.add_argument("--no-cli", action="store_true", help="gpt: skip the whole-command `lamina train` timing")
    ap.add_argument("--cli-repeats", type=int, default=3, help="gpt: how many whole-command runs (median)")
    ap.add_argument("--cli-only", action="store_true",
                    help="gpt: only the whole-command runs (written to time_to_target_gpt_cli.json)")
    args = ap.parse_args()
    name, w = args.workload, WORKLOADS[args.workload]
    load0, _ = refuse_if_busy(args.allow_busy, others_limit=BUSY_CORES)
    torch.set_num_threads(args.threads)
    if name == "gpt":
        bundle = load_dataset("tiny_shakespeare", block_size=64, path=SHARED / "tinyshakespeare" / "input.txt")
    else:
        bundle = load_dataset("digits" if name == "digits" else "fashion_mnist", seed=0)
    runners = {"lamina defaults": run_lamina,
               "hand-written loop": run_hand_gpt if name == "gpt" else run_hand_classifier}
    if name == "digits":
        try:
            import lightning  # noqa: F401

            runners["PyTorch Lightning"] = run_lightning_digits
        except ImportError:
            print("lightning not installed (pip install 'lamina[bench]'): no Lightning row")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = []

    def spread_ok() -> bool:
        for rn in runners:
            xs = [x["train_s_to_target"] for x in runs if x["runner"] == rn and x["train_s_to_target"]]
            if len(xs) >= 2 and (max(xs) - min(xs)) / statistics.median(xs) > args.spread:
                return False
        return True

    if args.cli_only:
        if name != "gpt":
            ap.error("--cli-only is for the gpt workload")
        args.repeats = 0
    r = 0
    while r < args.repeats or (r < args.max_repeats and not spread_ok()):
        order = list(runners) if r % 2 == 0 else list(runners)[::-1]
        for rn in order:
            before, others = loadavg1(), other_cpu_cores()
            t0 = time.perf_counter()
            out = runners[rn](name, bundle, args.threads, r, work)
            hit = reached(w, out["curve"])
            row = {"runner": rn, "repeat": r, "load_before": before, "load_after": loadavg1(),
                   "other_cores_before": others, "busy": others > BUSY_CORES,
                   "run_s": time.perf_counter() - t0, "reached": hit is not None,
                   "train_s_to_target": hit["train_s"] if hit else None,
                   "wall_s_to_target": hit.get("wall_s") if hit else None,
                   "epochs_to_target": hit["epoch"] if hit else None, "final": out["curve"][-1]["value"], **out}
            runs.append(row)
            print(f"repeat {r} {rn}: target {'reached' if hit else 'NOT reached'} "
                  f"{'' if not hit else 'after %.1f s training (epoch %d)' % (hit['train_s'], hit['epoch'])}; "
                  f"last {w['metric']} {row['final']:.4f}; load {before:.2f} -> {row['load_after']:.2f}"
                  f"{' BUSY' if row['busy'] else ''}", flush=True)
        r += 1
    args.repeats = r

    cli = None
    if name == "gpt" and not args.no_cli:  # the whole command a user types, process start to exit, stopping at target
        steps, tries = [], []
        for i in range(args.cli_repeats):
            run_root = work / f"cli{i}"
            cold_compile_cache(work)
            cli_step("lamina train (whole command)", ["train", str(w["config"]), "--no-progress",
                                                      f"trainer.early_stopping.stop_at={w['target']}",
                                                      f"trainer.threads={args.threads}", f"logging.root={run_root}",
                                                      "name=gpt-cli",
                                                      f"data.path={SHARED / 'tinyshakespeare' / 'input.txt'}"],
                     work / "cli.log", steps)
            summ = json.loads(sorted(run_root.glob("gpt-cli*/summary.json"))[-1].read_text())
            tries.append({**steps[-1], "stop_at": summ.get("stop_at"), "steps": summ["steps"],
                          "final_val_loss": summ["final"].get("val/loss"), "perf": summ.get("perf")})
            t = tries[-1]
            print(f"lamina train CLI {i}: {t['wall_s']:.1f} s wall (whole command), stopped at step {t['steps']} "
                  f"with val loss {t['final_val_loss']:.4f}; load {t['load_before']:.2f} -> {t['load_after']:.2f}"
                  f"{' BUSY' if t['busy'] else ''}", flush=True)
        walls = [t["wall_s"] for t in tries]
        cli = {"median_wall_s": statistics.median(walls), "wall_s": walls, "runs": tries}
        print(f"lamina train CLI: median {cli['median_wall_s']:.1f} s wall over {len(walls)} runs "
              f"({min(walls):.1f}-{max(walls):.1f})")

    def med(rn, key):
        xs = [x[key] for x in runs if x["runner"] == rn and x[key] is not None]
        return statistics.median(xs) if xs else None

    base = med("hand-written loop", "train_s_to_target")
    rows, summary = [], {}
    for rn in runners:
        t = med(rn, "train_s_to_target")
        summary[rn] = {"median_train_s_to_target": t, "median_wall_s_to_target": med(rn, "wall_s_to_target"),
                       "median_epochs_to_target": med(rn, "epochs_to_target"),
                       "reached": sum(x["reached"] for x in runs if x["runner"] == rn),
                       "ratio_vs_hand": t / base if t and base else None}
        rows.append([rn, t if t else "-", summary[rn]["median_wall_s_to_target"] or "-",
                     summary[rn]["median_epochs_to_target"] or "-", f"{summary[rn]['reached']}/{args.repeats}",
                     summary[rn]["ratio_vs_hand"] or "-"])
    perf = next((x["perf"] for x in runs if x.get("perf")), None)
    load1 = loadavg1()
    print(f"\n{name}: time to {w['metric']} {'>=' if w['mode'] == 'max' else '<='} {w['target']}, "
          f"{'whole command only' if args.cli_only else 'median of %d' % args.repeats}, {args.threads} threads; load avg {load0:.2f} -> {load1:.2f}"
          f"{' (BUSY runs: ' + str(sum(x['busy'] for x in runs)) + ')' if any(x['busy'] for x in runs) else ''}")
    if perf:
        print("lamina perf preset: " + "; ".join(perf["applied"]) + (" | skipped: " + "; ".join(perf["skipped"])
                                                                       if perf["skipped"] else ""))
    table = None if args.cli_only else print_table(["runner", "train s to target", "wall s to target", "epochs",
                                                     "reached", "x hand loop"], rows)
    write_result(f"time_to_target_{name}" + ("_cli" if args.cli_only else ""), {
        "workload": name, "target": {k: w[k] for k in ("metric", "target", "mode")}, "threads": args.threads,
        "repeats": args.repeats, "loadavg_before_after": [load0, load1], "busy_runs": sum(x["busy"] for x in runs),
        "perf": perf, "table": table, "summary": summary, "cli_whole_command": cli, "runs": runs})


if __name__ == "__main__":
    sys.exit(main())
