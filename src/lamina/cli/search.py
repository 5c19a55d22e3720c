"""The search verbs: tune (hyperparameters), nas (architectures), lr-find (learning-rate range test).

Each parses, checks that optuna is installed (one line naming the extra), calls one library function, prints
a line per trial and a short table; everything also lands in the study folder (study.json, best.yaml, PNGs,
study.html).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]", help="a YAML config and/or overrides")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def _study_args(p: argparse.ArgumentParser, default_trials: int) -> None:
    p.add_argument("--trials", type=int, default=default_trials, help="trials in total (a resumed study counts "
                                                                      "the ones it already has)")
    p.add_argument("--jobs", default="1", help="worker processes (one per core: 'auto'); torch threads are split "
                                               "between them")
    p.add_argument("--out", help="study folder (default: <logging.root>/<name>-<verb>); the same command resumes it")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///<out>/study.db)")
    p.add_argument("--sampler", default="tpe", help="tpe | random (nas: nsga2 | tpe | random)")
    p.add_argument("--json", action="store_true", help="print the study summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar over the trials")


def add_parsers(sub) -> None:
    t = sub.add_parser("tune", help="hyperparameter search (Optuna): --space SPACE.yaml over any dotted config key; "
                                    "writes best.yaml that `lamina train` runs")
    _config_args(t)
    t.add_argument("--space", required=True, help="YAML: dotted key -> {type: log|uniform|int|categorical, ...}")
    _study_args(t, 20)
    t.add_argument("--metric", help="per-epoch metric to optimise (default: trainer.monitor)")
    t.add_argument("--direction", help="maximize | minimize (default: from trainer.monitor_mode)")
    t.add_argument("--pruner", default="median", help="median | hyperband | none")
    t.add_argument("--seeds", help="after the search, train best.yaml with these seeds (e.g. 0,1,2): mean +- std")

    n = sub.add_parser("nas", help="architecture search: validation metric vs parameters vs batch-1 CPU latency "
                                   "(multi-objective Optuna); Pareto front plot and the front's configs as YAML")
    _config_args(n)
    n.add_argument("--space", required=True, help="YAML over model.* keys, list indices allowed: model.channels[1]")
    _study_args(n, 24)
    n.set_defaults(sampler="nsga2")
    n.add_argument("--metric", help="per-epoch metric (default: trainer.monitor)")
    n.add_argument("--direction", help="maximize | minimize (default: from trainer.monitor_mode)")
    n.add_argument("--no-base", action="store_true", help="do not evaluate the config's own architecture as trial 0")
    n.add_argument("--latency-repeats", type=int, default=50, help="timed batch-1 forwards per candidate")

    lr = sub.add_parser("lr-find", help="learning-rate range test: loss vs exponentially growing lr, a suggested "
                                        "lr and a plot (before a search)")
    _config_args(lr)
    lr.add_argument("--start", type=float, default=1e-7, help="first lr")
    lr.add_argument("--end", type=float, default=10.0, help="last lr")
    lr.add_argument("--steps", type=int, default=100, help="optimizer steps")
    lr.add_argument("--out", help="folder for lr_find.json / lr_find.png (default: <logging.root>/<name>-lr-find)")
    lr.add_argument("--json", action="store_true")


def _load(a):
    from lamina.cli.main import _split_train_args
    from lamina.config import load_config

    path, overrides = _split_train_args(a.args)
    return load_config(path, overrides)


def _out(a, cfg, verb: str) -> Path:
    return Path(a.out) if a.out else Path(cfg.logging.root) / f"{cfg.name or cfg.data.name + '-' + cfg.model.name}-{verb}"


def parse_seeds(text: str | None) -> list[int] | None:
    from lamina.errors import ConfigError

    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or any(not 0 <= s < 2**63 for s in seeds):
        raise ConfigError(f"--seeds: expected distinct integers in 0..2**63-1 such as 0,1,2, got {text!r}")
    if len(seeds) > 100:
        raise ConfigError(f"--seeds: at most 100 seeds, got {len(seeds)}")
    return seeds


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else str(v)


def cmd_tune(a, console) -> int:
    from lamina.config import read_yaml
    from lamina.search.space import SearchSpace
    from lamina.search.study import need_optuna
    from lamina.search.tune import TuneSettings, tune

    need_optuna()
    seeds = parse_seeds(a.seeds)
    cfg = _load(a)
    space_raw = read_yaml(a.space)
    space = SearchSpace.from_dict(space_raw, where=f"search space {Path(a.space).name}")
    out = _out(a, cfg, "tune")
    s = TuneSettings(a.trials, out, a.metric, a.direction, a.pruner, a.sampler, a.jobs, a.storage)

    with _trial_bar(console, "tune", a) as bar:
        summary = tune(cfg, space, space_raw, s, on_trial=_trial_printer(space, console, bar, a.trials),
                       on_start=lambda: console.print(f"study: {out}  ({a.trials} trials, {s.pruner} pruning, "
                                                      f"jobs={a.jobs})"))
    if not summary:  # a torchrun rank other than 0
        return 0
    if seeds:
        from lamina.search.seeds import train_seeds
        from lamina.config import load_config

        best = summary.get("best")
        if best:
            console.print(f"training best.yaml with seeds {','.join(map(str, seeds))}")
            summary["seeds"] = train_seeds(load_config(best["config"]), seeds, out / "seeds",
                                           on_run=lambda s_, r: console.print(f"  seed {s_}: " + "  ".join(
                                               f"{k} {v:.4f}" for k, v in r.items())))
            (out / "seeds.json").write_text(json.dumps(summary["seeds"], indent=2))
    if a.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "trials"}, default=str))
        return 0
    c = summary["cost"]
    console.print(f"[bold]{c['trials']}[/] trials ({c['complete']} complete, {c['pruned']} pruned, {c['failed']} "
                  f"failed), {c['train_time_s']:.0f} s of training, {c['train_samples']:,} samples")
    best = summary.get("best")
    if best:
        console.print(f"best: trial {best['number']}  {summary['metric']} {best['value']:.4f}  " + "  ".join(
            f"{k}={_fmt(v)}" for k, v in best["params"].items()))
        if best.get("test"):
            console.print("      test " + "  ".join(f"{k} {v:.4f}" for k, v in best["test"].items()))
    if summary.get("seeds"):
        from lamina.search.seeds import format_seeds

        console.print(format_seeds(summary["seeds"]))
    console.print(f"page: {summary.get('page')}")
    if best:
        console.print(f"run it: lamina train {best['config']}")
    print(out)
    return 0


def _trial_bar(console, label: str, a):
    from lamina.cli.progress import progress_bar

    return progress_bar(console, f"{label} trials", a.no_progress)


def _trial_printer(space, console, bar=None, trials: int = 0):
    """A line per finished trial; with `bar`, progress(trials finished in this call, --trials) too (a resumed
    study's earlier trials are not counted, so its bar ends short of the total)."""
    finished = [0]

    def on_trial(o):
        if isinstance(o.value, (list, tuple)):
            v = f"{o.value[0]:.4f} {int(o.value[1]):>9,} p {o.value[2]:6.3f} ms"
        else:
            v = "" if o.value is None else f"{o.value:.4f}"
        extra = f"  {o.error}" if o.error else ""
        params = "  ".join(f"{k.split('.', 1)[-1]}={_fmt(x)}" for k, x in space.values_of(o.params).items())
        console.print(f"trial {o.number:>3}  {o.state:<8} {v:>8}  {o.seconds:6.1f}s  {params}{extra}")
        finished[0] += 1
        if bar is not None:
            bar(min(finished[0], trials), trials)

    return on_trial


def cmd_nas(a, console) -> int:
    from lamina.config import read_yaml
    from lamina.search.nas import NASSettings, nas
    from lamina.search.space import SearchSpace
    from lamina.search.study import need_optuna

    need_optuna()
    cfg = _load(a)
    space_raw = read_yaml(a.space)
    space = SearchSpace.from_dict(space_raw, where=f"nas space {Path(a.space).name}")
    out = _out(a, cfg, "nas")
    s = NASSettings(a.trials, out, a.metric, a.direction, a.sampler, a.jobs, a.storage,
                    include_base=not a.no_base, latency_repeats=a.latency_repeats)
    with _trial_bar(console, "nas", a) as bar:
        summary = nas(cfg, space, space_raw, s, on_trial=_trial_printer(space, console, bar, a.trials),
                      on_start=lambda: console.print(f"study: {out}  ({a.trials} trials, {a.sampler}, objectives: "
                                                     "metric / params / latency)"))
    if a.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "trials"}, default=str))
        return 0
    c = summary["cost"]
    console.print(f"[bold]{c['trials']}[/] trials, {c['train_time_s']:.0f} s of training; Pareto front "
                  f"({summary['metric']}, params, latency):")
    for p in summary["front"]:
        v = p["values"]
        console.print(f"  trial {p['number']:>3}{' (base)' if p['base'] else '':7} {v[summary['metric']]:.4f}  "
                      f"{v['params']:>9,} params  {v['latency_ms']:6.3f} ms  {p['config']}")
    b = summary.get("base")
    if b:
        dom, beat = summary["dominate_base"], summary.get("beat_base", [])
        console.print(f"base config (trial {b['number']}): {b['metric']:.4f}, {b['params']:,} params, "
                      f"{b['latency_ms']:.3f} ms; dominated (all three objectives) by {len(dom)} trial(s)"
                      + (f": {dom}" if dom else "") + f"; better {summary['metric']} with fewer params or lower "
                      f"latency: {len(beat)}" + (f": {beat}" if beat else ""))
    console.print(f"plot: {out / 'pareto.png'}  page: {summary.get('page')}")
    print(out)
    return 0


def cmd_lr_find(a, console) -> int:
    from lamina.search.lr_find import lr_find

    cfg = _load(a)
    out = _out(a, cfg, "lr-find")
    res = lr_find(cfg, start=a.start, end=a.end, steps=a.steps, out=out)
    if a.json:
        print(json.dumps({k: v for k, v in res.items() if k not in ("lrs", "losses")}))
        return 0
    console.print(f"{res['steps_run']} steps from lr {a.start:g}; loss min {res['min_loss']:.4f} at lr "
                  f"{res['lr_at_min']:.3g}" + (f"; diverged at lr {res['diverged_at']:.3g}" if res.get("diverged_at")
                                               else ""))
    console.print(f"suggested lr: [bold]{res['suggested_lr']:.3g}[/] (steepest descent of the smoothed loss; "
                  f"min/10 = {res['lr_at_min'] / 10:.3g})")
    console.print(f"plot: {res['plot']}")
    print(res["suggested_lr"])
    return 0


COMMANDS = {"tune": cmd_tune, "nas": cmd_nas, "lr-find": cmd_lr_find}
