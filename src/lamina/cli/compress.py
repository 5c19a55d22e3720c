"""The compression verbs: quantize, prune, distill.

`quantize` and `prune` take a trained run, build the compressed variant, and print it against the fp32 model
measured in the same process (size, batch-1/32 CPU latency, test metric); `distill` trains a student config
with a trained run as its teacher and prints student vs teacher.
"""

from __future__ import annotations

import argparse
import json

from lamina.cli import trust
from lamina.cli.trust import _run


def _need(module: str, what: str) -> None:
    trust._need(module, what, extra="compress")


def _measured(p: argparse.ArgumentParser, progress_help: str) -> None:
    """The arguments quantize and prune share: how to time, and the progress bars (fine-tuning, measuring)."""
    p.add_argument("--repeats", type=int, default=30, help="timed repeats per latency")
    p.add_argument("--no-progress", action="store_true", help=progress_help)


def add_parsers(sub) -> None:
    q = sub.add_parser("quantize", help="int8/int4 variant of a trained run vs fp32: size, latency, test metric")
    _run(q)
    q.add_argument("--method", default="dynamic",
                   help="dynamic (int8 Linear/LSTM) | static (int8 CNN, calibrated) | weight-int8 | weight-int4 "
                        "(LM weights, torchao) | qat (quantization-aware fine-tuning)")
    q.add_argument("--calib", type=int, default=512, help="static: training samples that calibrate activation ranges")
    q.add_argument("--epochs", type=float, default=1.0, help="qat: fine-tuning epochs (fractions allowed)")
    q.add_argument("--group-size", type=int, default=32, help="weight-int4: inputs sharing one scale")
    _measured(q, "no live progress bars (qat fine-tuning; measuring both models)")

    p = sub.add_parser("prune", help="pruned variant of a trained run (fine-tuned) vs fp32")
    _run(p)
    p.add_argument("--method", default="channels",
                   help="channels (structured: removes channels/heads, smaller dense model) | magnitude (global "
                        "unstructured on a cubic sparsity schedule)")
    p.add_argument("--amount", type=float, default=0.5, help="share of channels (channels) or weights (magnitude)")
    p.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs after/while pruning")
    _measured(p, "no live progress bars (fine-tuning; measuring every variant)")

    d = sub.add_parser("distill", help="train a student with a trained run as teacher (Hinton et al. KD)")
    d.add_argument("teacher", metavar="TEACHER_RUN")
    d.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]",
                   help="the student's config and overrides (default: the teacher's config); "
                        "trainer.distill.temperature / alpha tune the loss")
    d.add_argument("--print-config", action="store_true", help="print the resolved student config and exit")
    d.add_argument("--no-progress", action="store_true", help="no live progress bar")
    d.add_argument("--json", action="store_true", help="print the result as JSON")
    d.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(console, result: dict) -> None:
    from rich.table import Table

    rows = result["rows"]
    lm = "test_ppl" in rows[0]
    t = Table(box=None, pad_edge=False)  # narrow: fits an 80-column terminal
    t.add_column("variant", no_wrap=True)
    for h in ("MB", "smaller", "b1 ms", "faster", "b32 ms", "faster", "ppl" if lm else "acc", "delta"):
        t.add_column(h, justify="right", no_wrap=True)
    for r in rows:
        metric = r.get("test_ppl") if lm else r.get("test_acc")
        delta = r.get("loss_delta") if lm else r.get("acc_delta_points")
        t.add_row(r["variant"], _fmt(r["bytes"] / 1e6, ".3f"), _fmt(r.get("size_x"), ".2f") + "x",
                  _fmt(r["latency_b1_ms"], ".2f"), _fmt(r.get("speedup_b1"), ".2f") + "x", _fmt(r["latency_b32_ms"], ".1f"),
                  _fmt(r.get("speedup_b32"), ".2f") + "x", _fmt(metric, ".4f"),
                  (_fmt(delta, "+.4f") + " loss") if lm else (_fmt(delta, "+.2f") + " pts"))
    console.print(t)


def _progress(a, console):
    if getattr(a, "no_progress", False):
        return None
    from lamina.cli.progress import RichProgress

    return RichProgress(console)


def _compressed(a, console, fn, *args, **kw) -> dict:
    """quantize_run / prune_run with the two bars: epochs while fine-tuning (a Trainer callback), then the
    measuring of the variants (progress(done, total): timed forwards and test batches)."""
    from lamina.cli.progress import progress_bar

    with progress_bar(console, "measure", a.no_progress) as bar:  # draws from its first call: after fine-tuning
        return fn(*args, **kw, callbacks=[p] if (p := _progress(a, console)) is not None else [], progress=bar)


def cmd_quantize(a, console) -> int:
    from lamina.compress.quantize import METHODS
    from lamina.compress.run import quantize_run
    from lamina.errors import ConfigError

    if a.method not in METHODS:
        raise ConfigError(f"--method: unknown quantization method '{a.method}'; accepted: {', '.join(METHODS)}")
    if a.method.startswith("weight-"):
        _need("torchao", "weight-only quantization")
    res = _compressed(a, console, quantize_run, a.path, a.method, calib=a.calib, epochs=a.epochs,
                      group_size=a.group_size, which=a.which, repeats=a.repeats)
    return _report(a, console, res, f"saved: {res['saved']}")


def _report(a, console, res: dict, footer: str) -> int:
    if a.json:
        print(json.dumps(res, default=str))
    else:
        _table(console, res)
        console.print(footer)
    return 0


def cmd_prune(a, console) -> int:
    from lamina.compress.run import prune_run
    from lamina.errors import ConfigError

    if a.method not in ("channels", "magnitude"):
        raise ConfigError(f"--method: unknown pruning method '{a.method}'; accepted: channels, magnitude")
    if not 0.0 < a.amount < 1.0:
        raise ConfigError(f"--amount: expected a fraction in (0, 1), got {a.amount}")
    if a.method == "channels":
        _need("torch_pruning", "channel pruning")
    res = _compressed(a, console, prune_run, a.path, a.method, a.amount, a.epochs, which=a.which, repeats=a.repeats)
    return _report(a, console, res, f"weight sparsity {res['weight_sparsity']:.3f}   saved: {res['saved']}")


def cmd_distill(a, console) -> int:
    from pathlib import Path

    from lamina import runs
    from lamina.cli.main import _split_train_args
    from lamina.config import load_config, to_yaml
    from lamina.errors import ConfigError

    teacher = Path(a.teacher)
    if not runs.RunFolder.is_run(teacher):
        raise ConfigError(f"TEACHER_RUN: {teacher} is not a run folder (no checkpoints/) or checkpoint; pass the "
                          "folder `lamina train` printed, e.g. runs/fashion-mnist-cnn")
    path, overrides = _split_train_args(a.args)
    if path is None:
        path = str(teacher / "config.yaml")
    overrides = [f"distill.teacher={teacher}", *overrides]
    cfg = load_config(path, overrides)
    if path == str(teacher / "config.yaml") and not any(o.startswith("name=") for o in overrides):
        cfg = cfg.model_copy(update={"name": f"{cfg.name or teacher.name}-student"})
    if a.print_config:
        print(to_yaml(cfg), end="")
        return 0
    # no measuring step: the student's test pass after training is the epoch bars' own (RichProgress)
    cbs = [p] if (p := _progress(a, console)) is not None and cfg.trainer.progress else []
    res = runs.train(cfg, callbacks=cbs)
    s = res.summary
    tsum = teacher / "summary.json"
    t = json.loads(tsum.read_text()) if tsum.is_file() else {}
    out = {"student_run": str(res.run_dir), "student_params": s["params"], "teacher_params": t.get("params"),
           "student_test": s["test"], "teacher_test": t.get("test"),
           "temperature": cfg.distill.temperature, "alpha": cfg.distill.alpha}
    if a.json:
        print(json.dumps(out))
        return 0
    ratio = f" ({s['params'] / t['params']:.2f}x)" if t.get("params") else ""
    console.print(f"student {s['params']:,} params{ratio}, T={out['temperature']}, alpha={out['alpha']}")
    for k, v in s["test"].items():
        tv = (t.get("test") or {}).get(k)
        console.print(f"  {k:<16} student {v:.4f}" + (f"   teacher {tv:.4f}" if tv is not None else ""))
    console.print(f"run folder: [bold]{res.run_dir}[/]")
    print(res.run_dir)
    return 0


COMMANDS = {"quantize": cmd_quantize, "prune": cmd_prune, "distill": cmd_distill}
