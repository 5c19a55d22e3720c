"""Calibration: expected calibration error, reliability diagrams, temperature scaling (Guo et al. 2017).

ECE itself comes from torchmetrics' MulticlassCalibrationError; `reliability_bins` is hand-rolled only
because torchmetrics does not expose its per-bin numbers, which a reliability diagram needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from lamina.errors import DataError, InputShapeError


# ----- inputs ----------------------------------------------------------------------------------
def _check(scores, labels, name: str = "probs") -> tuple[torch.Tensor, torch.Tensor]:
    scores, labels = torch.as_tensor(scores), torch.as_tensor(labels)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise InputShapeError(f"{name}: expected shape (N, C) with C >= 2, got {tuple(scores.shape)}")
    if labels.ndim != 1 or labels.shape[0] != scores.shape[0]:
        raise InputShapeError(f"labels: expected shape ({scores.shape[0]},), got {tuple(labels.shape)}")
    if scores.shape[0] == 0:
        raise DataError(f"{name}: empty input; calibration needs at least one sample")
    if not torch.isfinite(scores).all():
        raise DataError(f"{name}: has NaN or Inf values")
    if labels.is_floating_point() or labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise DataError(f"labels: expected integer classes in [0, {scores.shape[1] - 1}]")
    return scores.detach().float().cpu(), labels.detach().long().cpu()


def _to_probs(scores: torch.Tensor) -> torch.Tensor:
    # Rows already on the simplex are probabilities; anything else is logits. Deciding here (not in
    # torchmetrics, which softmaxes only when a value leaves [0, 1]) keeps logits in [0, 1] from passing as probs.
    is_probs = (scores >= 0).all() and (scores <= 1).all() and torch.allclose(scores.sum(1), torch.ones(len(scores)),
                                                                            atol=1e-4)
    return scores if is_probs else scores.softmax(1)


# ----- ECE and reliability bins ----------------------------------------------------------------
def reliability_bins(probs, labels, n_bins: int = 15) -> dict:
    """Top-1 confidence in `n_bins` equal-width bins over [0, 1]: edges, mean accuracy, mean confidence, count.

    Bin i holds confidences in [edge_i, edge_i+1); a confidence of exactly 1.0 goes into the last bin.
    Empty bins report accuracy = confidence = 0 and count 0.
    """
    if int(n_bins) < 1:
        raise DataError(f"n_bins: expected a positive integer, got {n_bins}")
    probs, labels = _check(probs, labels)
    probs = _to_probs(probs)
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins).float()
    acc = torch.bincount(idx, weights=correct, minlength=n_bins) / count.clamp(min=1)
    mean_conf = torch.bincount(idx, weights=conf, minlength=n_bins) / count.clamp(min=1)
    return {"bin_edges": edges.tolist(), "accuracy": acc.tolist(), "confidence": mean_conf.tolist(),
            "count": count.long().tolist()}


def ece_from_bins(bins: dict) -> float:
    """sum_b |acc_b - conf_b| * n_b / N: the l1 ECE of a `reliability_bins` result."""
    n = sum(bins["count"])
    return float(sum(abs(a - c) * k for a, c, k in zip(bins["accuracy"], bins["confidence"], bins["count"])) / n)


def expected_calibration_error(probs, labels, n_bins: int = 15, norm: str = "l1") -> float:
    """ECE of top-1 confidence (norm "l1"), or its "l2" / "max" variants; `probs`: (N, C) probabilities or logits."""
    from torchmetrics.classification import MulticlassCalibrationError

    if norm not in ("l1", "l2", "max"):
        raise DataError(f"norm: expected one of l1, l2, max, got {norm!r}")
    if int(n_bins) < 1:
        raise DataError(f"n_bins: expected a positive integer, got {n_bins}")
    probs, labels = _check(probs, labels)
    metric = MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=int(n_bins), norm=norm)
    return float(metric(_to_probs(probs), labels))


# ----- temperature scaling ---------------------------------------------------------------------
class TemperatureScaler:
    """One temperature T > 0 for all classes: logits / T. Argmax (so accuracy) never changes."""

    def __init__(self, max_iter: int = 100):
        self.max_iter = max_iter
        self.temperature = 1.0

    def fit(self, logits, labels) -> float:
        """Minimize validation NLL over log T (keeps T > 0 without constraints) with LBFGS; returns T."""
        logits, labels = _check(logits, labels, "logits")
        logits = logits.double()  # LBFGS line search is touchy in float32 on large logits
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        opt.step(closure)
        t = float(log_t.detach().exp())
        if not (t > 0 and t < float("inf")):
            raise DataError(f"temperature fit diverged (T={t}); check that logits are logits, not probabilities")
        self.temperature = t
        return t

    def transform(self, logits) -> torch.Tensor:
        logits = torch.as_tensor(logits)
        if logits.ndim != 2:
            raise InputShapeError(f"logits: expected shape (N, C), got {tuple(logits.shape)}")
        return logits / self.temperature


# ----- plot ------------------------------------------------------------------------------------
def plot_reliability(bins_before: dict, bins_after: dict | None, path: str | Path, title: str = "") -> Path:
    """Reliability diagram: accuracy per confidence bin (bars) against the diagonal, before / after."""
    from lamina.plots import plt, save_figure  # the project's Agg backend set-up

    panels = [("before", bins_before)] + ([("after", bins_after)] if bins_after is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (name, b) in zip(axes[0], panels):
        edges = b["bin_edges"]
        width = edges[1] - edges[0]
        acc = [a if k else 0.0 for a, k in zip(b["accuracy"], b["count"])]
        conf = [c if k else 0.0 for c, k in zip(b["confidence"], b["count"])]
        ax.bar(edges[:-1], acc, width=width, align="edge", edgecolor="black", alpha=0.8, label="accuracy")
        ax.bar(edges[:-1], [c - a for a, c in zip(acc, conf)], bottom=acc, width=width, align="edge",
               color="tab:red", alpha=0.3, label="gap")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name} (ECE {ece_from_bins(b):.4f})")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    return save_figure(fig, path, title)


# ----- a trained run ---------------------------------------------------------------------------
LOGIT_TASKS = ("classification", "sequence_classification", "fusion")  # tasks whose forward returns class logits


@torch.no_grad()
def collect_logits(model, task, loader, device="cpu", progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of `model` over `loader`, on CPU; the task's batch adapter feeds the model.
    `progress(done, total)` counts batches."""
    model = model.to(device).eval()
    outs, ys = [], []
    if progress is not None:
        progress(0, len(loader))
    for batch in loader:
        out = task.forward(model, batch)
        outs.append(getattr(out, "logits", out).float().cpu())  # fusion: FusionOutput.logits
        ys.append(batch["y"].cpu())
        if progress is not None:
            progress(len(outs), len(loader))
    return torch.cat(outs), torch.cat(ys)


def calibrate_run(run_dir: str | Path, which: str = "best", n_bins: int = 15, progress=None) -> dict:
    """Fit T on the run's val split, report ECE / NLL / accuracy on test before and after; writes
    calibration.json and calibration.png into the run folder. `progress(done, total)`: the val batches, then (a
    second phase, from 0) the test batches."""
    from lamina.runs import open_run

    run = open_run(run_dir, which)
    model, task, ckpt = run.model, run.task, run.checkpoint
    if run.facts.task not in LOGIT_TASKS:
        raise DataError(f"calibration needs a run that predicts classes ({', '.join(LOGIT_TASKS)}); {run_dir} is "
                        f"{run.facts.task}")
    bundle = run.data()  # same name, options and seed -> the same splits
    for split in ("val", "test"):
        if getattr(bundle, split) is None:
            raise DataError(f"data set '{bundle.name}' has no {split} split; calibration needs val and test")
    device = run.device
    val = collect_logits(model, task, run.eval_loader("val"), device, progress)
    test_logits, test_y = collect_logits(model, task, run.eval_loader("test"), device, progress)
    scaler = TemperatureScaler()
    t = scaler.fit(*val)
    scaled = scaler.transform(test_logits)

    def stats(logits):
        return {"ece": expected_calibration_error(logits, test_y, n_bins),
                "nll": float(F.cross_entropy(logits, test_y)),
                "acc": float((logits.argmax(1) == test_y).float().mean())}

    before, after = stats(test_logits), stats(scaled)
    bins_before = reliability_bins(test_logits, test_y, n_bins)
    bins_after = reliability_bins(scaled, test_y, n_bins)
    out = {"checkpoint": str(ckpt), "temperature": t, "n_val": len(val[1]), "n_test": len(test_y), "n_bins": n_bins,
           "before": before, "after": after, "bins_before": bins_before, "bins_after": bins_after}
    root = run.folder.path
    (root / "calibration.json").write_text(json.dumps(out, indent=2))
    plot_reliability(bins_before, bins_after, root / "calibration.png", f"{bundle.name}: T = {t:.3f}")
    return out
