"""Runs: turn a RunConfig into data + model + task + Trainer, and a run folder with everything a user wants.

    runs/<name>/config.yaml        resolved config (re-run with `lamina train runs/<name>/config.yaml`)
    runs/<name>/data.json          data facts needed to treat new inputs like training inputs
    runs/<name>/metrics.csv        one row per epoch
    runs/<name>/tb/                TensorBoard events
    runs/<name>/checkpoints/{last,best}/
    runs/<name>/summary.json       final metrics, parameters, wall time, throughput
    runs/<name>/curves.png, confusion.png

Under torchrun (`trainer.strategy=ddp|fsdp`) every rank runs `train`; rank 0 picks the run folder and writes
every file; all ranks train, evaluate and checkpoint together (engine/distributed.py). When torchrun restarts
the workers after a failure (`--max-restarts`), the restarted ranks find the run folder of the first attempt
(runs/.elastic/<rdzv id>) and resume from its last checkpoint.

The CLI is a thin shell over `train`, `evaluate` and `predict` here; nothing in this module prints.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from lamina.config import RunConfig, to_dict, to_yaml, validate
from lamina.data import DataBundle, load_dataset, make_loader
from lamina.data.transforms import build_transforms, eval_transforms
from lamina.data.windows import RandomWindowLoader, SequentialWindowLoader
from lamina.engine import (CSVLogger, EarlyStopping, LRMonitor, ModelCheckpoint, TensorBoardLogger, Trainer,
                           build_optimizer, build_scheduler, seed_everything)
from lamina.engine.precision import Precision, select_device
from lamina.engine.checkpoint import load_model_weights, read_meta, resolve
from lamina.engine.distributed import Distributed, launched_by_torchrun, restart_count
from lamina.errors import CheckpointError, ConfigError, DataError, LaminaError, unknown_name
from lamina.models import create_model, get_entry
from lamina.models.contract import check_input_shape
from lamina.tasks import build_task


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    history: list[dict]


# ----- building blocks ------------------------------------------------------------------------
def _pretrained_tokenizer(cfg: RunConfig) -> Path | None:
    """Text runs from a pretrained encoder cut their text with the encoder's own tokenizer.json."""
    if not cfg.model.pretrained:
        return None
    from lamina.hub import pretrained_tokenizer

    return pretrained_tokenizer(cfg.model.pretrained)


def load_data(cfg: RunConfig, tokenizer: Path | None = None) -> DataBundle:
    """The run's data set; `tokenizer`: a saved tokenizer.json to reuse instead of training one."""
    opts = dict(cfg.data.options)
    if tokenizer is not None and tokenizer.is_file():
        opts["tokenizer"] = str(tokenizer)
    elif opts.get("tokenizer") and not Path(str(opts["tokenizer"])).expanduser().exists():
        from lamina.hub import pretrained_tokenizer  # data.tokenizer=<pretrained source>: its tokenizer.json

        found = pretrained_tokenizer(str(opts["tokenizer"]))
        if found is not None:
            opts["tokenizer"] = str(found)
    try:
        bundle = load_dataset(cfg.data.name, seed=cfg.seed, **opts)
    except TypeError as e:  # unknown loader option
        bad = str(e).split("'")[1] if "'" in str(e) else str(e)
        raise ConfigError(f"data.{bad}: not an option of data set '{cfg.data.name}'") from None
    if cfg.data.train_fraction < 1.0:
        bundle.train = train_subset(bundle.train, cfg.data.train_fraction, cfg.seed, bundle.task)
    return bundle


def train_subset(data, fraction: float, seed: int, task: str):
    """`fraction` of a training split: per class in proportion for classification (a small subset keeps every
    class), a prefix for token streams (windows need contiguous text), a seeded random sample otherwise."""
    n = len(data)
    if task == "language_modeling":
        return data.subset(torch.arange(max(1, int(n * fraction))))
    g = torch.Generator().manual_seed(seed + 7919)  # independent of the split's own permutation
    y = data.tensors.get("y")
    if task == "classification" and y is not None and y.ndim == 1 and not y.is_floating_point():
        keep = []
        for c in torch.unique(y):
            idx = (y == c).nonzero().flatten()
            keep.append(idx[torch.randperm(len(idx), generator=g)[:max(1, round(len(idx) * fraction))]])
        return data.subset(torch.cat(keep).sort().values)
    return data.subset(torch.randperm(n, generator=g)[:max(1, int(n * fraction))].sort().values)


_CORE_TASKS = ("classification", "regression", "language_modeling")


def task_name(cfg: RunConfig, bundle: DataBundle) -> str:
    from lamina.tasks import TASKS

    name = bundle.task if cfg.task.name == "auto" else cfg.task.name
    if name not in TASKS:
        raise ConfigError(f"task.name: {unknown_name('task', name, TASKS)}"
                          if cfg.task.name != "auto" else f"data set '{bundle.name}' has task {name}, which no "
                          f"registered task handles; supported: {', '.join(sorted(TASKS))}")
    if name not in _CORE_TASKS or bundle.task not in _CORE_TASKS:  # token tasks: the data set decides
        if name != bundle.task:
            raise ConfigError(f"task.name: {name} does not fit data set '{bundle.name}' (task {bundle.task})")
        return name
    if (name == "language_modeling") != ("ids" in bundle.train.tensors):
        raise ConfigError(f"task.name: {name} does not fit data set '{bundle.name}' (task {bundle.task})")
    if name == "classification" and not bundle.num_classes:
        raise ConfigError(f"task.name: classification needs class labels, data set '{bundle.name}' has none")
    return name


def data_facts(bundle: DataBundle, task: str) -> dict:
    """What a trained model needs to know about its data, saved with every run and checkpoint."""
    if task == "classification":
        outputs = int(bundle.num_classes)
    elif task == "language_modeling":
        outputs = int(bundle.meta["vocab_size"])
    elif task not in _CORE_TASKS:
        outputs = int(bundle.meta.get("num_outputs") or bundle.num_classes or 0)
    else:
        y = bundle.train.y
        outputs = 1 if y.ndim == 1 else int(y.shape[-1])
    return {**bundle.summary(), "task": task, "num_outputs": outputs, "class_names": bundle.class_names,
            "meta": bundle.meta}


def build_model(cfg: RunConfig, facts: dict) -> torch.nn.Module:
    if cfg.model.pretrained:  # pretrained weights, fitted to this data (channels, size, scale, new head)
        from lamina import hub
        from lamina.hub.adapt import adapt_pretrained

        model, info = hub.load(cfg.model.pretrained)
        return adapt_pretrained(model, info, facts, cfg.finetune.input_size)
    entry = get_entry(cfg.model.name)
    opts = dict(cfg.model.options)
    shape = tuple(facts["input_shape"])
    if facts["task"] not in _CORE_TASKS:  # the task says what the model needs from the data
        from lamina.tasks import TASKS

        task_cls = TASKS[facts["task"]]
        opts = {**task_cls.model_options(facts), **opts}
        model = create_model(cfg.model.name, **opts)
        check = getattr(task_cls, "check_model", None)
        if check is not None:
            check(model, facts)  # e.g. "seq2seq needs an encoder-decoder model"
        return model
    if entry.input_kind == "tokens":
        if facts["task"] != "language_modeling":
            raise ConfigError(f"model.name: {cfg.model.name} is a token model; data set '{facts['name']}' is "
                              f"{facts['task']} data; use a token-stream data set such as tiny_shakespeare or text")
        opts.setdefault("vocab_size", facts["num_outputs"])
        opts.setdefault("block_size", int(facts["meta"]["block_size"]))
        model = create_model(cfg.model.name, **opts)
        if getattr(model, "output_kind", "next_token") != "next_token":
            raise ConfigError(f"model.name: {cfg.model.name} is not a language model (it predicts one label per "
                              f"{'sequence' if model.output_kind == 'sequence' else 'token'}); use gpt, char_lstm, ...")
        if model.block_size < facts["meta"]["block_size"]:
            raise ConfigError(f"model.block_size: {model.block_size} is shorter than data.block_size "
                              f"{facts['meta']['block_size']}")
        return model
    if facts["task"] == "language_modeling":
        raise ConfigError(f"model.name: data set '{facts['name']}' is a token stream; use a token model "
                          "(gpt, gpt_mini, ...), not {cfg.model.name}")
    if entry.input_kind == "vector":
        opts.setdefault("in_features", int(torch.tensor(shape).prod()))
        if facts["meta"].get("cat_cardinalities"):
            opts.setdefault("cat_cardinalities", tuple(facts["meta"]["cat_cardinalities"]))
    else:
        if len(shape) != 3:
            raise ConfigError(f"model.name: {cfg.model.name} is an image model (input (B, C, H, W)) but data set "
                              f"'{facts['name']}' gives per-sample shape {shape}; use a vector model such as mlp")
        opts.setdefault("in_chans", shape[0])
    opts.setdefault("num_classes", facts["num_outputs"])
    model = create_model(cfg.model.name, **opts)
    check_input_shape(model, shape)
    if cfg.finetune.input_size:  # same input resize as a pretrained run gets: comparisons at equal resolution
        from lamina.hub.adapt import add_input_preprocessing

        add_input_preprocessing(model, None, cfg.finetune.input_size, shape[0])
    return model


def _lora_head(model: torch.nn.Module, task: str) -> list[str]:
    """Parameters trained in full next to LoRA adapters: a classifier's new head; none for a language model
    (its output layer is the pretrained vocabulary projection, often tied to the embedding)."""
    if task == "language_modeling":
        return []
    from lamina.engine.transfer import head_parameter_names

    return head_parameter_names(model)


def _finetune_setup(cfg: RunConfig, model: torch.nn.Module, task: str = "classification"):
    """(optimizer, callbacks) for cfg.finetune: what trains (full / linear probe / LoRA / gradual unfreezing,
    frozen patterns) and at which rate (layer-wise lr decay). Plain training is mode full, nothing else set."""
    from lamina.engine import transfer

    ft = cfg.finetune
    callbacks = []
    if ft.freeze:
        transfer.freeze(model, ft.freeze)
    if ft.mode == "linear_probe":
        transfer.linear_probe(model)
    elif ft.mode == "lora":
        from lamina.nn.lora import apply_lora

        head = _lora_head(model, task)
        apply_lora(model, ft.lora_targets, rank=ft.lora_rank, alpha=ft.lora_alpha)
        params = dict(model.named_parameters(remove_duplicate=False))
        for n in head:  # a classifier's new head is trained in full
            params[n].requires_grad_(True)
    elif ft.mode == "gradual":
        callbacks.append(transfer.GradualUnfreezing(ft.unfreeze_every))
    if ft.lr_decay:
        groups = transfer.param_groups_layerwise_lr_decay(model, cfg.optimizer.lr, ft.lr_decay,
                                                          cfg.optimizer.weight_decay,
                                                          include_frozen=ft.mode == "gradual")
        for g in groups:
            g.pop("names", None)
        o = cfg.optimizer
        optimizer = (torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
                     if o.name == "sgd" else
                     (torch.optim.Adam if o.name == "adam" else torch.optim.AdamW)(groups, lr=o.lr, betas=o.betas))
    else:
        optimizer = build_optimizer(model, cfg.optimizer)
    return optimizer, callbacks


def make_task(cfg: RunConfig, facts: dict):
    if facts["task"] not in _CORE_TASKS:
        from lamina.tasks import TASKS

        return TASKS[facts["task"]].from_facts(facts, {"label_smoothing": cfg.task.label_smoothing,
                                                       **cfg.task.options})
    if facts["task"] == "classification":
        return build_task("classification", num_classes=facts["num_outputs"],
                          label_smoothing=cfg.task.label_smoothing)
    if facts["task"] == "language_modeling":
        return build_task("language_modeling", vocab_size=facts["num_outputs"])
    return build_task("regression", num_outputs=facts["num_outputs"])


def make_eval_loader(cfg: RunConfig, data, task: str, device, bundle: DataBundle):
    if task == "language_modeling":
        return SequentialWindowLoader(data.tensors["ids"], bundle.meta["block_size"], cfg.data.eval_batch_size,
                                      device=device)
    return make_loader(data, cfg.data.eval_batch_size, device=device, trim=bundle.meta.get("pad_trim"),
                       transform=eval_transforms(cfg.data.augment))  # e.g. normalize: same scale as training


def make_loaders(cfg: RunConfig, bundle: DataBundle, task: str, device):
    """(train, val): in-memory batches, or random / sequential windows of a token stream."""
    if task == "language_modeling":
        block = bundle.meta["block_size"]
        ids = bundle.train.tensors["ids"]
        steps = cfg.data.steps_per_epoch or max(1, len(ids) // (cfg.data.batch_size * block))
        train = RandomWindowLoader(ids, block, cfg.data.batch_size, steps, seed=cfg.seed, device=device)
    else:
        augment = build_transforms(cfg.data.augment) if cfg.data.augment else None
        train = make_loader(bundle.train, cfg.data.batch_size, shuffle=True, seed=cfg.seed, device=device,
                            transform=augment, trim=bundle.meta.get("pad_trim"), bucket=bundle.meta.get("bucket"))
    val = make_eval_loader(cfg, bundle.val, task, device, bundle) if bundle.val is not None else None
    return train, val


def _run_dir(cfg: RunConfig) -> Path:
    root = Path(cfg.logging.root)
    name = cfg.name or f"{cfg.data.name}-{cfg.model.name}-{datetime.now():%Y%m%d-%H%M%S}"
    d, i = root / name, 2
    while d.exists():
        d, i = root / f"{name}-{i}", i + 1
    return d


def _elastic_run_dir(cfg: RunConfig, dist: Distributed) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume or None) under torchrun. The first attempt creates the folder and
    records it under the rendezvous id; a restart after a lost worker reads it back and resumes from `last`."""
    choice = None
    if dist.is_main:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        pointer = Path(cfg.logging.root) / ".elastic" / f"{run_id}.txt"
        if restart_count() > 0 and pointer.is_file():
            d = Path(pointer.read_text().strip())
            last = d / "checkpoints" / "last"
            ok = last.exists() or (last.parent / ".last.old").exists()
            choice = (str(d), str(d) if ok else None)
        else:
            d = _run_dir(cfg)
            d.mkdir(parents=True, exist_ok=True)
            pointer.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(pointer, str(d))
            choice = (str(d), None)
    d, resume = dist.broadcast_object(choice)
    return Path(d), Path(resume) if resume else None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_finite_data(bundle: DataBundle) -> None:
    for split in ("train", "val", "test"):
        data = getattr(bundle, split)
        if data is None:
            continue
        for k, v in data.tensors.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise DataError(f"{split} split of '{bundle.name}' has NaN or Inf values in '{k}'")


# ----- train ------------------------------------------------------------------------------------
def train(cfg: RunConfig, callbacks=(), resume: str | Path | None = None, run_dir: str | Path | None = None,
          task_wrapper=None) -> RunResult:
    """Train per config. `resume`: a run folder or checkpoint; training continues in that run folder.
    `task_wrapper(task, bundle) -> task`: composes a different training objective over the configured task
    (e.g. trust.fairness's group-reweighted loss) without a config flag."""
    wall0 = time.perf_counter()
    device = select_device(cfg.trainer.device)  # device/precision errors before anything is written
    Precision(cfg.trainer.precision, device)
    dist = Distributed.from_config(cfg.trainer, device)
    try:
        result = _train(cfg, dist, callbacks, resume, run_dir, wall0, task_wrapper)
    except BaseException:
        dist.close(clean=False)
        raise
    dist.close()
    return result


def _train(cfg: RunConfig, dist: Distributed, callbacks, resume, run_dir, wall0, task_wrapper=None) -> RunResult:
    if resume is None and run_dir is None and launched_by_torchrun():
        run_dir, resume = _elastic_run_dir(cfg, dist)
    if resume is not None:
        ckpt = resolve(resume)
        run_dir = Path(run_dir) if run_dir else ckpt.parent.parent
    seed_everything(cfg.seed)
    bundle = load_data(cfg, _pretrained_tokenizer(cfg))
    _check_finite_data(bundle)
    tname = task_name(cfg, bundle)
    facts = data_facts(bundle, tname)
    task = make_task(cfg, facts)
    if task_wrapper is not None:
        task = task_wrapper(task, bundle)
    if cfg.trainer.distill.teacher:  # knowledge distillation composes over whatever task the run has
        from lamina.compress.distill import distill_wrapper

        task = distill_wrapper(cfg)(task, bundle)
    model = build_model(cfg, facts)
    if dist.cp > 1:  # ring attention splits each training sequence into 2 * cp zigzag chunks
        block = (facts.get("meta") or {}).get("block_size")
        if tname != "language_modeling" or not block:
            raise ConfigError(f"trainer.context_parallel: {dist.cp} applies to language-model runs (gpt, llama on "
                              f"token streams); this run is {tname}")
        if block % (2 * dist.cp):
            raise ConfigError(f"data.block_size: {block} must be a multiple of 2 * trainer.context_parallel = "
                              f"{2 * dist.cp} (zigzag chunks), e.g. {-(-block // (2 * dist.cp)) * 2 * dist.cp}")
    trainer_cfg = cfg.trainer
    monitor, mode = trainer_cfg.monitor, trainer_cfg.monitor_mode
    if bundle.val is None and monitor.startswith("val/"):
        monitor = "train/loss"
    device = dist.device
    main = dist.is_main

    train_loader, val_loader = make_loaders(cfg, bundle, tname, device)
    steps_per_epoch = max(1, -(-len(train_loader) // trainer_cfg.accumulate))
    total = trainer_cfg.max_steps or steps_per_epoch * trainer_cfg.max_epochs
    optimizer, ft_callbacks = _finetune_setup(cfg, model, tname)
    scheduler = build_scheduler(optimizer, cfg.schedule, total, steps_per_epoch,
                                [g["lr"] for g in optimizer.param_groups] if cfg.finetune.lr_decay else cfg.optimizer.lr)

    if run_dir is None:
        run_dir = dist.broadcast_object(str(_run_dir(cfg)) if main else None)
    run_dir = Path(run_dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(run_dir / "config.yaml", to_yaml(cfg))
        _atomic_write(run_dir / "data.json", json.dumps(facts, indent=2, default=_jsonable))
        if "tokenizer" in bundle.extras:  # text runs: the tokenizer travels with the run
            bundle.extras["tokenizer"].save(run_dir / "tokenizer.json")
    if dist.rank > 0:  # same init everywhere (FSDP shards it as is), then rank-specific dropout streams
        torch.manual_seed(cfg.seed + dist.rank)

    ckpt_cb = ModelCheckpoint(run_dir / "checkpoints", monitor=monitor, mode=mode)
    cbs = [ckpt_cb, LRMonitor()]
    es = trainer_cfg.early_stopping
    if es.patience is not None:
        cbs.append(EarlyStopping(monitor, mode, es.patience, es.min_delta))
    loggers = [CSVLogger(run_dir / "metrics.csv")] if main else []
    if cfg.logging.tensorboard and main:
        loggers.append(TensorBoardLogger(run_dir / "tb"))
    if resume is not None and main:
        loggers[0].load()
    trainer = Trainer(trainer_cfg, callbacks=[*cbs, *ft_callbacks, *(callbacks if main else ())], loggers=loggers,
                      dist=dist)
    trainer.meta = {"config": to_dict(cfg), "model": cfg.model.name, "data": json.loads(
        json.dumps(facts, default=_jsonable))}
    history = trainer.fit(model, task, train_loader, val_loader, optimizer, scheduler,
                          resume_from=resolve(resume) if resume is not None else None)

    # Test with the best checkpoint's weights (the one a user would ship).
    best = run_dir / "checkpoints" / "best"
    if dist.broadcast_object(best.exists()):
        load_model_weights(best, model)
    final = dict(history[-1]) if history else {}
    test_metrics, cm = {}, None
    if bundle.test is not None:
        test_loader = make_eval_loader(cfg, bundle.test, tname, device, bundle)
        test_metrics = trainer.evaluate(model, task, test_loader, prefix="test")
        if hasattr(task, "test_extras") and not dist.sharded_checkpoints:
            # metrics that need decoding (BLEU of beam-searched outputs): rank 0 alone, on its full replica
            extras = task.test_extras(model, bundle, "test", trainer.device, run_dir=run_dir) if main else None
            test_metrics.update(dist.broadcast_object(extras))
        if tname == "classification":
            preds = trainer.predict(model, task, test_loader)["label"]
            cm = confusion_matrix(bundle.test.y, preds, bundle.num_classes)
    wall = time.perf_counter() - wall0
    summary = {
        "run_dir": str(run_dir), "data": bundle.summary(), "model": cfg.model.name, "task": tname,
        "params": count_params(model), "epochs": trainer.epoch, "steps": trainer.global_step,
        "best_epoch": ckpt_cb.best_epoch, "monitor": monitor, "best_monitor": ckpt_cb.best,
        "final": final, "test": test_metrics,
        "train_time_s": trainer.train_time, "wall_time_s": wall,
        "train_samples_per_s": trainer.samples_seen / trainer.train_time if trainer.train_time else None,
        "train_tokens_per_s": (trainer.samples_seen * bundle.meta["block_size"] / trainer.train_time
                               if tname == "language_modeling" and trainer.train_time else None),
        "device": str(trainer.device), "precision": trainer_cfg.precision, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "strategy": dist.strategy, "world_size": dist.world_size,
        "context_parallel": dist.cp, "restarts": restart_count(),
    }
    if history and any("val/loss" in r for r in history):  # when (if) validation stopped following training
        from lamina.trust.overfitting import overfitting_onset

        try:
            o = overfitting_onset(history, min_rise=0.01)  # a rise under 1% of the best val loss is noise
            summary["overfitting"] = {k: o[k] for k in ("overfitting", "onset_epoch", "best_epoch", "final_gap",
                                                        "val_rise") if k in o} | ({"advice": o["advice"]}
                                                                                  if o.get("advice") else {})
        except DataError:
            pass
    if not main:
        return RunResult(run_dir, summary, history)
    if cfg.finetune.mode == "lora":  # the adapters alone (plus the new head): what a LoRA run needs to ship
        from safetensors.torch import save_file

        from lamina.nn.lora import lora_state_dict, trainable_fraction

        own = model.state_dict()
        adapters = {**lora_state_dict(model), **{n: own[n] for n in _lora_head(model, tname) if n in own}}
        save_file({k: v.detach().contiguous().cpu() for k, v in adapters.items()}, str(run_dir / "adapters.safetensors"))
        summary["trainable_fraction"] = trainable_fraction(model)
    _atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2, default=_jsonable))
    if cfg.logging.plots and history:
        from lamina.plots import plot_confusion, plot_curves

        plot_curves(history, run_dir / "curves.png", title=f"{bundle.name} / {cfg.model.name}")
        if cm is not None:
            acc = test_metrics.get("test/acc")
            plot_confusion(cm.numpy(), bundle.class_names, run_dir / "confusion.png",
                           title=f"test confusion ({bundle.name}, acc {acc:.4f})" if acc is not None else "")
    return RunResult(run_dir, summary, history)


def confusion_matrix(y: torch.Tensor, pred: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(y.cpu().long() * k + pred.cpu().long(), minlength=k * k).reshape(k, k)


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


# ----- load a trained run -----------------------------------------------------------------------
def load_run(path: str | Path, which: str = "best"):
    """(cfg, model, task, facts, ckpt_dir) for a run folder or checkpoint folder; no data is loaded."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        cand = p / "checkpoints" / which
        ckpt = resolve(cand if cand.exists() or (cand.parent / f".{which}.old").exists() else p / "checkpoints" / "last")
    else:
        ckpt = resolve(p)
    meta = read_meta(ckpt)
    if "config" not in meta:
        raise CheckpointError(f"{ckpt}/meta.json has no config; it was not written by `lamina train`")
    cfg = validate(meta["config"])
    facts = meta["data"]
    task = make_task(cfg, facts)
    model = build_model(cfg, facts)
    try:
        load_model_weights(ckpt, model)
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{ckpt} does not fit model {cfg.model.name}: {str(e).splitlines()[-1].strip()}") from None
    return cfg, model, task, facts, ckpt


def _run_tokenizer(ckpt: Path) -> Path:
    return ckpt.parent.parent / "tokenizer.json"  # runs/<name>/checkpoints/<which> -> runs/<name>/tokenizer.json


def evaluate(path: str | Path, split: str = "test", which: str = "best") -> dict:
    cfg, model, task, _, ckpt = load_run(path, which)
    bundle = load_data(cfg, _run_tokenizer(ckpt))  # same name, options and seed -> the same split as in training
    data = getattr(bundle, split, None)
    if data is None:
        raise DataError(f"data set '{bundle.name}' has no {split} split; use one of: "
                        + ", ".join(s for s in ("train", "val", "test") if getattr(bundle, s) is not None))
    trainer = Trainer(cfg.trainer.model_copy(update={"compile": False}))
    loader = make_eval_loader(cfg, data, task.name, trainer.device, bundle)
    metrics = trainer.evaluate(model, task, loader, prefix=split)
    if hasattr(task, "test_extras"):
        metrics.update(task.test_extras(model, bundle, split, trainer.device))
    return {"checkpoint": str(ckpt), "split": split, "n": len(data), **metrics}


def predict(path: str | Path, inputs: list[str], which: str = "best") -> list[dict]:
    from lamina.data.inputs import read_inputs

    cfg, model, task, facts, ckpt = load_run(path, which)
    x_parts, names = read_inputs(inputs, facts)
    trainer = Trainer(cfg.trainer.model_copy(update={"compile": False}))
    from lamina.data.base import TensorData

    loader = make_loader(TensorData(**x_parts), cfg.data.eval_batch_size, device=trainer.device,
                         transform=eval_transforms(cfg.data.augment))
    out = trainer.predict(model, task, loader)
    rows = []
    for i, name in enumerate(names):
        if "label" in out:
            label = int(out["label"][i])
            cls = facts["class_names"][label] if facts.get("class_names") else str(label)
            rows.append({"input": name, "label": label, "class": cls, "confidence": float(out["confidence"][i])})
        else:
            rows.append({"input": name, "value": out["value"][i].tolist()})
    return rows


def generate(path: str | Path, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, greedy: bool = False, seed: int = 0,
             stop: str | None = None, on_text=None, which: str = "best") -> str:
    """Sample text from a trained language-model run; `on_text(str)` receives each new piece (streaming)."""
    from lamina.data.files import decode_text, encode_text
    from lamina.models.generation import generate as _generate

    cfg, model, task, facts, ckpt = load_run(path, which)
    if facts["task"] == "seq2seq":  # translate the prompt (one line per sentence)
        from lamina.data.tokenizers import load_tokenizer

        if not prompt.strip():
            raise DataError("prompt: empty; give a sentence to translate, e.g. --prompt 'A dog runs.'")
        tok = load_tokenizer(_run_tokenizer(ckpt))
        lines = [line for line in prompt.splitlines() if line.strip()]
        out = task.translate(model, tok, lines, select_device(cfg.trainer.device))
        text = "\n".join(out)
        if on_text:
            on_text(text)
        return text
    if facts["task"] != "language_modeling":
        raise ConfigError(f"{path}: generate needs a language-model run; this run is {facts['task']}")
    meta = facts["meta"]
    if not prompt:
        raise DataError("prompt: empty; give at least one character, e.g. --prompt 'ROMEO:'")
    idx = encode_text(meta, prompt)[None]
    stop_ids = tuple(encode_text(meta, stop).tolist()) if stop else ()
    device = select_device(cfg.trainer.device)
    model = model.to(device).eval()
    g = torch.Generator(device=device).manual_seed(seed)
    cb = (lambda tok: on_text(decode_text(meta, tok.reshape(-1)[:1]))) if on_text else None
    out = _generate(model, idx.to(device), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    greedy=greedy, stop_tokens=stop_ids, generator=g, on_token=cb)
    return decode_text(meta, out[0, idx.shape[1]:].cpu())


__all__ = ["train", "evaluate", "predict", "generate", "load_run", "RunResult", "LaminaError"]
