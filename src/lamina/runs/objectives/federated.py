"""FedProx's client objective (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"), as a task
wrapper the federated client (runs/federated.py) puts around the run's task for one round of local training:

    loss = task loss + mu / 2 * sum_i ||w_i - w_global,i||^2

over the trainable parameters, w_global being the weights the server sent this round (a frozen copy). It keeps
a client's update close to the global model when clients' data differ (non-IID), which limits client drift.
mu = 0 is FedAvg's local objective. Flower's FedProx strategy sends mu to the clients as `proximal_mu` in the fit
config and aggregates like FedAvg; the term itself is the client's to add, here.
"""

from __future__ import annotations

import torch


class FedProxTask:
    """The wrapped task's forward / metrics / loaders, with the proximal term added to the training loss."""

    def __init__(self, task, model: torch.nn.Module, mu: float):
        self.task, self.mu, self.model = task, float(mu), model
        # the round's starting point, by parameter name; buffers (BatchNorm statistics) are not penalised
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def __getattr__(self, name):  # everything but loss: the wrapped task's
        return getattr(self.__dict__["task"], name)

    def proximal_term(self) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        return sum((params[n] - a).pow(2).sum() for n, a in self.anchor.items())

    def loss(self, outputs, batch) -> torch.Tensor:
        loss = self.task.loss(outputs, batch)
        if not torch.is_grad_enabled() or not self.mu:  # validation: the task's loss only
            return loss
        return loss + self.mu / 2 * self.proximal_term()


__all__ = ["FedProxTask"]
