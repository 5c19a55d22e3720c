"""Few-shot learning: train an encoder on some classes, test N-way K-shot episodes on classes it never saw.

    protonet   episodic training (runs/objectives/fewshot.py: ProtoNetTask) with the Trainer, prototype rule at test
    baseline   ordinary supervised training on the training classes (the run's classification task and loader),
               then a head fitted on each test episode's support: nearest centroid or logistic regression

Splits (stated in fewshot.json): data.name=omniglot trains on the minimal background set small1 (5 alphabets, 136
characters) and tests on the characters of small2's alphabets that small1 lacks (Japanese (katakana), Sanskrit,
Tagalog), and on Lake et al.'s twenty 20-way within-alphabet one-shot runs (evaluation alphabets, disjoint from
both). Any other classification data set trains on `fewshot.train_classes` (default: the first half) of its
train split and tests on the other classes of its test split.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lamina.config import RunConfig, to_dict, to_yaml
from lamina.data.base import TensorData
from lamina.data.episodes import EpisodeSampler
from lamina.data.sample import is_streamed
from lamina.engine import seed_everything
from lamina.errors import ConfigError
from lamina.io import atomic_write_text
from lamina.models import create_model, get_entry
from lamina.runs.build import count_params, load_data, make_task
from lamina.runs.folder import RunFolder
from lamina.runs.objectives.fewshot import (PRETRAIN_TASK, ANILTask, ProtoNetTask, check_task, embed, evaluate_episodes,
                                            mean_ci95, prototype_logits)
from lamina.runs.outputs import jsonable
from lamina.runs.train import fit_part


def _relabel(data: TensorData, classes: list[int]) -> TensorData:
    """Only `classes`, relabelled 0..len-1 in that order."""
    keep = torch.isin(data.y, torch.tensor(classes, dtype=data.y.dtype)).nonzero().flatten()
    sub = data.subset(keep)
    lut = torch.full((int(data.y.max()) + 1,), -1, dtype=torch.long)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    if is_streamed(sub):  # files stay files (episodes decode theirs); only the labels change, in the new subset
        sub.tensors["y"] = lut[sub.y]
        return sub
    return TensorData(**{**sub.tensors, "y": lut[sub.y]})


def fewshot_split(cfg: RunConfig) -> dict:
    """{"train", "test": TensorData, "test_groups": {class: group} or None, "split": description, "runs": ...}."""
    f = cfg.fewshot
    if cfg.data.name == "omniglot":
        from lamina.data.omniglot import load_background, load_one_shot_runs

        a, b = load_background("small1", f.size), load_background("small2", f.size)
        seen = set(a.alphabets)
        held = sorted({al for al in b.alphabets if al not in seen})
        classes = [c for c, al in enumerate(b.alphabets) if al in held]
        test = _relabel(b.data, classes)
        groups = {i: held.index(b.alphabets[c]) for i, c in enumerate(classes)}
        return {"train": a.data, "test": test, "test_groups": groups, "runs": load_one_shot_runs(f.size),
                "input_shape": (1, f.size, f.size),
                "split": {"train": f"omniglot background small1: {len(a.names)} characters of "
                                   f"{', '.join(sorted(seen))}",
                          "test": f"omniglot background small2, alphabets not in small1 ({', '.join(held)}): "
                                  f"{len(classes)} characters",
                          "one_shot_runs": "Lake et al. (2015) 20 runs, 20-way 1-shot within-alphabet, "
                                           "evaluation alphabets"}}
    bundle = load_data(cfg)
    check_task(bundle.task, bundle.name, bundle.num_classes)
    k = int(bundle.num_classes)
    train_classes = f.train_classes if f.train_classes is not None else list(range(k // 2))
    bad = [c for c in train_classes if not 0 <= c < k]
    if bad or len(set(train_classes)) != len(train_classes):
        raise ConfigError(f"fewshot.train_classes: expected distinct class ids in 0..{k - 1}, got {train_classes}")
    held = [c for c in range(k) if c not in train_classes]
    if len(held) < 2:
        raise ConfigError(f"fewshot.train_classes: leaves {len(held)} class(es) for testing; an episode needs 2")
    names = bundle.class_names or [str(c) for c in range(k)]
    return {"train": _relabel(bundle.train, train_classes), "test": _relabel(bundle.test, held), "test_groups": None,
            "runs": None, "input_shape": tuple(bundle.input_shape),
            "split": {"train": f"{bundle.name} train split, classes {[names[c] for c in train_classes]}",
                      "test": f"{bundle.name} test split, held-out classes {[names[c] for c in held]}"}}


def _encoder(cfg: RunConfig, input_shape: tuple, num_classes: int) -> torch.nn.Module:
    entry = get_entry(cfg.model.name)
    opts = {"num_classes": num_classes}
    if entry.input_kind == "vector":
        opts["in_features"] = int(torch.tensor(input_shape).prod())
    else:
        opts["in_chans"] = input_shape[0]
    model = create_model(cfg.model.name, **{**opts, **cfg.model.options})
    for attr in ("forward_features", "forward_head"):
        if not hasattr(model, attr):
            raise ConfigError(f"model.name: {cfg.model.name} has no {attr}; few-shot needs a classifier-like model "
                              "of the zoo (cnn, resnet, vit, efficientnet, mlp)")
    return model


@torch.no_grad()
def one_shot_runs(model: torch.nn.Module, runs, device) -> dict:
    """Error rate on Lake et al.'s 20-way one-shot runs with the prototype (here: nearest-neighbour) rule."""
    model.eval()
    wrong, total, per = 0, 0, []
    for r in runs:
        zs, zq = embed(model, r.support.to(device)), embed(model, r.query.to(device))
        pred = prototype_logits(zs, zq, len(zs), 1).argmax(-1).cpu()
        w = int((pred != r.answer).sum())
        per.append(w / len(r.answer))
        wrong, total = wrong + w, total + len(r.answer)
    return {"error": wrong / total, "trials": total, "per_run_error": per}


def train_fewshot(cfg: RunConfig, callbacks: Sequence = (), on_event: Callable[[dict], None] | None = None,
                  run_dir: str | Path | None = None) -> dict:
    f = cfg.fewshot
    emit = on_event or (lambda ev: None)
    wall0 = time.perf_counter()
    seed_everything(cfg.seed)
    d = fewshot_split(cfg)
    train, test = d["train"], d["test"]
    n_train = int(train.y.max()) + 1
    test_sampler = EpisodeSampler(test, f.ways, f.shots, f.queries, f.test_episodes, seed=cfg.seed + 1,
                                  groups=d["test_groups"] if f.within_alphabet else None)
    train_ways, train_shots = f.train_ways or f.ways, f.train_shots or f.shots
    model = _encoder(cfg, d["input_shape"], n_train)
    emit({"event": "start", "method": f.method, "train_classes": n_train, "train_samples": len(train),
          "test_classes": int(test.y.max()) + 1, "params": count_params(model)})
    info = {"config": to_dict(cfg), "model": cfg.model.name, "objectives": [f"fewshot:{f.method}"]}
    t0 = time.perf_counter()
    anil = None
    if f.method in ("protonet", "anil"):
        if f.method == "anil":  # the head adapts to an episode's classes: train with the test's number of ways
            train_ways = f.ways
            anil = ANILTask(model, f.ways, f.inner_steps, f.inner_lr)
        sampler = EpisodeSampler(train, train_ways, train_shots, f.train_queries or f.queries, f.episodes,
                                 seed=cfg.seed)
        trainer = fit_part(cfg, model, anil or ProtoNetTask(), sampler, callbacks=callbacks, info=info,
                           recalibrate_short=False)
    else:  # supervised pretraining on the training classes, the run's own classification task and loader
        from lamina.data.base import DataBundle
        from lamina.data.facts import DataFacts

        bundle = DataBundle("fewshot-train", train, None, None, PRETRAIN_TASK, d["input_shape"], n_train)
        facts = DataFacts.from_bundle(bundle, PRETRAIN_TASK, n_train)
        task = make_task(cfg, facts)
        loader = task.train_loader(bundle, cfg.data, cfg.seed, None)
        trainer = fit_part(cfg, model, task, loader, callbacks=callbacks, info=info, recalibrate_short=False)
    train_s = time.perf_counter() - t0
    device = trainer.device
    emit({"event": "trained", "seconds": train_s})
    t1 = time.perf_counter()
    heads = {"protonet": ["centroid"], "anil": ["anil", "centroid"], "baseline": ["centroid", "logistic"]}[f.method]
    results = {}
    for h in heads:
        test_sampler.to(device)
        test_sampler.epoch = 0  # every head sees the same episodes
        tick = (lambda i, n, h=h: emit({"event": "episode", "head": h, "i": i, "n": n}))
        results[h] = (anil.evaluate(model, test_sampler, tick) if h == "anil"
                      else evaluate_episodes(model, test_sampler, h, on_episode=tick))
    runs = one_shot_runs(model, d["runs"], device) if d["runs"] else None
    folder = RunFolder(run_dir) if run_dir else RunFolder.new(cfg.logging.root, cfg.name or
                                                              f"{cfg.data.name}-fewshot-{f.method}",
                                                              cfg.data.name, cfg.model.name)
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.write_text("config.yaml", to_yaml(cfg))
    trainer.save_checkpoint(folder.checkpoints / "last")
    out = {"run_dir": str(folder.path), "method": f.method, "model": cfg.model.name, "params": count_params(model),
           "split": d["split"], "ways": f.ways, "shots": f.shots, "queries": f.queries,
           "train_ways": train_ways if anil or f.method == "protonet" else None,
           "train_shots": train_shots if anil or f.method == "protonet" else None,
           "train_queries": (f.train_queries or f.queries) if anil or f.method == "protonet" else None,
           "inner_steps": f.inner_steps if anil else None, "inner_lr": f.inner_lr if anil else None,
           "within_alphabet": f.within_alphabet, "test_episodes": f.test_episodes,
           "heads": {h: {k: v for k, v in r.items() if k != "values"} for h, r in results.items()},
           "episode_acc": {h: r["values"] for h, r in results.items()},
           "one_shot_runs": runs, "train_time_s": train_s, "eval_time_s": time.perf_counter() - t1,
           "wall_time_s": time.perf_counter() - wall0, "history": trainer.history}
    atomic_write_text(folder.path / "fewshot.json", json.dumps(out, indent=2, default=jsonable))
    return out


__all__ = ["fewshot_split", "mean_ci95", "one_shot_runs", "train_fewshot"]
