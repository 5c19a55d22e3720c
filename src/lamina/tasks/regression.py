"""Regression: mean squared error; MAE, RMSE and R^2 via torchmetrics."""

from __future__ import annotations

import torch.nn.functional as F
import torchmetrics

from lamina.tasks.base import DenseTask, model_inputs


class RegressionTask(DenseTask):
    name = "regression"
    default_monitor = ("val/loss", "min")

    def __init__(self, num_outputs: int = 1):
        self.outputs = int(num_outputs)

    # ----- building a run ------------------------------------------------------------------------------
    @classmethod
    def num_outputs(cls, bundle) -> int:
        y = bundle.train.y
        return 1 if y.ndim == 1 else int(y.shape[-1])

    @classmethod
    def from_facts(cls, facts, options: dict) -> "RegressionTask":
        return cls(facts.num_outputs)

    # ----- per batch -----------------------------------------------------------------------------------

    def forward(self, model, batch):
        args, kwargs = model_inputs(batch)
        return model(*args, **kwargs)

    def _target(self, outputs, batch):
        return batch["y"].to(outputs.dtype).reshape(outputs.shape)

    def loss(self, outputs, batch):
        return F.mse_loss(outputs.float(), self._target(outputs.float(), batch))

    def train_stats(self, outputs, batch):
        return {"abs_err": (outputs.detach().float() - self._target(outputs.float(), batch)).abs().sum()}

    def summarize_train(self, sums: dict, n: int) -> dict:
        return {"mae": float(sums["abs_err"]) / max(n * self.outputs, 1)}

    def make_metrics(self):
        return torchmetrics.MetricCollection({
            "mae": torchmetrics.MeanAbsoluteError(),
            "rmse": torchmetrics.MeanSquaredError(squared=False),
            "r2": torchmetrics.R2Score(),
        })

    def update_metrics(self, metrics, outputs, batch):
        out = outputs.float()
        t = self._target(out, batch)
        if out.shape[-1] == 1:
            out, t = out.squeeze(-1), t.squeeze(-1)
        metrics.update(out, t)

    def predict(self, outputs):
        return {"value": outputs.float()}
