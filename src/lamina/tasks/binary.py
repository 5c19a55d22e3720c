"""Binary classification at low prevalence (fraud, rare disease, machine failure): the positive class is rare,
a missed positive costs more than a false alarm, and accuracy says nothing (99.8% for "never fraud").

Batch and model as in `classification` (x [+ x_cat], y in {0, 1}; the model gives 2 logits). What differs:

* loss (task.loss): "ce" (cross-entropy, optional label smoothing) or "focal" (Lin et al. 2017:
  -w_y (1 - p_y)^gamma log p_y, task.gamma, default 2; gamma 0 is weighted cross-entropy exactly).
  task.class_weight: none | balanced (n / (2 n_c), from the training split's class counts, after any
  resampling) | cost (the weights are the costs below: the loss then is a cost-weighted cross-entropy) |
  [w_neg, w_pos]. Under/over-sampling of the training split is a data option (lamina.data.imbalance).
* metrics over a whole split (BinaryMetrics; scores are the positive class's softmax probability):
  pr_auc (average precision, torchmetrics), roc_auc (torchmetrics), recall_fpr_<f> = recall at a false-positive
  rate of at most f (task.fprs, default 0.1% and 1%; torchmetrics' sensitivity at specificity 1 - f), and at
  the task's threshold: precision, recall, f1 and cost = (cost_fn * FN + cost_fp * FP) / n, the mean cost per
  example of a missed positive (task.cost_fn, default 10) and a false alarm (task.cost_fp, default 1);
  prevalence (the split's positive rate: the pr_auc of a random scorer).
* threshold (task.threshold): "max_f1" or "min_cost" chooses it on the validation split after training
  (test_extras) and applies it to the test split; the choice is written to the run folder (threshold.json)
  and read back by open_run, so `lamina eval` and `lamina predict` use it. A number fixes it. Until chosen (during
  training), thresholded metrics use 0.5.

Why a task of its own and not options of `classification`: every number above is about one positive class and
needs all of a split's scores at once (the ranking), and the threshold is state that a run saves; the multi-class
task keeps its cheap streaming metrics and its argmax decision.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from lamina.errors import ConfigError, DataError
from lamina.tasks.base import check_options, model_inputs
from lamina.tasks.classification import ClassificationTask

LOSSES = ("ce", "focal")
RULES = ("max_f1", "min_cost")
THRESHOLD_FILE = "threshold.json"


def focal_loss(logits: torch.Tensor, y: torch.Tensor, gamma: float = 2.0,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of -w_y (1 - p_y)^gamma log p_y over the batch, p = softmax(logits); with weights the mean is
    sum(w_y l) / sum(w_y), as F.cross_entropy's, so gamma = 0 gives F.cross_entropy(logits, y, weight) exactly."""
    logp = F.log_softmax(logits.float(), -1).gather(1, y[:, None]).squeeze(1)  # (B,) log p_y
    loss = -(1 - logp.exp()).pow(gamma) * logp
    if weight is None:
        return loss.mean()
    w = weight.to(loss.device, loss.dtype)[y]
    return (w * loss).sum() / w.sum()


def sweep(scores: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every distinct decision `score >= t` at once: thresholds (descending; the first predicts nothing
    positive), and tp / fp at each. Sorting once makes it O(n log n) instead of a pass per threshold."""
    s, order = torch.sort(scores.double().reshape(-1), descending=True)
    t = y.reshape(-1)[order].double()
    tp, fp = torch.cumsum(t, 0), torch.cumsum(1 - t, 0)
    last = torch.cat([torch.nonzero(s[:-1] != s[1:]).reshape(-1), torch.tensor([len(s) - 1])])  # end of each tie run
    none = torch.tensor([math.nextafter(float(s[0]), math.inf)], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    return {"threshold": torch.cat([none, s[last]]), "tp": torch.cat([zero, tp[last]]),
            "fp": torch.cat([zero, fp[last]])}


def choose_threshold(scores: torch.Tensor, y: torch.Tensor, rule: str = "max_f1", cost_fn: float = 10.0,
                     cost_fp: float = 1.0) -> float:
    """The threshold (predict positive when score >= it) that maximizes F1 or minimizes the total cost
    cost_fn * FN + cost_fp * FP on these scores; ties go to the higher threshold (fewer alarms)."""
    if rule not in RULES:
        raise ConfigError(f"task.threshold: expected one of {', '.join(RULES)} or a number, got {rule!r}")
    sw = sweep(scores, y)
    pos = float(y.sum())
    fn = pos - sw["tp"]
    if rule == "max_f1":
        f1 = 2 * sw["tp"] / (2 * sw["tp"] + sw["fp"] + fn).clamp_min(1e-12)
        k = int(torch.argmax(f1))
    else:
        k = int(torch.argmin(cost_fn * fn + cost_fp * sw["fp"]))
    return float(sw["threshold"][k])


def at_threshold(scores: torch.Tensor, y: torch.Tensor, threshold: float, cost_fn: float = 10.0,
                 cost_fp: float = 1.0) -> dict[str, float]:
    """precision, recall, f1 and mean cost per example of the decision `score >= threshold`."""
    pred, y = scores.reshape(-1) >= threshold, y.reshape(-1).bool()
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    return {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
            "cost": (cost_fn * fn + cost_fp * fp) / max(len(y), 1)}


def fpr_key(fpr: float) -> str:
    return f"recall_fpr_{fpr:g}"


def ranking_metrics(scores: torch.Tensor, y: torch.Tensor, fprs=(1e-3, 1e-2)) -> dict[str, float]:
    """pr_auc, roc_auc and recall at each false-positive rate in `fprs` (torchmetrics); {} when y has one class."""
    from torchmetrics.functional.classification import (binary_auroc, binary_average_precision,
                                                        binary_sensitivity_at_specificity)

    y = y.reshape(-1).long()
    s = scores.reshape(-1).float()
    if len(y) == 0 or int(y.sum()) in (0, len(y)):
        return {}
    out = {"pr_auc": float(binary_average_precision(s, y)), "roc_auc": float(binary_auroc(s, y))}
    for f in fprs:
        out[fpr_key(f)] = float(binary_sensitivity_at_specificity(s, y, min_specificity=1.0 - f)[0])
    return out


class BinaryMetrics:
    """Accumulates a split's positive-class scores and labels (on the CPU: one float a row) and computes the
    ranking metrics and the thresholded ones at `task.threshold`."""

    def __init__(self, task: "BinaryTask"):
        self.task = task
        self.reset()

    def reset(self) -> None:
        self.scores: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []

    def to(self, device):
        return self

    def update(self, scores: torch.Tensor, y: torch.Tensor) -> None:
        self.scores.append(scores.detach().float().cpu())
        self.ys.append(y.detach().cpu())

    def compute(self) -> dict[str, float]:
        if not self.scores:
            return {}
        s, y = torch.cat(self.scores), torch.cat(self.ys)
        t = self.task
        return {**ranking_metrics(s, y, t.fprs), **at_threshold(s, y, t.threshold, t.cost_fn, t.cost_fp),
                "prevalence": float(y.float().mean())}


class BinaryTask(ClassificationTask):
    name = "binary"
    default_monitor = ("val/pr_auc", "max")
    OPTIONS = ("label_smoothing", "loss", "gamma", "class_weight", "positive", "threshold", "cost_fn", "cost_fp",
               "fprs")

    def __init__(self, class_names: list[str], class_counts: list[int] | None = None, loss: str = "ce",
                 gamma: float = 2.0, class_weight="none", positive: str | None = None, threshold="max_f1",
                 cost_fn: float = 10.0, cost_fp: float = 1.0, fprs=(1e-3, 1e-2), label_smoothing: float = 0.0):
        super().__init__(2, label_smoothing=label_smoothing, class_names=class_names)
        if loss not in LOSSES:
            raise ConfigError(f"task.loss: expected one of {', '.join(LOSSES)}, got {loss!r}")
        self.kind = loss
        self.gamma = _number("gamma", gamma, low=0.0)
        if loss == "focal" and self.label_smoothing:
            raise ConfigError(f"task.label_smoothing: the focal loss has no label smoothing; set it to 0, got "
                              f"{self.label_smoothing}")
        self.cost_fn, self.cost_fp = _number("cost_fn", cost_fn, low=0.0), _number("cost_fp", cost_fp, low=0.0)
        if self.cost_fn + self.cost_fp <= 0:
            raise ConfigError("task.cost_fn / task.cost_fp: at least one cost must be positive, got 0 and 0")
        if isinstance(fprs, (int, float)):
            fprs = [fprs]
        if not isinstance(fprs, (list, tuple)) or not fprs:
            raise ConfigError(f"task.fprs: expected a list of false-positive rates in (0, 1), got {fprs!r}")
        self.fprs = tuple(_number("fprs", f, low=0.0, high=1.0, open_low=True, open_high=True) for f in fprs)
        counts = list(class_counts) if class_counts else None
        # the positive class: named, else the training split's rarer class, else the second
        if positive is not None:
            if str(positive) not in self.class_names:
                raise ConfigError(f"task.positive: class {positive!r} is not one of the data's classes "
                                  f"({', '.join(self.class_names)})")
            self.pos = self.class_names.index(str(positive))
        else:
            self.pos = int(counts[1] <= counts[0]) if counts else 1
        self.rule, self.threshold = None, 0.5
        if isinstance(threshold, str) and threshold in RULES:
            self.rule = threshold
        else:
            self.threshold = _number("threshold", threshold, low=0.0, high=1.0,
                                     what=f"one of {', '.join(RULES)} or a probability in [0, 1]")
        self.weight = self._weights(class_weight, counts)

    def _weights(self, cw, counts) -> torch.Tensor | None:
        """Per-class loss weights indexed by class index (None: unweighted)."""
        if cw in (None, "none", False):
            return None
        if cw == "balanced":
            if not counts or min(counts) == 0:
                raise ConfigError(f"task.class_weight: balanced needs both classes in the training split, "
                                  f"got counts {counts}")
            n = sum(counts)
            return torch.tensor([n / (2 * c) for c in counts], dtype=torch.float32)
        if cw == "cost":
            w = [0.0, 0.0]
            w[self.pos], w[1 - self.pos] = self.cost_fn, self.cost_fp
            return torch.tensor(w, dtype=torch.float32)
        if isinstance(cw, (list, tuple)) and len(cw) == 2:
            w = [_number("class_weight", v, low=0.0, open_low=True) for v in cw]
            return torch.tensor(w, dtype=torch.float32)
        raise ConfigError(f"task.class_weight: expected none, balanced, cost or [w_{self.class_names[0]}, "
                          f"w_{self.class_names[1]}] (positive numbers), got {cw!r}")

    # ----- building a run --------------------------------------------------------------------------------
    @classmethod
    def check_data(cls, bundle) -> None:
        super().check_data(bundle)
        k = int(bundle.num_classes or 0)
        if k != 2:
            names = ", ".join(map(str, (bundle.class_names or [])[:10]))
            raise ConfigError(f"task.name: binary needs a target with exactly 2 classes; data set '{bundle.name}' "
                              f"has {k} ({names}); use task.name=classification")
        if "class_counts" not in bundle.meta:  # loaders that do not count: the training split's, for the weights
            bundle.meta["class_counts"] = torch.bincount(bundle.train.y.long(), minlength=2).tolist()

    @classmethod
    def from_facts(cls, facts, options: dict) -> "BinaryTask":
        check_options("option of task binary", options, cls.OPTIONS)
        kw = {k: options[k] for k in cls.OPTIONS if k in options}
        return cls(list(facts.class_names or ["0", "1"]), facts.meta.get("class_counts"), **kw)

    def restore(self, run_dir: str | Path) -> None:
        """The threshold chosen when the run was trained (threshold.json), if it chose one."""
        f = Path(run_dir) / THRESHOLD_FILE
        if self.rule is None or not f.is_file():
            return
        try:
            t = float(json.loads(f.read_text())["threshold"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{f}: not a threshold file written by lamina ({type(e).__name__}); delete it to "
                            "use 0.5, or retrain") from None
        if not 0.0 <= t <= 1.0 + 1e-6:
            raise DataError(f"{f}: threshold {t} is not a probability in [0, 1]")
        self.threshold = t

    # ----- per batch --------------------------------------------------------------------------------------
    def loss(self, outputs, batch):
        y = batch["y"]
        if self.kind == "focal":
            return focal_loss(outputs, y, self.gamma, self.weight)
        w = None if self.weight is None else self.weight.to(outputs.device)
        return F.cross_entropy(outputs.float(), y, weight=w, label_smoothing=self.label_smoothing)

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """The positive class's probability, (B,)."""
        return outputs.float().softmax(-1)[:, self.pos]

    def make_metrics(self):
        return BinaryMetrics(self)

    def update_metrics(self, metrics, outputs, batch):
        metrics.update(self.scores(outputs), (batch["y"] == self.pos).long())

    def predict(self, outputs):
        probs = outputs.float().softmax(-1)
        score = probs[:, self.pos]
        label = torch.where(score >= self.threshold, self.pos, 1 - self.pos)
        return {"label": label, "confidence": probs.gather(1, label[:, None]).squeeze(1), "probs": probs,
                "score": score}

    # ----- after training ----------------------------------------------------------------------------------
    @torch.no_grad()
    def split_scores(self, model, data, device, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive scores, 0/1 labels) of a whole split, in eval mode."""
        was = model.training
        model.eval()
        from lamina.data.sample import is_streamed, split_batches

        out = []
        batches = (split_batches(data, batch_size) if is_streamed(data) else  # files: read batch by batch
                   ({k: v[i:i + batch_size] for k, v in data.tensors.items()} for i in range(0, len(data), batch_size)))
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            args, kwargs = model_inputs(batch)
            out.append(self.scores(model(*args, **kwargs)).cpu())
        model.train(was)
        return torch.cat(out), (data.y == self.pos).long()

    def test_extras(self, model, bundle, split: str, device, run_dir=None, progress=None) -> dict:
        """With a threshold rule: choose the threshold on the validation split, then report `split` at it
        (precision, recall, f1, cost, threshold); the choice goes to <run_dir>/threshold.json."""
        data = getattr(bundle, split, None)
        if self.rule is None or data is None or bundle.val is None or split in ("train", "val"):
            return {}
        vs, vy = self.split_scores(model, bundle.val, device)
        if int(vy.sum()) == 0:
            return {}  # no positive to aim at: keep the current threshold
        self.threshold = choose_threshold(vs, vy, self.rule, self.cost_fn, self.cost_fp)
        if run_dir is not None:
            from lamina.io import atomic_write_text

            atomic_write_text(Path(run_dir) / THRESHOLD_FILE, json.dumps(
                {"threshold": self.threshold, "rule": self.rule, "chosen_on": "val", "positive":
                 self.class_names[self.pos], "cost_fn": self.cost_fn, "cost_fp": self.cost_fp,
                 "val": at_threshold(vs, vy, self.threshold, self.cost_fn, self.cost_fp)}, indent=2))
        s, y = self.split_scores(model, data, device)
        m = at_threshold(s, y, self.threshold, self.cost_fn, self.cost_fp)
        return {f"{split}/threshold": self.threshold, **{f"{split}/{k}": v for k, v in m.items()}}


def _number(name: str, v, low: float | None = None, high: float | None = None, open_low: bool = False,
            open_high: bool = False, what: str | None = None) -> float:
    """A task option as a float within bounds; anything else is one ConfigError line naming task.<name>."""
    lo = "(" if open_low else "["
    hi = ")" if open_high else "]"
    rng = f"in {lo}{low:g}, {high:g}{hi}" if high is not None else (f"> {low:g}" if open_low else f">= {low:g}")
    want = what or f"a number {rng}"
    try:
        f = float(v)
        if isinstance(v, bool):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"task.{name}: expected {want}, got {v!r}") from None
    ok = math.isfinite(f) and (low is None or (f > low if open_low else f >= low)) and \
        (high is None or (f < high if open_high else f <= high))
    if not ok:
        raise ConfigError(f"task.{name}: expected {want}, got {v!r}")
    return f


__all__ = ["BinaryMetrics", "BinaryTask", "LOSSES", "RULES", "at_threshold", "choose_threshold", "focal_loss",
           "ranking_metrics", "sweep"]
