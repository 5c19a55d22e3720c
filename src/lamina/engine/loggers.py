"""Metric sinks: metrics.csv (rewritten atomically each epoch, wide format) and TensorBoard events."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lamina.io import atomic_write_text


class CSVLogger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[dict] = []

    def log_epoch(self, row: dict) -> None:
        self.rows.append(dict(row))
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())

    def log_step(self, step: int, values: dict) -> None: ...

    def load(self) -> None:
        """Pick up earlier rows (resume)."""
        if self.path.is_file():
            with open(self.path) as f:
                self.rows = [{k: _num(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]

    def close(self) -> None: ...


def _num(v: str):
    try:
        f = float(v)
        return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
    except ValueError:
        return v


class TensorBoardLogger:
    def __init__(self, logdir: str | Path):
        from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard import costs ~1 s

        self.writer = SummaryWriter(str(logdir))

    def log_epoch(self, row: dict) -> None:
        step = row.get("step", 0)
        for k, v in row.items():
            if k not in ("epoch", "step") and isinstance(v, (int, float)):
                self.writer.add_scalar(k if "/" in k else f"epoch/{k}", v, step)
        self.writer.flush()

    def log_step(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def load(self) -> None: ...

    def close(self) -> None:
        self.writer.close()
