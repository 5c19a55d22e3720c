"""Hyperparameter search on Optuna: `tune(cfg, space, trials)` trains one run per trial through `runs.train`.

- The objective is the best value of a validation metric over a trial's epochs (default: the config's
  `trainer.monitor`, the value its best checkpoint keeps). Test metrics are recorded, never optimised.
- Sampler: TPE (multivariate, seeded from the config's seed plus the worker index) by default, or random.
- Pruning: every epoch's metric is reported; `median` (MedianPruner: stop a trial below the median of earlier
  trials at the same epoch, after 5 finished trials and 1 epoch) or `hyperband` (successive halving brackets
  over epochs), or `none`.
- Storage: <out>/study.db (SQLite). `--jobs N` runs N worker processes on it, one per core by default
  (`torch` threads split between them); the same command resumes a stopped study (search/study.py).
- Outputs in <out>: best.yaml (the base config with the best trial's values: `lamina train best.yaml` runs
  it), study.json (every trial: state, value, params, seconds, samples, run folder; the search's cost),
  history.png / importances.png / parallel.png, and study.html.
- Under torchrun (`trainer.strategy=ddp`): one study process per rank group; rank 0 asks Optuna for the
  trial's values and broadcasts them, every rank trains, rank 0 alone reports to Optuna and writes files, and
  the pruning decision is broadcast so all ranks stop the same epoch.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lamina.config import RunConfig, to_dict, to_yaml, validate
from lamina.engine.callbacks import Callback
from lamina.errors import ConfigError
from lamina.io import atomic_write_text
from lamina.search.space import SearchSpace, apply_values
from lamina.search.study import (TrialOutcome, check_jobs, check_trials, cpu_seconds, file_lock, need_optuna,
                                 open_storage, record_command, run_study, run_trials, sqlite_url,
                                 write_settings)

PRUNERS = ("median", "hyperband", "none")
SAMPLERS = ("tpe", "random")


@dataclass
class TuneSettings:
    trials: int
    out: Path
    metric: str | None = None  # None: the config's trainer.monitor
    direction: str | None = None  # maximize | minimize; None: from trainer.monitor_mode
    pruner: str = "median"
    sampler: str = "tpe"
    jobs: int | str = 1
    storage: str | None = None  # None: sqlite:///<out>/study.db
    study_name: str = "tune"
    extra_callbacks: list = field(default_factory=list)  # per-trial run callbacks (e.g. a progress bar), main rank

    def resolved(self, cfg: RunConfig) -> "TuneSettings":
        metric = self.metric or cfg.trainer.monitor
        direction = self.direction or ("maximize" if cfg.trainer.monitor_mode == "max" else "minimize")
        if direction not in ("maximize", "minimize"):
            raise ConfigError(f"--direction: expected maximize or minimize, got {direction}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner: expected one of {', '.join(PRUNERS)}, got {self.pruner}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler: expected one of {', '.join(SAMPLERS)}, got {self.sampler}")
        if not metric.startswith(("val/", "train/")):
            raise ConfigError(f"--metric: expected a per-epoch metric such as val/acc or val/loss, got {metric} "
                              f"(test metrics are never searched on)")
        return TuneSettings(check_trials(self.trials), Path(self.out), metric, direction, self.pruner, self.sampler,
                            check_jobs(self.jobs), self.storage, self.study_name, self.extra_callbacks)


class PruningReporter(Callback):
    """Reports each epoch's metric to the Optuna trial and stops the run when the pruner says so. Runs on every
    rank (`all_ranks`): rank 0 talks to Optuna, the decision is broadcast."""

    all_ranks = True

    def __init__(self, trial, metric: str, prune: bool):
        self.trial, self.metric, self.prune = trial, metric, prune
        self.values: list[float] = []
        self.train_time = 0.0
        self.samples = 0
        self.epochs = 0

    def on_epoch_end(self, trainer, metrics):
        self.train_time, self.samples, self.epochs = trainer.train_time, trainer.samples_seen, trainer.epoch
        v = metrics.get(self.metric)
        if v is None:
            if self.metric.startswith("val/") and not any(k.startswith("val/") for k in metrics):
                return  # not a validation epoch (trainer.val_every)
            raise ConfigError(f"--metric: {self.metric} is not a metric of this run; it has "
                              f"{', '.join(k for k in metrics if k.startswith(('val/', 'train/')))}")
        v = float(v)
        self.values.append(v)
        stop = False
        if trainer.dist.is_main and self.trial is not None:
            self.trial.report(v if math.isfinite(v) else float("nan"), step=trainer.epoch)
            stop = self.prune and self.trial.should_prune()
        if trainer.dist.world_size > 1:
            stop = trainer.dist.broadcast_object(stop)
        if stop:
            optuna = need_optuna()
            raise optuna.TrialPruned(f"pruned after epoch {trainer.epoch} ({self.metric} {v:.4f})")


def make_pruner(name: str, cfg: RunConfig):
    optuna = need_optuna()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.trainer.max_epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def make_sampler(name: str, seed: int, multi_objective: bool = False):
    optuna = need_optuna()
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if multi_objective:
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8)


def best_of(values: list[float], direction: str, metric: str = "the metric") -> float:
    if not values:
        raise ConfigError(f"{metric} was never reported: the trial ended before its first validation epoch "
                          f"(trainer.max_steps shorter than an epoch, or trainer.val_every larger than max_epochs)")
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan")
    return max(finite) if direction == "maximize" else min(finite)


def trial_config(base: RunConfig, values: dict, out: Path, number: int, threads: int | None) -> RunConfig:
    cfg = apply_values(base, values)
    raw = to_dict(cfg)
    raw["name"] = f"trial-{number:04d}"
    raw["logging"]["root"] = str(out / "trials")
    raw["trainer"]["progress"] = False
    if threads and raw["trainer"].get("threads") is None:
        raw["trainer"]["threads"] = threads
    return validate(raw)


def _objective(base: RunConfig, space: SearchSpace, s: TuneSettings, threads: int | None,
               dist=None) -> Callable:
    from lamina import runs

    def objective(trial):
        values = space.suggest(trial)
        cfg = trial_config(base, values, s.out, trial.number, threads)
        rep = PruningReporter(trial, s.metric, s.pruner != "none")
        trial.set_user_attr("values", json.loads(json.dumps(values, default=list)))
        t0 = time.perf_counter()

        def stopped(p, _exc):  # a pruned trial's energy and FLOPs still count toward the search's cost
            if p.cost is not None:
                cost = p.cost.result(p.trainer.samples_seen, time.perf_counter() - p.wall0)
                trial.set_user_attr("cost", json.loads(json.dumps(cost, default=str)))

        try:
            if dist is None:
                res = runs.train(cfg, callbacks=[rep, *s.extra_callbacks], on_stopped=stopped)
            else:
                p = runs.prepare(cfg, dist, [rep, *s.extra_callbacks])
                try:
                    history = runs.fit(p)
                except BaseException as e:
                    stopped(p, e)
                    raise
                res = runs.finalize(p, history)
        finally:
            trial.set_user_attr("train_time_s", rep.train_time)
            trial.set_user_attr("samples", rep.samples)
            trial.set_user_attr("epochs", rep.epochs)
            trial.set_user_attr("wall_s", time.perf_counter() - t0)
            trial.set_user_attr("run_dir", str(s.out / "trials" / f"trial-{trial.number:04d}"))
        summ = res.summary
        trial.set_user_attr("test", {k: v for k, v in summ.get("test", {}).items() if isinstance(v, (int, float))})
        if summ.get("cost"):
            trial.set_user_attr("cost", json.loads(json.dumps(summ["cost"], default=str)))
        return best_of(rep.values, s.direction, s.metric)

    return objective


def _open_study(base: RunConfig, s: TuneSettings, worker: int = 0):
    optuna = need_optuna()
    storage = open_storage(s.storage or sqlite_url(s.out / "study.db"))
    return optuna.create_study(study_name=s.study_name, storage=storage, direction=s.direction,
                               sampler=make_sampler(s.sampler, base.seed + worker),
                               pruner=make_pruner(s.pruner, base), load_if_exists=True)


def _threads_per_job(jobs: int) -> int | None:
    return max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None


def _spec(base: RunConfig, space_raw: dict, s: TuneSettings) -> dict:
    return {"kind": "tune", "config": to_dict(base), "space": space_raw, "trials": s.trials, "out": str(s.out),
            "metric": s.metric, "direction": s.direction, "pruner": s.pruner, "sampler": s.sampler,
            "jobs": s.jobs, "storage": s.storage, "study_name": s.study_name}


def run_worker(spec: dict) -> None:
    base = validate(spec["config"])
    space = SearchSpace.from_dict(spec["space"])
    s = TuneSettings(spec["trials"], Path(spec["out"]), spec["metric"], spec["direction"], spec["pruner"],
                     spec["sampler"], spec["jobs"], spec["storage"], spec["study_name"])
    study = _open_study(base, s, worker=spec.get("worker", 0))
    run_trials(study, s.trials, _objective(base, space, s, _threads_per_job(s.jobs)), s.out / ".lock")


def tune(base: RunConfig, space: SearchSpace, space_raw: dict, settings: TuneSettings,
         on_trial: Callable[[TrialOutcome], None] | None = None, on_start: Callable[[], None] | None = None) -> dict:
    """Run (or resume) the study; returns the study summary that study.json holds. `on_start()` is called once
    everything is checked and the study is open (a header printed then never precedes an input error)."""
    from lamina.engine.distributed import launched_by_torchrun

    s = settings.resolved(base)
    space.check(base)
    s.out.mkdir(parents=True, exist_ok=True)
    if launched_by_torchrun():
        return _tune_distributed(base, space, space_raw, s, on_trial, on_start)
    write_settings(s.out, {"kind": "tune", "config": to_dict(base), "space": space_raw, "metric": s.metric,
                           "direction": s.direction})
    study = _open_study(base, s)
    if on_start:
        on_start()
    wall, cpu = run_study(study, s.trials, _objective(base, space, s, _threads_per_job(s.jobs)), s.out / ".lock",
                          s.jobs, _spec(base, space_raw, s), on_trial)
    return write_outputs(study, base, space, s, wall=wall, cpu=cpu)


def _tune_distributed(base, space, space_raw, s, on_trial, on_start=None) -> dict:
    """torchrun: one process group for the whole study; rank 0 owns the study, every rank trains."""
    from lamina.engine.distributed import Distributed
    from lamina.engine.precision import select_device

    dist = Distributed.from_config(base.trainer, select_device(base.trainer.device))
    study = None
    if dist.is_main:
        write_settings(s.out, {"kind": "tune", "config": to_dict(base), "space": space_raw, "metric": s.metric,
                               "direction": s.direction})
        study = _open_study(base, s)
        if on_start:
            on_start()
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    try:
        while True:
            trial = None
            if dist.is_main:
                from lamina.search.study import counted, recover_stale

                with file_lock(s.out / ".lock"):
                    recover_stale(study)
                    trial = study.ask() if counted(study) < s.trials else None
                if trial is not None:
                    trial.set_user_attr("pid", os.getpid())
                    trial.set_user_attr("host", socket.gethostname())
                    space.suggest(trial)  # draw now: the other ranks get the values, not the sampler
            params = dist.broadcast_object(None if trial is None else (trial.number, dict(trial.params)))
            if params is None:
                break
            number, stored = params
            trial_proxy = trial if dist.is_main else _FixedTrial(number, stored, space)
            objective = _objective(base, space, s, None, dist=dist)
            run_trials_once(study, trial_proxy, objective, dist, on_trial)
    finally:
        dist.close()
    if not dist.is_main:
        return {}
    wall, cpu = record_command(study, time.perf_counter() - t0, cpu_seconds() - cpu0)
    return write_outputs(study, base, space, s, wall=wall, cpu=cpu)


class _FixedTrial:
    """What a non-zero rank holds of rank 0's trial: the same values, no Optuna storage."""

    def __init__(self, number, stored, space):
        self.number, self.params, self._stored = number, stored, stored
        self.user_attrs = {}

    def suggest_float(self, name, *a, **k):
        return self._stored[name]

    suggest_int = suggest_categorical = suggest_float

    def set_user_attr(self, k, v):
        self.user_attrs[k] = v

    def report(self, *a, **k):
        pass

    def should_prune(self):
        return False


def run_trials_once(study, trial, objective, dist, on_trial) -> None:
    optuna = need_optuna()
    t0 = time.perf_counter()
    try:
        value = objective(trial)
    except optuna.TrialPruned:
        if dist.is_main:
            fz = study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            if on_trial:
                on_trial(TrialOutcome(trial.number, "pruned", fz.value, dict(trial.params), time.perf_counter() - t0))
        return
    except BaseException:
        if dist.is_main:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    if dist.is_main:
        study.tell(trial, value)
        if on_trial:
            on_trial(TrialOutcome(trial.number, "complete", value, dict(trial.params), time.perf_counter() - t0))


# ----- outputs ---------------------------------------------------------------------------------------
def trial_rows(study, space: SearchSpace) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": (t.values[0] if len(t.values) == 1 else list(t.values)) if t.values else None,
                     "params": space.values_of(dict(t.params)), "epochs": ua.get("epochs"),
                     "train_time_s": ua.get("train_time_s"), "wall_s": ua.get("wall_s"),
                     "samples": ua.get("samples"), "test": ua.get("test"), "run_dir": ua.get("run_dir"),
                     "error": ua.get("error"), "cost": ua.get("cost")})
    return rows


def search_cost(rows: list[dict], wall: float | None = None, cpu: float | None = None) -> dict:
    """What the whole search cost: training seconds and samples over every trial (pruned ones included), this
    command's wall and CPU seconds, and the energy of the trials whose runs measured it."""
    # compute is summed over every trial that ran (failed and interrupted ones spent it too)
    done = [r for r in rows if r["state"] in ("complete", "pruned", "fail")]
    out = {"trials": sum(r["state"] in ("complete", "pruned") for r in rows),
           "complete": sum(r["state"] == "complete" for r in rows),
           "pruned": sum(r["state"] == "pruned" for r in rows), "failed": sum(r["state"] == "fail" for r in rows),
           "train_time_s": sum(r["train_time_s"] or 0 for r in done),
           "trial_wall_s": sum(r["wall_s"] or 0 for r in done),
           "train_samples": sum(r["samples"] or 0 for r in done),
           "epochs": sum(r["epochs"] or 0 for r in done)}
    if wall is not None:
        out["command_wall_s"] = wall
    if cpu is not None:
        out["command_cpu_s"] = cpu  # every command's processes (workers included), summed over resumes
    costs = [r["cost"] for r in done if r.get("cost")]
    if costs:
        try:
            from lamina.runs.cost import total_cost

            out["energy"] = total_cost([{"cost": c} for c in costs])
        except ImportError:
            pass
    return out


def write_outputs(study, base: RunConfig, space: SearchSpace, s: TuneSettings, wall=None, cpu=None) -> dict:
    optuna = need_optuna()
    rows = trial_rows(study, space)
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    summary = {"study": s.study_name, "out": str(s.out), "metric": s.metric, "direction": s.direction,
               "pruner": s.pruner, "sampler": s.sampler, "trials_requested": s.trials,
               "cost": search_cost(rows, wall, cpu), "trials": rows}
    if complete:
        best = study.best_trial
        values = space.values_of(dict(best.params))
        cfg = apply_values(base, values)
        raw = to_dict(cfg)
        raw["name"] = f"{base.name or base.data.name}-tuned"
        best_cfg = validate(raw)
        header = (f"# best of study '{s.study_name}' ({s.out}): {s.metric} {best.value:.4f} (trial {best.number} "
                  f"of {len(rows)})\n# values: " + json.dumps(json.loads(json.dumps(values, default=list))) + "\n")
        atomic_write_text(s.out / "best.yaml", header + to_yaml(best_cfg))
        summary["best"] = {"number": best.number, "value": best.value, "params": values,
                           "config": str(s.out / "best.yaml"), "test": best.user_attrs.get("test"),
                           "run_dir": best.user_attrs.get("run_dir")}
    summary["plots"] = write_plots(study, s.out, s.metric)
    study_json = s.out / "study.json"
    atomic_write_text(study_json, json.dumps(summary, indent=2, default=str))
    from lamina.search.page import write_study_page

    summary["page"] = str(write_study_page(s.out, summary))
    atomic_write_text(study_json, json.dumps(summary, indent=2, default=str))
    return summary


def write_plots(study, out: Path, metric: str = "Objective Value") -> dict:
    """Optuna's matplotlib views, as PNGs; a view that needs more trials than the study has is skipped."""
    optuna = need_optuna()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    views = {"history.png": ovm.plot_optimization_history, "parallel.png": ovm.plot_parallel_coordinate}
    if len(done) >= 2 and any(len(t.distributions) for t in done):
        views["importances.png"] = ovm.plot_param_importances
    written = {}
    for name, fn in views.items():
        if not done:
            break
        try:
            ax = fn(study, target_name=metric)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.set_size_inches(8, 4.5)
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            written[name.removesuffix(".png")] = str(out / name)
        except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. importances with all-equal values
            plt.close("all")
    return written


__all__ = ["TuneSettings", "tune", "PruningReporter", "trial_config", "write_outputs", "search_cost", "run_worker"]
