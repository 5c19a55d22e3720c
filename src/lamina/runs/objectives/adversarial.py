"""Adversarial training (config section `adversarial`): PGD-AT (Madry et al. 2018) or TRADES (Zhang et al.
2019) as a task wrapper.

In a training step (the model in train mode) `forward` first attacks the batch, then runs the model once on
[x_adv] (pgd) or [x, x_adv] (pgd with clean_fraction > 0, trades) concatenated: one forward per step keeps
DDP's one-forward-one-backward contract. `loss` tells the two layouts apart by the outputs' length. In
evaluation (eval mode, or any pass without gradients, as DistillTask reads it) everything is the wrapped task's, so val/ and test/ metrics are clean accuracy;
train/acc is the accuracy under the training attack, and `train/adv_eps` marks the run as adversarially trained.

The attack runs on the plain module (no DDP reducer hooks fire, no compiled graph) in eval mode with
parameters frozen (lamina.nn.attacks.attack_mode): BN running statistics are not pulled toward the attack's
intermediate iterates, dropout is off, and no parameter gradient is computed. (Madry et al. attack in train
mode; with eval mode the BN statistics the attack sees are the running ones, which is what the deployed model
uses and what TRADES does.) Inputs are attacked in pixel space: a run's `normalize` augment step is undone
first and reapplied to x_adv.
"""

from __future__ import annotations

import torch

from lamina.data.transforms import normalize_stats
from lamina.engine.distributed import unwrap_model
from lamina.errors import ConfigError
from lamina.nn.attacks import adversarial_examples, trades_kl
from lamina.nn.preprocess import Normalized


class AdversarialTask:
    """The wrapped task trained on adversarial inputs; evaluation, metrics and predictions are the task's."""

    def __init__(self, task, cfg, normalize: tuple[list[float], list[float]] | None = None):
        if getattr(task, "name", None) != "classification":
            raise ConfigError(f"adversarial.method: {cfg.method} needs a classification task, "
                              f"got {getattr(task, 'name', task)}")
        self.task, self.cfg, self.normalize = task, cfg, normalize

    @classmethod
    def from_config(cls, task, ctx) -> "AdversarialTask":
        return cls(task, ctx.cfg.adversarial, normalize_stats(ctx.cfg.data.augment))

    def __getattr__(self, name):  # everything not overridden: the wrapped task's
        return getattr(self.__dict__["task"], name)

    def _both(self) -> bool:  # clean and adversarial halves in one forward
        return self.cfg.method == "trades" or self.cfg.clean_fraction > 0

    def forward(self, model, batch):
        net = unwrap_model(model)
        if not net.training or not torch.is_grad_enabled():  # evaluation, or a no-grad pass (BN recalibration)
            return self.task.forward(model, batch)
        x, y = batch["x"], batch["y"]
        attacked = net
        if self.normalize is not None:
            m = torch.as_tensor(self.normalize[0], device=x.device, dtype=x.dtype).reshape(1, -1, 1, 1)
            s = torch.as_tensor(self.normalize[1], device=x.device, dtype=x.dtype).reshape(1, -1, 1, 1)
            x, attacked = x * s + m, Normalized(net, *self.normalize)
        x_adv = adversarial_examples(attacked, x, y, self.cfg, clamp=self.cfg.clamp)
        if self.normalize is not None:
            x, x_adv = (x - m) / s, (x_adv - m) / s
        inputs = torch.cat([x, x_adv]) if self._both() else x_adv
        if inputs.ndim == 4 and batch["x"].is_contiguous(memory_format=torch.channels_last):
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return self.task.forward(model, {**batch, "x": inputs, "y": torch.cat([y, y]) if self._both() else y})

    def loss(self, outputs, batch):
        n = len(batch["y"])
        if len(outputs) != 2 * n:  # pgd on adversarial inputs only, or evaluation
            return self.task.loss(outputs, batch)
        clean, adv = outputs[:n], outputs[n:]
        if self.cfg.method == "trades":
            return self.task.loss(clean, batch) + self.cfg.beta * trades_kl(adv, clean).mean()
        f = self.cfg.clean_fraction
        return f * self.task.loss(clean, batch) + (1 - f) * self.task.loss(adv, batch)

    def train_stats(self, outputs, batch):  # accuracy under the training attack
        return self.task.train_stats(outputs[-len(batch["y"]):], batch)

    def summarize_train(self, sums: dict, n: int) -> dict:
        return {**self.task.summarize_train(sums, n), "adv_eps": self.cfg.eps}
