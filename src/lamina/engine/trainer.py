"""The Trainer: a few verbs (setup, train_step, backward, clip_gradients, optimizer_step, evaluate,
save_checkpoint) and `fit()` as a convenience loop over them. Override `train_step` to change what one
micro-batch does; everything else (precision, accumulation, clipping, scheduling, checkpoints, resume)
stays the same. Ways to train other than a task's plain loss are not here: they are task wrappers
(lamina.runs.objectives) the Trainer calls like any task. Constructing a Trainer changes no global state;
thread count, deterministic mode and (under torchrun or fsdp) the process group are set up on first use.

Distributed (`trainer.strategy=ddp|fsdp` under torchrun, see engine/distributed.py): the Trainer is the same
on every rank. It wraps the model (DDP / FSDP2), gives each rank its part of every global batch, averages the
epoch's training sums and the evaluation metrics over ranks, writes logs and plain checkpoints on rank 0 only,
and writes sharded (DCP) checkpoints from every rank. Checkpoints keep every rank's RNG state, so a restart at
the same world size continues exactly; at another world size, rank r takes the state of saved rank r % N.

Speed preset (`trainer.perf`, engine/perf.py): setup asks `plan_perf` what to use for this model and machine
(bf16 autocast, channels_last, torch.compile) and applies it; evaluation stays in trainer.precision.

Hot-path rules: no host sync per step (training stats are summed on device and read once per log
interval; the NaN check reads one bool per step only on CPU, where it costs nothing), callbacks without
`on_train_batch_end` are not called per step, and in-memory data is indexed in whole batches.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lamina.config.io import validate_section
from lamina.config.schema import TrainerConfig
from lamina.engine.callbacks import ModelCheckpoint
from lamina.engine.checkpoint import (load_checkpoint, load_sharded_into, load_weights, save_checkpoint,
                                      save_sharded_checkpoint)
from lamina.engine.distributed import Distributed
from lamina.engine.perf import PerfPlan, plan_perf
from lamina.engine.precision import Precision, select_device
from lamina.engine.seed import rng_state, set_deterministic, set_rng_state
from lamina.errors import CheckpointError, TrainingError


class Trainer:
    def __init__(self, config: TrainerConfig | None = None, callbacks=(), loggers=(), dist: Distributed | None = None,
                 **overrides):
        """Builds nothing global: the process group (under torchrun or fsdp), thread count and deterministic mode
        are set up on first use (`setup`, `evaluate`, `predict`, or reading `dist` / `device`)."""
        cfg = config or TrainerConfig()
        # keyword overrides (Trainer(max_epochs=3)) get the same validation and messages as YAML
        self.cfg = validate_section(TrainerConfig, {**cfg.model_dump(), **overrides}, "trainer") if overrides else cfg
        self.callbacks = list(callbacks)
        self.loggers = list(loggers)
        self._dist = dist
        self._precision = self._eval_precision = None
        self.perf: PerfPlan | None = None  # what setup decided (trainer.perf preset + explicit settings)
        self._process_set = False
        self.model = self.optimizer = self.scheduler = self.task = None
        self.train_loader = None
        self.epoch = 0  # epochs completed
        self.global_step = 0  # optimizer steps taken
        self.batch_in_epoch = 0  # micro-batches consumed in the current epoch
        self.should_stop = False
        self.last_metrics: dict = {}
        self.history: list[dict] = []
        self.checkpoint_info: dict = {}  # extra facts saved into each checkpoint's meta.json (config, data facts)
        self.train_time = 0.0
        self.samples_seen = 0
        self._epoch_start_loader_state = None
        self._acc = (None, {})  # running (loss_sum, stats) of the current epoch
        self._n_seen = 0
        self._resumed_acc = None

    @property
    def dist(self) -> Distributed:
        """The process layout: one process, or this rank's place under torchrun (joins the group on first use)."""
        if self._dist is None:
            self._dist = Distributed.from_config(self.cfg, select_device(self.cfg.device))
        return self._dist

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def precision(self) -> Precision:
        if self._precision is None:
            name = self.perf.precision if self.perf is not None else self.cfg.precision
            self._precision = Precision(name, self.device, autocast=not self.dist.fsdp_mixed_precision)
        return self._precision

    @property
    def eval_precision(self) -> Precision:
        """Evaluation and prediction run in the precision the config names (fp32 unless trainer.precision says
        otherwise), not the preset's training bf16: reported metrics are then the fp32 model's, the same figures
        `lamina eval` or an exported fp32 model gives."""
        if self._eval_precision is None:
            self._eval_precision = Precision(self.cfg.precision, self.device,
                                             autocast=not self.dist.fsdp_mixed_precision)
        return self._eval_precision

    def _apply_process_settings(self) -> None:
        """trainer.threads and trainer.deterministic are process-wide: applied when work starts, once."""
        if self._process_set:
            return
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        set_deterministic(self.cfg.deterministic)
        self._process_set = True

    # ----- verbs -----------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, optimizer=None, scheduler=None, task=None,
              planned_steps: int | None = None):
        """`planned_steps`: optimizer steps the run will take, if known (the perf preset compiles on CPU only
        when a run is long enough to pay for it)."""
        self._apply_process_settings()
        self.perf = plan_perf(self.cfg, model, self.device, optimizer, fsdp=self.dist.strategy == "fsdp",
                              planned_steps=planned_steps, context_parallel=self.dist.cp)
        self._precision = None  # re-made from the plan
        self.model = model.to(self.device)
        if self.perf.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer, self.scheduler, self.task = optimizer, scheduler, task
        if self.dist.cp > 1:  # ring attention in place of SDPA; batches are split along the sequence
            from lamina.engine.context_parallel import apply_context_parallel

            apply_context_parallel(self.model, self.dist.cp_group)
        wrapped = self.dist.wrap(self.model, optimizer)  # DDP wrapper, or the model itself sharded in place
        self._forward_model = torch.compile(wrapped) if self.perf.compile else wrapped
        return self.model

    def to_device(self, batch: dict) -> dict:
        dev = self.device
        out = {k: v.to(dev, non_blocking=True) if v.device != dev else v for k, v in batch.items()}
        channels_last = self.perf.channels_last if self.perf is not None else self.cfg.channels_last
        if channels_last and out.get("x") is not None and out["x"].ndim == 4:
            out["x"] = out["x"].contiguous(memory_format=torch.channels_last)
        return out

    def train_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch forward: returns (loss, outputs). The override point."""
        if self.dist.cp > 1:
            from lamina.engine.context_parallel import shard_batch

            batch, _ = shard_batch(batch, self.dist.cp_group)
        with self.precision.autocast():
            outputs = self.task.forward(self._forward_model, batch)
            loss = self.task.loss(outputs, batch)
        return loss, outputs

    def backward(self, loss: torch.Tensor) -> None:
        scale = getattr(self.train_loader, "loss_scale", 1.0) / self.cfg.accumulate  # see ShardedLoader
        self.precision.backward(loss * scale if scale != 1.0 else loss)

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        self.precision.unscale(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def optimizer_step(self) -> None:
        if self.cfg.grad_clip is not None:
            self.clip_gradients(self.cfg.grad_clip)
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.global_step += 1

    # ----- fit -------------------------------------------------------------------------------
    def fit(self, model, task, train_loader, val_loader=None, optimizer=None, scheduler=None,
            resume_from: str | Path | None = None) -> list[dict]:
        optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.setup(model, optimizer, scheduler, task, planned_steps=self._planned_steps(train_loader))
        train_loader = self.dist.shard(train_loader)
        self.train_loader, self.val_loader = train_loader, val_loader
        if hasattr(train_loader, "to"):
            train_loader.to(self.device)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        for cb in self.callbacks:
            cb.on_fit_start(self)
        batch_hooks = [cb for cb in self.callbacks if hasattr(cb, "on_train_batch_end")]
        epoch_hooks = [cb for cb in self.callbacks if hasattr(cb, "on_train_epoch_end")]
        cfg, acc = self.cfg, self.cfg.accumulate
        check_finite = self.device.type == "cpu"
        self.should_stop = self._steps_done()
        try:
            while not self.should_stop and self.epoch < cfg.max_epochs:
                t0 = time.perf_counter()
                model.train()
                skip = self.batch_in_epoch
                if skip == 0 and hasattr(train_loader, "state_dict"):
                    self._epoch_start_loader_state = train_loader.state_dict()
                acc_state = self._resumed_acc if skip else None  # partial-epoch sums of a mid-epoch resume
                self._resumed_acc = None
                loss_sum = torch.zeros((), device=self.device)
                stat_sums: dict[str, torch.Tensor] = {}
                n_seen = 0
                if acc_state:
                    loss_sum += acc_state["loss_sum"].to(self.device)
                    stat_sums = {k: v.to(self.device) for k, v in acc_state["stats"].items()}
                    n_seen = acc_state["n_seen"]
                self._acc = (loss_sum, stat_sums)
                n_batches = len(train_loader)
                for i, batch in enumerate(train_loader):
                    if i < skip:  # resume mid-epoch: replay the loader to the same position
                        continue
                    batch = self.to_device(batch)
                    boundary = (i + 1) % acc == 0 or i + 1 == n_batches
                    with self.dist.no_sync(self._forward_model) if not boundary else contextlib.nullcontext():
                        loss, outputs = self.train_step(batch)
                        if check_finite and not math.isfinite(loss.item()):
                            self._non_finite(loss)
                        self.backward(loss)
                    self.batch_in_epoch = i + 1
                    if boundary:
                        self.optimizer_step()
                    bs = len(batch["y"]) if "y" in batch else len(next(iter(batch.values())))
                    n_seen += bs
                    self._n_seen = n_seen
                    loss_sum += loss.detach() * bs
                    for k, v in self.task.train_stats(outputs, batch).items():
                        stat_sums[k] = stat_sums[k] + v if k in stat_sums else v
                    for cb in batch_hooks:
                        cb.on_train_batch_end(self, loss)
                    if self.global_step % cfg.log_every == 0 and self.batch_in_epoch % acc == 0 and self.loggers:
                        lv = loss.detach().float().item()
                        if not math.isfinite(lv):
                            self._non_finite(loss)
                        for lg in self.loggers:
                            lg.log_step(self.global_step, {"train/loss_step": lv,
                                                           "lr": self.optimizer.param_groups[0]["lr"]})
                    if self._steps_done():
                        self.should_stop = True
                    if self.should_stop:  # max_steps, or a callback asked (e.g. a time limit)
                        break
                if self.dist.world_size > 1:  # epoch sums over all ranks (context-parallel peers count alike)
                    loss_sum, n_seen, stat_sums = self._reduce_epoch_sums(loss_sum, n_seen, stat_sums)
                dt = time.perf_counter() - t0
                self.train_time += dt
                self.samples_seen += n_seen
                train_loss = float(loss_sum) / max(n_seen, 1)
                if not math.isfinite(train_loss):
                    self._non_finite(torch.tensor(train_loss))
                if self.should_stop and self.batch_in_epoch < n_batches:
                    break  # partial epoch: on_fit_end saves a resumable `last`
                self.epoch += 1
                self.batch_in_epoch = 0
                row = {"epoch": self.epoch, "step": self.global_step, "train/loss": train_loss}
                row.update({f"train/{k}": v for k, v in self.task.summarize_train(stat_sums, n_seen).items()})
                row["train/samples_per_s"] = n_seen / dt if dt > 0 else float("nan")
                for cb in epoch_hooks:
                    cb.on_train_epoch_end(self)
                if val_loader is not None and (self.epoch % cfg.val_every == 0 or self.epoch == cfg.max_epochs):
                    row.update(self.evaluate(model, task, val_loader, prefix="val"))
                row["time"] = self.train_time
                self.last_metrics = row
                self.history.append(row)  # before callbacks: a checkpoint saved now includes this row
                for cb in self.callbacks:
                    cb.on_epoch_end(self, row)
                for lg in self.loggers:
                    lg.log_epoch(row)
        finally:
            for cb in self.callbacks:
                cb.on_fit_end(self)
            for lg in self.loggers:
                lg.close()
        return self.history

    def _reduce_epoch_sums(self, loss_sum, n_seen, stat_sums):
        keys = sorted(stat_sums)
        flat = torch.stack([loss_sum.float(), torch.tensor(float(n_seen), device=loss_sum.device),
                            *[stat_sums[k].float().reshape(()) for k in keys]])
        flat = self.dist.all_reduce_sum(flat) / self.dist.cp  # cp peers saw the same samples
        return flat[0], int(round(float(flat[1]))), {k: flat[2 + i] for i, k in enumerate(keys)}

    def _planned_steps(self, loader) -> int | None:
        try:
            per_epoch = -(-len(loader) // self.cfg.accumulate)
        except TypeError:  # an iterable without a length
            return self.cfg.max_steps
        total = per_epoch * self.cfg.max_epochs
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def _steps_done(self) -> bool:
        return self.cfg.max_steps is not None and self.global_step >= self.cfg.max_steps

    def _non_finite(self, loss: torch.Tensor) -> None:
        ckpt = next((cb.dir / "last" for cb in self.callbacks if isinstance(cb, ModelCheckpoint)), None)
        kept = f"; last good checkpoint kept at {ckpt}" if ckpt is not None and ckpt.exists() else ""
        raise TrainingError(f"loss is {float(loss.detach())} at step {self.global_step + 1} (epoch {self.epoch + 1})"
                            f"{kept}; try a lower optimizer.lr or set trainer.grad_clip")

    # ----- evaluate / predict ----------------------------------------------------------------
    def _eval_outputs(self, model, task, loader, with_loss: bool):
        """(batch, outputs, loss or None, is_stand_in) per batch of this rank's share of `loader`, no grad.

        Evaluation splits every batch over all ranks; context parallelism is for long training sequences, so its
        ring kernels step aside (each rank evaluates whole sequences). `is_stand_in`: an empty shard's
        placeholder batch (see ShardedLoader), run only so FSDP's collectives line up; count nothing of it."""
        loader = self.dist.shard(loader, train=False, ranks=self.dist.world_size, rank=self.dist.rank)
        with torch.no_grad(), self._without_context_parallel(model):
            for batch in loader:
                batch = self.to_device(batch)
                with self.eval_precision.autocast():
                    outputs = task.forward(model, batch)
                    loss = task.loss(outputs, batch) if with_loss else None
                yield batch, outputs, loss, getattr(loader, "ignore_batch", False)

    def _without_context_parallel(self, model):
        if self.dist.cp == 1:
            return contextlib.nullcontext()
        from lamina.engine.context_parallel import context_parallel_disabled

        return context_parallel_disabled(model)

    def progress_sink(self, prefix: str, progress: Callable[[int, int], None] | None = None
                      ) -> Callable[[int, int], None] | None:
        """`progress(done, total)` plus every callback's `on_eval_progress(trainer, prefix, done, total)` (a bar
        for a long validation or test pass), as one sink; None when nobody listens."""
        sinks = [progress] if progress is not None else []
        sinks += [functools.partial(cb.on_eval_progress, self, prefix) for cb in self.callbacks
                  if hasattr(cb, "on_eval_progress")]
        if not sinks:
            return None
        if len(sinks) == 1:
            return sinks[0]

        def every(done: int, total: int) -> None:
            for sink in sinks:
                sink(done, total)

        return every

    @torch.no_grad()
    def evaluate(self, model, task, loader, prefix: str = "val",
                 progress: Callable[[int, int], None] | None = None) -> dict:
        """Loss and the task's metrics over `loader`; `progress(done, total)` counts this rank's batches."""
        self._apply_process_settings()
        model = model.to(self.device)
        was_training = model.training
        model.eval()
        metrics = task.make_metrics().to(self.device)
        loss_sum, n = 0.0, 0
        progress = self.progress_sink(prefix, progress)
        try:  # this rank's share: the loader is split over ranks batch by batch
            total = -(-len(loader) // self.dist.world_size) if progress is not None else 0
        except TypeError:  # an iterable without a length: no count to show
            progress, total = None, 0
        if progress is not None:
            progress(0, total)
        done = 0
        for batch, outputs, loss, stand_in in self._eval_outputs(model, task, loader, with_loss=True):
            if progress is not None:
                done += 1
                progress(min(done, total), total)
            if stand_in:
                continue
            bs = len(outputs)
            loss_sum += float(loss) * bs
            n += bs
            task.update_metrics(metrics, outputs, batch)
        if self.dist.world_size > 1:
            sums = self.dist.all_reduce_sum(torch.tensor([loss_sum, float(n)], dtype=torch.float64, device=self.device))
            loss_sum, n = float(sums[0]), int(sums[1])
        if progress is not None and done < total:  # fewer batches than counted (an uneven shard): the pass is over
            progress(total, total)
        out = {f"{prefix}/loss": loss_sum / max(n, 1)}
        out.update({f"{prefix}/{k}": float(v) for k, v in metrics.compute().items()})  # torchmetrics syncs ranks
        model.train(was_training)
        return out

    @torch.no_grad()
    def predict(self, model, task, loader) -> dict[str, torch.Tensor]:
        self._apply_process_settings()
        model = model.to(self.device).eval()
        parts: dict[str, list] = {}
        for _, outputs, _, stand_in in self._eval_outputs(model, task, loader, with_loss=False):
            for k, v in task.predict(outputs).items():
                parts.setdefault(k, []).append(v[:0].cpu() if stand_in else v.cpu())
        if self.dist.world_size > 1:  # batch b of the input = rank 0's part of b, rank 1's part of b, ...
            every = self.dist.all_gather_object(parts)
            parts = {k: [p[k][b] for b in range(len(parts[k])) for p in every] for k in parts}
        return {k: torch.cat(v) for k, v in parts.items()}

    # ----- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        loader_state = None
        if hasattr(self.train_loader, "state_dict"):
            loader_state = (self._epoch_start_loader_state if self.batch_in_epoch else self.train_loader.state_dict())
        return {
            "epoch": self.epoch, "global_step": self.global_step, "batch_in_epoch": self.batch_in_epoch,
            "train_time": self.train_time, "samples_seen": self.samples_seen,
            "optimizer": None if self.dist.sharded_checkpoints else self.optimizer.state_dict(),  # sharded: in DCP
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "precision": self.precision.state_dict(),
            "rng": self.dist.all_gather_object(rng_state()) if self.dist.world_size > 1 else rng_state(),
            "world_size": self.dist.world_size, "loader": loader_state,
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "history": self.history,
            "epoch_acc": self._epoch_acc_state(),
        }

    def _epoch_acc_state(self) -> dict | None:
        """The current epoch's running sums (mid-epoch checkpoints), summed over ranks: rank 0 resumes them."""
        if not self.batch_in_epoch or self._acc[0] is None:
            return None
        loss_sum, n_seen, stats = self._acc[0].detach(), self._n_seen, dict(self._acc[1])
        if self.dist.world_size > 1:
            loss_sum, n_seen, stats = self._reduce_epoch_sums(loss_sum.clone(), n_seen,
                                                              {k: v.detach().clone() for k, v in stats.items()})
        return {"loss_sum": loss_sum.cpu(), "n_seen": n_seen, "stats": {k: v.detach().cpu() for k, v in stats.items()}}

    def save_checkpoint(self, path: str | Path, metrics: dict | None = None) -> Path:
        """Collective under torchrun: every rank calls it (ModelCheckpoint does); rank 0 or DCP writes."""
        meta = {**self.checkpoint_info, "epoch": self.epoch, "global_step": self.global_step,
                "batch_in_epoch": self.batch_in_epoch, "metrics": metrics or {}}
        state = self.state_dict()  # gathers every rank's RNG: all ranks take part
        if self.dist.sharded_checkpoints:
            return save_sharded_checkpoint(path, self.model, self.optimizer, state, meta, self.dist)
        if self.dist.is_main:
            save_checkpoint(path, self.model, state, meta)
        self.dist.barrier()  # no rank runs ahead (and, e.g., reads `last`) before it is complete
        return Path(path)

    def _restore_scheduler(self, saved: dict | None, step: int) -> None:
        """Same horizon: load the state (exact resume). A resume that extends the run (more epochs) keeps
        the new schedule and moves it to `step`: the schedule stretches instead of ending at the old total."""
        current = self.scheduler.state_dict()
        horizon = lambda st: (st.get("total_steps"), [d.get("total") if isinstance(d, dict) else None  # noqa: E731
                                                      for d in st.get("lr_lambdas", [])])
        if saved is not None and horizon(saved) == horizon(current):
            self.scheduler.load_state_dict(saved)
            return
        self.scheduler.last_epoch = step - 1
        self.scheduler._step_count = max(self.scheduler._step_count, 2)  # no "step before optimizer" warning
        self.scheduler.step()

    def load_checkpoint(self, path: str | Path) -> dict:
        weights, state, meta = load_checkpoint(path)
        if meta.get("sharded"):  # resharded by DCP onto this world size, sharded or plain model
            load_sharded_into(path, self.model, self.optimizer)
        elif self.dist.sharded_checkpoints:
            raise CheckpointError(f"{path} is a plain (unsharded) checkpoint; resume it with trainer.strategy=ddp "
                                  "or none; trainer.strategy=fsdp resumes sharded checkpoints written by fsdp")
        else:
            load_weights(self.model, weights, str(path))
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self._restore_scheduler(state.get("scheduler"), state["global_step"])
        self.precision.load_state_dict(state.get("precision", {}))
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.train_time, self.samples_seen = state.get("train_time", 0.0), state.get("samples_seen", 0)
        self.history = list(state.get("history", []))
        self._resumed_acc = state.get("epoch_acc") if self.dist.rank == 0 else None  # sums over all ranks
        if state.get("loader") is not None and hasattr(self.train_loader, "load_state_dict"):
            self.train_loader.load_state_dict(state["loader"])
            self._epoch_start_loader_state = state["loader"]
        for cb, s in zip(self.callbacks, state.get("callbacks", [])):
            cb.load_state_dict(s)
        rng = state["rng"]
        set_rng_state(rng[self.dist.rank % len(rng)] if isinstance(rng, list) else rng)
        return meta
