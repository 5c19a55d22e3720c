"""Gradient health: per-layer gradient norms, update/weight ratios, dead ReLUs and saturated sigmoid/tanh units.

    GradientHealth(every_n_steps=10)       a Callback: samples every n-th optimizer step during `Trainer.fit`
    gradient_health(model, loss_fn, batch) one forward/backward, no training: a quick look at a fresh model
    diagnose(report) -> [Finding]          vanishing / exploding / dead_relu / saturation, each with a fix

A report is a dict {layer name: row}, in module order (= depth order for sequential nets). Weight rows
(every module owning a >=2-D `weight`: Linear, Conv, Embedding) hold grad_norm, weight_norm, grad_weight_ratio
and, from the callback, update_ratio = ||w_after - w_before|| / ||w_before||, measured, so it is right for
any optimizer (Adam's update is not lr * grad). Activation rows (nn.ReLU / nn.Sigmoid / nn.Tanh modules; a
functional call is invisible to hooks) hold dead_frac or saturation.

Gradients are read with `register_post_accumulate_grad_hook`: it fires once a parameter's .grad is complete
for a backward, i.e. before the Trainer's optimizer_step zeroes it, without touching trainer.py. Hooks cost
a flag check on unsampled steps.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from lamina.engine.callbacks import Callback

_ACTS = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}


@dataclass
class Finding:
    kind: str  # "vanishing" | "exploding" | "dead_relu" | "saturation"
    layer: str
    value: float
    suggestion: str

    def message(self) -> str:
        return f"gradient health: {self.kind} at layer '{self.layer}' (value {self.value:.3g}): {self.suggestion}"


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() >= 2 and m.weight.requires_grad]


def _act_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    return [(n, m, _ACTS[type(m)]) for n, m in model.named_modules() if type(m) in _ACTS]


def _unit_reduce(t: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) -> bool per unit, reducing over the batch (and spatial/sequence positions for conv-like C)."""
    if t.dim() <= 2:
        return t
    return t.transpose(0, 1).flatten(1).transpose(0, 1)  # (B*positions, C): a channel is one unit


class _Probe:
    """Hooks on a model; collects sums per layer while `active` is true. Shared by the callback and the function."""

    def __init__(self, model: nn.Module, sat_threshold: float = 0.99, train_only: bool = False):
        # train_only: the callback ignores evaluation forwards (model.eval()), which would skew activation stats
        self.model, self.sat_threshold, self.train_only = model, sat_threshold, train_only
        self.weights = _weight_layers(model)
        self.acts = _act_layers(model)
        self.active = False
        self.grad = {}  # name -> latest grad norm (overwritten per micro-batch: the last one is the full grad)
        self.before = {}  # name -> weight snapshot at backward time, for the measured update
        self.snapshot = False
        self.act_stats: dict[str, list[float]] = {}
        self.handles = []
        for name, m in self.weights:
            self.handles.append(m.weight.register_post_accumulate_grad_hook(self._grad_hook(name)))
        for name, m, kind in self.acts:
            self.handles.append(m.register_forward_hook(self._act_hook(name, kind)))

    def _grad_hook(self, name):
        def hook(p):
            if self.active and p.grad is not None:
                self.grad[name] = float(p.grad.detach().float().norm())
                if self.snapshot:
                    self.before[name] = p.detach().clone()
        return hook

    def _act_hook(self, name, kind):
        def hook(module, inputs, out):
            if not self.active or (self.train_only and not module.training) or not isinstance(out, torch.Tensor) \
                    or out.dim() == 0:
                return
            o = out.detach().float()
            if kind == "relu":
                v = float((~(_unit_reduce(o) > 0).any(dim=0)).float().mean())
            elif kind == "tanh":
                v = float((o.abs() > self.sat_threshold).float().mean())
            else:
                v = float(((o < 1 - self.sat_threshold) | (o > self.sat_threshold)).float().mean())
            self.act_stats.setdefault(name, []).append(v)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


class GradientHealth(Callback):
    """Samples gradient health every `every_n_steps` optimizer steps; per epoch writes `grad/*` and `act/*`
    metrics, refreshes `self.report` (per-layer means over the epoch's samples), `self.findings`, and warns
    once per (kind, layer) per fit."""

    def __init__(self, every_n_steps: int = 10, vanish_ratio: float = 1e-3, explode_norm: float = 1e3,
                 explode_ratio: float = 1e3, dead_threshold: float = 0.5, saturation_threshold: float = 0.5,
                 warn: bool = True):
        self.every_n_steps = max(1, int(every_n_steps))
        self.thresholds = dict(vanish_ratio=vanish_ratio, explode_norm=explode_norm, explode_ratio=explode_ratio,
                               dead_threshold=dead_threshold, saturation_threshold=saturation_threshold)
        self.warn = warn
        self.report: dict[str, dict] = {}
        self.history: list[dict[str, dict]] = []  # one report per epoch
        self.findings: list[Finding] = []
        self._probe: _Probe | None = None
        self._trainer = None
        self._warned: set[tuple[str, str]] = set()
        self._sums: dict[str, dict[str, list[float]]] = {}

    # The probe is "active" for every forward/backward of a sampled step: global_step counts optimizer steps
    # and only increments in optimizer_step, so all micro-batches of an accumulated step share the decision.
    def _sampling(self) -> bool:
        return self._trainer is not None and self._trainer.global_step % self.every_n_steps == 0

    def on_fit_start(self, trainer):
        self._trainer = trainer
        self._probe = _Probe(trainer.model, train_only=True)
        self._probe.snapshot = True
        self._warned = set()
        self._sums = {}
        self._arm()

    def _arm(self):
        self._probe.active = self._sampling()

    def on_train_batch_end(self, trainer, loss):
        p = self._probe
        if p is None:
            return
        boundary = trainer.batch_in_epoch % trainer.cfg.accumulate == 0 or trainer.batch_in_epoch == len(
            trainer.train_loader)
        if boundary:  # the optimizer step has happened: grads complete, weights updated
            self._collect(p)
        self._arm()

    def _collect(self, p: _Probe):
        if not p.grad and not p.act_stats:
            return
        for name, m in p.weights:
            if name not in p.grad:
                continue
            w = m.weight.detach().float()
            row = self._sums.setdefault(name, {})
            wn = float(w.norm())
            row.setdefault("grad_norm", []).append(p.grad[name])
            row.setdefault("weight_norm", []).append(wn)
            row.setdefault("grad_weight_ratio", []).append(p.grad[name] / max(wn, 1e-12))
            if name in p.before:
                b = p.before[name].float()
                row.setdefault("update_ratio", []).append(float((w - b).norm()) / max(float(b.norm()), 1e-12))
        for name, vals in p.act_stats.items():
            kind = "dead_frac" if dict((n, k) for n, _, k in p.acts)[name] == "relu" else "saturation"
            self._sums.setdefault(name, {}).setdefault(kind, []).append(sum(vals) / len(vals))
        p.grad, p.before, p.act_stats = {}, {}, {}

    def on_epoch_end(self, trainer, metrics):
        if self._probe is None:
            return
        kinds = {n: k for n, _, k in self._probe.acts}
        report = {}
        for name, _ in self._probe.weights:
            if name in self._sums:
                report[name] = {"kind": "weight", **{k: sum(v) / len(v) for k, v in self._sums[name].items()}}
        for name, _, k in self._probe.acts:
            if name in self._sums:
                report[name] = {"kind": kinds[name], **{k2: sum(v) / len(v) for k2, v in self._sums[name].items()}}
        self._sums = {}
        if not report:
            return
        self.report = report
        self.history.append(report)
        metrics.update(summarize(report))
        self.findings = diagnose(report, **self.thresholds)
        if self.warn:
            for f in self.findings:
                if (f.kind, f.layer) not in self._warned:
                    self._warned.add((f.kind, f.layer))
                    warnings.warn(f.message(), RuntimeWarning, stacklevel=2)

    def on_fit_end(self, trainer):
        if self._probe is not None:
            self._probe.remove()
            self._probe = None

    def state_dict(self):
        return {"report": self.report, "history": self.history}

    def load_state_dict(self, state):
        self.report, self.history = state.get("report", {}), state.get("history", [])


def summarize(report: dict[str, dict]) -> dict[str, float]:
    """Scalar epoch metrics from a report."""
    norms = [r["grad_norm"] for r in report.values() if "grad_norm" in r]
    out = {}
    if norms:
        out["grad/min_layer_norm"] = min(norms)
        out["grad/max_layer_norm"] = max(norms)
        out["grad/first_last_ratio"] = norms[0] / max(norms[-1], 1e-30)
    ups = [r["update_ratio"] for r in report.values() if "update_ratio" in r]
    if ups:
        out["grad/max_update_ratio"] = max(ups)
    dead = [r["dead_frac"] for r in report.values() if "dead_frac" in r]
    if dead:
        out["act/max_dead_relu"] = max(dead)
    sat = [r["saturation"] for r in report.values() if "saturation" in r]
    if sat:
        out["act/max_saturation"] = max(sat)
    return out


def diagnose(report: dict[str, dict], vanish_ratio: float = 1e-3, explode_norm: float = 1e3,
             explode_ratio: float = 1e3, dead_threshold: float = 0.5, saturation_threshold: float = 0.5
             ) -> list[Finding]:
    """Findings from a report. Depth order is the report's order; the reference layer is the last weight layer
    (the head), whose gradient is one step from the loss and so rarely itself vanishes."""
    findings: list[Finding] = []
    layers = [(n, r["grad_norm"]) for n, r in report.items() if "grad_norm" in r]
    if len(layers) >= 2:
        last_name, last = layers[-1]
        early = layers[:-1]
        if last > 0 and math.isfinite(last):
            low = [(n, g / last) for n, g in early if g / last < vanish_ratio]
            if low:  # name the earliest affected layer: that is where the signal is lost most
                n, r = low[0]
                findings.append(Finding("vanishing", n, r, (
                    f"{len(low)}/{len(early)} layers get < {vanish_ratio:g}x the gradient of '{last_name}'; use "
                    "non-saturating activations (ReLU/GELU) with Kaiming init (Xavier for tanh), add normalization "
                    "(LayerNorm/BatchNorm) and residual connections")))
            high = [(n, g / last) for n, g in early if g / last > explode_ratio]
            if high:
                n, r = high[0]
                findings.append(Finding("exploding", n, r, (
                    f"gradient is {r:.3g}x that of '{last_name}'; add gradient clipping (trainer.grad_clip), "
                    "normalization, or scale down init / residual branches")))
    for n, g in layers:
        if not math.isfinite(g) or g > explode_norm:
            if not any(f.kind == "exploding" and f.layer == n for f in findings):
                findings.append(Finding("exploding", n, g, (
                    f"gradient norm {g:.3g} > {explode_norm:g}; add gradient clipping (trainer.grad_clip), lower "
                    "the learning rate, add normalization or use a smaller init")))
    for n, r in report.items():
        if r.get("dead_frac", 0.0) > dead_threshold:
            findings.append(Finding("dead_relu", n, r["dead_frac"], (
                "most units never fire; lower the learning rate, use Kaiming init, add normalization before the "
                "activation, or use LeakyReLU/GELU")))
        if r.get("saturation", 0.0) > saturation_threshold:
            findings.append(Finding("saturation", n, r["saturation"], (
                "most outputs are saturated (zero gradient); normalize inputs/pre-activations, use Xavier init, "
                "or a non-saturating activation (ReLU/GELU)")))
    return findings


def gradient_health(model: nn.Module, loss_fn, batch, lr: float | None = None) -> dict[str, dict]:
    """One forward/backward on `batch`, no optimizer step; returns a report (see module doc).

    batch: (x, y) or {"x", "y", ...} -> loss_fn(model(x), y); a bare tensor x -> loss_fn(model(x)).
    With `lr`, weight rows also hold update_ratio ~= lr * ||grad|| / ||w|| (plain SGD's step). The model's
    existing .grad values are restored afterwards, and its train/eval mode is left as it is."""
    probe = _Probe(model)
    saved = {p: p.grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.grad = None
        probe.active = True
        if isinstance(batch, dict):
            x, y = batch["x"], batch.get("y")
        elif isinstance(batch, (tuple, list)):
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, y = batch, None
        out = model(x)
        loss = loss_fn(out, y) if y is not None else loss_fn(out)
        loss.backward()
        probe.active = False
        report = {}
        kinds = {n: k for n, _, k in probe.acts}
        for name, m in probe.weights:
            if name not in probe.grad:
                continue
            wn = float(m.weight.detach().float().norm())
            row = {"kind": "weight", "grad_norm": probe.grad[name], "weight_norm": wn,
                   "grad_weight_ratio": probe.grad[name] / max(wn, 1e-12)}
            if lr is not None:
                row["update_ratio"] = lr * row["grad_weight_ratio"]
            report[name] = row
        for name, vals in probe.act_stats.items():
            key = "dead_frac" if kinds[name] == "relu" else "saturation"
            report[name] = {"kind": kinds[name], key: sum(vals) / len(vals)}
        return report
    finally:
        probe.remove()
        for p, g in saved.items():
            p.grad = g


def format_report(report: dict[str, dict]) -> str:
    """A plain-text per-layer table."""
    cols = ["grad_norm", "weight_norm", "grad_weight_ratio", "update_ratio", "dead_frac", "saturation"]
    lines = ["layer".ljust(24) + "kind".ljust(9) + "".join(c[:12].rjust(13) for c in cols)]
    for n, r in report.items():
        cells = "".join((f"{r[c]:13.3e}" if c in r else " " * 13) for c in cols)
        lines.append(n[:23].ljust(24) + r.get("kind", "")[:8].ljust(9) + cells)
    return "\n".join(lines)


# ----- the demonstration pair (issue: "a 20-layer sigmoid MLP vs the same depth with ReLU + normalization +
# residual, both diagnosed correctly"); used by tests/test_gradient_health.py and scripts/gradient_health_demo.py
DEPTH, WIDTH = 20, 64  # 20 weight layers on 64 input features (scikit-learn's digits)
class PlainMLP(nn.Module):
    """20 x (Linear -> Sigmoid), PyTorch default init: the textbook vanishing-gradient net."""

    def __init__(self, act=nn.Sigmoid):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64 if i == 0 else WIDTH, WIDTH) for i in range(DEPTH - 1))
        self.acts = nn.ModuleList(act() for _ in range(DEPTH - 1))
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x):
        x = x.flatten(1)  # digits come as (B, 1, 8, 8)
        for lin, act in zip(self.layers, self.acts):
            x = act(lin(x))
        return self.head(x)


class ResidualMLP(nn.Module):
    """Same depth: input projection, 18 pre-norm residual blocks h + Linear(ReLU(LayerNorm(h))), head."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, WIDTH)
        self.norms = nn.ModuleList(nn.LayerNorm(WIDTH) for _ in range(DEPTH - 2))
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(DEPTH - 2))
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH - 2))
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x):
        h = self.proj(x.flatten(1))
        for norm, act, lin in zip(self.norms, self.acts, self.layers):
            h = h + lin(act(norm(h)))
        return self.head(h)


# ----- a trained run ---------------------------------------------------------------------------------
class _TaskForward(nn.Module):
    """A module whose forward is the task's batch adapter on one fixed batch, so `gradient_health` (which calls
    model(x)) works for any input layout: images, token ids, several modalities."""

    def __init__(self, model: nn.Module, task, batch: dict):
        super().__init__()
        self.model, self.task, self.batch = model, task, batch

    def forward(self, _):
        return self.task.forward(self.model, self.batch)


def gradient_health_run(run_dir, which: str = "best", batch_size: int | None = None) -> dict:
    """Gradient health of a trained run's model on one training batch (training mode, the task's own loss);
    writes gradient_health.json into the run folder: {"report", "findings", "summary"}."""
    import json

    from lamina.data.sample import take
    from lamina.data.transforms import eval_transforms
    from lamina.runs import open_run

    run = open_run(run_dir, which)
    cfg, model, task, ckpt = run.cfg, run.model, run.task, run.checkpoint
    bundle = run.data()
    n = min(batch_size or cfg.data.batch_size, len(bundle.train))
    g = torch.Generator().manual_seed(cfg.seed)
    batch = take(bundle.train, torch.randperm(len(bundle.train), generator=g)[:n])  # streamed: reads just these
    norm = eval_transforms(cfg.data.augment)  # the scale the model trained on
    if norm is not None and "x" in batch:
        batch = norm(batch)
    wrapped = _TaskForward(model, task, batch).train()
    report = gradient_health(wrapped, lambda out: task.loss(out, batch), torch.zeros(()))
    report = {k.removeprefix("model."): v for k, v in report.items()}
    findings = diagnose(report)
    out = {"checkpoint": str(ckpt), "batch_size": n, "report": report, "summary": summarize(report),
           "findings": [f.__dict__ for f in findings]}
    root = run.folder.path
    (root / "gradient_health.json").write_text(json.dumps(out, indent=2))
    return out
