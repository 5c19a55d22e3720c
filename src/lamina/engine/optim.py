"""Optimizers and learning-rate schedules built from typed configs.

Every schedule is stepped once per optimizer step. Warmup + constant/step/cosine/linear are one
per-step factor function under LambdaLR: warmup composes with any schedule and the only state is the
step count, so resume is exact. One-cycle uses torch's OneCycleLR (it also cycles momentum).
"""

from __future__ import annotations

import math

import torch

from lamina.config.schema import OptimizerConfig, ScheduleConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm gains (1-D params): decaying them only hurts."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, groups: list[dict] | None = None
                    ) -> torch.optim.Optimizer:
    """The optimizer named by `cfg` over `groups` (default: decay / no-decay groups of the model's trainable
    parameters; layer-wise lr decay passes its own groups, each with its lr and weight decay)."""
    groups = groups if groups is not None else param_groups(model, cfg.weight_decay)
    impl = _impl(cfg, groups)
    kw = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               **kw)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, **kw)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **kw)


_FUSED_DEVICES = ("cpu", "cuda", "mps")


def _impl(cfg: OptimizerConfig, groups: list[dict]) -> str:
    """optimizer.impl auto: Adam/AdamW fused (one kernel for every parameter's update instead of a few per
    tensor) when every parameter is a floating-point tensor on a device torch has the kernel for; else foreach.
    SGD: foreach."""
    if cfg.impl != "auto":
        return cfg.impl
    params = [p for g in groups for p in g["params"]]
    if cfg.name in ("adam", "adamw") and params and all(
            p.is_floating_point() and p.device.type in _FUSED_DEVICES and type(p) in (torch.Tensor, torch.nn.Parameter)
            for p in params):
        return "fused"
    return "foreach"


class LRFactor:
    """lr(step) / base_lr for warmup followed by constant | step | cosine | linear decay."""

    def __init__(self, name: str, total_steps: int, warmup_steps: int = 0, step_size: int = 1,
                 gamma: float = 0.1, min_factor: float = 0.0):
        self.name, self.total, self.warmup = name, max(1, total_steps), warmup_steps
        self.step_size, self.gamma, self.min_factor = max(1, step_size), gamma, min_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.name == "constant":
            return 1.0
        if self.name == "step":
            return self.gamma ** (step // self.step_size)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.name == "cosine":
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_factor + (1 - self.min_factor) * (1 - progress)  # linear


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int,
                    steps_per_epoch: int, base_lr: float | list[float]):
    """`base_lr`: the peak lr, or one per param group (layer-wise lr decay keeps each group's own peak)."""
    if cfg.name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=base_lr, total_steps=max(2, total_steps),
                                                   pct_start=cfg.pct_start)
    top = max(base_lr) if isinstance(base_lr, (list, tuple)) else base_lr
    factor = LRFactor(cfg.name, total_steps, cfg.warmup_steps, cfg.step_size * steps_per_epoch, cfg.gamma,
                      cfg.min_lr / top)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
