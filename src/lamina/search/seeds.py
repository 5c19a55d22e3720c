"""Seeds and variance: the same config trained with several seeds, reported as mean +- std with every value.

One seed's number cannot tell a 0.2-point improvement from luck; `train_seeds(cfg, [0, 1, 2])` gives the
spread that a comparison must beat. The std is the sample standard deviation (ddof=1), the usual choice
when the seeds stand for a population of possible runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from lamina.config import RunConfig, to_dict, validate
from lamina.io import atomic_write_text


def mean_std(values: list[float]) -> dict:
    vals = [float(v) for v in values]
    n = len(vals)
    mean = sum(vals) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "values": vals, "n": n}


def seed_config(cfg: RunConfig, seed: int, root: Path | None) -> RunConfig:
    raw = to_dict(cfg)
    raw["seed"] = seed
    raw["name"] = f"{cfg.name or cfg.data.name + '-' + cfg.model.name}-seed{seed}"
    if root is not None:
        raw["logging"]["root"] = str(root)
    return validate(raw)


def train_seeds(cfg: RunConfig, seeds: list[int], out: str | Path | None = None,
                callbacks_for: Callable[[int], list] | None = None,
                on_run: Callable[[int, dict], None] | None = None) -> dict:
    """Train `cfg` once per seed (run folders <out>/<name>-seed<s>, or under logging.root); returns per-seed test
    metrics and their mean/std, and writes seeds.json into `out` when given."""
    from lamina.runs import train

    out = Path(out) if out is not None else None
    runs, per_metric = [], {}
    for s in seeds:
        res = train(seed_config(cfg, s, out), callbacks=callbacks_for(s) if callbacks_for else ())
        test = {k: v for k, v in res.summary.get("test", {}).items() if isinstance(v, (int, float))}
        runs.append({"seed": s, "run_dir": str(res.run_dir), "test": test,
                     "best_monitor": res.summary.get("best_monitor"), "wall_time_s": res.summary.get("wall_time_s"),
                     "cost": res.summary.get("cost")})
        for k, v in test.items():
            per_metric.setdefault(k, []).append(v)
        if on_run:
            on_run(s, test)
    result = {"config": cfg.name or f"{cfg.data.name}-{cfg.model.name}", "seeds": list(seeds), "runs": runs,
              "test": {k: mean_std(v) for k, v in per_metric.items()},
              "best_monitor": mean_std([r["best_monitor"] for r in runs if isinstance(r["best_monitor"], (int, float))]),
              "wall_time_s": sum(r["wall_time_s"] or 0 for r in runs)}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "seeds.json", json.dumps(result, indent=2, default=str))
    return result


def format_seeds(result: dict) -> str:
    """'test/acc 0.9301 +- 0.0012 (n=3: 0.9290 0.9301 0.9315)' per metric, one line each."""
    lines = []
    for k, m in result["test"].items():
        vals = " ".join(f"{v:.4f}" for v in m["values"])
        lines.append(f"{k} {m['mean']:.4f} +- {m['std']:.4f} (n={m['n']}: {vals})")
    return "\n".join(lines)


__all__ = ["mean_std", "train_seeds", "format_seeds", "seed_config"]
