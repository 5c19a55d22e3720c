"""Train a run from a config, in three steps a caller can also take one at a time:

    prepared = prepare(cfg, dist)   data, task (+ objectives), model, loaders, optimizer, run folder, Trainer
    history  = fit(prepared)        Trainer.fit, with exact resume from a checkpoint
    result   = finalize(prepared, history)   test metrics with the best weights, summary, post-run outputs

`train(cfg)` does all three. What the run cost (runs/cost.py) comes with them: CodeCarbon probes the hardware
while `prepare` loads data, `fit` counts the model's FLOPs on one batch and tracks energy around training (rank 0),
`finalize` writes it all to summary["cost"].

Under torchrun (`trainer.strategy=ddp|fsdp`) every rank runs them; rank 0 picks the run folder and writes every
file; all ranks train, evaluate and checkpoint together (engine/distributed.py). When torchrun restarts the
workers after a failure (`--max-restarts`), the restarted ranks find the run folder of the first attempt
(runs/.elastic/<rdzv id>) and resume from its last checkpoint. Nothing here prints; the CLI is a thin shell over it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lamina import __version__ as lamina_version
from lamina.config import RunConfig, to_dict, to_yaml
from lamina.data import DataBundle
from lamina.data.facts import DataFacts
from lamina.engine import (BatchNormRecalibration, EarlyStopping, LRMonitor, ModelCheckpoint, Trainer,
                           build_scheduler, seed_everything)
from lamina.engine.checkpoint import load_model_weights, read_meta, resolve
from lamina.engine.distributed import Distributed, launched_by_torchrun, restart_count
from lamina.engine.optim import build_optimizer
from lamina.engine.precision import Precision, select_device
from lamina.errors import ConfigError
from lamina.io import atomic_write_text
from lamina.runs.build import (build_run_model, check_finite_data, count_params, data_facts, finetune_setup,
                               load_data, make_task, pretrained_tokenizer, resolved_options, task_class)
from lamina.runs.cost import CostMeter
from lamina.runs.folder import RunFolder
from lamina.runs.objectives import ObjectiveContext, active_objectives, apply_objectives
from lamina.runs.outputs import DEFAULT_OUTPUTS, RunEnd, jsonable
from lamina.runs.tracking import build_loggers, open_store, track_failed, track_run_end, tracking_summary


# Below this many optimizer steps a BatchNorm model's running statistics still trail its weights (see
# engine.callbacks.BatchNormRecalibration): such runs recompute them before every evaluation. The default job
# (400 steps) and every longer run keep their exact numbers.
SHORT_RUN_STEPS = 200


def _has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for m in model.modules())


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    history: list[dict]


@dataclass
class Prepared:
    """Everything a run needs before its first step."""

    cfg: RunConfig
    dist: Distributed
    bundle: DataBundle
    facts: DataFacts
    task: object
    model: torch.nn.Module
    folder: RunFolder
    trainer: Trainer
    train_loader: object
    val_loader: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    checkpoints: ModelCheckpoint
    monitor: str
    resume: Path | None = None
    wall0: float = field(default_factory=time.perf_counter)
    cost: CostMeter | None = None  # energy tracker and FLOP count (cfg.cost); None: no cost in the summary


def _elastic_folder(cfg: RunConfig, dist: Distributed) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume or None) under torchrun. The first attempt creates the folder and
    records it under the rendezvous id; a restart after a lost worker reads it back and resumes from `last`."""
    choice = None
    if dist.is_main:
        pointer = RunFolder.elastic_pointer(cfg.logging.root)
        if restart_count() > 0 and pointer.is_file():
            d = Path(pointer.read_text().strip())
            last = d / "checkpoints" / "last"
            ok = last.exists() or (last.parent / ".last.old").exists()
            choice = (str(d), str(d) if ok else None)
        else:
            d = RunFolder.new(cfg.logging.root, cfg.name, cfg.data.name, cfg.model.name).path
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_text(pointer, str(d))
            choice = (str(d), None)
    d, resume = dist.broadcast_object(choice)
    return Path(d), Path(resume) if resume else None


def checkpoint_info(cfg: RunConfig, model: torch.nn.Module, facts: DataFacts, objectives: list[str]) -> dict:
    """What every checkpoint's meta.json carries: enough to rebuild this exact model and its data (open_run)."""
    return {"config": to_dict(cfg), "model": cfg.model.name, "model_options": resolved_options(model),
            "objectives": objectives, "data": json.loads(json.dumps(facts.to_dict(), default=jsonable))}


def fit_part(cfg: RunConfig, model: torch.nn.Module, task, train_loader, val_loader=None, callbacks: Sequence = (),
             info: dict | None = None, recalibrate_short: bool = True) -> Trainer:
    """One fit with a fresh optimizer and schedule over `train_loader` (cfg.trainer's epochs or max_steps): a step
    of a loop that trains one model several times (continual experiences, few-shot encoders). Short fits of
    BatchNorm models get BatchNorm recalibration as short runs do (`recalibrate_short`)."""
    optimizer = build_optimizer(model, cfg.optimizer)
    spe = max(1, -(-len(train_loader) // cfg.trainer.accumulate))
    total = cfg.trainer.max_steps or spe * cfg.trainer.max_epochs
    scheduler = build_scheduler(optimizer, cfg.schedule, total, spe, cfg.optimizer.lr)
    cbs = list(callbacks)
    if recalibrate_short and total < SHORT_RUN_STEPS and _has_batchnorm(model):
        cbs.insert(0, BatchNormRecalibration())  # before any callback that reads the statistics
    trainer = Trainer(cfg.trainer, callbacks=cbs)
    trainer.checkpoint_info = info or {}
    trainer.fit(model, task, train_loader, val_loader, optimizer, scheduler)
    return trainer


def prepare(cfg: RunConfig, dist: Distributed, callbacks: Sequence = (), resume: str | Path | None = None,
            run_dir: str | Path | None = None, task_wrapper: Callable | None = None) -> Prepared:
    wall0 = time.perf_counter()
    store = open_store(cfg) if dist.is_main else None  # an MLflow store that cannot be opened fails first
    cost = CostMeter(cfg.cost, dist)  # first: CodeCarbon's hardware probe runs while the data loads
    if resume is None and run_dir is None and launched_by_torchrun():
        run_dir, resume = _elastic_folder(cfg, dist)
    if resume is not None:
        resume = resolve(resume)
        run_dir = Path(run_dir) if run_dir else resume.parent.parent
    seed_everything(cfg.seed)
    bundle = load_data(cfg, pretrained_tokenizer(cfg))
    check_finite_data(bundle)
    task_cls = task_class(cfg, bundle)
    facts = data_facts(bundle, task_cls)
    task = make_task(cfg, facts)
    if task_wrapper is not None:
        task = task_wrapper(task, bundle)
    task = apply_objectives(task, ObjectiveContext(cfg, bundle, facts))
    model = build_run_model(cfg, facts)
    if dist.cp > 1:  # ring attention splits each training sequence into 2 * cp zigzag chunks
        block = facts.meta.get("block_size")
        if not task_cls.supports_context_parallel or not block:
            raise ConfigError(f"trainer.context_parallel: {dist.cp} applies to language-model runs (gpt, llama on "
                              f"token streams); this run is {facts.task}")
        if block % (2 * dist.cp):
            raise ConfigError(f"data.block_size: {block} must be a multiple of 2 * trainer.context_parallel = "
                              f"{2 * dist.cp} (zigzag chunks), e.g. {-(-block // (2 * dist.cp)) * 2 * dist.cp}")
    tcfg = cfg.trainer
    monitor, mode = tcfg.monitor, tcfg.monitor_mode
    if bundle.val is None and monitor.startswith("val/"):
        monitor = "train/loss"
    device, main = dist.device, dist.is_main

    train_loader = task.train_loader(bundle, cfg.data, cfg.seed, device)
    val_loader = task.eval_loader(bundle.val, bundle, cfg.data, device) if bundle.val is not None else None
    steps_per_epoch = max(1, -(-len(train_loader) // tcfg.accumulate))
    total = tcfg.max_steps or steps_per_epoch * tcfg.max_epochs
    optimizer, ft_callbacks = finetune_setup(cfg, model, task)
    peak = [g["lr"] for g in optimizer.param_groups] if cfg.finetune.lr_decay else cfg.optimizer.lr
    scheduler = build_scheduler(optimizer, cfg.schedule, total, steps_per_epoch, peak)

    if run_dir is None:
        new = RunFolder.new(cfg.logging.root, cfg.name, cfg.data.name, cfg.model.name).path if main else None
        run_dir = dist.broadcast_object(str(new) if new else None)
    folder = RunFolder(run_dir)
    if main:
        folder.path.mkdir(parents=True, exist_ok=True)
        folder.write_text("config.yaml", to_yaml(cfg))
        folder.write_text("data.json", json.dumps(facts.to_dict(), indent=2, default=jsonable))
        if "tokenizer" in bundle.extras:  # text runs: the tokenizer travels with the run
            bundle.extras["tokenizer"].save(folder.tokenizer)
    if dist.rank > 0:  # same init everywhere (FSDP shards it as is), then rank-specific dropout streams
        torch.manual_seed(cfg.seed + dist.rank)

    ckpt_cb = ModelCheckpoint(folder.checkpoints, monitor=monitor, mode=mode)
    cbs = [ckpt_cb, LRMonitor()]
    if total < SHORT_RUN_STEPS and _has_batchnorm(model):
        cbs.insert(0, BatchNormRecalibration())  # before checkpoints: they save the recalibrated statistics
    es = tcfg.early_stopping
    if es.patience is not None or es.stop_at is not None:
        cbs.append(EarlyStopping(monitor, mode, es.patience, es.min_delta, es.stop_at))
    resume_step = read_meta(resume).get("global_step") if resume is not None and main else None
    loggers = build_loggers(cfg, folder, facts.task, store, resume_step) if main else []
    # caller callbacks run on rank 0 only, unless they say `all_ranks` (e.g. a tuning reporter that broadcasts)
    mine = [cb for cb in callbacks if main or getattr(cb, "all_ranks", False)]
    trainer = Trainer(tcfg, callbacks=[*cbs, *ft_callbacks, *mine], loggers=loggers,
                      dist=dist)
    trainer.checkpoint_info = checkpoint_info(cfg, model, facts, active_objectives(cfg))
    return Prepared(cfg, dist, bundle, facts, task, model, folder, trainer, train_loader, val_loader, optimizer,
                    scheduler, ckpt_cb, monitor, resume, wall0, cost)


def fit(p: Prepared) -> list[dict]:
    if p.cost is None:
        return p.trainer.fit(p.model, p.task, p.train_loader, p.val_loader, p.optimizer, p.scheduler,
                             resume_from=p.resume)
    p.cost.count_flops(p.model, p.task, p.train_loader, p.val_loader, p.dist.device, p.trainer.precision.autocast,
                       dp_size=p.dist.dp_size, world_size=p.dist.world_size)
    with p.cost.tracking():
        return p.trainer.fit(p.model, p.task, p.train_loader, p.val_loader, p.optimizer, p.scheduler,
                             resume_from=p.resume)


def finalize(p: Prepared, history: list[dict], outputs: Sequence[Callable[[RunEnd], None]] = DEFAULT_OUTPUTS
             ) -> RunResult:
    """Test with the best checkpoint's weights (the one a user would ship), then the summary and outputs."""
    dist, trainer, model, task, bundle = p.dist, p.trainer, p.model, p.task, p.bundle
    best = p.folder.checkpoints / "best"
    if dist.broadcast_object(best.exists()):
        load_model_weights(best, model)
    final = dict(history[-1]) if history else {}
    test_metrics, artifacts = {}, {}
    if bundle.test is not None:
        test_loader = task.eval_loader(bundle.test, bundle, p.cfg.data, dist.device)
        test_metrics = trainer.evaluate(model, task, test_loader, prefix="test")
        if not dist.sharded_checkpoints:
            # metrics that need decoding (BLEU of beam-searched outputs): rank 0 alone, on its full replica
            extras = (task.test_extras(model, bundle, "test", trainer.device, run_dir=p.folder.path,
                                       progress=trainer.progress_sink("test decoding"))
                      if dist.is_main else None)
            test_metrics.update(dist.broadcast_object(extras) or {})
        artifacts = task.test_outputs(trainer, model, test_loader, bundle.test)
    tokens = task.tokens_per_sample(p.facts)
    tcfg = p.cfg.trainer
    summary = {
        "lamina_version": lamina_version,  # `lamina compare` refuses runs of another major.minor
        "run_dir": str(p.folder.path), "data": bundle.summary(), "model": p.cfg.model.name, "task": p.facts.task,
        "params": count_params(model), "epochs": trainer.epoch, "steps": trainer.global_step,
        "best_epoch": p.checkpoints.best_epoch, "monitor": p.monitor, "best_monitor": p.checkpoints.best,
        "final": final, "test": test_metrics,
        "train_time_s": trainer.train_time, "wall_time_s": time.perf_counter() - p.wall0,
        "train_samples_per_s": trainer.samples_seen / trainer.train_time if trainer.train_time else None,
        "train_tokens_per_s": (trainer.samples_seen * tokens / trainer.train_time
                               if tokens and trainer.train_time else None),
        "device": str(trainer.device), "precision": trainer.precision.precision, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "strategy": dist.strategy, "world_size": dist.world_size,
        "context_parallel": dist.cp, "restarts": restart_count(),
        "bn_recalibrated": any(isinstance(cb, BatchNormRecalibration) for cb in trainer.callbacks),
        "perf": trainer.perf.to_dict() if trainer.perf is not None else None,
        "data_path": bundle.extras.get("data_path"),  # in memory or streamed from files, and why
    }
    es = next((cb for cb in trainer.callbacks if isinstance(cb, EarlyStopping) and cb.stop_at is not None), None)
    if es is not None:  # trainer.early_stopping.stop_at: did the run reach its quality target, and when
        summary["stop_at"] = {"monitor": p.monitor, "target": es.stop_at, "reached_epoch": es.reached_target_epoch}
    if p.cost is not None:
        summary["cost"] = p.cost.result(trainer.samples_seen, summary["wall_time_s"], resumed=p.resume is not None)
        if summary["cost"].get("warning"):
            summary.setdefault("warnings", []).append(summary["cost"]["warning"])
    tracked = tracking_summary(trainer.loggers)
    if tracked:
        summary["tracking"] = tracked
    end = RunEnd(p.cfg, p.folder, model, task, p.facts, history, summary, artifacts, dist.is_main)
    for out in outputs:
        out(end)
    if dist.is_main:  # last: the loggers get the files the outputs wrote
        track_run_end(p.cfg, p.folder, summary, trainer.loggers)
    return RunResult(p.folder.path, summary, history)


def train(cfg: RunConfig, callbacks: Sequence = (), resume: str | Path | None = None,
          run_dir: str | Path | None = None, task_wrapper: Callable | None = None,
          outputs: Sequence[Callable[[RunEnd], None]] = DEFAULT_OUTPUTS,
          on_stopped: Callable[[Prepared, BaseException], None] | None = None) -> RunResult:
    """Train per config. `resume`: a run folder or checkpoint; training continues in that run folder.
    `task_wrapper(task, bundle) -> task`: composes a different training objective over the configured task
    (e.g. trust.fairness's group-reweighted loss) without a config section. `outputs`: post-run outputs.
    `on_stopped(prepared, exc)`: called when training ends by an exception (a pruned search trial), before it
    propagates, so the caller can still read what the partial run cost."""
    device = select_device(cfg.trainer.device)  # device/precision errors before anything is written
    Precision(cfg.trainer.precision, device)
    dist = Distributed.from_config(cfg.trainer, device)
    prepared = None
    try:
        prepared = prepare(cfg, dist, callbacks, resume, run_dir, task_wrapper)
        result = finalize(prepared, fit(prepared), outputs)
    except BaseException as e:
        if on_stopped is not None and prepared is not None:
            on_stopped(prepared, e)
        if prepared is not None:
            track_failed(prepared.trainer.loggers)
        dist.close(clean=False)
        raise
    dist.close()
    return result
