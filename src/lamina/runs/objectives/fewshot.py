"""Few-shot learning objectives and heads, on any zoo model through its contract (forward_features, forward_head
with pre_logits=True as the embedding).

- **Prototypical networks** (Snell, Swersky & Zemel 2017): each episode's support embeddings are averaged per
  class into prototypes; queries are classified by softmax over negative squared Euclidean distances; the loss
  is the queries' cross-entropy. `ProtoNetTask` is that loss as a task over episode batches
  (data/episodes.py), so the Trainer trains it like any other run.
- **Heads for a frozen encoder**, fitted per episode on the support only: nearest centroid (the prototype rule,
  the "strong baseline" of Chen et al. 2019 / Tian et al. 2020 with a supervised encoder) or multinomial
  logistic regression (scikit-learn's LogisticRegression on L2-normalised embeddings, as Tian et al.).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lamina.models.contract import pooled_features


PRETRAIN_TASK = "classification"  # what the baseline's encoder is pretrained on, and what the data must be


def check_task(task: str, data: str, num_classes) -> None:
    from lamina.errors import ConfigError

    if task != PRETRAIN_TASK or not num_classes:
        raise ConfigError(f"fewshot: needs a classification data set with class labels; '{data}' is {task}")


embed = pooled_features  # the model's embedding: pooled features before its classifier (the model contract)


def split_episode(z: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    n, k = int(batch["ways"]), int(batch["shots"])
    return z[:n * k], z[n * k:], batch["y"][n * k:], n, k


def prototype_logits(support: torch.Tensor, query: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """-||q - c||^2 for each query and class prototype c (the mean of the class's k support embeddings)."""
    protos = support.float().reshape(n, k, -1).mean(1)  # support is class-major: (n*k, D) -> (n, k, D)
    return -torch.cdist(query.float(), protos).pow(2)  # (Q, n)


class ProtoNetTask:
    """Episode batch -> embeddings -> prototype loss on the queries. Reports query accuracy as train/acc."""

    name = "fewshot"

    def __init__(self):
        self._logits = None  # the last training episode's query logits: train_stats reuses them

    def forward(self, model, batch):
        return embed(model, batch["x"])

    def loss(self, outputs, batch) -> torch.Tensor:
        s, q, yq, n, k = split_episode(outputs, batch)
        logits = prototype_logits(s, q, n, k)
        self._logits = logits.detach()
        return F.cross_entropy(logits, yq)

    def train_stats(self, outputs, batch):
        s, q, yq, n, k = split_episode(outputs.detach(), batch)
        logits, self._logits = self._logits, None
        if logits is None or len(logits) != len(yq):
            logits = prototype_logits(s, q, n, k)
        correct = (logits.argmax(-1) == yq).sum()
        return {"correct": correct, "queries": torch.tensor(len(yq), device=correct.device)}

    def summarize_train(self, sums: dict, n: int) -> dict:
        return {"acc": float(sums["correct"]) / max(float(sums["queries"]), 1.0)}


class _HeadView(torch.nn.Module):
    """Calls the wrapped model's forward_head, so torch.func.functional_call can swap in adapted head weights."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.m.forward_head(feats)


class ANILTask:
    """ANIL (Raghu et al. 2020, "almost no inner loop"): MAML with only the head adapted. The model's own head,
    reset to `ways` outputs, is the meta-learned initialisation; per episode it takes `steps` SGD steps of size
    `lr` on the support's cross-entropy (torch.func.functional_call with the adapted weights, graph kept, so the
    outer loss on the queries differentiates through the adaptation into the body and the head's init)."""

    name = "fewshot"

    def __init__(self, model: torch.nn.Module, ways: int, steps: int = 5, lr: float = 0.1):
        before = {n: id(p) for n, p in model.named_parameters()}
        model.reset_classifier(ways)  # the contract: a fresh head with `ways` outputs
        self.head_names = [n for n, p in model.named_parameters() if before.get(n) != id(p)]
        if not self.head_names:
            raise ValueError("anil: the model's reset_classifier created no new parameters")
        self.view, self.ways, self.steps, self.lr = _HeadView(model), int(ways), int(steps), float(lr)

    def adapt(self, feats_support: torch.Tensor, ys: torch.Tensor, create_graph: bool) -> dict:
        from torch.func import functional_call

        params = {f"m.{n}": p for n, p in self.view.m.named_parameters() if n in self.head_names}
        for _ in range(self.steps):
            loss = F.cross_entropy(functional_call(self.view, params, (feats_support,)).float(), ys)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
            params = {k: p - self.lr * g for (k, p), g in zip(params.items(), grads)}
        return params

    def query_logits(self, model, batch, create_graph: bool) -> torch.Tensor:
        from torch.func import functional_call

        n, k = int(batch["ways"]), int(batch["shots"])
        if n != self.ways:
            raise ValueError(f"anil: the head has {self.ways} outputs, the episode {n} ways")
        feats = model.forward_features(batch["x"])
        params = self.adapt(feats[:n * k], batch["y"][:n * k], create_graph)
        return functional_call(self.view, params, (feats[n * k:],))

    def forward(self, model, batch):
        return self.query_logits(model, batch, create_graph=torch.is_grad_enabled())

    def loss(self, outputs, batch) -> torch.Tensor:
        n, k = int(batch["ways"]), int(batch["shots"])
        return F.cross_entropy(outputs.float(), batch["y"][n * k:])

    def train_stats(self, outputs, batch):
        n, k = int(batch["ways"]), int(batch["shots"])
        yq = batch["y"][n * k:]
        correct = (outputs.detach().argmax(-1) == yq).sum()
        return {"correct": correct, "queries": torch.tensor(len(yq), device=correct.device)}

    def summarize_train(self, sums: dict, n: int) -> dict:
        return {"acc": float(sums["correct"]) / max(float(sums["queries"]), 1.0)}

    def episode_accuracy(self, model, batch) -> float:
        """The head adapted on the episode's support (first order: nothing is trained), its queries scored."""
        from torch.func import functional_call

        n, k = int(batch["ways"]), int(batch["shots"])
        with torch.no_grad():
            feats = model.forward_features(batch["x"])
        with torch.enable_grad():
            params = self.adapt(feats[:n * k], batch["y"][:n * k], create_graph=False)
        with torch.no_grad():
            pred = functional_call(self.view, params, (feats[n * k:],)).argmax(-1)
        return float((pred == batch["y"][n * k:]).float().mean())

    def evaluate(self, model, sampler, on_episode=None) -> dict:
        # BatchNorm as in training: statistics of the episode itself (transductive, as MAML and ANIL evaluate),
        # with the running buffers restored afterwards so evaluation changes nothing
        saved = {n: b.clone() for n, b in model.named_buffers()}
        try:
            return evaluate_episodes(model, sampler, self.episode_accuracy, on_episode, train_mode=True)
        finally:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(saved[n])


def episode_accuracy(support: torch.Tensor, ys: torch.Tensor, query: torch.Tensor, yq: torch.Tensor, n: int, k: int,
                     head: str = "centroid") -> float:
    if head == "centroid":
        pred = prototype_logits(support, query, n, k).argmax(-1)
        return float((pred == yq).float().mean())
    from sklearn.linear_model import LogisticRegression

    s = F.normalize(support.float(), dim=-1).cpu().numpy()
    q = F.normalize(query.float(), dim=-1).cpu().numpy()
    clf = LogisticRegression(max_iter=1000, C=10.0).fit(s, ys.cpu().numpy())
    return float((torch.as_tensor(clf.predict(q)) == yq.cpu()).float().mean())


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% interval, 1.96 * sample std / sqrt(n)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, 1.96 * sd / math.sqrt(n)


def evaluate_episodes(model: torch.nn.Module, sampler, head="centroid", on_episode=None,
                      train_mode: bool = False) -> dict:
    """Accuracy over the sampler's test episodes, mean and 95% interval. `head`: "centroid" or "logistic" on the
    frozen embeddings, or a callable (model, batch) -> accuracy (ANIL adapts its head per episode)."""
    was = model.training
    model.train(train_mode)
    accs = []
    try:
        for i, batch in enumerate(sampler):
            if callable(head):
                accs.append(head(model, batch))
            else:
                with torch.no_grad():
                    s, q, yq, n, k = split_episode(embed(model, batch["x"]), batch)
                accs.append(episode_accuracy(s, batch["y"][:n * k], q, yq, n, k, head))
            if on_episode:
                on_episode(i + 1, len(sampler))
    finally:
        model.train(was)
    m, ci = mean_ci95(accs)
    return {"acc": m, "ci95": ci, "episodes": len(accs), "values": accs}


__all__ = ["ANILTask", "PRETRAIN_TASK", "ProtoNetTask", "check_task", "embed", "episode_accuracy",
           "evaluate_episodes", "mean_ci95", "prototype_logits", "split_episode"]
