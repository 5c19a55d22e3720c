"""Robustness of a trained model: robust accuracy under an attack, and `attack_run` on a trained run.

The attacks themselves (FGSM, PGD, APGD-CE/DLR, and the PGD-AT / TRADES training examples) live in
lamina.nn.attacks, below the engine, because the adversarial-training objective (lamina.runs.objectives) uses
them too; they are re-exported here, so `lamina.trust.robust.pgd` and friends keep working. See that module's
docstring for the attack contract (pixel space, eval mode, frozen parameters, detached examples).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lamina.data.sample import is_streamed
from lamina.data.transforms import normalize_stats
from lamina.errors import ConfigError, DataError
from lamina.nn.attacks import (ATTACKS, NORMS, adversarial_examples, apgd, apgd_checkpoints, attack_mode,  # noqa: F401
                               check_budget, dlr_loss, fgsm, make_attack, pgd, trades_kl)
from lamina.nn.preprocess import Normalized  # noqa: F401  (re-exported: lamina.trust.robust.Normalized)


def robust_accuracy(model: nn.Module, loader, attack: Callable, *, n: int | None = None, device=None,
                    adapter: Callable | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Clean and robust accuracy of `model` over (the first `n` samples of) `loader`, whose batches are dicts
    with "x" in the attack's value range and "y". `adapter(batch) -> x`: the model input, default batch["x"].
    `progress(done, total)`: samples attacked so far (total known when the loader's data has a length)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device)
    clean = robust = seen = 0
    total = _samples(loader, n) if progress is not None else None
    if total is None:
        progress = None
    else:
        progress(0, total)
    for batch in loader:
        x = (adapter(batch) if adapter else batch["x"]).to(device)
        y = batch["y"].to(device)
        if n is not None:
            x, y = x[: n - seen], y[: n - seen]
        if len(y) == 0:
            break
        with torch.no_grad(), attack_mode(model):
            clean_ok = model(x).argmax(1) == y
        x_adv = attack(model, x, y)
        with torch.no_grad(), attack_mode(model):
            robust_ok = (model(x_adv).argmax(1) == y) & clean_ok  # a wrong clean answer is not robust
        clean += int(clean_ok.sum())
        robust += int(robust_ok.sum())
        seen += len(y)
        if progress is not None:
            progress(min(seen, total), total)
        if n is not None and seen >= n:
            break
    if seen == 0:
        raise DataError("robust_accuracy: the loader yielded no samples")
    if progress is not None and seen < total:
        progress(total, total)
    return {"clean_acc": clean / seen, "robust_acc": robust / seen, "n": seen}


def _samples(loader, n: int | None) -> int | None:
    """How many samples robust_accuracy will attack: the loader's data size (capped at n), or None if unknown."""
    data = getattr(loader, "data", getattr(loader, "dataset", None))
    try:
        size = len(data)
    except TypeError:
        return n
    return min(size, n) if n is not None else size


def _check_range(lo: float, hi: float, clamp) -> None:
    if clamp is not None and (lo < clamp[0] - 1e-6 or hi > clamp[1] + 1e-6):
        raise DataError(f"test inputs span [{lo:.3g}, {hi:.3g}], outside the attack's value range {list(clamp)}; "
                        "pass clamp=(lo, hi) for this data")


class _RangeChecked:
    """A streamed test split's loader whose batches are checked against the attack's value range as they are read
    (the in-memory path checks the whole tensor up front; a streamed split is never whole)."""

    def __init__(self, loader, clamp):
        self.loader, self.clamp = loader, clamp
        self.data = loader.data  # robust_accuracy's progress total

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            x = batch["x"]
            if not x.is_floating_point():
                raise DataError("attacks need float inputs in batch['x']; this streamed split does not have them")
            _check_range(float(x.min()), float(x.max()), self.clamp)
            yield batch


def attack_run(run_dir: str | Path, attack: str = "pgd", eps: float = 0.1, steps: int = 20, norm: str = "linf",
               alpha: float | None = None, n: int | None = None, which: str = "best", restarts: int = 1,
               clamp: tuple[float, float] = (0.0, 1.0), seed: int = 0,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Clean vs robust accuracy of a trained classification run on its test split (first `n` samples, or all),
    under `attack` with budget `eps` in `norm` (pixel space: before the run's normalize step, if any); writes
    attack.json into the run folder (attack_<attack>_<norm>_eps<eps>.json alongside, so several budgets keep
    their numbers) and returns the same dict. `progress(done, total)`: test samples attacked so far."""
    from lamina.data import make_loader
    from lamina.engine.precision import Precision
    from lamina.runs import open_run

    check_budget(eps, norm, steps, alpha)
    if attack not in ATTACKS:
        make_attack(attack)  # raises the one-line "unknown attack" error
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ConfigError(f"n: expected a positive number of test samples, got {n!r}")
    run = open_run(run_dir, which)
    cfg, model, ckpt = run.cfg, run.model, run.checkpoint
    if run.facts.task != "classification":
        raise DataError(f"attacks need a classification run, {run_dir} is {run.facts.task}")
    bundle = run.data()  # same name, options and seed -> the same test split
    if bundle.test is None:
        raise DataError(f"data set '{bundle.name}' has no test split; attack needs one")
    streamed = is_streamed(bundle.test)  # files read batch by batch; each batch's range is checked as it comes
    x_all = None if streamed else getattr(bundle.test, "tensors", {}).get("x")
    if not streamed and (x_all is None or not torch.is_tensor(x_all) or not x_all.is_floating_point()):
        raise DataError(f"attacks need float inputs in batch['x']; data set '{bundle.name}' does not have them")
    if x_all is not None:
        _check_range(float(x_all.min()), float(x_all.max()), clamp)
    device = run.device
    stats = normalize_stats(cfg.data.augment)
    net = Normalized(model, *stats) if stats else model
    net = net.to(device).eval()
    if cfg.trainer.channels_last and len(bundle.input_shape) == 3:
        net = net.to(memory_format=torch.channels_last)
    # raw pixels (no normalize transform): the attack works in [0, 1]; `Normalized` applies the run's scale
    loader = make_loader(bundle.test, cfg.data.eval_batch_size, device=device, trim=bundle.meta.get("pad_trim"))
    if streamed:
        loader = _RangeChecked(loader, clamp)
    g = torch.Generator(device=device).manual_seed(seed)
    atk = make_attack(attack, eps, steps, norm, alpha, restarts, clamp, generator=g,
                      autocast=Precision(cfg.trainer.precision, device).autocast)
    t0 = time.perf_counter()
    res = robust_accuracy(net, loader, atk, n=n, device=device, progress=progress)
    secs = time.perf_counter() - t0
    out = {"checkpoint": str(ckpt), "attack": attack, "eps": eps, "steps": None if attack == "fgsm" else steps,
           "norm": norm, "alpha": alpha if attack == "pgd" else None, "restarts": restarts, "n": res["n"],
           "clean_acc": res["clean_acc"], "robust_acc": res["robust_acc"], "seconds": secs,
           "adversarial_training": cfg.adversarial.method}
    root = run.folder.path
    text = json.dumps(out, indent=2)
    (root / "attack.json").write_text(text)
    (root / f"attack_{attack}_{norm}_eps{eps:g}.json").write_text(text)
    return out
