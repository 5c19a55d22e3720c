"""When did validation stop following training? `overfitting_onset(history)` and the `OverfittingMonitor`
callback. Here in the runs layer because every run's summary.json records the verdict (a post-run output) and
the tools (trust.overfitting's learning curves, report) read it.

Onset rule: the first epoch after the best validation loss, provided validation loss then stays above that
best for `patience` epochs while training loss keeps falling. Requiring both halves separates overfitting
(train improves, val worsens) from noise or a too-high learning rate (both worsen). The gap itself is
val - train of the same metric; with augmentation or dropout on, train loss is measured under them, so the
gap can start negative: its trend, not its sign, carries the signal.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from lamina.engine.callbacks import Callback
from lamina.errors import ConfigError, DataError


def _series(history: list[dict], key: str) -> list[float | None]:
    out = []
    for row in history:
        v = row.get(key)
        try:
            v = float(v) if v not in (None, "") else None
        except (TypeError, ValueError):
            v = None
        out.append(v if v is not None and math.isfinite(v) else None)
    return out


def overfitting_onset(history: list[dict], train_key: str = "train/loss", val_key: str = "val/loss",
                      patience: int = 2, min_rise: float = 0.0) -> dict:
    """Gap per epoch and the epoch overfitting began. `history`: rows of metrics.csv (or Trainer.fit's
    return). `min_rise`: relative amount val must exceed its best by to count (0.01 = 1%)."""
    if patience < 1:
        raise ConfigError(f"patience: expected a positive integer, got {patience}")
    rows = [(r.get("epoch"), t, v) for r, t, v in zip(history, _series(history, train_key), _series(history, val_key))
            if t is not None and v is not None]
    if not rows:
        raise DataError(f"overfitting check needs '{train_key}' and '{val_key}' in the history; "
                        f"found: {', '.join(sorted({k for r in history for k in r})) or 'no rows'}")
    epochs = [int(float(e)) if e not in (None, "") else i + 1 for i, (e, _, _) in enumerate(rows)]
    train = np.array([t for _, t, _ in rows])
    val = np.array([v for _, _, v in rows])
    best = int(np.argmin(val))
    onset = None
    after = val[best + 1:]
    if len(after) >= patience and (after > val[best] * (1 + min_rise)).all() and train[-1] < train[best]:
        onset = epochs[best + 1]
    gap = (val - train).tolist()
    out = {"train_key": train_key, "val_key": val_key, "epochs": epochs, "gap": gap,
           "best_epoch": epochs[best], "best_val": float(val[best]), "overfitting": onset is not None,
           "onset_epoch": onset, "final_gap": gap[-1], "gap_at_best": gap[best],
           "val_rise": float(val[-1] - val[best]), "train_drop_since_best": float(train[best] - train[-1])}
    if onset is not None:
        out["advice"] = (f"validation loss has risen since epoch {onset} (best {val[best]:.4f} at epoch "
                         f"{epochs[best]}, now {val[-1]:.4f}) while training loss fell: stop at the best epoch "
                         "(trainer.early_stopping.patience), add data or augmentation (data.augment), or "
                         "regularize (optimizer.weight_decay, dropout)")
    return out


class OverfittingMonitor(Callback):
    """Warns once, during training, when `overfitting_onset` fires on the history so far."""

    def __init__(self, patience: int = 2, train_key: str = "train/loss", val_key: str = "val/loss"):
        self.patience, self.train_key, self.val_key = patience, train_key, val_key
        self.rows: list[dict] = []
        self.found: dict | None = None

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        self.rows.append(dict(metrics))
        if self.found is not None or self.val_key not in metrics:
            return
        try:
            res = overfitting_onset(self.rows, self.train_key, self.val_key, self.patience)
        except DataError:
            return
        if res["overfitting"]:
            self.found = res
            warnings.warn(f"overfitting: {res['advice']}", stacklevel=2)

    def state_dict(self) -> dict:
        return {"rows": self.rows, "found": self.found}

    def load_state_dict(self, state: dict) -> None:
        self.rows, self.found = list(state.get("rows", [])), state.get("found")
