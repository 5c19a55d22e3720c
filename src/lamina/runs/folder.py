"""RunFolder: the one place that knows a run folder's layout.

    runs/<name>/config.yaml        resolved config (re-run with `lamina train runs/<name>/config.yaml`)
    runs/<name>/data.json          data facts needed to treat new inputs like training inputs
    runs/<name>/tokenizer.json     text runs: the tokenizer the data was cut with
    runs/<name>/metrics.csv        one row per epoch
    runs/<name>/steps.csv          one row per logged step: step, train/loss_step, lr (every trainer.log_every)
    runs/<name>/mlflow.json        the MLflow run it logs to (logging.loggers has mlflow)
    runs/<name>/tb/                TensorBoard events
    runs/<name>/checkpoints/{last,best}/
    runs/<name>/summary.json       final metrics, parameters, wall time, throughput
    runs/<name>/curves.png, confusion.png, adapters.safetensors (LoRA runs)
    runs/<name>/comparisons.json   the `lamina compare` pages that include this run

Tools write their own outputs beside these (attack.json, calibration.json, report.html, compressed/, ...)
through `RunFolder.path`.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from lamina.engine.checkpoint import resolve
from lamina.errors import ConfigError
from lamina.io import atomic_write_text

class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ----- the layout ------------------------------------------------------------------------------------
    config = property(lambda self: self.path / "config.yaml")
    data_facts = property(lambda self: self.path / "data.json")
    tokenizer = property(lambda self: self.path / "tokenizer.json")
    metrics = property(lambda self: self.path / "metrics.csv")
    tensorboard = property(lambda self: self.path / "tb")
    checkpoints = property(lambda self: self.path / "checkpoints")
    summary = property(lambda self: self.path / "summary.json")
    curves = property(lambda self: self.path / "curves.png")
    confusion = property(lambda self: self.path / "confusion.png")
    adapters = property(lambda self: self.path / "adapters.safetensors")
    mlflow = property(lambda self: self.path / "mlflow.json")  # the MLflow run this run logs to (logging.loggers)
    steps = property(lambda self: self.path / "steps.csv")  # per-step rows, when a logger wrote them
    comparisons = property(lambda self: self.path / "comparisons.json")  # `lamina compare` pages with this run

    def checkpoint(self, which: str = "best") -> Path:
        """checkpoints/<which>, or checkpoints/last when the run has no such checkpoint (a run without
        validation has no `best`), after the crash fallbacks of engine.checkpoint.resolve."""
        cand = self.checkpoints / which
        if cand.exists() or (self.checkpoints / f".{which}.old").exists():
            return resolve(cand)
        return resolve(self.checkpoints / "last")

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.path / name, text)

    # ----- finding and creating folders ------------------------------------------------------------------
    @staticmethod
    def is_run(path: str | Path) -> bool:
        """A run folder (with checkpoints/) or a checkpoint folder (with meta.json)?"""
        p = Path(path)
        return p.is_dir() and ((p / "checkpoints").is_dir() or (p / "meta.json").is_file())

    @staticmethod
    def locate(path: str | Path, which: str = "best") -> tuple["RunFolder", Path]:
        """(folder, checkpoint) for a run folder or a checkpoint folder (or a file inside one)."""
        p = Path(path)
        if (p / "checkpoints").is_dir():
            folder = RunFolder(p)
            return folder, folder.checkpoint(which)
        ckpt = resolve(p)
        return RunFolder(ckpt.parent.parent), ckpt  # runs/<name>/checkpoints/<which> -> runs/<name>

    @staticmethod
    def new(root: str | Path, name: str | None, data: str, model: str) -> "RunFolder":
        """A folder name not yet taken under `root`: `name`, else <data>-<model>-<time>; -2, -3, ... on clashes."""
        if name is not None and ("/" in name or "\\" in name or name in (".", "..") or not name.strip()):
            raise ConfigError(f"name: {name!r} is not a folder name (no path separators, '.' or '..'); runs go "
                              "under logging.root")
        name = name or f"{data}-{model}-{datetime.now():%Y%m%d-%H%M%S}"
        root = Path(root)
        d, i = root / name, 2
        while d.exists():
            d, i = root / f"{name}-{i}", i + 1
        return RunFolder(d)

    @staticmethod
    def elastic_pointer(root: str | Path) -> Path:
        """Where the first attempt of a torchrun job records its run folder, for restarted workers to find."""
        return Path(root) / ".elastic" / f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}.txt"
