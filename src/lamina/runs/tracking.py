"""Experiment tracking of a run: which loggers it writes to (`logging.loggers`), and what they get at its end.

During training every logger gets the per-step loss and learning rate and one row per epoch (engine/loggers.py).
At the end of a run, after the outputs (summary.json, plots):

- TensorBoard: the flattened config as hparams with the final, best and test metrics (the HPARAMS dashboard), and
  every figure of the run folder (curves.png, confusion.png, ...) as an image.
- MLflow: test and best metrics, the run folder's files (summary.json, config.yaml, metrics.csv, steps.csv, the
  PNGs, report.html when there is one), checkpoints/last's weights and meta.json, and the model: `model/` holds
  the best checkpoint's model.safetensors and meta.json with config.yaml and data.json, a checkpoint folder that
  `lamina eval`, `open_run` and `load_model_weights` read as they are (safetensors and JSON: no pickle).

The MLflow run's id is kept in the run folder (mlflow.json), so `lamina train --resume` continues the same run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lamina import __version__
from lamina.config import RunConfig, to_dict
from lamina.engine.loggers import CSVLogger, MLflowLogger, MLflowStore, TensorBoardLogger
from lamina.errors import CheckpointError, ConfigError
from lamina.io import atomic_write_text
from lamina.runs.folder import RunFolder

# run-folder files an MLflow run keeps (top level only: tools' folders such as compressed/ stay out)
ARTIFACT_SUFFIXES = (".json", ".yaml", ".csv", ".png", ".html", ".safetensors")
MODEL_FILES = ("model.safetensors", "meta.json")  # state.pt (optimizer, RNG) is for resuming, not for the model
RUN_FILES_FOR_MODEL = ("config.yaml", "data.json", "tokenizer.json")


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested config -> {"trainer.max_epochs": 20, ...}: numbers and strings only (lists as JSON, None as
    "null", booleans as "true"/"false"), what TensorBoard's hparams and MLflow's params take."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, bool):
            out[key] = "true" if v else "false"
        elif isinstance(v, (int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out


def default_tracking_uri(cfg: RunConfig) -> str:
    return "sqlite:///" + str(Path(cfg.logging.root).resolve() / "mlflow.db")


def open_store(cfg: RunConfig) -> MLflowStore | None:
    """The run's MLflow store when `logging.loggers` has mlflow (opened before the run starts: a bad URI fails
    first), else None. A sqlite store keeps its artifacts beside the database (<folder>/mlartifacts/)."""
    if "mlflow" not in cfg.logging.active():
        return None
    m = cfg.logging.mlflow
    uri = m.tracking_uri or default_tracking_uri(cfg)
    artifacts = None
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):].split("?", 1)[0]
        if db and db != ":memory:":
            artifacts = (Path(db).resolve().parent / "mlartifacts").as_uri()
    return MLflowStore(uri, m.experiment, artifact_location=artifacts)


def run_tags(cfg: RunConfig, task: str, folder: RunFolder) -> dict:
    return {"lamina.version": __version__, "lamina.data": cfg.data.name, "lamina.model": cfg.model.name,
            "lamina.task": task, "lamina.run_dir": str(folder.path.resolve())}


def build_loggers(cfg: RunConfig, folder: RunFolder, task: str, store: MLflowStore | None = None,
                  resume_step: int | None = None) -> list:
    """metrics.csv + steps.csv always, then the configured loggers (rank 0 only). `resume_step`: the global step
    of the checkpoint a resumed run starts from."""
    csv_logger = CSVLogger(folder.metrics, steps=folder.steps)
    loggers: list = [csv_logger]
    active = cfg.logging.active()
    if "tensorboard" in active:
        loggers.append(TensorBoardLogger(folder.tensorboard,
                                         purge_step=resume_step + 1 if resume_step is not None else None))
    if store is not None:
        loggers.append(_mlflow_logger(cfg, folder, task, store, resume_step is not None))
    if resume_step is not None:
        csv_logger.load(resume_step)
    return loggers


def _mlflow_logger(cfg: RunConfig, folder: RunFolder, task: str, store: MLflowStore, resumed: bool):
    pointer = folder.mlflow
    run_id = None
    if resumed and pointer.is_file():
        try:
            saved = json.loads(pointer.read_text())
        except (OSError, ValueError):
            saved = {}
        if isinstance(saved, dict) and saved.get("tracking_uri") == store.tracking_uri \
                and isinstance(saved.get("run_id"), str) and store.run_exists(saved["run_id"]):
            run_id = saved["run_id"]
    lg = store.start(folder.path.name, flatten(to_dict(cfg)), run_tags(cfg, task, folder), run_id=run_id)
    atomic_write_text(pointer, json.dumps({"tracking_uri": store.tracking_uri, "experiment_id": store.experiment_id,
                                           "run_id": lg.run_id}, indent=2))
    return lg


def end_metrics(summary: dict) -> dict:
    """The numbers a run ends with: its last epoch's (final/...), the best monitored value (best/<monitor>) and the
    test metrics (test/...); finite numbers only."""
    out = {f"final/{k}": v for k, v in (summary.get("final") or {}).items() if k not in ("epoch", "step")}
    if summary.get("best_monitor") is not None and summary.get("monitor"):
        out[f"best/{summary['monitor']}"] = summary["best_monitor"]
    out.update(summary.get("test") or {})
    return {k: float(v) for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def figures(folder: RunFolder) -> list[Path]:
    return sorted(p for p in folder.path.glob("*.png") if p.is_file())


def track_run_end(cfg: RunConfig, folder: RunFolder, summary: dict, loggers: list) -> None:
    """Hparams and figures to TensorBoard; metrics, files and the model to MLflow, which then ends the run."""
    step = int(summary.get("steps") or 0)
    metrics = end_metrics(summary)
    for lg in loggers:
        if isinstance(lg, TensorBoardLogger):
            lg.log_hparams(flatten(to_dict(cfg)), metrics, step)
            for png in figures(folder):
                lg.log_image_file(f"figures/{png.stem}", png, step)
            lg.close()
        elif isinstance(lg, MLflowLogger):
            try:
                lg.log_metrics({k: v for k, v in metrics.items() if not k.startswith("final/")}, step)
                _mlflow_artifacts(lg, folder)
            except Exception as e:  # e.g. an artifact location this machine cannot write: the run folder is whole
                msg = " ".join(str(e).split())[:200] or type(e).__name__
                raise ConfigError(f"logging.mlflow: the run's files could not be stored in MLflow run {lg.run_id} "
                                  f"of {lg.tracking_uri} ({msg}); the run folder {folder.path} is complete") from None
            lg.finish("FINISHED")


def _mlflow_artifacts(lg, folder: RunFolder) -> None:
    for f in sorted(folder.path.iterdir()):
        if f.is_file() and f.suffix in ARTIFACT_SUFFIXES and not f.name.startswith("."):
            lg.log_artifact(f)
    try:
        model = folder.checkpoint("best")
    except CheckpointError:  # a run that ended before its first checkpoint: nothing to ship
        return
    for name in MODEL_FILES:
        lg.log_artifact(model / name, "model")
    for name in RUN_FILES_FOR_MODEL:
        if (folder.path / name).is_file():
            lg.log_artifact(folder.path / name, "model")
    last = folder.checkpoints / "last"
    if last.is_dir() and last.resolve() != model.resolve():
        for name in MODEL_FILES:
            if (last / name).is_file():
                lg.log_artifact(last / name, "checkpoints/last")


def tracking_summary(loggers: list) -> dict:
    """summary["tracking"]: where the run's MLflow run is ({} without one)."""
    return {"mlflow": {"tracking_uri": lg.tracking_uri, "experiment_id": lg.experiment_id, "run_id": lg.run_id}
            for lg in loggers if isinstance(lg, MLflowLogger)}


def track_failed(loggers: list) -> None:
    """A run that raised: its MLflow run ends FAILED (what was logged stays)."""
    for lg in loggers:
        if isinstance(lg, MLflowLogger):
            try:
                lg.finish("FAILED")
            except Exception:  # the original error matters more than a second one from the store
                pass
