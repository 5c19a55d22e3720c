"""The machinery tuning and architecture search share: a study folder with an Optuna SQLite storage, trials that
are ordinary run folders, one worker process per core, and recovery of a stopped study.

    <out>/study.db          Optuna storage (SQLite): every finished trial is committed as it ends, so a study
                            stopped by Ctrl-C or kill loses none and the same command resumes it; several
                            processes (`--jobs`, or a second `lamina tune` on the same folder) share it
    <out>/trials/trial-N    the run folder of trial N (config, metrics, checkpoints, summary.json)
    <out>/search.json       the search's settings, checked on resume (a different config or space is refused)

Trials are run with Optuna's ask/tell interface under a file lock, so `--trials N` means N trials in total
whatever the number of workers. A trial left RUNNING by a killed process (its pid is gone) is marked failed
and its parameters are enqueued again, so the resumed study retries it first.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lamina.errors import ConfigError, LaminaError, MissingDependencyError
from lamina.io import atomic_write_text

MAX_TRIALS = 10_000  # one command's trials: a typo (1e9) must not look like a search
MAX_CONSECUTIVE_FAILURES = 3  # trials failing one after another with a user error: the search itself is wrong


def need_optuna():
    try:
        import optuna
    except ImportError:
        raise MissingDependencyError('tune and nas need the optuna package: pip install "lamina[tune]"') from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def check_trials(trials: int) -> int:
    if isinstance(trials, bool) or not isinstance(trials, int) or not 0 < trials <= MAX_TRIALS:
        raise ConfigError(f"--trials: expected an integer in 1..{MAX_TRIALS}, got {trials}")
    return trials


def check_jobs(jobs: int | str) -> int:
    cores = os.cpu_count() or 1
    if jobs in ("auto", 0, "0"):
        return cores
    try:
        n = int(jobs)
    except (TypeError, ValueError):
        n = -1
    if not 0 < n <= max(cores * 4, 1):
        raise ConfigError(f"--jobs: expected 'auto' or an integer in 1..{cores * 4} (this machine has {cores} "
                          f"cores), got {jobs}")
    return n


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"


def open_storage(url: str):
    """An Optuna RDB storage; anything that cannot be opened is one line naming the storage."""
    optuna = need_optuna()
    if url.startswith("sqlite:///"):
        db = Path(url[len("sqlite:///"):])
        if not db.parent.is_dir():
            raise ConfigError(f"--storage: cannot open {url}: folder {db.parent} does not exist")
        if db.exists() and not db.is_file():
            raise ConfigError(f"--storage: cannot open {url}: {db} is not a file")
        if db.is_file():
            with open(db, "rb") as f:
                head = f.read(16)
            if head and head != b"SQLite format 3\x00":
                raise ConfigError(f"--storage: cannot open {url}: {db.name} is not an SQLite database")
    try:
        # a long busy timeout: workers of one study commit to the same file
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}
                                          if url.startswith("sqlite") else {})
    except Exception as e:  # sqlalchemy / optuna raise many kinds; all mean the same to a user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--storage: cannot open {url}: {first[:200]}") from None


@contextlib.contextmanager
def file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale(study) -> int:
    """Trials left RUNNING by a process of this host that no longer exists: failed, their parameters enqueued
    again. Returns how many. Trials of live processes (another worker, another command) are left alone."""
    optuna = need_optuna()
    host = socket.gethostname()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid, h = t.user_attrs.get("pid"), t.user_attrs.get("host")
        if h == host and isinstance(pid, int) and pid != os.getpid() and not _alive(pid):
            study._storage.set_trial_user_attr(t._trial_id, "error", "stopped (its process ended mid-trial)")
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            if t.params and not t.user_attrs.get("retried"):
                study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "retried": True})
            n += 1
    return n


def counted(study) -> int:
    """Trials that count towards --trials: finished (complete, pruned, or failed: a diverged or invalid trial
    spent its budget too) and running. Only trials interrupted from outside (Ctrl-C, a killed process) do not
    count: their values are run again."""
    optuna = need_optuna()
    S = optuna.trial.TrialState
    return sum(1 for t in study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED, S.RUNNING, S.FAIL))
               if not (t.state == S.FAIL and t.user_attrs.get("interrupted")))


@dataclass
class TrialOutcome:
    number: int
    state: str  # complete | pruned | failed
    value: float | list | None
    params: dict
    seconds: float
    error: str | None = None


def run_trials(study, trials: int, objective: Callable, lock: Path,
               on_trial: Callable[[TrialOutcome], None] | None = None) -> None:
    """Ask/tell until the study holds `trials` counted trials. `objective(trial) -> value(s)`; it raises
    optuna.TrialPruned to prune. A LaminaError fails the trial (recorded) and the search goes on, unless
    MAX_CONSECUTIVE_FAILURES fail in a row, which re-raises the last one."""
    optuna = need_optuna()
    fails = 0
    while True:
        with file_lock(lock):
            recover_stale(study)
            if counted(study) >= trials:
                return
            trial = study.ask()
            trial.set_user_attr("pid", os.getpid())
            trial.set_user_attr("host", socket.gethostname())
        t0 = time.perf_counter()
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            frozen = study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            out = TrialOutcome(trial.number, "pruned", frozen.value, dict(trial.params), time.perf_counter() - t0)
            fails = 0
        except LaminaError as e:
            trial.set_user_attr("error", str(e))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            out = TrialOutcome(trial.number, "failed", None, dict(trial.params), time.perf_counter() - t0, str(e))
            fails += 1
            if on_trial:
                on_trial(out)
            if fails >= MAX_CONSECUTIVE_FAILURES:
                raise
            continue
        except BaseException:  # Ctrl-C, a bug: the trial is failed (retried on resume), nothing finished is lost
            with contextlib.suppress(Exception):
                trial.set_user_attr("error", "interrupted")
                trial.set_user_attr("interrupted", True)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                if trial.params and not trial.user_attrs.get("retried"):
                    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "retried": True})
            raise
        else:
            values = value if isinstance(value, (list, tuple)) else [value]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                # diverged (NaN loss): a failed trial that counts, so a search of unstable settings still ends
                trial.set_user_attr("error", f"objective is not a finite number ({value})")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                out = TrialOutcome(trial.number, "failed", None, dict(trial.params), time.perf_counter() - t0,
                                   f"objective is not a finite number ({value})")
            else:
                study.tell(trial, value)
                out = TrialOutcome(trial.number, "complete", value, dict(trial.params), time.perf_counter() - t0)
            fails = 0
        if on_trial:
            on_trial(out)


def outcome_of(frozen) -> TrialOutcome | None:
    """A finished trial as the printer sees it (None while it runs)."""
    state = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(frozen.state.name)
    if state is None:
        return None
    value = None
    if frozen.values:
        value = frozen.values[0] if len(frozen.values) == 1 else list(frozen.values)
    secs = ((frozen.datetime_complete - frozen.datetime_start).total_seconds()
            if frozen.datetime_complete and frozen.datetime_start else 0.0)
    return TrialOutcome(frozen.number, state, value, dict(frozen.params), secs, frozen.user_attrs.get("error"))


class TrialWatcher:
    """Reports every worker's finished trials, not only the calling process's: a thread polls the shared storage
    and calls on_trial once per trial, in the order they finish. Trials finished before it started (a resumed
    study) are not reported again."""

    def __init__(self, study, on_trial: Callable[[TrialOutcome], None], every: float = 2.0):
        import threading

        self.study, self.on_trial, self.every = study, on_trial, every
        self.seen = {t.number for t in study.get_trials(deepcopy=False) if outcome_of(t) is not None}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lamina-trial-watcher", daemon=True)

    def poll(self) -> None:
        new = [t for t in self.study.get_trials(deepcopy=False) if t.number not in self.seen]
        for t in sorted(new, key=lambda t: t.datetime_complete or t.datetime_start or 0):
            out = outcome_of(t)
            if out is not None:
                self.seen.add(t.number)
                self.on_trial(out)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(Exception):  # a locked database now is read again next time
                self.poll()

    def __enter__(self) -> "TrialWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self.poll()


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the worker processes, once joined)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_study(study, trials: int, objective: Callable, lock: Path, jobs: int, spec: dict,
              on_trial: Callable[[TrialOutcome], None] | None = None) -> tuple[float, float]:
    """Run the study here and in jobs - 1 spawned workers until it holds `trials` trials; with workers, a
    watcher reports everyone's trials. Returns (wall seconds, CPU seconds) of the whole command."""
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    procs = spawn_workers(jobs, spec) if jobs > 1 else []
    watch = TrialWatcher(study, on_trial) if procs and on_trial else contextlib.nullcontext()
    with watch:
        try:
            run_trials(study, trials, objective, lock, on_trial=None if procs else on_trial)
        except BaseException:
            join_workers(procs, interrupted=True)
            raise
        join_workers(procs)
    return record_command(study, time.perf_counter() - t0, cpu_seconds() - cpu0)


def record_command(study, wall: float, cpu: float) -> tuple[float, float]:
    """Add one command's wall and CPU seconds to the study (a resumed search is the sum of its commands);
    returns the totals over every command so far."""
    cmds = list(study.user_attrs.get("commands", [])) + [{"wall_s": wall, "cpu_s": cpu, "host": socket.gethostname()}]
    study.set_user_attr("commands", cmds)
    return sum(c["wall_s"] for c in cmds), sum(c["cpu_s"] for c in cmds)


def _meaning(key: str, value):
    """What a setting means for the search: where runs are logged (logging.*) does not change any trial."""
    if key == "config" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "logging"}
    return value


def write_settings(out: Path, settings: dict) -> None:
    """search.json: what the study was started with. A resume with different settings is refused, since its
    trials would mix two searches."""
    f = out / "search.json"
    if f.is_file():
        try:
            old = json.loads(f.read_text())
        except ValueError:
            raise ConfigError(f"{f}: not a JSON file; delete it or choose another --out") from None
        keys = ("kind", "config", "space", "metric", "direction", "objectives")
        diff = [k for k in keys if _meaning(k, old.get(k)) != _meaning(k, settings.get(k))]
        if diff:
            raise ConfigError(f"{out}: this study was started with a different {diff[0]}; resume it with the same "
                              f"config and space, or choose another --out")
        return
    atomic_write_text(f, json.dumps(settings, indent=2, default=str))


def spawn_workers(n: int, spec: dict) -> list:
    """n - 1 extra worker processes for the same study (the caller is the n-th). Spawned, not forked: each
    starts a fresh interpreter with its own torch thread pool."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = []
    for i in range(1, n):
        p = ctx.Process(target=worker_main, args=(json.dumps({**spec, "worker": i}),), daemon=False)
        p.start()
        procs.append(p)
    return procs


def worker_main(spec_json: str) -> None:
    """Entry of a spawned worker: rebuild the search from its spec and run trials until the study is full."""
    spec = json.loads(spec_json)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        try:
            if spec["kind"] == "tune":
                from lamina.search.tune import run_worker
            else:
                from lamina.search.nas import run_worker
            run_worker(spec)
        except KeyboardInterrupt:
            pass
        except LaminaError as e:
            print(f"worker {spec.get('worker')}: {e}", file=sys.stderr)


def join_workers(procs: list, interrupted: bool = False) -> None:
    for p in procs:
        if interrupted and p.is_alive():
            p.terminate()
        p.join()


__all__ = ["need_optuna", "check_trials", "check_jobs", "sqlite_url", "open_storage", "file_lock", "recover_stale",
           "counted", "run_trials", "TrialOutcome", "TrialWatcher", "outcome_of", "run_study", "cpu_seconds", "record_command", "write_settings", "spawn_workers", "worker_main", "join_workers"]
