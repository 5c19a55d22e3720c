"""Pruning: unstructured global magnitude pruning on a sparsity schedule, and structured channel pruning.

* `GradualPruning` (a Trainer callback) prunes the smallest-magnitude weights of all conv/linear layers
  *globally* (one threshold over the whole network, so layers that matter less lose more) and raises the
  sparsity along the cubic schedule of Zhu & Gupta (2017), s_t = s_f * (1 - (1 - t/n)^3): most weights go
  early, while the network can still recover, and the last ones slowly. The masks are kept by the callback
  and multiplied in after every step rather than through torch.nn.utils.prune's reparametrization, whose
  `weight_orig`/`weight_mask` keys would make every checkpoint unloadable into the plain model.
  Unstructured zeros shrink a compressed file, not dense latency.
* `channel_prune` removes whole conv channels / linear units (and attention heads) with Torch-Pruning's
  dependency graph (Fang et al., CVPR 2023): a pruned channel is removed from every layer that produces or
  consumes it -- BatchNorm, the next conv, residual additions and concatenations -- so the result is a
  smaller dense model that runs faster everywhere. Hand-written channel surgery gets residual coupling wrong;
  the dependency graph is the well-kept library for exactly this. Group importance is the L2 norm of every
  weight in the coupled group. The classifier / LM head and embeddings keep their widths.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from lamina.engine.callbacks import Callback
from lamina.errors import ConfigError, MissingDependencyError, ModelError

_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def prunable_weights(model: nn.Module, skip_head: bool = True) -> list[tuple[nn.Module, str]]:
    """(module, "weight") of every conv/linear layer; the classifier head is kept whole by default (its 10 rows
    decide every prediction and hold few of the weights)."""
    model = _inner(model)
    head = getattr(model, "head", None) if skip_head else None
    lm_head = getattr(model, "lm_head", None) if skip_head else None
    return [(m, "weight") for m in model.modules() if isinstance(m, _PRUNABLE) and m is not head and m is not lm_head]


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the prunable layers' weights (pruned or not)."""
    zeros = total = 0
    for m, _ in prunable_weights(model, skip_head=False):
        w = m.weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(total, 1)


def global_magnitude_masks(model: nn.Module, amount: float) -> dict[nn.Module, torch.Tensor]:
    """{layer: 0/1 mask} zeroing the `amount` smallest-|w| share of all prunable weights (one global threshold)."""
    if not 0.0 <= amount < 1.0:
        raise ConfigError(f"magnitude pruning: sparsity must be in [0, 1), got {amount}")
    layers = [m for m, _ in prunable_weights(model)]
    if not layers:
        raise ModelError(f"magnitude pruning: {type(model).__name__} has no conv/linear weights")
    scores = torch.cat([m.weight.detach().abs().reshape(-1).float().cpu() for m in layers])
    k = int(round(amount * scores.numel()))
    if k == 0:
        return {m: torch.ones_like(m.weight, dtype=torch.bool) for m in layers}
    threshold = torch.kthvalue(scores, k).values
    masks, budget = {}, k
    for m in layers:  # ties at the threshold: prune in layer order until exactly k weights are gone
        w = m.weight.detach().abs()
        below = w < threshold
        tie = (w == threshold) & ~below
        take = min(budget - int(below.sum()), int(tie.sum())) if budget > int(below.sum()) else 0
        mask = ~below
        if take > 0:
            idx = tie.reshape(-1).nonzero().squeeze(1)[:take]
            mask.view(-1)[idx] = False
        budget -= int((~mask).sum())
        masks[m] = mask
    return masks


@torch.no_grad()
def apply_masks(masks: dict[nn.Module, torch.Tensor]) -> None:
    for m, mask in masks.items():
        m.weight.mul_(mask.to(m.weight.device, m.weight.dtype))


def magnitude_prune(model: nn.Module, amount: float) -> dict[nn.Module, torch.Tensor]:
    """Global unstructured magnitude pruning in place to `amount` sparsity of the conv/linear weights (the head
    excluded); returns the masks. Weights stay plain tensors (no `weight_orig`/`weight_mask` reparametrization as
    in torch.nn.utils.prune), so checkpoints, export and quantization see an ordinary model."""
    masks = global_magnitude_masks(model, amount)
    apply_masks(masks)
    return masks


def cubic_sparsity(step: int, total: int, final: float, start: float = 0.0, begin: int = 0, end: int | None = None) -> float:
    """Zhu & Gupta's schedule: sparsity at `step`, rising from `start` at `begin` to `final` at `end`."""
    end = total if end is None else end
    if step <= begin:
        return start
    if step >= end:
        return final
    frac = (step - begin) / max(end - begin, 1)
    return final + (start - final) * (1.0 - frac) ** 3


class GradualPruning(Callback):
    """Raise global magnitude sparsity to `final` along the cubic schedule while training.

    Every `every` optimizer steps until `end_fraction` of the run the masks are recomputed for the scheduled
    sparsity; after every step the current masks are re-applied, so the optimizer (whose momentum would revive
    them) never brings a pruned weight back. The rest of the run fine-tunes at the final sparsity, and every
    checkpoint holds plain weights with exact zeros.
    """

    def __init__(self, model: nn.Module, final: float, total_steps: int, every: int = 10, end_fraction: float = 0.7):
        if not 0.0 < final < 1.0:
            raise ConfigError(f"prune: sparsity must be in (0, 1), got {final}")
        self.model, self.final, self.every = model, float(final), max(1, int(every))
        self.end = max(1, int(total_steps * end_fraction))
        self.masks: dict | None = None
        self.history: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, loss=None) -> None:
        step = trainer.global_step
        if step <= self.end and (step % self.every == 0 or step == self.end or self.masks is None):
            target = cubic_sparsity(step, self.end, self.final)
            if target > 0:
                self.masks = global_magnitude_masks(self.model, target)
                self.history.append((step, target))
        if self.masks is not None:
            apply_masks(self.masks)

    def on_fit_end(self, trainer) -> None:
        if not self.history or self.history[-1][1] < self.final:  # a run shorter than the schedule
            self.masks = magnitude_prune(self.model, self.final)
            self.history.append((trainer.global_step, self.final))


def channel_prune(model: nn.Module, example: torch.Tensor, ratio: float = 0.5, round_to: int | None = None) -> nn.Module:
    """A copy of `model` with `ratio` of the channels of every prunable group removed.

    Attention layers lose whole heads (q/k/v/out projections stay consistent; `n_head` is updated); MLP hidden
    units, conv channels (with their BatchNorm) and residual-coupled channels go together through the
    dependency graph. `example` is one input batch, as the model sees it.
    """
    try:
        import torch_pruning as tp
    except ImportError:
        raise MissingDependencyError('channel pruning needs torch-pruning: pip install "lamina[compress]"') from None
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"channel pruning: ratio must be in (0, 1), got {ratio}")
    from lamina.nn.attention import MultiHeadAttention

    model = copy.deepcopy(_inner(model)).eval()
    ignored = [m for m in (getattr(model, "head", None), getattr(model, "lm_head", None)) if isinstance(m, nn.Module)]
    ignored += [m for m in model.modules() if isinstance(m, nn.Embedding)]
    attn = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    for a in attn:  # heads are cut here (exactly, by their weights' norm); the dependency graph handles the rest
        if a.n_kv_head == a.n_head and a.kernel is None:  # GQA couples heads unevenly: kept whole
            _prune_heads(a, ratio)
        ignored += [a.q_proj, a.k_proj, a.v_proj, a.out_proj]
    # The residual stream (embedding width) is fed by embeddings and LayerNorms: keep it, prune inside blocks.
    unwrapped = [m for m in model.modules() if isinstance(m, nn.Linear) and attn and m not in ignored
                 and not _is_hidden_producer(model, m)]
    try:
        with warnings.catch_warnings():  # norms/positional tables outside any layer: the residual width is kept
            warnings.filterwarnings("ignore", message=".*Unwrapped parameters.*")
            pruner = tp.pruner.MetaPruner(
                model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                ignored_layers=ignored + unwrapped, round_to=round_to,
            )
            pruner.step()
    except Exception as e:  # tracing or dependency errors name a layer deep inside torch-pruning
        raise ModelError(f"channel pruning: {type(model).__name__}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]}") from None
    try:  # the dependency graph can miss a coupling it cannot trace (e.g. zero-padded shortcuts): run it once
        with torch.no_grad():
            model(example)
    except Exception as e:
        raise ModelError(f"channel pruning: the pruned {type(model).__name__} no longer runs ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}); its layer coupling is not traceable by torch-pruning") from None
    return model


@torch.no_grad()
def _prune_heads(a, ratio: float) -> None:
    """Keep the round((1 - ratio) * n_head) heads with the largest L2 norm over their q/k/v rows and out_proj
    columns; slice the four projections and update `n_head` (head_dim is unchanged)."""
    h, d = a.n_head, a.head_dim
    keep_n = max(1, int(round(h * (1.0 - ratio))))
    if keep_n == h:
        return
    score = sum(lin.weight.reshape(h, d, -1).pow(2).sum((1, 2)) for lin in (a.q_proj, a.k_proj, a.v_proj))
    score = score + a.out_proj.weight.reshape(a.out_proj.out_features, h, d).pow(2).sum((0, 2))
    keep = score.topk(keep_n).indices.sort().values
    rows = (keep[:, None] * d + torch.arange(d)).reshape(-1)  # the kept heads' channel indices
    for lin in (a.q_proj, a.k_proj, a.v_proj):
        lin.weight = nn.Parameter(lin.weight[rows].clone())
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias[rows].clone())
        lin.out_features = len(rows)
    a.out_proj.weight = nn.Parameter(a.out_proj.weight[:, rows].clone())
    a.out_proj.in_features = len(rows)
    a.n_head = a.n_kv_head = keep_n


def _is_hidden_producer(model: nn.Module, lin: nn.Linear) -> bool:
    """True for the first Linear of an MLP block (its outputs are hidden units, free to prune); the second one
    writes back into the residual stream, whose width every block shares."""
    for m in model.modules():
        fc = getattr(m, "fc", None)
        if fc is lin:
            return True
        for name in ("w1", "w3", "gate_proj", "up_proj"):  # gated (SwiGLU) MLPs: both input projections
            if getattr(m, name, None) is lin:
                return True
    return False
