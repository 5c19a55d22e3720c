"""Recommenders over user and item ids: matrix factorisation, a two-tower retrieval model, neural collaborative
filtering (NeuMF); and the two baselines every recommender is measured against, popularity and item-kNN.

Contract (input_kind "interactions"; lamina.tasks.recommendation trains and ranks through it):

    forward(user (B,) int64)                    -> (B, n_items) a score for every item (ranking, serving)
    forward(user (B,) int64, items (B, K) int64) -> (B, K) scores of the given candidates (training)
    output_kind = "item_scores"; n_users, n_items

Scores are logits (higher = more likely to be interacted with); only their order per user matters for ranking.

* `mf`: s(u, i) = <p_u, q_i> + b_u + b_i + b, matrix factorisation with biases (Koren et al. 2009), trained
  here on implicit feedback (BPR, Rendle et al. 2009, by default).
* `two_tower`: user tower f(e_u) and item tower g(e_i), MLPs over id embeddings; s = <f, g> / T on unit vectors
  (cosine with temperature T) or the plain dot product. Every item vector is computed once per ranking, so the
  full catalogue costs one matrix product, which is what makes two towers a retrieval model (Yi et al. 2019;
  trained with sampled or in-batch softmax).
* `ncf`: NeuMF (He et al. 2017): a GMF branch p_u * q_i and an MLP branch over [p'_u; q'_i] (a tower that halves
  its width each layer), concatenated into one logit. Its first MLP layer W [p'_u; q'_i] + c is computed as
  W_u p'_u + W_i q'_i + c (the same numbers), so scoring every item costs one (B, n_items, h) activation instead
  of n_items concatenations. The paper pre-trains GMF and MLP separately; here both train jointly from scratch.

Baselines (fitted from training pairs, no gradient; the same forward): `Popularity` (how many training users
have each item) and `ItemKNN` (Deshpande & Karypis 2004 / Sarwar et al. 2001: item-item cosine similarity of the
binary user x item matrix, each item keeping its k most similar items; a user's score for j sums the
similarities of j to the items in the user's history).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lamina.errors import ModelError
from lamina.models.contract import build_model
from lamina.models.registry import register_model


def _positive(name: str, v, what: str = "a positive integer") -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ModelError(f"{name} must be {what}, got {v!r}")


class Recommender(nn.Module):
    """Shared part of the contract: sizes, `output_kind`, and a check that ids are in range (on CPU only: the
    check would cost a device sync per batch elsewhere)."""

    output_kind = "item_scores"

    def __init__(self, n_users: int, n_items: int):
        super().__init__()
        self.n_users, self.n_items = n_users, n_items

    def _check_ids(self, user: torch.Tensor, items: torch.Tensor | None) -> None:
        if user.device.type != "cpu" or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return
        for name, t, n in (("user", user, self.n_users), ("item", items, self.n_items)):
            if t is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
                raise ModelError(f"{getattr(self, 'model_name', type(self).__name__)}: {name} ids must be in "
                                 f"[0, {n}), got {int(t.min())}..{int(t.max())}")


def shared_candidates(items: torch.Tensor | None) -> torch.Tensor | None:
    """The (K,) row every user shares when `items` (B, K) is one row expanded over the batch (stride 0, as in-batch
    negatives are built); None otherwise. Dot-product models then score (B, D) x (D, K) instead of gathering a
    (B, K, D) tensor of the same vectors."""
    if items is not None and items.dim() == 2 and items.shape[0] > 1 and items.stride(0) == 0:
        return items[0]
    return None


def _embedding(n: int, dim: int, std: float) -> nn.Embedding:
    e = nn.Embedding(n, dim)
    nn.init.normal_(e.weight, std=std)
    return e


# ----- matrix factorisation ------------------------------------------------------------------------------------
@dataclass
class MFConfig:
    n_users: int = 100  # set from the data by the task
    n_items: int = 100
    dim: int = 64  # latent factors; 64 is the common middle of 16-128 on sparse implicit data
    init_std: float = 0.01  # small random factors: scores start near 0, every pair alike (BPR's usual init)

    def __post_init__(self):
        for k in ("n_users", "n_items", "dim"):
            _positive(f"mf: {k}", getattr(self, k))
        if not self.init_std > 0:
            raise ModelError(f"mf: init_std must be > 0, got {self.init_std}")


class MatrixFactorization(Recommender):
    def __init__(self, cfg: MFConfig):
        super().__init__(cfg.n_users, cfg.n_items)
        self.cfg = cfg
        self.user = _embedding(cfg.n_users, cfg.dim, cfg.init_std)
        self.item = _embedding(cfg.n_items, cfg.dim, cfg.init_std)
        self.user_bias = nn.Embedding(cfg.n_users, 1)
        self.item_bias = nn.Embedding(cfg.n_items, 1)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, user: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        self._check_ids(user, items)
        p = self.user(user)  # (B, d)
        bu = self.user_bias(user) + self.bias  # (B, 1)
        if items is None:
            return p @ self.item.weight.t() + self.item_bias.weight.t() + bu  # (B, n_items)
        shared = shared_candidates(items)
        if shared is not None:  # one candidate row for every user (in-batch negatives)
            return p @ self.item(shared).t() + self.item_bias(shared).t() + bu  # (B, K)
        q = self.item(items)  # (B, K, d)
        return (q @ p[:, :, None]).squeeze(-1) + self.item_bias(items).squeeze(-1) + bu  # (B, K)


# ----- two towers ------------------------------------------------------------------------------------------
@dataclass
class TwoTowerConfig:
    n_users: int = 100
    n_items: int = 100
    embed_dim: int = 64  # id embedding fed to each tower
    tower: tuple[int, ...] = (128, 64)  # hidden widths of each tower; the last is the output vector size
    dropout: float = 0.0
    normalize: bool = True  # unit output vectors, score = cosine / temperature (stable softmax training)
    temperature: float = 0.1  # cosine / T spans [-10, 10]: a softmax over thousands of items can still be sharp

    def __post_init__(self):
        for k in ("n_users", "n_items", "embed_dim"):
            _positive(f"two_tower: {k}", getattr(self, k))
        if not self.tower or any(not isinstance(w, int) or w < 1 for w in self.tower):
            raise ModelError(f"two_tower: tower must be a non-empty list of positive widths, got {self.tower!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"two_tower: dropout must be in [0, 1), got {self.dropout}")
        if not self.temperature > 0:
            raise ModelError(f"two_tower: temperature must be > 0, got {self.temperature}")


def _tower(dim: int, widths: tuple[int, ...], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, w in enumerate(widths):
        layers.append(nn.Linear(dim, w))
        if k < len(widths) - 1:  # the output layer stays linear: vectors of any sign
            layers += [nn.ReLU(), nn.Dropout(dropout)]
        dim = w
    return nn.Sequential(*layers)


class TwoTower(Recommender):
    def __init__(self, cfg: TwoTowerConfig):
        super().__init__(cfg.n_users, cfg.n_items)
        self.cfg = cfg
        self.user = _embedding(cfg.n_users, cfg.embed_dim, 0.1)
        self.item = _embedding(cfg.n_items, cfg.embed_dim, 0.1)
        self.user_tower = _tower(cfg.embed_dim, tuple(cfg.tower), cfg.dropout)
        self.item_tower = _tower(cfg.embed_dim, tuple(cfg.tower), cfg.dropout)

    def _out(self, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(v, dim=-1) if self.cfg.normalize else v

    def user_vectors(self, user: torch.Tensor) -> torch.Tensor:
        return self._out(self.user_tower(self.user(user)))

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """(n_items, D) every item's vector, or (*items.shape, D). A batch that names more items than the catalogue
        holds (sampled softmax: B x (1 + negatives); in-batch: B x B) runs the tower once per item and gathers:
        the same vectors for a fraction of the work."""
        if items is None or items.numel() >= self.n_items:
            every = self._out(self.item_tower(self.item.weight))  # (n_items, D)
            return every if items is None else every[items]
        return self._out(self.item_tower(self.item(items)))

    def forward(self, user: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        self._check_ids(user, items)
        u = self.user_vectors(user)  # (B, D)
        scale = 1.0 / self.cfg.temperature if self.cfg.normalize else 1.0
        if items is None:
            return (u @ self.item_vectors().t()) * scale  # (B, n_items)
        shared = shared_candidates(items)
        if shared is not None:  # one candidate row for every user (in-batch negatives)
            return (u @ self.item_vectors(shared).t()) * scale  # (B, K)
        return (self.item_vectors(items) @ u[:, :, None]).squeeze(-1) * scale  # (B, K)


# ----- neural collaborative filtering ------------------------------------------------------------------------
@dataclass
class NCFConfig:
    n_users: int = 100
    n_items: int = 100
    gmf_dim: int = 32  # GMF factors (the paper's "predictive factors" 8-64)
    mlp: tuple[int, ...] = (64, 32, 16)  # MLP tower: input [p'_u; q'_i] of mlp[0] (mlp[0] / 2 each), then halving
    dropout: float = 0.0
    init_std: float = 0.01  # embeddings ~ N(0, 0.01^2), the paper's initialisation

    def __post_init__(self):
        for k in ("n_users", "n_items", "gmf_dim"):
            _positive(f"ncf: {k}", getattr(self, k))
        if len(self.mlp) < 2 or any(not isinstance(w, int) or w < 1 for w in self.mlp) or self.mlp[0] % 2:
            raise ModelError(f"ncf: mlp must list at least 2 positive widths, the first even (two embeddings of "
                             f"half of it), got {self.mlp!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"ncf: dropout must be in [0, 1), got {self.dropout}")
        if not self.init_std > 0:
            raise ModelError(f"ncf: init_std must be > 0, got {self.init_std}")


class NeuMF(Recommender):
    def __init__(self, cfg: NCFConfig):
        super().__init__(cfg.n_users, cfg.n_items)
        self.cfg = cfg
        half = cfg.mlp[0] // 2
        self.gmf_user = _embedding(cfg.n_users, cfg.gmf_dim, cfg.init_std)
        self.gmf_item = _embedding(cfg.n_items, cfg.gmf_dim, cfg.init_std)
        self.mlp_user = _embedding(cfg.n_users, half, cfg.init_std)
        self.mlp_item = _embedding(cfg.n_items, half, cfg.init_std)
        # first MLP layer W [p'; q'] + c, split into its user and item halves (same parameters, no concat)
        self.first_user = nn.Linear(half, cfg.mlp[1], bias=True)
        self.first_item = nn.Linear(half, cfg.mlp[1], bias=False)
        rest: list[nn.Module] = []
        for a, b in zip(cfg.mlp[1:-1], cfg.mlp[2:]):
            rest += [nn.Dropout(cfg.dropout), nn.Linear(a, b), nn.ReLU()]
        self.mlp_rest = nn.Sequential(*rest)
        self.predict = nn.Linear(cfg.gmf_dim + cfg.mlp[-1], 1)  # h^T [GMF; MLP] + bias
        nn.init.kaiming_uniform_(self.predict.weight, a=1)  # LeCun-uniform, as the paper's output layer

    def _score(self, user: torch.Tensor, item_gmf: torch.Tensor, item_mlp: torch.Tensor) -> torch.Tensor:
        """user (B,), item_gmf (B | 1, K, g), item_mlp (B | 1, K, h1) -> (B, K)."""
        gmf = self.gmf_user(user)[:, None, :] * item_gmf  # (B, K, g)
        h = torch.relu(self.first_user(self.mlp_user(user))[:, None, :] + item_mlp)  # (B, K, h1)
        h = self.mlp_rest(h)  # (B, K, mlp[-1])
        return self.predict(torch.cat([gmf, h], dim=-1)).squeeze(-1)

    def forward(self, user: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        self._check_ids(user, items)
        if items is None:
            return self._score(user, self.gmf_item.weight[None], self.first_item(self.mlp_item.weight)[None])
        return self._score(user, self.gmf_item(items), self.first_item(self.mlp_item(items)))


# ----- registry ----------------------------------------------------------------------------------------------
@register_model("recsys", input_kind="interactions")
def mf(**kwargs) -> MatrixFactorization:
    """Matrix factorisation: <p_u, q_i> + user, item and global biases (64 factors); BPR on implicit feedback."""
    return build_model("mf", MatrixFactorization, MFConfig(), kwargs)


@register_model("recsys", input_kind="interactions")
def two_tower(**kwargs) -> TwoTower:
    """Two-tower retrieval: user and item MLP towers over id embeddings, cosine / temperature scores."""
    return build_model("two_tower", TwoTower, TwoTowerConfig(), kwargs)


@register_model("recsys", input_kind="interactions")
def ncf(**kwargs) -> NeuMF:
    """Neural collaborative filtering (NeuMF, He et al. 2017): GMF and MLP branches over id embeddings."""
    return build_model("ncf", NeuMF, NCFConfig(), kwargs)


# ----- baselines ---------------------------------------------------------------------------------------------
def _history(indptr: torch.Tensor, indices: torch.Tensor, user: torch.Tensor, n_items: int) -> torch.Tensor:
    """(B, n_items) 0/1 rows of the users' training items, from CSR (indptr, indices)."""
    cnt = (indptr[1:] - indptr[:-1])[user]
    rows = torch.repeat_interleave(torch.arange(len(user), device=user.device), cnt)
    start = torch.repeat_interleave(indptr[user], cnt)
    offset = torch.arange(len(rows), device=user.device) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
    out = torch.zeros(len(user), n_items, device=user.device)
    out[rows, indices[start + offset]] = 1.0
    return out


def _csr(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = torch.unique(users.long().cpu() * n_items + items.long().cpu())
    indptr = torch.zeros(n_users + 1, dtype=torch.long)
    indptr[1:] = torch.cumsum(torch.bincount(key // n_items, minlength=n_users), 0)
    return indptr, key % n_items


class Popularity(Recommender):
    """Every user gets the same ranking: items by how many training users interacted with them."""

    model_name = "popularity"

    def __init__(self, counts: torch.Tensor, n_users: int):
        super().__init__(n_users, len(counts))
        self.register_buffer("counts", counts.float())

    @classmethod
    def fit(cls, users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int) -> "Popularity":
        _, idx = _csr(users, items, n_users, n_items)
        return cls(torch.bincount(idx, minlength=n_items), n_users)

    def forward(self, user: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        if items is None:
            return self.counts[None, :].expand(len(user), -1)
        return self.counts[items]


class ItemKNN(Recommender):
    """Item-based k-nearest neighbours, cosine similarity on the binary user x item matrix:
    sim(i, j) = |U_i & U_j| / sqrt(|U_i| |U_j|), sim(i, i) = 0; row i keeps its `k` largest (all when k is None);
    score(u, j) = sum over the user's training items i of sim(i, j)."""

    model_name = "item_knn"

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor, sim: torch.Tensor, n_users: int, n_items: int):
        super().__init__(n_users, n_items)
        self.register_buffer("indptr", indptr)
        self.register_buffer("indices", indices)
        self.sim_t = sim.t().coalesce()  # sparse (n_items, n_items): row j holds sim(i, j) over i

    @classmethod
    def fit(cls, users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int, k: int | None = 100,
            chunk: int | None = None) -> "ItemKNN":
        if k is not None:
            _positive("item_knn: k", k)
        indptr, idx = _csr(users, items, n_users, n_items)
        owner = torch.repeat_interleave(torch.arange(n_users), indptr[1:] - indptr[:-1])
        x_t = torch.sparse_coo_tensor(torch.stack([idx, owner]), torch.ones(len(idx)), (n_items, n_users),
                                      check_invariants=False).coalesce()
        norm = torch.bincount(idx, minlength=n_items).float().sqrt().clamp(min=1e-12)
        chunk = chunk or max(1, 2**24 // max(n_users, n_items))
        rows, cols, vals = [], [], []
        for a in range(0, n_items, chunk):
            b = min(n_items, a + chunk)
            sel = (idx >= a) & (idx < b)  # the chunk's items as dense user columns: (n_users, b - a)
            dense = torch.zeros(n_users, b - a)
            dense[owner[sel], idx[sel] - a] = 1.0
            co = torch.sparse.mm(x_t, dense).t()  # (b - a, n_items): co-occurrence of chunk items with all
            sim = co / (norm[a:b, None] * norm[None, :])
            sim[torch.arange(b - a), torch.arange(a, b)] = 0.0
            if k is not None and k < n_items:
                v, j = sim.topk(k, dim=1)
            else:
                v, j = sim, torch.arange(n_items).expand(b - a, -1)
            keep = v > 0
            r = torch.arange(a, b)[:, None].expand_as(j)
            rows.append(r[keep])
            cols.append(j[keep])
            vals.append(v[keep])
        sim = torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals),
                                      (n_items, n_items), check_invariants=False).coalesce()
        return cls(indptr, idx, sim, n_users, n_items)

    def _apply(self, fn, recurse=True):
        self.sim_t = fn(self.sim_t)
        return super()._apply(fn, recurse)

    def forward(self, user: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        hist = _history(self.indptr, self.indices, user, self.n_items)  # (B, n_items)
        scores = torch.sparse.mm(self.sim_t, hist.t()).t()  # (B, n_items)
        return scores if items is None else scores.gather(1, items)


__all__ = ["ItemKNN", "shared_candidates", "MFConfig", "MatrixFactorization", "NCFConfig", "NeuMF", "Popularity", "Recommender",
           "TwoTower", "TwoTowerConfig", "mf", "ncf", "two_tower"]
