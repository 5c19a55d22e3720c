"""Adversarial attacks as plain functions of a model and a batch: FGSM, PGD (L-inf / L2, random start, restarts),
APGD-CE / APGD-DLR, and the training-time examples of PGD-AT (Madry et al. 2018) and TRADES (Zhang et al. 2019).

Here, below the engine, because two layers use them: the adversarial-training objective
(lamina.runs.objectives.adversarial) and the robustness tool (lamina.trust.robust: robust accuracy, attack_run).

Written here rather than depending on torchattacks / autoattack: both are thinly maintained (autoattack is a
git-only research package with no releases; torchattacks pins old torch idioms), and the attacks are a few
dozen lines of torch each. APGD follows Croce & Hein 2020 ("Reliable evaluation of adversarial robustness with
an ensemble of diverse parameter-free attacks"), Alg. 1: step size 2*eps, momentum 0.75, halving checkpoints
p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), condition rho = 0.75.

Contract of every attack: `attack(model, x, y) -> x_adv` on a batch, where `x` lives in the model's own input
range (`clamp`, default [0, 1]: pixels before any normalize step; wrap the model with `Normalized` when the
run normalizes). Attacks run the model in eval mode (BN uses running statistics and is not updated by attack
iterates; dropout off), take gradients with respect to the input only (parameters' `.requires_grad` is turned
off for the attack and restored, so no parameter `.grad` is touched and no weight gradients are computed), and
restore the model's train/eval mode afterwards. The loss is summed over the batch, so each sample's input
gradient does not shrink with the batch size (matters under fp16/bf16 autocast). Returned examples are
detached; a sample misclassified by any iterate keeps that iterate (a robust-accuracy evaluation counts it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lamina.errors import ConfigError, unknown_name

NORMS = ("linf", "l2")
ATTACKS = ("fgsm", "pgd", "apgd", "apgd-dlr")

# ----- checks and helpers ---------------------------------------------------------------------------
def check_budget(eps: float, norm: str, steps: int | None = None, alpha: float | None = None) -> None:
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ConfigError(f"eps: expected a number >= 0, got {eps!r}")
    if norm not in NORMS:
        raise ConfigError(f"norm: expected one of {', '.join(NORMS)}, got {norm!r}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps: expected a positive integer, got {steps!r}")
    if alpha is not None and not alpha > 0:
        raise ConfigError(f"alpha: expected a step size > 0, got {alpha!r}")


def _bshape(x: torch.Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (x.ndim - 1)  # per-sample scalars broadcast over (C, H, W)


def _l2(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).view(_bshape(v))


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps, norm: str, clamp) -> torch.Tensor:
    """Into the eps-ball around x, then into the value range (the box keeps the ball constraint: both are convex
    and the box projection only moves coordinates toward x's own values, which lie inside the box)."""
    d = x_adv - x
    if norm == "linf":
        d = torch.maximum(torch.minimum(d, eps), -eps) if torch.is_tensor(eps) else d.clamp(-eps, eps)
    else:
        d = d * torch.clamp(eps / (_l2(d) + 1e-12), max=1.0)
    out = x + d
    return out.clamp(*clamp) if clamp is not None else out


def _random_start(x: torch.Tensor, eps: float, norm: str, clamp, generator) -> torch.Tensor:
    if norm == "linf":
        d = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    else:  # uniform in the L2 ball: direction ~ N(0, I), radius ~ eps * U^(1/d)
        g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        dim = x[0].numel()
        r = torch.rand((len(x),) + (1,) * (x.ndim - 1), generator=generator, device=x.device, dtype=x.dtype)
        d = g / (_l2(g) + 1e-12) * eps * r ** (1.0 / dim)
    out = x + d
    return out.clamp(*clamp) if clamp is not None else out


def _ascent(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest ascent direction of unit norm: sign for L-inf, grad / ||grad||_2 for L2."""
    return grad.sign() if norm == "linf" else grad / (_l2(grad) + 1e-12)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference-of-logits ratio (Croce & Hein 2020), per sample: -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3).
    Scale-invariant, so it does not saturate like CE on over-confident models. Needs >= 3 classes."""
    z, _ = logits.float().sort(dim=1)
    zy = logits.float().gather(1, y[:, None]).squeeze(1)
    top_is_y = (logits.argmax(1) == y).float()
    other = z[:, -2] * top_is_y + z[:, -1] * (1 - top_is_y)
    return -(zy - other) / (z[:, -1] - z[:, -3] + 1e-12)


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")


@contextlib.contextmanager
def attack_mode(model: nn.Module, train: bool = False):
    """Model in eval mode (or train mode, `train=True`) with parameters frozen; both restored on exit."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.train(train)
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)


def _input_grad(model, x_adv, y, loss_fn, autocast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-sample loss, logits, d sum(loss) / d x_adv) at x_adv."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad(), (autocast() if autocast is not None else contextlib.nullcontext()):
        logits = model(x_adv)
        losses = loss_fn(logits, y)
    (grad,) = torch.autograd.grad(losses.sum(), [x_adv])
    return losses.detach(), logits.detach(), grad.detach()


# ----- attacks ---------------------------------------------------------------------------------------
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, clamp=(0.0, 1.0),
         loss_fn: Callable = _ce, autocast=None) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): x + eps * sign(grad_x loss), clamped to the range."""
    check_budget(eps, "linf")
    with attack_mode(model):
        _, _, grad = _input_grad(model, x, y, loss_fn, autocast)
    out = x + eps * grad.sign()
    return (out.clamp(*clamp) if clamp is not None else out).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 10,
        alpha: float | None = None, norm: str = "linf", random_start: bool = True, restarts: int = 1,
        clamp=(0.0, 1.0), loss_fn: Callable = _ce, generator: torch.Generator | None = None,
        autocast=None, train_mode: bool = False) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018): `steps` ascent steps of size `alpha` (default 2.5*eps/steps)
    in the L-inf (sign) or L2 (normalized gradient) geometry, each projected into the eps-ball and the value
    range; `random_start`: uniform start in the ball. With `restarts` > 1, per sample the first restart that
    misclassifies wins, else the one with the highest loss."""
    check_budget(eps, norm, steps, alpha)
    if restarts < 1:
        raise ConfigError(f"restarts: expected a positive integer, got {restarts!r}")
    alpha = 2.5 * eps / steps if alpha is None else alpha
    x = x.detach()
    best, best_loss, best_wrong = x.clone(), None, torch.zeros(len(x), dtype=torch.bool, device=x.device)
    with attack_mode(model, train=train_mode):
        for _ in range(restarts):
            x_adv = _random_start(x, eps, norm, clamp, generator) if random_start and eps > 0 else x.clone()
            wrong_at = torch.zeros_like(best_wrong)
            kept = x_adv.clone()
            for _ in range(steps):
                losses, logits, grad = _input_grad(model, x_adv, y, loss_fn, autocast)
                # a sample already misclassified by an earlier iterate keeps that iterate
                hit = (logits.argmax(1) != y) & ~wrong_at
                kept[hit], wrong_at = x_adv[hit], wrong_at | hit
                x_adv = _project(x_adv + alpha * _ascent(grad, norm), x, eps, norm, clamp).detach()
            with torch.no_grad(), (autocast() if autocast is not None else contextlib.nullcontext()):
                logits = model(x_adv)
                final_loss = loss_fn(logits, y).float()
            final_wrong = logits.argmax(1) != y
            use_final = final_wrong | ~wrong_at
            x_run = torch.where(use_final.view(_bshape(x)), x_adv, kept)
            run_wrong = wrong_at | final_wrong
            if best_loss is None:
                best, best_loss, best_wrong = x_run, final_loss, run_wrong
                continue
            take = (run_wrong & ~best_wrong) | (~run_wrong & ~best_wrong & (final_loss > best_loss))
            best = torch.where(take.view(_bshape(x)), x_run, best)
            best_loss = torch.where(take, final_loss, best_loss)
            best_wrong = best_wrong | run_wrong
    return best.detach()


def apgd_checkpoints(n_iter: int) -> list[int]:
    """Iterations at which APGD decides whether to halve the step: p_j * n_iter, in the integer form of the
    reference code (first interval 0.22 n, each next one 0.03 n shorter, never under 0.06 n)."""
    k = max(int(0.22 * n_iter), 1)
    dec, low = max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    out, at = [0], 0
    while at + k < n_iter:
        at += k
        out.append(at)
        k = max(k - dec, low)
    return out


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 100, norm: str = "linf",
         loss: str = "ce", restarts: int = 1, rho: float = 0.75, momentum: float = 0.75, clamp=(0.0, 1.0),
         generator: torch.Generator | None = None, autocast=None) -> torch.Tensor:
    """Auto-PGD (Croce & Hein 2020): PGD with momentum and a per-sample step size (2*eps at first) halved at
    checkpoints where the loss stalled (fewer than rho of the steps since the last checkpoint increased it) or
    where neither step nor best loss changed since the last checkpoint; after a halving it restarts from the
    best point. `loss`: "ce" (APGD-CE) or "dlr" (APGD-DLR). Returns, per sample, a misclassifying iterate if any
    restart found one, else the highest-loss point."""
    check_budget(eps, norm, steps)
    if loss not in ("ce", "dlr"):
        raise ConfigError(f"loss: expected 'ce' or 'dlr', got {loss!r}")
    loss_fn = _ce if loss == "ce" else dlr_loss
    x = x.detach()
    bs = _bshape(x)
    checks = apgd_checkpoints(steps)
    out = x.clone()
    done = torch.zeros(len(x), dtype=torch.bool, device=x.device)  # misclassified by some iterate: settled
    out_loss = torch.full((len(x),), -float("inf"), device=x.device)
    with attack_mode(model):
        for _ in range(restarts):
            x0 = _random_start(x, eps, norm, clamp, generator) if eps > 0 else x.clone()
            eta = torch.full((len(x),), 2.0 * eps, device=x.device, dtype=x.dtype)
            f0, logits, g = _input_grad(model, x0, y, loss_fn, autocast)
            found, x_found = (logits.argmax(1) != y), x0.clone()
            x_max, f_max, g_max = x0.clone(), f0.clone(), g.clone()  # best point, its loss and gradient
            x1 = _project(x0 + eta.view(bs) * _ascent(g, norm), x, eps, norm, clamp)
            x_prev, x_k = x0, x1
            f_prev = f0
            n_incr = torch.zeros(len(x), device=x.device)
            last_check, eta_at_last, fmax_at_last = 0, eta.clone(), f_max.clone()
            for k in range(1, steps + 1):
                f_k, logits, g = _input_grad(model, x_k, y, loss_fn, autocast)
                wrong = logits.argmax(1) != y
                new = wrong & ~found
                x_found[new], found = x_k[new], found | wrong
                n_incr += (f_k > f_prev).float()
                better = f_k > f_max
                x_max = torch.where(better.view(bs), x_k, x_max)
                g_max = torch.where(better.view(bs), g, g_max)
                f_max = torch.where(better, f_k, f_max)
                f_prev = f_k
                if k == steps:
                    break
                if k in checks and k > last_check:
                    cond1 = n_incr < rho * (k - last_check)
                    cond2 = (eta == eta_at_last) & (f_max == fmax_at_last)
                    halve = cond1 | cond2
                    eta_at_last, fmax_at_last = eta.clone(), f_max.clone()
                    eta = torch.where(halve, eta / 2, eta)
                    # restart halved samples from their best point, with the gradient stored there
                    x_k = torch.where(halve.view(bs), x_max, x_k)
                    x_prev = torch.where(halve.view(bs), x_max, x_prev)
                    g = torch.where(halve.view(bs), g_max, g)
                    n_incr.zero_()
                    last_check = k
                z = _project(x_k + eta.view(bs) * _ascent(g, norm), x, eps, norm, clamp)
                a = momentum if k > 0 else 1.0
                x_next = _project(x_k + a * (z - x_k) + (1 - a) * (x_k - x_prev), x, eps, norm, clamp)
                x_prev, x_k = x_k, x_next.detach()
            # merge this restart: misclassifying iterates first, then the highest loss
            take_found = found & ~done
            take_loss = ~found & ~done & (f_max > out_loss)
            out = torch.where(take_found.view(bs), x_found, out)
            out = torch.where(take_loss.view(bs), x_max, out)
            out_loss = torch.where(take_loss, f_max, out_loss)
            done = done | found
            if bool(done.all()):
                break
    return out.detach()


def make_attack(name: str = "pgd", eps: float = 0.1, steps: int = 20, norm: str = "linf",
                alpha: float | None = None, restarts: int = 1, clamp=(0.0, 1.0),
                generator: torch.Generator | None = None, autocast=None) -> Callable:
    """attack(model, x, y) -> x_adv by name: fgsm | pgd | apgd (APGD-CE) | apgd-dlr."""
    check_budget(eps, norm, steps, alpha)
    if name not in ATTACKS:
        raise ConfigError(f"attack: {unknown_name('attack', name, ATTACKS)}")
    if name == "fgsm":
        if norm != "linf":
            raise ConfigError("norm: fgsm is an L-inf attack; use --norm linf, or pgd/apgd for l2")
        return partial(fgsm, eps=eps, clamp=clamp, autocast=autocast)
    if name == "pgd":
        return partial(pgd, eps=eps, steps=steps, alpha=alpha, norm=norm, restarts=restarts, clamp=clamp,
                       generator=generator, autocast=autocast)
    return partial(apgd, eps=eps, steps=steps, norm=norm, loss="dlr" if name == "apgd-dlr" else "ce",
                   restarts=restarts, clamp=clamp, generator=generator, autocast=autocast)


# ----- adversarial training ----------------------------------------------------------------------------
def trades_kl(logits_adv: torch.Tensor, logits_clean: torch.Tensor) -> torch.Tensor:
    """KL(f(x) || f(x_adv)) per sample, as TRADES' robust term (summed over classes)."""
    return F.kl_div(logits_adv.float().log_softmax(1), logits_clean.float().log_softmax(1), log_target=True,
                    reduction="none").sum(1)


def adversarial_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, *, clamp=(0.0, 1.0),
                         autocast=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-time adversarial inputs for `cfg` (a trainer.adversarial section): PGD on CE for pgd, PGD on
    KL(f(x) || f(x_adv)) from a small Gaussian start for trades (Zhang et al.'s recipe). Eval mode for the
    attack in both (see Trainer.train_step for why)."""
    if cfg.method == "pgd":
        return pgd(model, x, y, cfg.eps, steps=cfg.steps, alpha=cfg.alpha, norm=cfg.norm, random_start=True,
                   clamp=clamp, generator=generator, autocast=autocast)
    with torch.no_grad(), attack_mode(model), (autocast() if autocast else contextlib.nullcontext()):
        clean = model(x).float()
    x_adv = x + 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_adv = _project(x_adv, x, cfg.eps, cfg.norm, clamp)
    alpha = cfg.alpha if cfg.alpha is not None else 2.5 * cfg.eps / cfg.steps
    kl = lambda logits, _y: trades_kl(logits, clean)  # noqa: E731
    with attack_mode(model):
        for _ in range(cfg.steps):
            _, _, grad = _input_grad(model, x_adv, y, kl, autocast)
            x_adv = _project(x_adv + alpha * _ascent(grad, cfg.norm), x, cfg.eps, cfg.norm, clamp).detach()
    return x_adv.detach()
