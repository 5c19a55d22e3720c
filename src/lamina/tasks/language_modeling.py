"""Language modeling: next-token cross-entropy over every position; perplexity and next-token accuracy."""

from __future__ import annotations

import torch.nn.functional as F
import torchmetrics
from torchmetrics.text import Perplexity


class LanguageModelingTask:
    name = "language_modeling"
    default_monitor = ("val/loss", "min")

    def __init__(self, vocab_size: int, label_smoothing: float = 0.0, ignore_index: int = -100):
        self.vocab_size, self.label_smoothing, self.ignore_index = int(vocab_size), label_smoothing, ignore_index

    def forward(self, model, batch):
        if batch.get("positions") is not None:  # a context-parallel shard (lamina.engine.context_parallel)
            return model(batch["x"], positions=batch["positions"])  # (B, T, V)
        return model(batch["x"])  # (B, T, V)

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs.float().reshape(-1, outputs.size(-1)), batch["y"].reshape(-1),
                               ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)

    def train_stats(self, outputs, batch):
        return {}

    def summarize_train(self, sums: dict, n: int) -> dict:
        return {}

    def make_metrics(self):
        return torchmetrics.MetricCollection({
            "ppl": Perplexity(ignore_index=self.ignore_index),
            "acc": torchmetrics.Accuracy(task="multiclass", num_classes=self.vocab_size,
                                         ignore_index=self.ignore_index),
        })

    def update_metrics(self, metrics, outputs, batch):
        out = outputs.float()
        metrics["ppl"].update(out, batch["y"])
        metrics["acc"].update(out.reshape(-1, out.size(-1)), batch["y"].reshape(-1))

    def predict(self, outputs):
        probs = outputs.float()[:, -1].softmax(-1)
        conf, label = probs.max(-1)
        return {"label": label, "confidence": conf}
