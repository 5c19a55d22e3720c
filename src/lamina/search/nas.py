"""Architecture search: multi-objective Optuna over a zoo family's own options, validation metric against
parameters and measured CPU latency, with the Pareto front plotted and saved as runnable configs.

    lamina nas configs/fashion_mnist.yaml --space configs/search/fashion_mnist_nas.yaml --trials 24

The space is a tune space over `model.*` keys, with list indices for per-stage choices (`model.channels[1]`,
`model.stages[2][0]` for an EfficientNet stage's expansion ratio, `model.kernel_size`, `model.depth`,
`model.n_head`, ...): the family decides what exists, the space file picks what varies. Each trial trains the
candidate through `runs.train` (so the budget is the config's: shorten it with overrides such as
`data.train_fraction=0.2 trainer.max_epochs=3` for a proxy search), then measures on the trained weights:

- params: trainable parameters of the model;
- latency_ms: median wall time of a batch-1 forward on the CPU, one thread, after warm-up (the deployment case
  NAS papers for mobile CPUs optimise; one thread keeps it independent of what else the machine runs).

Why Optuna's NSGA-II and not a one-shot supernet: a supernet shares weights between candidates and ranks them
by inherited-weight accuracy, which on small budgets correlates poorly with stand-alone accuracy (Yu et al.
2020, "Evaluating the search phase of NAS"), and it needs a family-specific weight-sharing implementation for
every zoo family; sampling and training real candidates works on any family through the model contract and
measures what the front claims. NSGA-II (default) keeps a diverse front; `--sampler tpe` (multi-objective TPE)
or `random` are the alternatives.

The base config's own architecture is trial 0 (enqueued; `--no-base` skips it), so the front answers the
question users ask: is there a model better than mine on every axis?
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lamina.config import RunConfig, to_dict, to_yaml, validate
from lamina.config.schema import MODEL_SOURCE_KEYS
from lamina.errors import ConfigError
from lamina.io import atomic_write_text
from lamina.search.space import SearchSpace, apply_values, split_key
from lamina.search.study import (TrialOutcome, check_jobs, check_trials, need_optuna, open_storage, run_study,
                                 run_trials, sqlite_url, write_settings)
from lamina.search.tune import _threads_per_job, search_cost, trial_config, trial_rows, write_plots

OBJECTIVES = ("metric", "params", "latency_ms")
NAS_SAMPLERS = ("nsga2", "tpe", "random")


@dataclass
class NASSettings:
    trials: int
    out: Path
    metric: str | None = None
    direction: str | None = None
    sampler: str = "nsga2"
    jobs: int | str = 1
    storage: str | None = None
    study_name: str = "nas"
    include_base: bool = True
    latency_repeats: int = 50

    def resolved(self, cfg: RunConfig) -> "NASSettings":
        metric = self.metric or cfg.trainer.monitor
        direction = self.direction or ("maximize" if cfg.trainer.monitor_mode == "max" else "minimize")
        if direction not in ("maximize", "minimize"):
            raise ConfigError(f"--direction: expected maximize or minimize, got {direction}")
        if self.sampler not in NAS_SAMPLERS:
            raise ConfigError(f"--sampler: expected one of {', '.join(NAS_SAMPLERS)}, got {self.sampler}")
        if not metric.startswith(("val/", "train/")):
            raise ConfigError(f"--metric: expected a per-epoch metric such as val/acc, got {metric}")
        if not 5 <= self.latency_repeats <= 10_000:
            raise ConfigError(f"--latency-repeats: expected 5..10000, got {self.latency_repeats}")
        return NASSettings(check_trials(self.trials), Path(self.out), metric, direction, self.sampler,
                           check_jobs(self.jobs), self.storage, self.study_name, self.include_base,
                           self.latency_repeats)

    @property
    def directions(self) -> list[str]:
        return [self.direction, "minimize", "minimize"]


def check_space(space: SearchSpace) -> None:
    bad = [k for k in space.keys if split_key(k)[0] != "model" or split_key(k)[1] in MODEL_SOURCE_KEYS]
    if bad:
        raise ConfigError(f"nas space: {bad[0]}: an architecture search varies model options (model.depth, "
                          f"model.channels[1], ...); tune training settings with `lamina tune`")


@torch.inference_mode()
def cpu_latency_ms(model: torch.nn.Module, example: dict, task, repeats: int = 50, warmup: int = 10) -> float:
    """Median batch-1 forward time on the CPU with one thread (ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = model.to("cpu").eval()
        for _ in range(warmup):
            task.forward(model, example)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            task.forward(model, example)
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def measure_run(run_dir: str | Path, repeats: int = 50) -> dict:
    """Parameters and batch-1 CPU latency of a trained run's best model."""
    from lamina.runs import open_run

    run = open_run(run_dir)
    loader = run.eval_loader("val" if run.data().val is not None else "test", device=torch.device("cpu"),
                             batch_size=1)
    batch = next(iter(loader))
    example = {k: v[:1] if torch.is_tensor(v) else v for k, v in batch.items()}
    params = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    return {"params": params, "latency_ms": cpu_latency_ms(run.model, example, run.task, repeats)}


def _objective(base: RunConfig, space: SearchSpace, s: NASSettings, threads: int | None) -> Callable:
    from lamina import runs
    from lamina.search.tune import PruningReporter, best_of

    def objective(trial):
        values = space.suggest(trial)
        cfg = trial_config(base, values, s.out, trial.number, threads)
        rep = PruningReporter(trial, s.metric, prune=False)  # records the metric; multi-objective: no pruning
        rep.trial = None
        trial.set_user_attr("values", json.loads(json.dumps(values, default=list)))
        t0 = time.perf_counter()
        try:
            res = runs.train(cfg, callbacks=[rep])
        finally:
            trial.set_user_attr("train_time_s", rep.train_time)
            trial.set_user_attr("samples", rep.samples)
            trial.set_user_attr("epochs", rep.epochs)
            trial.set_user_attr("wall_s", time.perf_counter() - t0)
            trial.set_user_attr("run_dir", str(s.out / "trials" / f"trial-{trial.number:04d}"))
        trial.set_user_attr("test", {k: v for k, v in res.summary.get("test", {}).items()
                                     if isinstance(v, (int, float))})
        if res.summary.get("cost"):
            trial.set_user_attr("cost", json.loads(json.dumps(res.summary["cost"], default=str)))
        m = measure_run(res.run_dir, s.latency_repeats)
        trial.set_user_attr("params", m["params"])
        trial.set_user_attr("latency_ms", m["latency_ms"])
        return best_of(rep.values, s.direction, s.metric), float(m["params"]), m["latency_ms"]

    return objective


def _sampler(name: str, seed: int):
    optuna = need_optuna()
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8)
    return optuna.samplers.RandomSampler(seed=seed)


def _open_study(base: RunConfig, s: NASSettings, worker: int = 0):
    optuna = need_optuna()
    storage = open_storage(s.storage or sqlite_url(s.out / "study.db"))
    study = optuna.create_study(study_name=s.study_name, storage=storage, directions=s.directions,
                                sampler=_sampler(s.sampler, base.seed + worker), load_if_exists=True)
    study.set_metric_names([s.metric, "params", "latency_ms"])
    return study


def base_values(base: RunConfig, space: SearchSpace) -> dict | None:
    """The base config's value of every key, as the trial parameters that reproduce it; None when the base
    lies outside the space (a range that excludes it, a categorical without it)."""
    from lamina.search.space import _model_default

    raw = to_dict(base)
    out = {}
    for p in space.params:
        parts = split_key(p.key)
        d, v = raw, None
        for i, h in enumerate(parts):
            if isinstance(h, int):
                v = d[h] if isinstance(d, list) and h < len(d) else None
            elif isinstance(d, dict):
                v = d.get(h)
                if v is None and parts[0] == "model" and i == 1:
                    v = _model_default(raw, h)
            else:
                v = None
            d = v
        if v is None:
            return None
        if p.kind == "categorical":
            match = [i for i, c in enumerate(p.choices) if _same(c, v)]
            if not match:
                return None
            stored = p.choices[match[0]]
            out[p.key] = stored if all(c is None or isinstance(c, (bool, int, float, str)) for c in p.choices) \
                else match[0]
        else:
            if not p.low <= v <= p.high:
                return None
            out[p.key] = v
    return out


def _same(a, b) -> bool:
    norm = (lambda x: [norm(y) for y in x] if isinstance(x, (list, tuple)) else x)  # noqa: E731
    return norm(a) == norm(b)


def _spec(base: RunConfig, space_raw: dict, s: NASSettings) -> dict:
    return {"kind": "nas", "config": to_dict(base), "space": space_raw, "trials": s.trials, "out": str(s.out),
            "metric": s.metric, "direction": s.direction, "sampler": s.sampler, "jobs": s.jobs,
            "storage": s.storage, "study_name": s.study_name, "latency_repeats": s.latency_repeats}


def run_worker(spec: dict) -> None:
    base = validate(spec["config"])
    space = SearchSpace.from_dict(spec["space"])
    s = NASSettings(spec["trials"], Path(spec["out"]), spec["metric"], spec["direction"], spec["sampler"],
                    spec["jobs"], spec["storage"], spec["study_name"], False, spec["latency_repeats"])
    study = _open_study(base, s, worker=spec.get("worker", 0))
    run_trials(study, s.trials, _objective(base, space, s, _threads_per_job(s.jobs)), s.out / ".lock")


def nas(base: RunConfig, space: SearchSpace, space_raw: dict, settings: NASSettings,
        on_trial: Callable[[TrialOutcome], None] | None = None, on_start: Callable[[], None] | None = None) -> dict:
    s = settings.resolved(base)
    check_space(space)
    space.check(base)
    s.out.mkdir(parents=True, exist_ok=True)
    write_settings(s.out, {"kind": "nas", "config": to_dict(base), "space": space_raw, "metric": s.metric,
                           "direction": s.direction, "objectives": [s.metric, "params", "latency_ms"]})
    study = _open_study(base, s)
    if on_start:
        on_start()
    if s.include_base and not study.get_trials(deepcopy=False):
        bv = base_values(base, space)
        if bv is not None:
            study.enqueue_trial(bv, user_attrs={"base": True})
    wall, cpu = run_study(study, s.trials, _objective(base, space, s, _threads_per_job(s.jobs)), s.out / ".lock",
                          s.jobs, _spec(base, space_raw, s), on_trial)
    return write_outputs(study, base, space, s, wall=wall, cpu=cpu)


def dominates(a: dict, b: dict, maximize: bool) -> bool:
    """a is no worse than b on every objective and better on one."""
    sa = [a["metric"] if maximize else -a["metric"], -a["params"], -a["latency_ms"]]
    sb = [b["metric"] if maximize else -b["metric"], -b["params"], -b["latency_ms"]]
    return all(x >= y for x, y in zip(sa, sb)) and any(x > y for x, y in zip(sa, sb))


def pareto_front(points: list[dict], maximize: bool) -> list[dict]:
    return [p for p in points if not any(dominates(q, p, maximize) for q in points if q is not p)]


def write_outputs(study, base: RunConfig, space: SearchSpace, s: NASSettings, wall=None, cpu=None) -> dict:
    optuna = need_optuna()
    rows = trial_rows(study, space)
    maximize = s.direction == "maximize"
    points = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        metric, params, lat = t.values
        points.append({"number": t.number, "metric": metric, "params": int(params), "latency_ms": lat,
                       "base": bool(t.user_attrs.get("base")), "test": t.user_attrs.get("test"),
                       "values": {s.metric: metric, "params": int(params), "latency_ms": lat},
                       "config_values": space.values_of(dict(t.params)), "run_dir": t.user_attrs.get("run_dir")})
    front = sorted(pareto_front(points, maximize), key=lambda p: p["params"])
    fdir = s.out / "front"
    fdir.mkdir(exist_ok=True)
    for p in front:
        raw = to_dict(apply_values(base, p["config_values"]))
        raw["name"] = f"{base.name or base.data.name}-nas-{p['number']:04d}"
        path = fdir / f"trial-{p['number']:04d}.yaml"
        atomic_write_text(path, f"# Pareto front of {s.out}: {s.metric} {p['metric']:.4f}, {p['params']:,} params, "
                                f"{p['latency_ms']:.3f} ms batch-1 CPU latency (trial {p['number']})\n"
                          + to_yaml(validate(raw)))
        p["config"] = str(path)
        p["params_list"] = p.pop("config_values")
    base_pt = next((p for p in points if p["base"]), None)
    dominating = [p["number"] for p in points if base_pt and dominates(p, base_pt, maximize)]
    # the weaker, common reading: a better metric with fewer parameters or a lower latency
    better = (lambda a, b: a > b) if maximize else (lambda a, b: a < b)
    beating = [p["number"] for p in points if base_pt and not p["base"] and better(p["metric"], base_pt["metric"])
               and (p["params"] < base_pt["params"] or p["latency_ms"] < base_pt["latency_ms"])]
    summary = {"kind": "nas", "study": s.study_name, "out": str(s.out), "metric": s.metric, "direction": s.direction,
               "objectives": [s.metric, "params", "latency_ms"], "sampler": s.sampler,
               "trials_requested": s.trials, "cost": search_cost(rows, wall, cpu),
               "front": [{"number": p["number"], "values": p["values"], "test": p["test"], "config": p["config"],
                          "params": p["params_list"], "base": p["base"]} for p in front],
               "base": base_pt and {k: base_pt[k] for k in ("number", "metric", "params", "latency_ms", "test")},
               "dominate_base": dominating, "beat_base": beating, "trials": rows}
    plot_front(points, front, s, s.out / "pareto.png")
    summary["plots"] = {"pareto": str(s.out / "pareto.png")}
    summary["plots"].update(write_plots(_single(study, optuna), s.out, s.metric) if points else {})
    atomic_write_text(s.out / "study.json", json.dumps(summary, indent=2, default=str))
    from lamina.search.page import write_study_page

    summary["page"] = str(write_study_page(s.out, summary))
    return summary


def _single(study, optuna):
    """A single-objective view of the study (the metric), for the history/importance/parallel plots."""
    view = optuna.create_study(direction=study.directions[0])
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        view.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=t.values[0],
                                                 user_attrs=t.user_attrs))
    return view


def plot_front(points: list[dict], front: list[dict], s: NASSettings, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lamina.plots import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    fset = {p["number"] for p in front}
    for ax, key, label in ((axes[0], "params", "parameters"), (axes[1], "latency_ms", "batch-1 CPU latency (ms)")):
        other = [p for p in points if p["number"] not in fset and not p["base"]]
        ax.scatter([p[key] for p in other], [p["metric"] for p in other], c="#9aa3b2", s=22, label="trial")
        fr = sorted(front, key=lambda p: p[key])
        ax.plot([p[key] for p in fr], [p["metric"] for p in fr], "o", color="#2753a3", label="Pareto front (3 obj.)")
        for p in points:
            if p["base"]:
                ax.scatter([p[key]], [p["metric"]], marker="*", s=180, color="#c2410c", label="base config", zorder=5)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(s.metric)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    return save_figure(fig, path, f"architecture search: {len(points)} trials")


__all__ = ["NASSettings", "nas", "pareto_front", "dominates", "cpu_latency_ms", "measure_run", "base_values",
           "check_space"]
