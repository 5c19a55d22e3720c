"""Recommendation from implicit feedback: negative sampling losses, full-ranking recall@k and NDCG@k.

Data: lamina.data.interactions (splits of (user, item) pairs, leave-last-out). Models: lamina.models.recsys
(`model(user) -> (B, n_items)`, `model(user, items) -> (B, K)`).

Training batches are training pairs plus "neg" (B, n): items drawn uniformly from those the user has NOT
interacted with in training (data.interactions.NegativeSampler: exact, vectorised, never a positive). Losses
(task.loss):
* bpr: -log sigmoid(s(u, pos) - s(u, neg)), averaged over the n negatives (Rendle et al. 2009); default n 1.
* bce: pointwise log loss, positive -> 1, each negative -> 0 (NCF, He et al. 2017); default n 4.
* softmax: cross-entropy of the positive against its n sampled negatives (sampled softmax with a uniform
  proposal, which needs no correction); default n 64.
* in_batch: cross-entropy of each user's positive against the other positives of the batch, with the logQ
  correction s - log q(item) for in-batch sampling in proportion to item frequency (Yi et al. 2019); another
  row's positive that is the same item is masked, not counted as a negative.

Evaluation ranks every item for each user (no sampled candidates): the held-out item's rank among all items,
leaving out the items the user already has: the training items for the validation split, training + validation
items for the test split. With one held-out item per user,
    recall@k = 1[rank <= k] (= hit rate@k),   NDCG@k = 1[rank <= k] / log2(rank + 1)   (the ideal DCG is 1),
averaged over users. Ties (e.g. popularity's equal counts) are broken at random in expectation: with g items
scored strictly higher and e others scored equal, each rank g+1 .. g+e+1 has probability 1 / (e+1), so the
metrics are exact expectations, never flattered by a lucky order. val/loss is the full softmax cross-entropy
of the held-out item over the same candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lamina.errors import ConfigError
from lamina.tasks.base import BaseTask, check_options, refuse_label_smoothing

LOSSES = {"bpr": 1, "bce": 4, "softmax": 64, "in_batch": 0}  # loss -> default negatives per positive
DEFAULT_KS = (10, 20)
MAX_K = 1000


@dataclass
class RecOutput:
    scores: torch.Tensor  # (B, K) candidates (training) or (B, n_items) all items, left-out items at -inf
    kind: str  # "sampled" (column 0 = the positive), "in_batch" (diagonal = the positive) or "full"

    def __len__(self) -> int:
        return len(self.scores)


def _discounts(k: int, device) -> torch.Tensor:
    """D[p] = sum_{q=1..p} 1 / log2(q + 1), D[0] = 0: (k + 1,)."""
    d = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=device))
    return torch.cat([torch.zeros(1, dtype=torch.float64, device=device), torch.cumsum(d, 0)])


def ranking_metrics(scores: torch.Tensor, target: torch.Tensor, ks=DEFAULT_KS) -> dict[str, torch.Tensor]:
    """Per row: recall@k and NDCG@k of the one relevant item `target` among all columns of `scores` (B, N); left-out
    columns hold -inf. Ties are broken at random in expectation (see the module docstring). Returns (B,) float64
    tensors named recall@k, ndcg@k, plus rank (the expected rank, 1-based)."""
    s = scores.float()
    st = s.gather(1, target[:, None].long())  # (B, 1)
    g = (s > st).sum(1).double()  # items strictly above the target
    e = ((s == st).sum(1) - 1).double()  # ties, the target excluded
    out = {"rank": g + 1 + e / 2}
    for k in ks:
        out[f"recall@{k}"] = ((k - g).clamp(min=0) / (e + 1)).clamp(max=1)
        d = _discounts(k, s.device)
        hi = (g + e + 1).clamp(max=k).long()
        lo = g.clamp(max=k).long()
        out[f"ndcg@{k}"] = (d[hi] - d[lo]) / (e + 1)
    return out


class RankingMetrics:
    """Sums of the per-user ranking metrics over a split (each user's held-out item counts once)."""

    def __init__(self, ks=DEFAULT_KS):
        self.ks = tuple(ks)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0

    def to(self, device):
        return self

    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        for name, v in ranking_metrics(scores, target, self.ks).items():
            if name != "rank":
                self.sums[name] = self.sums.get(name, 0.0) + float(v.sum())
        self.n += len(target)

    def compute(self) -> dict[str, float]:
        return {k: v / self.n for k, v in self.sums.items()} if self.n else {}


def mask_seen(scores: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """scores (B, N) with the items of `seen` (B, L), padded with N, set to -inf."""
    if seen.shape[1] == 0:
        return scores
    pad = torch.zeros(len(scores), 1, dtype=scores.dtype, device=scores.device)
    out = torch.cat([scores, pad], 1).scatter(1, seen, float("-inf"))
    return out[:, :-1]


class RecommendationTask(BaseTask):
    name = "recommendation"
    default_monitor = ("val/ndcg@10", "max")
    trains_new_head = False
    OPTIONS = ("label_smoothing", "loss", "negatives", "ks")

    def __init__(self, n_users: int, n_items: int, loss: str = "bpr", negatives: int | None = None,
                 ks=DEFAULT_KS):
        if loss not in LOSSES:
            raise ConfigError(f"task.loss: expected one of {', '.join(LOSSES)}, got {loss!r}")
        n = LOSSES[loss] if negatives is None else negatives
        if not isinstance(n, int) or isinstance(n, bool) or n < 0 or (n == 0 and loss != "in_batch") or n > 10_000:
            raise ConfigError(f"task.negatives: expected an integer in 1..10000 (0 only with loss in_batch), got "
                              f"{negatives!r}")
        ks = tuple(ks) if isinstance(ks, (list, tuple)) else (ks,)
        if not ks or any(not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K for k in ks):
            raise ConfigError(f"task.ks: expected cut-offs in 1..{MAX_K} such as [10, 20], got {list(ks)!r}")
        self.n_users, self.n_items = int(n_users), int(n_items)
        self.kind, self.negatives, self.ks = loss, int(n), tuple(sorted(set(ks)))
        self.log_q: torch.Tensor | None = None  # in_batch: log item frequency in training (set by train_loader)

    # ----- building a run --------------------------------------------------------------------------------
    @classmethod
    def from_facts(cls, facts, options: dict) -> "RecommendationTask":
        check_options("option of task recommendation", options, cls.OPTIONS)
        refuse_label_smoothing(options, "ranking losses over sampled negatives have no label smoothing")
        kw = {k: options[k] for k in cls.OPTIONS[1:] if k in options}
        return cls(int(facts.meta["n_users"]), int(facts.meta["n_items"]), **kw)

    @classmethod
    def check_data(cls, bundle) -> None:
        if bundle.task != "recommendation" or "user" not in bundle.train.tensors:
            raise ConfigError(f"task.name: recommendation needs user-item interactions (data set interactions); "
                              f"'{bundle.name}' is {bundle.task} data")

    @classmethod
    def num_outputs(cls, bundle) -> int:
        return int(bundle.meta["n_items"])

    @classmethod
    def model_options(cls, facts, entry=None) -> dict:
        if entry is not None and entry.input_kind != "interactions":
            raise ConfigError(f"model.name: {entry.name} is not a recommender ({entry.input_kind} input); use mf, "
                              "two_tower or ncf")
        return {"n_users": int(facts.meta["n_users"]), "n_items": int(facts.meta["n_items"])}

    @classmethod
    def check_model(cls, model, facts) -> None:
        if getattr(model, "output_kind", None) != "item_scores":
            raise ConfigError(f"model.name: {getattr(model, 'model_name', type(model).__name__)} is not a "
                              "recommender; use mf, two_tower or ncf")

    def seen_items(self, bundle, split: str):
        """The items left out of `split`'s rankings: training items (val), training + validation items (test);
        for the training split itself, none but its own pairs are known, so training items."""
        from lamina.data.interactions import UserItems

        cache = bundle.extras.setdefault("seen_items", {})  # built once per bundle and split
        if split not in cache:
            parts = [bundle.train] + ([bundle.val] if split == "test" and bundle.val is not None else [])
            u = torch.cat([p.tensors["user"] for p in parts])
            i = torch.cat([p.tensors["item"] for p in parts])
            cache[split] = UserItems.from_pairs(u, i, self.n_users, self.n_items)
        return cache[split]

    def train_loader(self, bundle, data_cfg, seed: int, device):
        from lamina.data.interactions import NegativeSampler
        from lamina.data.loader import InMemoryLoader

        if data_cfg.augment:
            raise ConfigError("data.augment: recommendation batches are ids; augmentations do not apply (set [])")
        if self.kind == "in_batch":
            counts = torch.bincount(bundle.train.tensors["item"], minlength=self.n_items).double()
            self.log_q = torch.log((counts / counts.sum()).clamp(min=1e-12)).float()
        return InMemoryLoader(bundle.train, data_cfg.batch_size, shuffle=True, seed=seed, device=device,
                              transform=NegativeSampler(self.seen_items(bundle, "train"), self.negatives))

    def eval_loader(self, data, bundle, data_cfg, device):
        from lamina.data.interactions import SeenItems
        from lamina.data.loader import InMemoryLoader

        split = "test" if data is bundle.test else "val" if data is bundle.val else "train"
        return InMemoryLoader(data, data_cfg.eval_batch_size, device=device,
                              transform=SeenItems(self.seen_items(bundle, split)))

    # ----- per batch ---------------------------------------------------------------------------------------
    def forward(self, model, batch) -> RecOutput:
        user, item = batch["user"], batch["item"]
        if "seen" in batch:  # evaluation: every item
            return RecOutput(mask_seen(model(user), batch["seen"]), "full")
        if self.kind == "in_batch":
            return RecOutput(model(user, item[None, :].expand(len(item), -1)), "in_batch")  # (B, B)
        return RecOutput(model(user, torch.cat([item[:, None], batch["neg"]], 1)), "sampled")  # (B, 1 + n)

    def loss(self, outputs: RecOutput, batch) -> torch.Tensor:
        s = outputs.scores.float()
        if outputs.kind == "full":
            return F.cross_entropy(s, batch["item"])
        if outputs.kind == "in_batch":
            item = batch["item"]
            log_q = self.log_q if self.log_q is not None else torch.zeros(self.n_items)
            s = s - log_q.to(s.device)[item][None, :]
            same = (item[:, None] == item[None, :]) & ~torch.eye(len(item), dtype=torch.bool, device=s.device)
            s = s.masked_fill(same, float("-inf"))
            return F.cross_entropy(s, torch.arange(len(item), device=s.device))
        pos, neg = s[:, :1], s[:, 1:]
        if self.kind == "bpr":
            return -F.logsigmoid(pos - neg).mean()
        if self.kind == "bce":
            return (F.softplus(-pos).sum() + F.softplus(neg).sum()) / s.numel()
        return F.cross_entropy(s, torch.zeros(len(s), dtype=torch.long, device=s.device))  # softmax

    def train_stats(self, outputs: RecOutput, batch):
        s = outputs.scores.detach()
        if outputs.kind == "in_batch":
            return {"pos_first": (s.argmax(1) == torch.arange(len(s), device=s.device)).sum()}
        return {"pos_first": (s[:, 0] > s[:, 1:].max(1).values).sum()}

    def summarize_train(self, sums: dict, n: int) -> dict:
        """pos_first: share of training rows whose positive outscored all its negatives (sampled or in-batch)."""
        return {"pos_first": float(sums["pos_first"]) / max(n, 1)} if "pos_first" in sums else {}

    def make_metrics(self):
        return RankingMetrics(self.ks)

    def update_metrics(self, metrics, outputs: RecOutput, batch) -> None:
        metrics.update(outputs.scores, batch["item"])

    def predict(self, outputs: RecOutput) -> dict[str, torch.Tensor]:
        """The top max(ks) items of each row and their scores."""
        k = min(max(self.ks), outputs.scores.shape[1])
        scores, items = outputs.scores.float().topk(k, dim=1)
        return {"items": items, "scores": scores}

    def test_extras(self, model, bundle, split: str, device, run_dir=None, progress=None) -> dict:
        """The popularity baseline's metrics on the same split, the floor a trained recommender must clear."""
        data = getattr(bundle, split, None)
        if data is None or split == "train":
            return {}
        from lamina.models.recsys import Popularity

        pop = Popularity.fit(bundle.train.tensors["user"], bundle.train.tensors["item"], self.n_users,
                             self.n_items)
        m = evaluate_ranking(pop, self, bundle, split, device)
        return {f"{split}/popularity_{k}": v for k, v in m.items()}


@torch.no_grad()
def evaluate_ranking(model, task: RecommendationTask, bundle, split: str = "test", device="cpu",
                     batch_size: int = 1024) -> dict[str, float]:
    """recall@k / NDCG@k of any scorer with the recommender forward (a trained model or a baseline) on a split,
    through the same loader, masking and metrics as Trainer.evaluate."""
    from types import SimpleNamespace

    data = getattr(bundle, split)
    was = getattr(model, "training", False)
    model.eval()
    model.to(device)
    metrics = task.make_metrics()
    cfg = SimpleNamespace(eval_batch_size=batch_size, augment=[])
    for batch in task.eval_loader(data, bundle, cfg, device):
        task.update_metrics(metrics, task.forward(model, batch), batch)
    model.train(was)
    return metrics.compute()


__all__ = ["LOSSES", "RankingMetrics", "RecOutput", "RecommendationTask", "evaluate_ranking", "mask_seen",
           "ranking_metrics"]
