"""Callbacks: hooks the Trainer calls at fixed points. State they keep is saved with checkpoints.

Hooks: on_fit_start, on_train_batch_end (only called for callbacks that define it: the hot path stays
clean), on_train_epoch_end (after an epoch's training, before its validation and checkpoints; also looked up
with hasattr), on_epoch_end(metrics) after validation, on_fit_end. A callback stops training by setting
`trainer.should_stop = True`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


class Callback:
    def on_fit_start(self, trainer) -> None: ...
    def on_epoch_end(self, trainer, metrics: dict) -> None: ...
    def on_fit_end(self, trainer) -> None: ...
    # on_train_batch_end(self, trainer, loss) is looked up with hasattr, see Trainer.fit

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


def _better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class ModelCheckpoint(Callback):
    """Saves `last` after every epoch and `best` whenever the monitored metric improves."""

    def __init__(self, dirpath: str | Path, monitor: str = "val/loss", mode: str = "min", save_last: bool = True):
        self.dir, self.monitor, self.mode, self.save_last = Path(dirpath), monitor, mode, save_last
        self.best: float | None = None
        self.best_epoch: int | None = None

    def on_epoch_end(self, trainer, metrics):
        value = metrics.get(self.monitor)
        if value is not None and _better(value, self.best, self.mode):
            self.best, self.best_epoch = value, trainer.epoch
            trainer.save_checkpoint(self.dir / "best", metrics)
        if self.save_last:
            trainer.save_checkpoint(self.dir / "last", metrics)

    def on_fit_end(self, trainer):
        # A max_steps stop mid-epoch still leaves a resumable `last`.
        if self.save_last and trainer.batch_in_epoch:
            trainer.save_checkpoint(self.dir / "last", trainer.last_metrics)

    def state_dict(self):
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state):
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")


class EarlyStopping(Callback):
    """Stops after `patience` evaluations without improvement (None: never), and/or as soon as the monitor reaches
    `stop_at` (a quality target: a time-to-target run ends there instead of spending the rest of its budget)."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min", patience: int | None = 5, min_delta: float = 0.0,
                 stop_at: float | None = None):
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.stop_at = stop_at
        self.best: float | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        self.reached_target_epoch: int | None = None

    def on_epoch_end(self, trainer, metrics):
        value = metrics.get(self.monitor)
        if value is None:
            return
        if self.stop_at is not None and (value <= self.stop_at if self.mode == "min" else value >= self.stop_at):
            trainer.should_stop, self.stopped_epoch, self.reached_target_epoch = True, trainer.epoch, trainer.epoch
        if self.patience is None:
            return
        if _better(value, self.best, self.mode, self.min_delta):
            self.best, self.wait = value, 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                trainer.should_stop, self.stopped_epoch = True, trainer.epoch

    def state_dict(self):
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state):
        self.best, self.wait = state.get("best"), state.get("wait", 0)


class LRMonitor(Callback):
    """Adds the learning rate of each param group to the epoch metrics (lr, lr/1, ...)."""

    def on_epoch_end(self, trainer, metrics):
        for i, g in enumerate(trainer.optimizer.param_groups):
            metrics["lr" if i == 0 else f"lr/{i}"] = g["lr"]


class BatchNormRecalibration(Callback):
    """Recompute BatchNorm running statistics from training batches at the end of each epoch, before validation
    and checkpoints (torch.optim.swa_utils.update_bn's method: reset, then a cumulative average over batches
    in train mode, no gradients).

    Why: the running statistics are an exponential average (momentum 0.1) of batch statistics taken while the
    weights move. In a short run at a high learning rate they trail the weights so far that evaluation is
    garbage: the default digits job cut to 2 epochs (40 steps) trains to 98% accuracy and validates at 10%
    (every prediction one class); recalibrated, 97.8%. The runs layer adds this callback to short runs only,
    so long runs keep their exact numbers. Everything it touches is restored: the train loader's state and
    the RNG (resume stays bit-exact), the BN momentum, the model's mode. Under DDP the ranks' statistics are
    averaged so every replica evaluates alike.
    """

    def __init__(self, max_batches: int = 50):
        self.max_batches = max_batches

    def on_train_epoch_end(self, trainer) -> None:
        from lamina.engine.seed import rng_state, set_rng_state

        model = trainer.model
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               and m.track_running_stats]
        if not bns:
            return
        loader = trainer.train_loader
        loader_state = loader.state_dict() if hasattr(loader, "state_dict") else None
        rng, momenta, was_training = rng_state(), [m.momentum for m in bns], model.training
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        model.train()
        try:
            with torch.no_grad():
                for i, batch in enumerate(loader):
                    if i >= self.max_batches:
                        break
                    with trainer.eval_precision.autocast():  # statistics for the precision evaluation runs in
                        trainer.task.forward(model, trainer.to_device(batch))
        finally:
            for m, mom in zip(bns, momenta):
                m.momentum = mom
            model.train(was_training)
            if loader_state is not None:
                loader.load_state_dict(loader_state)
            set_rng_state(rng)
        if trainer.dist.world_size > 1:
            for m in bns:
                for buf in (m.running_mean, m.running_var):
                    buf.copy_(trainer.dist.all_reduce_sum(buf.clone()) / trainer.dist.world_size)
