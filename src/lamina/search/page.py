"""study.html: a search's page (best trial, cost, plots, every trial), written with the report package."""

from __future__ import annotations

import json
from pathlib import Path

from lamina.report.page import image, key_values, section, table, write_page


def _fmt_params(p: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in (p or {}).items())


def write_study_page(out: Path, summary: dict) -> Path:
    kind = summary.get("kind", "tune")
    best = summary.get("best") or {}
    overview = {"metric": summary.get("metric"), "direction": summary.get("direction"),
                "pruner": summary.get("pruner"), "sampler": summary.get("sampler"),
                "best value": best.get("value"), "best trial": best.get("number"),
                "best config": best.get("config")}
    for k, v in (best.get("test") or {}).items():
        overview[f"best trial {k}"] = v
    parts = [section("overview", "Best trial", key_values({k: v for k, v in overview.items() if v is not None})
                     + (table([{"parameter": k, "value": json.dumps(v, default=str)}
                               for k, v in (best.get("params") or {}).items()]) if best else ""))]
    cost = dict(summary.get("cost") or {})
    energy = cost.pop("energy", None)
    parts.append(section("cost", "Cost of the search", key_values(cost) + (key_values(energy)
                                                                            if isinstance(energy, dict) else ""),
                         "training seconds and samples summed over every trial, pruned ones included"))
    if summary.get("front"):
        parts.append(section("front", "Pareto front", image(out / "pareto.png", "Pareto front") + table(
            [{"trial": r.get("number"), **{k: v for k, v in (r.get("values") or {}).items()},
              "config": r.get("config"), "params": _fmt_params(r.get("params"))} for r in summary["front"]])))
    plots = "".join(image(out / f"{n}.png", n) for n in ("history", "importances", "parallel"))
    parts.append(section("plots", "Plots", f'<div class="grid">{plots}</div>' if plots else "",
                         "optimization history, parameter importances (fANOVA), parallel coordinates"))
    rows = [{"trial": r.get("number"), "state": r.get("state"), "value": r.get("value"), "epochs": r.get("epochs"),
             "train s": r.get("train_time_s"), "params": _fmt_params(r.get("params")),
             "error": r.get("error") or ""} for r in summary.get("trials", [])]
    parts.append(section("trials", "Trials", table(rows)))
    title = f"lamina {kind}: {summary.get('study', out.name)}"
    return write_page(out / "study.html", title, f"{len(rows)} trials in {out}", parts,
                      nav={"overview": "Best", "cost": "Cost", "front": "Front", "plots": "Plots",
                           "trials": "Trials"})
