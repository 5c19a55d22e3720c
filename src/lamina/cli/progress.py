"""Live progress for `lamina train`: a rich progress bar per epoch plus one summary line per epoch."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lamina.engine.callbacks import Callback

_SHOW = ("train/loss", "train/acc", "train/mae", "val/loss", "val/acc", "val/ppl", "val/mae", "val/r2", "val/zero_shot_acc",
         "val/i2t_top1", "train/top1", "val/top1", "val/eer")


class RichProgress(Callback):
    def __init__(self, console: Console | None = None, refresh_s: float = 0.1, header: bool = True):
        self.console = console or Console(stderr=True)
        self.header = header  # False: the caller printed its own (one fit of many, e.g. a continual stream)
        self.refresh_s = refresh_s
        self.progress: Progress | None = None
        self._task = None
        self._last = 0.0

    def on_fit_start(self, trainer):
        # Printed here, after data, model and config were all accepted: a rejected run prints one line only.
        m = trainer.checkpoint_info
        if self.header:
            self.console.print(f"[bold]lamina train[/]: data [cyan]{m.get('data', {}).get('name', '?')}[/], model "
                               f"[cyan]{m.get('model', '?')}[/], {trainer.cfg.max_epochs} epochs on {trainer.device}"
                               + (f", resuming at epoch {trainer.epoch + 1}" if trainer.epoch else ""))
            if trainer.perf is not None and trainer.cfg.perf.enabled:
                self.console.print(trainer.perf.note(), markup=False, highlight=False)
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
            TimeRemainingColumn(), console=self.console, transient=True, auto_refresh=False,
        )
        self.progress.start()
        self._new_epoch(trainer)

    def _new_epoch(self, trainer):
        if self._task is not None:
            self.progress.remove_task(self._task)
        self._task = self.progress.add_task("train", total=len(trainer.train_loader), epoch=trainer.epoch + 1,
                                            epochs=trainer.cfg.max_epochs, loss="-")
        self._count = trainer.batch_in_epoch
        self.progress.update(self._task, completed=self._count)

    def on_train_batch_end(self, trainer, loss):
        self._count += 1
        now = time.perf_counter()
        if now - self._last >= self.refresh_s:  # rate-limited: keeps the hot path cheap
            self._last = now
            self.progress.update(self._task, completed=self._count, loss=f"{float(loss.detach()):.4f}")
            self.progress.refresh()

    def on_epoch_end(self, trainer, metrics):
        parts = [f"{k} {metrics[k]:.4f}" for k in _SHOW if k in metrics]
        self.progress.console.print(f"epoch {metrics['epoch']:>3}/{trainer.cfg.max_epochs}  " + "  ".join(parts)
                                    + f"  ({metrics.get('time', 0):.1f}s)")
        if trainer.epoch < trainer.cfg.max_epochs:
            self._new_epoch(trainer)

    def on_fit_end(self, trainer):
        if self.progress is not None:
            self.progress.stop()
