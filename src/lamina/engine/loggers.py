"""Metric sinks. Every logger takes `log_step(step, values)` (the training loss every `trainer.log_every` steps and
the learning rate), `log_epoch(row)` (one row per epoch), `load(step)` (resume from a checkpoint at `step`) and
`close()` (end of fit).

- CSVLogger: metrics.csv (one row per epoch, rewritten atomically, wide format) and steps.csv (one row per logged
  step, appended; a resume cuts the rows past its checkpoint once, so none repeats).
- TensorBoardLogger: scalars as they come; at the end of a run (lamina.runs.tracking) the config as hparams with
  the final metrics, and the run's figures as images.
- MLflowLogger: the same metrics, params and tags in an MLflow tracking store (lamina[track]); MLflow's client
  does the storing, lamina only batches the writes.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

from lamina.errors import ConfigError, MissingDependencyError
from lamina.io import atomic_write_text


class CSVLogger:
    def __init__(self, path: str | Path, steps: str | Path | None = None):
        self.path = Path(path)
        self.steps_path = Path(steps) if steps is not None else None  # None: per-step values are dropped
        self.rows: list[dict] = []
        self._steps_file = self._steps_writer = None
        self._step_cols: list[str] = []

    def log_epoch(self, row: dict) -> None:
        self.rows.append(dict(row))
        self._write()
        if self._steps_file is not None:  # a row per epoch on disk: the steps up to this checkpoint too
            self._steps_file.flush()

    def _write(self) -> None:
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())

    def log_step(self, step: int, values: dict) -> None:
        """One row of steps.csv; the columns are fixed by the file's header (or the first call's keys)."""
        if self.steps_path is None:
            return
        if self._steps_file is None:
            self._open_steps(values)
        self._steps_writer.writerow([int(step), *(values.get(k) for k in self._step_cols)])

    def _open_steps(self, values: dict) -> None:
        header = _csv_header(self.steps_path)
        self._step_cols = header[1:] if header else list(values)
        self._steps_file = open(self.steps_path, "a", newline="")  # appended: a long run never rewrites it
        self._steps_writer = csv.writer(self._steps_file, lineterminator="\n")
        if not header:
            self._steps_writer.writerow(["step", *self._step_cols])

    def load(self, step: int | None = None) -> None:
        """Pick up earlier rows (resume). `step`: the checkpoint's global step; rows logged after it (by the
        attempt that crashed) are dropped from both files, as the resumed run logs those steps again."""
        if self.path.is_file():
            with open(self.path) as f:
                self.rows = [{k: _num(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
            kept = [r for r in self.rows if step is None or not isinstance(r.get("step"), int) or r["step"] <= step]
            if len(kept) < len(self.rows):
                self.rows = kept
                self._write()
        if step is not None and self.steps_path is not None and self.steps_path.is_file():
            with open(self.steps_path, newline="") as f:
                lines = f.read().splitlines(keepends=True)
            kept = lines[:1] + [ln for ln in lines[1:] if ln.endswith("\n")  # not a row cut by the crash
                                and _leading_int(ln) is not None and _leading_int(ln) <= step]
            if len(kept) < len(lines):  # once per resume, not per step
                atomic_write_text(self.steps_path, "".join(kept))

    def close(self) -> None:
        if self._steps_file is not None:
            self._steps_file.close()
            self._steps_file = self._steps_writer = None


def _csv_header(path: Path) -> list[str]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def _leading_int(line: str) -> int | None:
    try:
        return int(line.split(",", 1)[0])
    except ValueError:
        return None


def _num(v: str):
    try:
        f = float(v)
        return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
    except ValueError:
        return v


class TensorBoardLogger:
    def __init__(self, logdir: str | Path, purge_step: int | None = None):
        """`purge_step`: a resumed run's first new step; TensorBoard hides the crashed attempt's events from
        there on instead of drawing both."""
        self.logdir = Path(logdir)
        self.writer = self._open(purge_step)

    def _open(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard import costs ~1 s

        return SummaryWriter(str(self.logdir), purge_step=purge_step)

    def _writer(self):
        if self.writer is None:  # after close(): the end-of-run hparams and figures go to a new event file
            self.writer = self._open()
        return self.writer

    def log_epoch(self, row: dict) -> None:
        step = row.get("step", 0)
        for k, v in row.items():
            if k not in ("epoch", "step") and isinstance(v, (int, float)):
                self._writer().add_scalar(k if "/" in k else f"epoch/{k}", v, step)
        self._writer().flush()

    def log_step(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self._writer().add_scalar(k, v, step)

    def log_hparams(self, hparams: dict, metrics: dict, step: int) -> None:
        """The hparams dashboard's row for this run: `hparams` (scalars and strings) with `metrics` (numbers),
        written into the run's own log folder so the row and its curves are one run in TensorBoard."""
        self._writer().add_hparams(hparams, metrics, run_name=".", global_step=step)

    def log_image_file(self, tag: str, path: str | Path, step: int) -> None:
        """A PNG the run wrote (curves, confusion matrix), as an image at `step`."""
        import numpy as np
        from PIL import Image  # matplotlib's own dependency

        with Image.open(path) as im:
            self._writer().add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")
        self._writer().flush()

    def load(self, step: int | None = None) -> None: ...

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ----- MLflow --------------------------------------------------------------------------------------------------
MLFLOW_ACCEPTED = ("sqlite:///<file.db> (the default is sqlite:///<logging.root>/mlflow.db), http(s)://<tracking "
                   "server>, a database URI (postgresql://, mysql://), or a folder (file store; MLflow 3 needs "
                   "MLFLOW_ALLOW_FILE_STORE=true)")
MAX_BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics (and 100 params) per call


def _mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network calls from a training run
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise MissingDependencyError('logging.loggers: mlflow needs the mlflow package: pip install "lamina[track]"'
                                     ) from None
    return MlflowClient


@contextmanager
def _quiet_store_setup():
    """MLflow logs each schema migration of a new SQL store at INFO (a dozen lines on a first run): not the
    user's business unless it fails, which surfaces as an exception."""
    names = ("mlflow", "alembic")
    levels = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for n, lv in zip(names, levels):
            logging.getLogger(n).setLevel(lv)


class MLflowStore:
    """An opened MLflow tracking store and experiment. Opening it checks the URI first, so a store that cannot
    be opened fails before anything trains or is written (one line: the URI and what is accepted)."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None):
        client_cls = _mlflow()
        self.tracking_uri = tracking_uri
        local = _sqlite_file(tracking_uri)
        try:
            if local is not None:
                local.parent.mkdir(parents=True, exist_ok=True)
            with _quiet_store_setup():
                self.client = client_cls(tracking_uri=tracking_uri)
                exp = self.client.get_experiment_by_name(experiment)
                if exp is None:
                    self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
                elif exp.lifecycle_stage != "active":
                    raise ConfigError(f"logging.mlflow.experiment: {experiment!r} is deleted in {tracking_uri}; "
                                      "restore it (mlflow experiments restore) or name another")
                else:
                    self.experiment_id = exp.experiment_id
        except ConfigError:
            raise
        except Exception as e:  # the store is another system: any failure to open it is the URI's
            msg = _first_sentence(e)
            if "MLFLOW_ALLOW_FILE_STORE" in str(e):
                msg = "MLflow refuses a file store unless MLFLOW_ALLOW_FILE_STORE=true"
            raise ConfigError(f"logging.mlflow.tracking_uri: cannot open MLflow store {tracking_uri!r} ({msg}); "
                              f"accepted: {MLFLOW_ACCEPTED}") from None

    def start(self, run_name: str, params: dict, tags: dict, run_id: str | None = None) -> "MLflowLogger":
        """A new run (params and tags logged), or `run_id` continued (a resumed lamina run: params stay as
        first logged, since MLflow refuses to change one)."""
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "lamina.resumed", "true")
            return MLflowLogger(self.client, run_id, resumed=True, where=(self.tracking_uri, self.experiment_id))
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        lg = MLflowLogger(self.client, run.info.run_id, where=(self.tracking_uri, self.experiment_id))
        lg.log_params(params)
        return lg

    def run_exists(self, run_id: str) -> bool:
        try:
            run = self.client.get_run(run_id)
        except Exception:  # MlflowException: no such run in this store
            return False
        return run.info.lifecycle_stage == "active" and run.info.experiment_id == self.experiment_id


def _first_sentence(e: Exception) -> str:
    text = " ".join(str(e).split())
    return (text.split(". ", 1)[0][:200] if text else type(e).__name__).rstrip(".")


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (its folder is created), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


class MLflowLogger:
    """Metrics of one MLflow run. Values are buffered and written in batches at each epoch's end and at close
    (one store transaction per epoch instead of one per logged step). A resumed run skips the points its store
    already has (steps the crashed attempt logged after its last checkpoint), so no step appears twice.

    `close()` (end of fit) writes what is buffered; `finish(status)` ends the run. lamina.runs finishes it after
    the run's artifacts; a direct Trainer user calls `finish()` after fit."""

    def __init__(self, client, run_id: str, resumed: bool = False, where: tuple[str, str] | None = None):
        self.client, self.run_id = client, run_id
        self.tracking_uri, self.experiment_id = where or (None, None)
        self._buffer: list = []
        self._logged_up_to: dict[str, int] = {}
        if resumed:
            for key in ("train/loss_step", "train/loss"):
                hist = client.get_metric_history(run_id, key)
                if hist:
                    self._logged_up_to[key] = max(m.step for m in hist)

    def _add(self, key: str, value, step: int) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return
        from mlflow.entities import Metric

        self._buffer.append(Metric(key, float(value), int(time.time() * 1000), int(step)))

    def _skip(self, key: str, step: int) -> bool:
        return step <= self._logged_up_to.get(key, -1)

    def log_step(self, step: int, values: dict) -> None:
        if self._skip("train/loss_step", step):
            return
        for k, v in values.items():
            self._add(k, v, step)
        if len(self._buffer) >= MAX_BATCH:
            self.flush()

    def log_epoch(self, row: dict) -> None:
        step = int(row.get("step", 0))
        if self._skip("train/loss", step):
            return
        for k, v in row.items():  # names as in TensorBoard: epoch/lr is not the per-step lr
            if k != "step":
                self._add(k if "/" in k or k == "epoch" else f"epoch/{k}", v, step)
        self.flush()

    def log_metrics(self, values: dict, step: int) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._add(k, v, step)
        self.flush()

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        # MLflow takes keys of letters, digits and _-. :/ (a free model option may have others) and values of at
        # most 6000 characters
        items = [Param(re.sub(r"[^\w\-. :/]", "_", k)[:250], str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:MAX_BATCH], self._buffer[MAX_BATCH:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def load(self, step: int | None = None) -> None: ...

    def close(self) -> None:
        self.flush()

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status)
