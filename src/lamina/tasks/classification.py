"""Classification: cross-entropy (optional label smoothing); accuracy, macro-F1, NLL; argmax + softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchmetrics

from lamina.errors import ConfigError
from lamina.tasks.base import DenseTask, model_inputs


def confusion_matrix(y: torch.Tensor, pred: torch.Tensor, k: int) -> torch.Tensor:
    """(k, k) counts, rows true class, columns predicted."""
    return torch.bincount(y.cpu().long() * k + pred.cpu().long(), minlength=k * k).reshape(k, k)


class ClassificationTask(DenseTask):
    name = "classification"
    default_monitor = ("val/acc", "max")

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, per_class: bool = False,
                 class_names: list[str] | None = None):
        self.num_classes = int(num_classes)
        self.label_smoothing = float(label_smoothing)
        # per_class: also AUROC (macro, one-vs-rest) and each class's recall and AUROC, the numbers a screening
        # task is judged by; off by default because AUROC keeps every prediction of the split in memory
        self.per_class = bool(per_class)
        self.class_names = list(class_names or [str(i) for i in range(self.num_classes)])

    # ----- building a run ------------------------------------------------------------------------------
    @classmethod
    def check_data(cls, bundle) -> None:
        super().check_data(bundle)
        if not bundle.num_classes:
            raise ConfigError(f"task.name: classification needs class labels, data set '{bundle.name}' has none")

    @classmethod
    def num_outputs(cls, bundle) -> int:
        return int(bundle.num_classes)

    @classmethod
    def from_facts(cls, facts, options: dict) -> "ClassificationTask":
        per_class = options.get("per_class", False)
        if not isinstance(per_class, bool):
            raise ConfigError(f"task.per_class: expected true or false, got {per_class!r}")
        return cls(facts.num_outputs, label_smoothing=options.get("label_smoothing", 0.0), per_class=per_class,
                   class_names=facts.class_names)

    def test_outputs(self, trainer, model, loader, data) -> dict:
        preds = trainer.predict(model, self, loader)["label"]
        return {"confusion": confusion_matrix(data.y, preds, self.num_classes)}

    # ----- per batch -----------------------------------------------------------------------------------
    def forward(self, model, batch):
        args, kwargs = model_inputs(batch)
        return model(*args, **kwargs)

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs.float(), batch["y"], label_smoothing=self.label_smoothing)

    def train_stats(self, outputs, batch):
        # Summed on device; the Trainer syncs once per log interval, not per step.
        return {"correct": (outputs.detach().argmax(-1) == batch["y"]).sum()}

    def summarize_train(self, sums: dict, n: int) -> dict:
        return {"acc": float(sums["correct"]) / max(n, 1)}

    def make_metrics(self):
        kw = {"task": "multiclass", "num_classes": self.num_classes}
        metrics = {"acc": torchmetrics.Accuracy(**kw), "f1_macro": torchmetrics.F1Score(average="macro", **kw)}
        if self.per_class:
            from torchmetrics.wrappers import ClasswiseWrapper

            names = [str(n) for n in self.class_names]
            metrics["auroc"] = torchmetrics.AUROC(**kw)
            metrics["recall"] = ClasswiseWrapper(torchmetrics.Recall(average=None, **kw), names, prefix="recall_")
            metrics["auroc_cls"] = ClasswiseWrapper(torchmetrics.AUROC(average=None, **kw), names, prefix="auroc_")
        return torchmetrics.MetricCollection(metrics)

    def update_metrics(self, metrics, outputs, batch):
        metrics.update(outputs.float(), batch["y"])

    def predict(self, outputs):
        probs = outputs.float().softmax(-1)
        conf, label = probs.max(-1)
        return {"label": label, "confidence": conf, "probs": probs}
