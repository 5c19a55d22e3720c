"""Continual learning: a run's data cut into a stream of experiences (data/streams.py), one model trained on them
in order with a strategy (runs/objectives/continual.py), and scored on every experience after each one.

    R[i, j] = test accuracy on experience j after training through experience i

    average accuracy  ACC = mean_j R[T-1, j]
    backward transfer BWT = mean_{j < T-1} (R[T-1, j] - R[j, j])   (negative: forgetting)

(Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory".) Each experience trains `trainer.max_epochs` epochs with a
fresh optimizer and schedule (the usual protocol: the learner is not told when the next task comes, but its
optimizer state is not carried over). `joint` trains once on every experience's data together: the upper bound.

The run folder holds config.yaml, data.json, stream.json (matrix, metrics, per-experience history and timings),
accuracy_matrix.png and checkpoints/last (after the last experience), so `lamina eval/predict/export` open it
like any run. Nothing here prints; `on_event` reports progress to the CLI.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lamina.config import RunConfig, to_yaml
from lamina.data.base import TensorData
from lamina.data.sample import require_in_memory
from lamina.data.streams import Experience, make_stream
from lamina.engine import Trainer, seed_everything
from lamina.errors import ConfigError
from lamina.io import atomic_write_text
from lamina.runs.build import (build_run_model, check_finite_data, count_params, data_facts, load_data, make_task,
                               task_class)
from lamina.runs.folder import RunFolder
from lamina.runs.objectives.continual import (ContinualTask, EWCAnchors, ReservoirBuffer, check_buffer,
                                              check_task, fisher_subset, per_sample_fisher, snapshot)
from lamina.runs.outputs import jsonable
from lamina.runs.train import checkpoint_info, fit_part

STRATEGIES = ("naive", "replay", "ewc", "lwf", "joint")


def _with_exp(data: TensorData | None, index: int) -> TensorData | None:
    """The split with each sample's experience attached ("exp"), which task-incremental masks read."""
    if data is None:
        return None
    return TensorData(**data.tensors, exp=torch.full((len(data),), index, dtype=torch.long))


def _concat(parts: Sequence[TensorData]) -> TensorData:
    keys = parts[0].tensors.keys()
    return TensorData(**{k: torch.cat([p.tensors[k] for p in parts]) for k in keys})


def stream_metrics(matrix: list[list[float | None]]) -> dict:
    """ACC, BWT and per-experience forgetting from the lower-triangular accuracy matrix (rows: after experience
    i; a joint run has one row)."""
    last = matrix[-1]
    out = {"acc": sum(last) / len(last)}
    t = len(matrix)
    if t > 1:
        drops = [last[j] - matrix[j][j] for j in range(t - 1)]
        out["bwt"] = sum(drops) / len(drops)
        out["forgetting"] = [max(matrix[i][j] for i in range(j, t - 1)) - last[j] for j in range(t - 1)]
    return out


def _evaluate_all(trainer: Trainer, model, task, exps: list[Experience], bundle, cfg) -> list[float]:
    row = []
    for e in exps:
        loader = task.eval_loader(e.test, bundle, cfg.data, trainer.device)
        row.append(trainer.evaluate(model, task, loader, prefix="test")["test/acc"])
    return row


def train_stream(cfg: RunConfig, strategy: str | None = None, callbacks: Sequence = (),
                 on_event: Callable[[dict], None] | None = None, run_dir: str | Path | None = None) -> dict:
    """Train `cfg` on its continual stream with `strategy` (default cfg.continual.strategy); returns the result
    written to stream.json."""
    c = cfg.continual
    strategy = strategy or c.strategy
    if strategy not in STRATEGIES:
        raise ConfigError(f"continual.strategy: unknown strategy '{strategy}'; expected one of {', '.join(STRATEGIES)}")
    wall0 = time.perf_counter()
    emit = on_event or (lambda ev: None)
    seed_everything(cfg.seed)
    bundle = load_data(cfg)
    for split in (bundle.train, bundle.val, bundle.test):  # experiences are cut, permuted and joined as tensors
        require_in_memory(split, "continual learning", bundle.input_shape)
    check_finite_data(bundle)
    task_cls = task_class(cfg, bundle)
    check_task(task_cls.name, bundle.name)
    facts = data_facts(bundle, task_cls)
    base_task = make_task(cfg, facts)
    num_classes = int(facts.num_outputs)
    exps = make_stream(c.stream, bundle.train, bundle.val, bundle.test, num_classes, c.experiences,
                       order=c.class_order, seed=cfg.seed)
    if any(e.test is None or len(e.test) == 0 for e in exps):
        raise ConfigError(f"continual: data set '{bundle.name}' has no test samples for some experience; every "
                          "experience is scored on its own test split")
    for e in exps:
        e.train, e.val, e.test = _with_exp(e.train, e.index), _with_exp(e.val, e.index), _with_exp(e.test, e.index)
    total_train = sum(len(e.train) for e in exps)
    if strategy == "replay":
        check_buffer(c.buffer_size, total_train)
    masks = None
    if c.scenario == "task":
        masks = torch.zeros(len(exps), num_classes, dtype=torch.bool)
        for e in exps:
            masks[e.index, e.classes] = True

    model = build_run_model(cfg, facts)
    folder = RunFolder(run_dir) if run_dir else RunFolder.new(cfg.logging.root, cfg.name or
                                                              f"{cfg.data.name}-{c.stream}-{strategy}",
                                                              cfg.data.name, cfg.model.name)
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.write_text("config.yaml", to_yaml(cfg))
    folder.write_text("data.json", json.dumps(facts.to_dict(), indent=2, default=jsonable))
    info = checkpoint_info(cfg, model, facts, [f"continual:{strategy}"])

    buffer = ReservoirBuffer(c.buffer_size, cfg.seed) if strategy == "replay" else None
    ewc = EWCAnchors()
    old_model, old_groups = None, []
    matrix: list[list[float]] = []
    history: list[dict] = []
    timings: list[dict] = []
    steps = [[e] for e in exps] if strategy != "joint" else [exps]
    trainer = None
    for k, group in enumerate(steps):
        train = _concat([e.train for e in group])
        vals = [e.val for e in group if e.val is not None and len(e.val)]
        val = _concat(vals) if vals else None
        task = ContinualTask(base_task, exp_masks=masks, replay=buffer,
                             replay_batch=c.replay_batch or cfg.data.batch_size, ewc=ewc, ewc_lambda=c.ewc_lambda,
                             model=model, old_model=old_model, old_groups=old_groups, lwf_alpha=c.lwf_alpha,
                             lwf_temperature=c.lwf_temperature)
        sub = type(bundle)(bundle.name, train, val, None, bundle.task, bundle.input_shape, bundle.num_classes,
                           bundle.class_names, bundle.meta)
        train_loader = task.train_loader(sub, cfg.data, cfg.seed + k, None)
        val_loader = task.eval_loader(val, sub, cfg.data, None) if val is not None else None
        emit({"event": "experience_start", "experience": k, "experiences": len(steps),
              "classes": sorted({c_ for e in group for c_ in e.classes}), "train": len(train)})
        t0 = time.perf_counter()
        trainer = fit_part(cfg, model, task, train_loader, val_loader, callbacks, info)
        rows = trainer.history
        t_fit, t_train = time.perf_counter() - t0, trainer.train_time  # fit includes validation; train_time not
        history += [{"experience": k, **r} for r in rows]
        t1 = time.perf_counter()
        # what the strategy keeps from this experience for the next ones (nothing after the last)
        more = k + 1 < len(steps)
        if strategy == "replay" and more:
            for e in group:
                buffer.add(e.train.x, e.train.y, e.index)
        elif strategy == "ewc" and more:
            e = group[0]
            pick = fisher_subset(len(e.train), c.ewc_samples, cfg.seed + k)
            x, y = e.train.x[pick].to(trainer.device), e.train.y[pick].to(trainer.device)
            rows_mask = masks[e.train.tensors["exp"][pick]].to(trainer.device) if masks is not None else None
            fisher = per_sample_fisher(model, x, y, rows_mask)
            star = {n: p.detach().clone() for n, p in model.named_parameters() if n in fisher}
            ewc.add(fisher, star)
        elif strategy == "lwf" and more:
            old_model = snapshot(model)
            seen = [cl for e in exps[:k + 1] for cl in e.classes]
            # class-incremental: one softmax over all classes seen so far; task-incremental: one per old head;
            # domain: every class, every time
            old_groups = ([list(e.classes) for e in exps[:k + 1]] if c.scenario == "task"
                          else [sorted(set(seen))])
        t_strategy = time.perf_counter() - t1
        t2 = time.perf_counter()
        row = _evaluate_all(trainer, model, task, exps, bundle, cfg)
        t_eval = time.perf_counter() - t2
        matrix.append(row)
        timings.append({"experience": k, "train_s": t_train, "fit_s": t_fit, "strategy_s": t_strategy,
                        "eval_s": t_eval, "samples": trainer.samples_seen})
        trainer.save_checkpoint(folder.checkpoints / "last", {"test/acc_mean": sum(row) / len(row)})
        emit({"event": "experience_end", "experience": k, "experiences": len(steps), "row": row,
              "train_s": t_train})

    result = {
        "run_dir": str(folder.path), "data": bundle.name, "model": cfg.model.name, "params": count_params(model),
        "stream": c.stream, "scenario": c.scenario, "strategy": strategy, "experiences": len(exps),
        "classes": [e.classes for e in exps], "train_sizes": [len(e.train) for e in exps],
        "test_sizes": [len(e.test) for e in exps], "epochs_per_experience": cfg.trainer.max_epochs,
        "matrix": matrix, **stream_metrics(matrix), "timings": timings,
        "train_time_s": sum(t["train_s"] for t in timings), "wall_time_s": time.perf_counter() - wall0,
        "memory": {"buffer_samples": len(buffer) if buffer else 0,
                   "buffer_bytes": (buffer.x.numel() * buffer.x.element_size() if buffer and buffer.x is not None
                                    else 0),
                   "ewc_anchors": len(ewc), "ewc_tensors": ewc.tensors()},
        "settings": c.model_dump(), "history": history,
    }
    atomic_write_text(folder.path / "stream.json", json.dumps(result, indent=2, default=jsonable))
    if cfg.logging.plots:
        from lamina.plots import plot_accuracy_matrix

        plot_accuracy_matrix(matrix, folder.path / "accuracy_matrix.png",
                             title=f"{bundle.name} {c.stream} ({c.scenario}-incremental), {strategy}: "
                                   f"ACC {result['acc']:.3f}" + (f", BWT {result['bwt']:+.3f}" if "bwt" in result
                                                                   else ""))
    return result


def seen_accuracy(matrix: list[list[float]]) -> list[float]:
    """Mean accuracy over the experiences seen so far, after each experience (the usual continual curve)."""
    return [sum(row[:i + 1]) / (i + 1) for i, row in enumerate(matrix)]


def parse_strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"--strategies: expected comma-separated names from {', '.join(STRATEGIES)}, got {text!r}")
    for n in names:
        if n not in STRATEGIES:
            raise ConfigError(f"--strategies: unknown strategy '{n}'; expected names from {', '.join(STRATEGIES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--strategies: a strategy is named twice in {text!r}")
    return names


def compare_strategies(cfg: RunConfig, strategies: Sequence[str], out: str | Path, callbacks: Sequence = (),
                       on_event: Callable[[dict], None] | None = None) -> dict:
    """Each strategy on the same stream (same data, seed, model init), one run folder each under `out`, then
    comparison.json and comparison.png (mean accuracy over seen experiences after each experience)."""
    out = Path(out)
    results = {}
    for name in strategies:
        if on_event:
            on_event({"event": "strategy_start", "strategy": name})
        results[name] = train_stream(cfg, name, callbacks, on_event, run_dir=out / name)
    summary = {
        "data": cfg.data.name, "model": cfg.model.name, "stream": cfg.continual.stream,
        "scenario": cfg.continual.scenario, "experiences": cfg.continual.experiences,
        "epochs_per_experience": cfg.trainer.max_epochs, "seed": cfg.seed,
        "strategies": {n: {k: r[k] for k in ("acc", "bwt", "forgetting", "matrix", "train_time_s", "wall_time_s",
                                             "memory", "run_dir", "params") if k in r}
                       for n, r in results.items()},
    }
    atomic_write_text(out / "comparison.json", json.dumps(summary, indent=2, default=jsonable))
    if cfg.logging.plots:
        from lamina.plots import plot_stream_comparison

        curves = {n: seen_accuracy(r["matrix"]) for n, r in results.items() if n != "joint"}
        bounds = {n: r["acc"] for n, r in results.items() if n == "joint"}
        plot_stream_comparison(curves, bounds, out / "comparison.png",
                               title=f"{cfg.data.name} {cfg.continual.stream}, {cfg.continual.scenario}-incremental")
    summary["out"] = str(out)
    return summary


__all__ = ["STRATEGIES", "compare_strategies", "parse_strategies", "seen_accuracy", "stream_metrics", "train_stream"]
