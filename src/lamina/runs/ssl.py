"""Self-supervised pretraining and representation probes.

    pretrain(cfg)        `lamina pretrain`: the run's training images without labels, learned by cfg.ssl.method
                         (runs/objectives/ssl.py) with the Trainer; leaves a run folder whose checkpoint is the
                         zoo model (the encoder; its classifier head untrained), so `lamina eval`, `lamina probe`
                         and `model.pretrained=<run folder>` read it like any run. Then probes it.
    probe(model, ...)    how linearly separable / how clustered the frozen features are on labelled data:
                         linear probe (multinomial logistic regression, scikit-learn's objective by L-BFGS, on standardised features of
                         the whole train split, scored on test) and weighted k-NN (Wu et al. 2018: the k nearest
                         train features by cosine similarity vote with weight exp(cos / T)).
    probe_run(path)      the same for any run folder (a supervised run: its penultimate features), or for the
                         same architecture freshly initialised (`random=True`): the floor a method must beat.

Label efficiency is plain fine-tuning: `lamina train CONFIG model.pretrained=<ssl run> data.train_fraction=0.01`
(train_fraction keeps every class in proportion) against the same command without model.pretrained.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from lamina.config import RunConfig, to_dict, to_yaml
from lamina.data import make_loader
from lamina.data.transforms import eval_transforms
from lamina.engine import seed_everything
from lamina.engine.checkpoint import save_checkpoint
from lamina.errors import ConfigError
from lamina.io import atomic_write_text
from lamina.models.contract import pooled_features
from lamina.runs.build import (build_run_model, check_finite_data, count_params, data_facts, load_data,
                               task_class)
from lamina.runs.folder import RunFolder
from lamina.runs.objectives.ssl import SSLTask, build_learner
from lamina.runs.outputs import jsonable
from lamina.runs.train import checkpoint_info, fit_part
from lamina.tasks.classification import ClassificationTask


# ----- probes --------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode(model: torch.nn.Module, loader, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 on CPU, labels (N,)) of every batch of `loader`, the model in eval mode."""
    was = model.training
    model.eval().to(device)
    feats, ys = [], []
    for batch in loader:
        feats.append(pooled_features(model, batch["x"].to(device)).float().cpu())
        ys.append(batch["y"].cpu())
    model.train(was)
    return torch.cat(feats), torch.cat(ys)


def linear_probe(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor,
                 C: float = 1.0, max_iter: int = 500, device=None) -> float:
    """Test accuracy of multinomial logistic regression on standardised frozen features: scikit-learn's
    LogisticRegression(C) objective (sum of cross-entropies + ||W||^2 / (2C), intercept unpenalised), written in
    torch and minimised by full-batch L-BFGS so it runs on the features' device in seconds where lbfgs in
    scikit-learn takes minutes on 55,000 x 128 (tests/test_ssl.py checks it against scikit-learn)."""
    dev = torch.device(device) if device is not None else f_train.device
    x, xt = f_train.to(dev, torch.float32), f_test.to(dev, torch.float32)
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)  # StandardScaler's
    x, xt = (x - mean) / std, (xt - mean) / std
    y = y_train.to(dev).long()
    n_cls = int(max(y_train.max(), y_test.max())) + 1
    w = torch.zeros(x.shape[1], n_cls, device=dev, requires_grad=True)
    b = torch.zeros(n_cls, device=dev, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")
    lam = 1.0 / (2.0 * C * len(x))  # the mean-loss form of sklearn's summed objective

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + lam * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((xt @ w + b).argmax(1).cpu() == y_test.cpu()).float().mean())


def knn_accuracy(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted k-NN: each test feature's k most cosine-similar train features vote for their class with weight
    exp(cos / T); the class with the largest sum wins. Test features go in chunks (N_test x N_train stays small)."""
    k = min(k, len(f_train))
    ftr = F.normalize(f_train.float(), dim=1)
    n_cls = int(max(y_train.max(), y_test.max())) + 1
    correct = 0
    for i in range(0, len(f_test), chunk):
        q = F.normalize(f_test[i:i + chunk].float(), dim=1)
        sim, idx = (q @ ftr.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(q), n_cls).scatter_add_(1, y_train[idx].long(), (sim / temperature).exp())
        correct += int((votes.argmax(1) == y_test[i:i + chunk]).sum())
    return correct / len(f_test)


def probe(model: torch.nn.Module, train_loader, test_loader, device, k: int = 20, temperature: float = 0.07
          ) -> dict:
    """Linear-probe and k-NN test accuracy of the frozen model's pooled features."""
    t0 = time.perf_counter()
    ftr, ytr = encode(model, train_loader, device)
    fte, yte = encode(model, test_loader, device)
    t1 = time.perf_counter()
    out = {"linear_probe": linear_probe(ftr, ytr, fte, yte, device=device), "knn": knn_accuracy(ftr, ytr, fte, yte, k, temperature),
           "knn_k": k, "features": int(ftr.shape[1]), "train": len(ftr), "test": len(fte),
           "encode_s": t1 - t0}
    out["probe_s"] = time.perf_counter() - t1
    return out


def probe_run(path: str | Path, random: bool = False) -> dict:
    """Probe a run folder's model on its own data's train and test splits (`random`: the same architecture
    freshly initialised with the run's seed instead of the trained weights)."""
    from lamina.runs.open import open_run

    run = open_run(path)
    model = run.model
    if random:
        cfg = run.cfg.model_copy(update={"model": run.cfg.model.model_copy(update={"pretrained": None})})
        seed_everything(cfg.seed)
        model = build_run_model(cfg, run.facts)
    if not isinstance(run.task, ClassificationTask) or len(run.facts.input_shape) != 3:
        raise ConfigError(f"probe: linear and k-NN probes need an image classification data set with labels; run "
                          f"{run.folder.path} is {run.facts.task}")
    device = run.device
    res = probe(model, run.eval_loader("train", device), run.eval_loader("test", device), device,
                run.cfg.ssl.knn_k, run.cfg.ssl.knn_temperature)
    return {"run_dir": str(run.folder.path), "model": run.cfg.model.name, "random": random,
            "objectives": [o for o in (run.cfg.ssl.method,) if o != "none"], **res}


# ----- pretraining ---------------------------------------------------------------------------------------------
def pretrain(cfg: RunConfig, callbacks: Sequence = (), on_event: Callable[[dict], None] | None = None,
             run_dir: str | Path | None = None, probe_after: bool = True) -> dict:
    """Self-supervised pretraining of cfg.model on cfg.data's training images (labels unused); returns the result
    dict also written to <run>/ssl.json (history, probes)."""
    s = cfg.ssl
    if s.method == "none":
        raise ConfigError("ssl.method: `lamina pretrain` needs a method: simclr, byol or mae (e.g. ssl.method=simclr)")
    emit = on_event or (lambda ev: None)
    wall0 = time.perf_counter()
    seed_everything(cfg.seed)
    bundle = load_data(cfg)
    check_finite_data(bundle)
    task_cls = task_class(cfg, bundle)
    if not issubclass(task_cls, ClassificationTask) or len(bundle.input_shape) != 3:
        raise ConfigError(f"data.name: self-supervised pretraining works on image data sets (C, H, W); "
                          f"'{bundle.name}' is {task_cls.name} with input {tuple(bundle.input_shape)}")
    facts = data_facts(bundle, task_cls)
    model = build_run_model(cfg, facts)  # the zoo model: the encoder; its head is never trained here
    # full batches only: NT-Xent's negatives and BatchNorm statistics want every batch the same size
    if len(bundle.train) < 2 * cfg.data.batch_size:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} needs at least two full batches of training "
                          f"images; the data has {len(bundle.train)}")
    loader = make_loader(bundle.train, cfg.data.batch_size, shuffle=True, drop_last=True, seed=cfg.seed)
    spe = max(1, len(loader) // cfg.trainer.accumulate)
    total = cfg.trainer.max_steps or spe * cfg.trainer.max_epochs
    learner = build_learner(s, model, total)
    # the views work on [0, 1] pixels; the run's normalize step (if any) comes after them, as in evaluation
    task = SSLTask(s, cfg.seed, eval_transforms(cfg.data.augment))
    emit({"event": "start", "method": s.method, "images": len(bundle.train), "steps": total,
          "encoder_params": count_params(model), "learner_params": count_params(learner)})
    trainer = fit_part(cfg, learner, task, loader, callbacks=callbacks, recalibrate_short=False)
    train_s = trainer.train_time

    folder = RunFolder(run_dir) if run_dir else RunFolder.new(cfg.logging.root, cfg.name or f"{cfg.data.name}-"
                                                              f"{s.method}", cfg.data.name, cfg.model.name)
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.write_text("config.yaml", to_yaml(cfg))
    folder.write_text("data.json", json.dumps(facts.to_dict(), indent=2, default=jsonable))
    meta = {**checkpoint_info(cfg, model, facts, [f"ssl:{s.method}"]), "epoch": trainer.epoch,
            "global_step": trainer.global_step, "batch_in_epoch": 0,
            "metrics": dict(trainer.history[-1]) if trainer.history else {}}
    ckpt = save_checkpoint(folder.checkpoints / "last", model, {}, meta)  # the encoder alone; heads are dropped
    out = {"run_dir": str(folder.path), "method": s.method, "model": cfg.model.name, "data": cfg.data.name,
           "images": len(bundle.train), "encoder_params": count_params(model),
           "learner_params": count_params(learner), "epochs": trainer.epoch, "steps": trainer.global_step,
           "train_time_s": train_s, "checkpoint": str(ckpt), "history": trainer.history,
           "config": to_dict(cfg)}
    if probe_after and bundle.test is not None:
        emit({"event": "probe"})
        device = trainer.device
        norm = eval_transforms(cfg.data.augment)
        test_loader = make_loader(bundle.test, cfg.data.eval_batch_size, device=device, transform=norm)
        train_eval = make_loader(bundle.train, cfg.data.eval_batch_size, device=device, transform=norm)
        out["probe"] = probe(model, train_eval, test_loader, device, s.knn_k, s.knn_temperature)
    out["wall_time_s"] = time.perf_counter() - wall0
    atomic_write_text(folder.path / "ssl.json", json.dumps(out, indent=2, default=jsonable))
    return out


__all__ = ["encode", "knn_accuracy", "linear_probe", "pretrain", "probe", "probe_run"]
