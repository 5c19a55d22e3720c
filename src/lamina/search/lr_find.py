"""Learning-rate range test (Smith 2017, "Cyclical learning rates", section 3.3; popularised by fastai): train
for a few hundred steps while the lr grows exponentially from `start` to `end`, record the loss, stop once it
diverges, and suggest the lr where the smoothed loss falls fastest.

The run's own data, task, model, optimizer and Trainer verbs are used (so precision, channels_last and
accumulation behave as in training), on a throwaway model: nothing is saved but lr_find.json and lr_find.png.
Suggestion: the steepest descent of the smoothed loss against log lr, searched before its minimum; `lr_at_min /
10` is reported beside it as the other common rule. The smoothing is a centred moving average (no lag: an
exponential average over 100 steps trails the raw loss by a decade of lr and moves the suggestion with it);
divergence is detected on a causal exponential average (beta 0.9), as it must be decided while running.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from lamina.config import RunConfig
from lamina.errors import ConfigError
from lamina.io import atomic_write_text

MAX_STEPS = 10_000
DIVERGE = 4.0  # stop when the smoothed loss exceeds this multiple of its minimum


def lr_schedule(start: float, end: float, steps: int) -> np.ndarray:
    return start * (end / start) ** (np.arange(steps) / max(steps - 1, 1))


def ema(losses: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (causal)."""
    out, avg = [], 0.0
    for i, v in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def smooth(losses: list[float], window: int | None = None) -> list[float]:
    """Centred moving average, the window shrinking at both ends (no lag)."""
    n = len(losses)
    w = window or max(3, n // 20)
    h = w // 2
    x = np.asarray(losses, dtype=float)
    c = np.concatenate([[0.0], np.cumsum(x)])
    return [float((c[min(n, i + h + 1)] - c[max(0, i - h)]) / (min(n, i + h + 1) - max(0, i - h))) for i in range(n)]


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, int]:
    """(lr, index) of the steepest descent of smoothed loss vs log lr, before the minimum."""
    i_min = int(np.argmin(smoothed))
    if i_min < 2:
        return lrs[i_min], i_min
    g = np.gradient(np.asarray(smoothed[: i_min + 1]), np.log(np.asarray(lrs[: i_min + 1])))
    skip = max(1, (i_min + 1) // 10)  # the first steps' estimates are noise
    i = skip + int(np.argmin(g[skip:]))
    return float(lrs[i]), i


def lr_find(cfg: RunConfig, start: float = 1e-7, end: float = 10.0, steps: int = 100,
            out: str | Path | None = None, progress=None) -> dict:
    import torch

    from lamina.engine import Trainer, seed_everything
    from lamina.runs import build_run_model, data_facts, load_data, make_task, task_class
    from lamina.runs.build import finetune_setup

    for name, v in (("--start", start), ("--end", end)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{name}: expected a positive learning rate, got {v}")
    if not start < end:
        raise ConfigError(f"--start/--end: expected start < end, got {start:g} >= {end:g}")
    if not 5 <= steps <= MAX_STEPS:
        raise ConfigError(f"--steps: expected an integer in 5..{MAX_STEPS}, got {steps}")
    seed_everything(cfg.seed)
    bundle = load_data(cfg)
    facts = data_facts(bundle, task_class(cfg, bundle))
    task = make_task(cfg, facts)
    model = build_run_model(cfg, facts)
    optimizer, _ = finetune_setup(cfg, model, task)
    base = [g["lr"] / cfg.optimizer.lr for g in optimizer.param_groups]  # layer-wise decay ratios survive
    trainer = Trainer(cfg.trainer)
    trainer.setup(model, optimizer, None, task)
    loader = task.train_loader(bundle, cfg.data, cfg.seed, trainer.device)
    trainer.train_loader = loader
    lrs = lr_schedule(start, end, steps)
    losses, used = [], []
    diverged = None
    model.train()
    it = iter(loader)
    for i, lr in enumerate(lrs):
        for g, r in zip(optimizer.param_groups, base):
            g["lr"] = float(lr) * r
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        loss, _ = trainer.train_step(trainer.to_device(batch))
        v = float(loss.detach())
        if not math.isfinite(v):
            diverged = float(lr)
            break
        trainer.backward(loss)
        trainer.precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        losses.append(v)
        used.append(float(lr))
        sm = ema(losses)
        if progress:
            progress(i + 1, steps, float(lr), v)
        if i > 10 and sm[-1] > DIVERGE * min(sm):
            diverged = float(lr)
            break
    if len(losses) < 5:
        raise ConfigError(f"lr-find: the loss was not finite after {len(losses)} steps from lr {start:g}; "
                          f"try a smaller --start")
    sm = smooth(losses)
    lr_s, i_s = suggest(used, sm)
    i_min = int(np.argmin(sm))
    out = Path(out or Path(cfg.logging.root) / f"{cfg.name or cfg.data.name}-lr-find")
    out.mkdir(parents=True, exist_ok=True)
    result = {"start": start, "end": end, "steps": steps, "steps_run": len(losses), "suggested_lr": lr_s,
              "lr_at_min": used[i_min], "min_loss": sm[i_min], "diverged_at": diverged,
              "model": cfg.model.name, "data": cfg.data.name, "lrs": used, "losses": losses, "smoothed": sm}
    atomic_write_text(out / "lr_find.json", json.dumps(result, indent=2))
    result["plot"] = str(_plot(result, out / "lr_find.png", i_s))
    del model, optimizer
    torch.set_grad_enabled(True)
    return result


def _plot(r: dict, path: Path, i_s: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lamina.plots import save_figure

    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(r["lrs"], r["losses"], color="#bbb", lw=0.8, label="loss")
    ax.plot(r["lrs"], r["smoothed"], color="#2753a3", label="smoothed")
    ax.axvline(r["suggested_lr"], color="#c2410c", ls="--", label=f"suggested {r['suggested_lr']:.2g}")
    ax.plot([r["suggested_lr"]], [r["smoothed"][i_s]], "o", color="#c2410c")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    lo = min(r["smoothed"])
    ax.set_ylim(top=max(r["smoothed"][0], lo) * 1.3 + 1e-9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, path, f"lr range test: {r['data']} / {r['model']}")


__all__ = ["lr_find", "lr_schedule", "smooth", "suggest"]
