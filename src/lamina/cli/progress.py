"""Live progress in the terminal: `RichProgress` for `lamina train` (a bar per epoch, one summary line per epoch,
and a bar for a validation or test pass that runs longer than a few seconds), and `progress_bar` for every other
long piece of work.

The library's progress protocol: a long function takes `progress: Callable[[int, int], None] | None = None` and
calls `progress(done, total)` as work completes: done never falls within a phase and ends at total. A function
with several phases (an evaluation pass, then beam-search decoding) starts each at 0 with the phase's own total.
Nothing below cli draws anything; None (the default) costs nothing. Bars go to stderr, only when it is a terminal.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

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
        self.eval_delay_s = 2.0  # a validation / test pass gets a bar once it has run this long
        self._fitting = False
        self._eval_task = None
        self._eval_t0 = 0.0
        self._eval_bar: LazyBar | None = None

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
            TextColumn("[bold]{task.description}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
            TimeRemainingColumn(), console=self.console, transient=True, auto_refresh=False,
        )
        self.progress.start()
        self._fitting = True
        self._new_epoch(trainer)

    def _new_epoch(self, trainer):
        if self._task is not None:
            self.progress.remove_task(self._task)
        self._task = self.progress.add_task(f"epoch {trainer.epoch + 1}/{trainer.cfg.max_epochs}",
                                            total=len(trainer.train_loader), loss="-")
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

    def on_eval_progress(self, trainer, prefix: str, done: int, total: int):
        """A validation pass during fit (a row under the epoch's bar), or the test pass after it (a bar of its
        own), drawn once the pass has run `eval_delay_s`; nothing when stderr is not a terminal."""
        if not self.console.is_terminal:
            return
        if not self._fitting:
            if done == 0 or self._eval_bar is None:
                if self._eval_bar is not None:
                    self._eval_bar.close()
                self._eval_bar = LazyBar(self.console, prefix, self.eval_delay_s, self.refresh_s)
            self._eval_bar(done, total)
            if done >= total:
                self._eval_bar.close()
                self._eval_bar = None
            return
        now = time.perf_counter()
        if done == 0:
            self._eval_t0 = now
        if self._eval_task is None:
            if now - self._eval_t0 < self.eval_delay_s or done >= total:
                return
            self._eval_task = self.progress.add_task(prefix, total=total, loss="-")
        self.progress.update(self._eval_task, completed=done)
        if done >= total:
            self.progress.remove_task(self._eval_task)
            self._eval_task = None
        if now - self._last >= self.refresh_s or done >= total:
            self._last = now
            self.progress.refresh()

    def on_fit_end(self, trainer):
        self._fitting = False
        if self.progress is not None:
            self.progress.stop()


class LazyBar:
    """A `progress(done, total)` sink drawing a transient rich bar on `console`, from the moment the work has run
    `delay_s` seconds (short work draws nothing). A new phase simply sets a new count and total."""

    def __init__(self, console: Console, label: str, delay_s: float = 0.0, refresh_s: float = 0.1):
        self.console, self.label, self.delay_s, self.refresh_s = console, label, delay_s, refresh_s
        self.progress: Progress | None = None
        self._task = None
        self._t0: float | None = None
        self._drawn = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self._t0 is None:  # the delay counts from the first call (by the protocol: progress(0, total))
            self._t0 = now
        if self.progress is None:
            if now - self._t0 < self.delay_s or done >= total:
                return
            self.progress = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                                     transient=True, auto_refresh=False)
            self.progress.start()
            self._task = self.progress.add_task(self.label, total=total)
        self.progress.update(self._task, completed=done, total=total)
        if now - self._drawn >= self.refresh_s or done >= total:
            self._drawn = now
            self.progress.refresh()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def bar_wanted(console: Console, no_progress: bool = False) -> bool:
    """A bar only when asked for and stderr is a terminal (no control codes in logs or pipes)."""
    return not no_progress and console.is_terminal


@contextlib.contextmanager
def progress_bar(console: Console, label: str, no_progress: bool = False,
                 delay_s: float = 0.0) -> Iterator[Callable[[int, int], None] | None]:
    """`with progress_bar(console, "attack", a.no_progress) as progress: lib_fn(..., progress=progress)`; yields
    None (no bar) under --no-progress or when stderr is not a terminal."""
    if not bar_wanted(console, no_progress):
        yield None
        return
    bar = LazyBar(console, label, delay_s)
    try:
        yield bar
    finally:
        bar.close()
