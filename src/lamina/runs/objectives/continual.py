"""Continual-learning strategies, as one task wrapper the stream loop (runs/continual.py) puts around the run's
classification task for each experience.

- **naive**: fine-tune on each experience in turn (the lower bound: catastrophic forgetting).
- **replay**: a fixed-size buffer filled by reservoir sampling (Vitter 1985) over every training sample of the
  stream; each training batch is joined by as many buffer samples, drawn uniformly (experience replay,
  Chaudhry et al. 2019). The buffer holds samples of past experiences only while the current one trains, is a
  preallocated tensor (memory bounded by buffer_size x sample size) and is filled after each experience.
- **ewc**: elastic weight consolidation (Kirkpatrick et al. 2017): after experience t, the diagonal of the
  empirical Fisher information F_t (mean over samples of the squared per-sample gradient of log p(y|x), taken
  with torch.func so each sample's gradient is exact) and the weights theta*_t are kept; later training adds
  lambda/2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2. A sum of quadratics is one quadratic, so the anchors
  are merged as they come (EWCAnchors): the same penalty and gradient for any number of past experiences at
  the cost of two tensors per parameter, one step's work and memory no longer growing with the stream.
- **lwf**: learning without forgetting (Li & Hoiem 2016): a frozen copy of the model as it was before the
  experience; its softened outputs on the current inputs, over the classes of earlier experiences, are
  distilled into the model: alpha * KL(old_T || new_T), per old head in task-incremental runs. As in the paper
  (lambda_o = 1, T = 2, a cross-entropy on softened outputs, which has KL's gradient): no T^2 factor, unlike
  Hinton et al.'s distillation (runs/objectives/distill.py), so alpha = 1 is the paper's balance.

Task-incremental runs score each sample among its own experience's classes: logits of other classes are
masked out of the loss (cross-entropy with label smoothing spread over the allowed classes only) and out of
the prediction. Why our own and not Avalanche: Avalanche needs torchvision, which does not import beside
torch 2.13 here, and wraps its own training loop; these are ~200 lines over lamina's Trainer.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from lamina.errors import ConfigError


SUPPORTED_TASKS = ("classification",)  # streams are cut by class labels; strategies act on logits


def check_task(name: str, data: str) -> None:
    if name not in SUPPORTED_TASKS:
        raise ConfigError(f"continual: a stream needs a classification data set; '{data}' is {name}")


def masked_cross_entropy(logits: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor,
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of `logits` (B, C) restricted per row to `allowed` (B, C) bool; label smoothing spreads its
    mass over each row's allowed classes (as F.cross_entropy does over all classes when all are allowed)."""
    logp = logits.float().masked_fill(~allowed, float("-inf")).log_softmax(-1)
    nll = -logp.gather(1, y.unsqueeze(1)).squeeze(1)
    if not label_smoothing:
        return nll.mean()
    smooth = -logp.masked_fill(~allowed, 0.0).sum(-1) / allowed.sum(-1)
    return ((1.0 - label_smoothing) * nll + label_smoothing * smooth).mean()


class ReservoirBuffer:
    """`capacity` samples of a stream, each seen sample kept with probability capacity / seen (Algorithm R);
    stores x, y and the experience each sample came from. Memory: capacity x one sample, allocated once."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity, self.seen = int(capacity), 0
        self.x = self.y = self.exp = None
        self._g = torch.Generator().manual_seed(int(seed) + 31337)

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, x: torch.Tensor, y: torch.Tensor, exp: int) -> None:
        n = len(x)
        if self.x is None:
            self.x = torch.empty((self.capacity, *x.shape[1:]), dtype=x.dtype)
            self.y = torch.empty(self.capacity, dtype=y.dtype)
            self.exp = torch.empty(self.capacity, dtype=torch.long)
        pos = torch.arange(self.seen, self.seen + n)  # each sample's 0-based position in the stream
        slot = torch.where(pos < self.capacity, pos,
                           (torch.rand(n, generator=self._g, dtype=torch.float64) * (pos + 1)).long())
        keep = (slot < self.capacity).nonzero().flatten()  # position i >= capacity: kept w.p. capacity/(i+1)
        # two samples of one call drawing the same slot: the later one wins, as in the sequential algorithm
        slots, inverse = torch.unique(slot[keep], return_inverse=True)
        last = torch.zeros(len(slots), dtype=torch.long).scatter_reduce(0, inverse, keep, "amax", include_self=False)
        self.x[slots] = x[last].to(self.x.device)
        self.y[slots] = y[last].to(self.y.device)
        self.exp[slots] = exp
        self.seen += n

    def sample(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self), (n,), generator=self._g)
        return self.x[idx].to(device), self.y[idx].to(device), self.exp[idx].to(device)


def per_sample_fisher(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor | None = None,
                      chunk: int = 256) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: mean over samples of (d log p(y_i | x_i) / d theta)^2, each sample's gradient
    computed exactly (torch.func.vmap over grad), with the model in eval mode (BatchNorm uses running stats).
    `allowed` (N, C) bool: task-incremental rows, each scored among its own experience's classes."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    was_training = model.training
    model.eval()

    def nll(p, xi, yi, mi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        logits = out.logits if hasattr(out, "logits") else out
        logits = logits.float()
        if mi is not None:
            logits = logits.masked_fill(~mi.unsqueeze(0), float("-inf"))
        return F.cross_entropy(logits, yi.unsqueeze(0))

    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    try:
        for s in range(0, len(x), chunk):
            xs, ys = x[s:s + chunk], y[s:s + chunk]
            if allowed is None:
                g = vmap(grad(lambda p, xi, yi: nll(p, xi, yi, None)), in_dims=(None, 0, 0))(params, xs, ys)
            else:
                g = vmap(grad(nll), in_dims=(None, 0, 0, 0))(params, xs, ys, allowed[s:s + chunk])
            for n in fisher:
                fisher[n] += g[n].pow(2).sum(0)
    finally:
        model.train(was_training)
    return {n: f / len(x) for n, f in fisher.items()}


class EWCAnchors:
    """sum_t sum_i F_t,i (theta_i - a_t,i)^2 kept as sum_i A_i (theta_i - m_i)^2 + c, exactly:
    A = sum_t F_t, m = sum_t F_t a_t / A (0 where A = 0), c = sum_t F_t a_t^2 - A m^2 (accumulated in float64)."""

    def __init__(self):
        self.A: dict[str, torch.Tensor] = {}
        self.m: dict[str, torch.Tensor] = {}
        self.c = 0.0
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def add(self, fisher: dict[str, torch.Tensor], star: dict[str, torch.Tensor]) -> None:
        for n, f in fisher.items():
            f64, a64 = f.double(), star[n].detach().double()
            if n in self.A:
                A0, m0 = self.A[n].double(), self.m[n].double()
                A1 = A0 + f64
                m1 = torch.where(A1 > 0, (A0 * m0 + f64 * a64) / A1.clamp_min(1e-300), torch.zeros_like(A1))
                self.c += float((A0 * m0.pow(2) + f64 * a64.pow(2) - A1 * m1.pow(2)).sum())
            else:
                A1, m1 = f64, torch.where(f64 > 0, a64, torch.zeros_like(a64))
            self.A[n], self.m[n] = A1.to(f.dtype), m1.to(f.dtype)
        self.count += 1

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        params = dict(model.named_parameters())
        return sum((A * (params[n] - self.m[n]).pow(2)).sum() for n, A in self.A.items()) + self.c

    def tensors(self) -> int:
        return len(self.A) + len(self.m)


class ContinualTask:
    """The run's classification task during one experience of a stream, with the strategy's additions:
    replayed samples in each training batch, an EWC penalty, an LwF distillation term, task-incremental masks.
    Everything else (metrics, prediction, loaders) is the wrapped task's.

    Task-incremental runs pass `exp_masks` (E, C) bool, each experience's classes; every batch then carries
    "exp" (each sample's experience) and each row is scored among its own experience's classes."""

    def __init__(self, task, *, exp_masks: torch.Tensor | None = None, replay: ReservoirBuffer | None = None,
                 replay_batch: int = 0, ewc: EWCAnchors | None = None, ewc_lambda: float = 0.0,
                 model: torch.nn.Module | None = None, old_model: torch.nn.Module | None = None,
                 old_groups: list[list[int]] | None = None, lwf_alpha: float = 0.0, lwf_temperature: float = 2.0):
        if getattr(task, "name", None) not in SUPPORTED_TASKS:
            raise ConfigError(f"continual: streams need a classification task; this run's task is "
                              f"{getattr(task, 'name', type(task).__name__)}")
        self.task, self.exp_masks = task, exp_masks
        self.replay, self.replay_batch = replay, int(replay_batch)
        self.ewc, self.ewc_lambda, self.model = ewc, float(ewc_lambda), model
        self.old_model = old_model.eval().requires_grad_(False) if old_model is not None else None
        self.old_groups = old_groups or []
        self.lwf_alpha, self.lwf_temperature = float(lwf_alpha), float(lwf_temperature)
        self._stash: dict = {}

    def __getattr__(self, name):  # everything but forward/loss/train_stats: the wrapped task's
        return getattr(self.__dict__["task"], name)

    def _rows(self, exp: torch.Tensor | None, device) -> torch.Tensor | None:
        if self.exp_masks is None or exp is None:
            return None
        return self.exp_masks.to(device)[exp.to(device)]

    def _mask(self, logits: torch.Tensor, exp: torch.Tensor | None) -> torch.Tensor:
        rows = self._rows(exp, logits.device)
        return logits if rows is None else logits.masked_fill(~rows, torch.finfo(logits.dtype).min)

    def forward(self, model, batch):
        if not torch.is_grad_enabled():  # evaluation: the task's outputs, masked to each row's experience
            return self._mask(self.task.forward(model, batch), batch.get("exp"))
        x, n = batch["x"], len(batch["x"])
        if self.replay is not None and len(self.replay) and self.replay_batch:
            rx, ry, rexp = self.replay.sample(self.replay_batch, x.device)
            logits = self.task.forward(model, {**batch, "x": torch.cat([x, rx.to(x.dtype)])})
            self._stash["replay"] = (logits[n:], ry, rexp)
            logits = logits[:n]
        else:
            logits = self.task.forward(model, batch)
        if self.old_model is not None and self.old_groups:
            with torch.no_grad():
                self._stash["old"] = self.task.forward(self.old_model, batch).detach()
        return logits

    def loss(self, outputs, batch) -> torch.Tensor:
        stash, self._stash = self._stash, {}
        loss = self._ce(outputs, batch["y"], batch.get("exp"))
        if not torch.is_grad_enabled():  # validation: the (masked) task loss only
            return loss
        if "replay" in stash:
            rl, ry, rexp = stash["replay"]
            n, m = len(outputs), len(rl)
            # the mean over the joined batch, as if replayed samples had been in the loader's batch
            loss = (loss * n + self._ce(rl, ry, rexp) * m) / (n + m)
        if self.ewc is not None and len(self.ewc) and self.ewc_lambda:
            loss = loss + self.ewc_lambda / 2 * self.ewc_penalty()
        if "old" in stash and self.lwf_alpha:
            loss = loss + self.lwf_alpha * self.lwf_term(outputs, stash["old"])
        return loss

    def _ce(self, logits, y, exp):
        rows = self._rows(exp, logits.device)
        if rows is None:
            return self.task.loss(logits, {"y": y})
        return masked_cross_entropy(logits, y, rows, getattr(self.task, "label_smoothing", 0.0))

    def ewc_penalty(self) -> torch.Tensor:
        return self.ewc.penalty(self.model)

    def lwf_term(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        t = self.lwf_temperature
        terms = []
        for g in self.old_groups:
            idx = torch.tensor(g, device=new.device)
            s = F.log_softmax(new.float().index_select(1, idx) / t, -1)
            o = F.log_softmax(old.float().index_select(1, idx) / t, -1)
            terms.append(F.kl_div(s, o, reduction="batchmean", log_target=True))
        return sum(terms) / len(terms)

    def train_stats(self, outputs, batch):
        return self.task.train_stats(self._mask(outputs.detach(), batch.get("exp")), batch)


def snapshot(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the model as it is now (LwF's teacher for the next experience)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def check_buffer(size: int, total: int) -> None:
    if size > total:
        raise ConfigError(f"continual.buffer_size: {size} is larger than the stream's {total} training samples; "
                          f"expected at most {total}")


def fisher_subset(n: int, k: int, seed: int) -> torch.Tensor:
    """Which of an experience's n samples estimate its Fisher: k of them, seeded, without replacement."""
    g = torch.Generator().manual_seed(int(seed) + 2718)
    return torch.randperm(n, generator=g)[:min(k, n)]


__all__ = ["SUPPORTED_TASKS", "check_task", "ContinualTask", "EWCAnchors", "ReservoirBuffer", "check_buffer", "fisher_subset", "masked_cross_entropy",
           "per_sample_fisher", "snapshot"]
