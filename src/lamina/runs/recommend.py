"""Top-k recommendations for one user of a trained recommendation run (task recommendation): `recommend`.

The run's data is loaded again (same file and options, so the same ids), the user's id from the file is looked
up, every item is scored by the run's model, and the items the user already has (all of them: training,
validation and test interactions) are left out: what is recommended is new to the user. Titles come from the
data's items file when it has one.
"""

from __future__ import annotations

import torch

from lamina.errors import ConfigError, DataError

MAX_K = 1000
HISTORY = 5  # the user's latest interactions shown next to the recommendations


def _recommendation_run(path, which: str = "best"):
    from lamina.runs.open import open_task_run
    from lamina.tasks.recommendation import RecommendationTask

    return open_task_run(path, RecommendationTask, "a recommendation run (task recommendation)",
                         "configs/movietweetings_recsys.yaml", which)


@torch.no_grad()
def recommend(run_path, user_id: str, k: int = 10, which: str = "best") -> dict:
    """{"user", "history": the user's latest items (oldest first), "items": [{"rank", "item", "title", "score"}]}."""
    if not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ConfigError(f"--k: expected 1 .. {MAX_K}, got {k}")
    run = _recommendation_run(run_path, which)
    bundle = run.data()
    user_ids, item_ids = bundle.extras["user_ids"], bundle.extras["item_ids"]
    titles = bundle.extras.get("titles") or [""] * len(item_ids)
    where = {str(u): i for i, u in enumerate(user_ids.tolist())}
    uid = str(user_id).strip()
    if uid not in where:
        sample = ", ".join(str(u) for u in user_ids[:3].tolist())
        raise DataError(f"user '{uid}' is not in the run's data ({len(user_ids):,} users, e.g. {sample})")
    u = where[uid]
    parts = [d for d in (bundle.train, bundle.val, bundle.test) if d is not None]
    users = torch.cat([d.tensors["user"] for d in parts])
    items = torch.cat([d.tensors["item"] for d in parts])
    mine = items[users == u]  # training (in time order), then validation, then test: oldest first
    model = run.model.to(run.device).eval()
    scores = model(torch.tensor([u], device=run.device)).float().cpu()[0]
    scores[mine] = float("-inf")
    k = min(k, int(torch.isfinite(scores).sum()))
    top = scores.topk(k)
    return {"user": uid, "model": run.cfg.model.name,
            "history": [{"item": str(item_ids[i]), "title": titles[i]} for i in mine[-HISTORY:].tolist()],
            "items": [{"rank": r + 1, "item": str(item_ids[i]), "title": titles[i], "score": round(float(s), 4)}
                      for r, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()))]}


__all__ = ["recommend"]
