"""Overfitting and data needs: when did validation stop following training, and would more data help?

    overfitting_onset(history)        per-epoch generalization gap; the epoch overfitting began (or None)
    OverfittingMonitor(patience=2)    a Callback: warns once during `fit`, naming that epoch and what to do
    learning_curve(cfg, fractions)    trains the same config on growing training subsets; metric vs n + plot,
                                      and a power-law fit of the error that says what more data would buy

Onset rule: the first epoch after the best validation loss, provided validation loss then stays above that
best for `patience` epochs while training loss keeps falling. Requiring both halves separates overfitting
(train improves, val worsens) from noise or a too-high learning rate (both worsen). The gap itself is
val - train of the same metric; with augmentation or dropout on, train loss is measured under them, so the
gap can start negative: its trend, not its sign, carries the signal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lamina.errors import ConfigError
from lamina.runs.overfitting import OverfittingMonitor, overfitting_onset  # noqa: F401  (re-exported)


# ----- learning curve -------------------------------------------------------------------------------
def fit_power_law(n: list[float], err: list[float]) -> dict | None:
    """err ~ a * n^-b by least squares in log-log space (Hestness et al. 2017's small-data regime); None when
    the errors do not fall with n (no power law to extrapolate)."""
    pts = [(x, e) for x, e in zip(n, err) if x > 0 and e > 0]
    if len(pts) < 2:
        return None
    lx, le = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    slope, icpt = np.polyfit(lx, le, 1)
    if slope >= 0:
        return None
    return {"a": float(math.exp(icpt)), "b": float(-slope)}


def samples_for(power: dict, target_err: float) -> float:
    """Training samples the fitted power law needs to reach `target_err`."""
    return (power["a"] / target_err) ** (1.0 / power["b"])


def curve_fractions(fractions) -> list[float]:
    """The training fractions a learning curve runs, in the order it runs them: increasing, each once."""
    fr = sorted({float(f) for f in fractions})
    if not fr or fr[0] <= 0 or fr[-1] > 1:
        raise ConfigError(f"fractions: expected values in (0, 1], got {list(fractions)}")
    return fr


def learning_curve(cfg, fractions=(0.1, 0.25, 0.5, 1.0), out: str | Path | None = None, metric: str | None = None,
                   equal_steps: bool = True, progress: Callable[[int, int], None] | None = None,
                   seeds: list[int] | None = None) -> dict:
    """Train `cfg` (a RunConfig) once per training fraction; each run is a normal run folder under
    <out>/runs. Records n_train, train/val/test metric and loss; fits a power law to the test error and
    writes learning_curve.json + learning_curve.png into `out`. `equal_steps`: a subset of fraction f trains
    max_epochs / f epochs, so every point gets the same number of updates and differs only in data (with
    equal epochs a 10% run gets a tenth of the steps and the curve mixes data with compute).
    Fractions train in increasing order (`curve_fractions`). `progress(done, total)` counts training runs (one
    per fraction and seed): called before each run and once all are done. `seeds`: train every fraction once per
    seed (the subset is drawn with the seed too); each row then holds the mean, `<key>_std` (sample std) and
    `<key>_values` for train/val/test, and the plot draws the test spread as error bars."""
    from lamina.runs import train

    fr = curve_fractions(fractions)
    out = Path(out or Path(cfg.logging.root) / f"{cfg.name or cfg.data.name}-learning-curve")
    out.mkdir(parents=True, exist_ok=True)
    rows, m = [], metric
    seed_list = list(seeds) if seeds else [None]
    total = len(fr) * len(seed_list)
    for i, f in enumerate(fr):
        per_seed = []
        for j, sd in enumerate(seed_list):
            if progress is not None:
                progress(i * len(seed_list) + j, total)
            run_cfg = cfg.model_copy(deep=True)
            run_cfg.data.train_fraction = f
            run_cfg.name = f"frac-{f:g}" if sd is None else f"frac-{f:g}-seed{sd}"
            if sd is not None:
                run_cfg.seed = sd
            run_cfg.logging.root = str(out / "runs")
            run_cfg.logging.tensorboard = False
            run_cfg.trainer.progress = False
            if equal_steps and run_cfg.trainer.max_steps is None:
                run_cfg.trainer.max_epochs = math.ceil(cfg.trainer.max_epochs / f)
            res = train(run_cfg)
            s, hist = res.summary, res.history
            m = m or ("acc" if "test/acc" in s["test"] else "loss")  # classification: accuracy; else loss
            last = hist[-1] if hist else {}
            best = next((r for r in hist if r.get("epoch") == s.get("best_epoch")), last)
            per_seed.append({"fraction": f, "n_train": s["data"]["train"], "run_dir": s["run_dir"],
                             "epochs": s["epochs"], "steps": s["steps"], "train": last.get(f"train/{m}"),
                             "val": best.get(f"val/{m}"), "test": s["test"].get(f"test/{m}"),
                             "train_loss": last.get("train/loss"), "val_loss": best.get("val/loss"),
                             "test_loss": s["test"].get("test/loss"), "seconds": s["wall_time_s"]})
        rows.append(per_seed[0] if sd is None else _seed_row(per_seed, seed_list))
    if progress is not None:
        progress(total, total)
    higher_better = m != "loss"
    errs = [(1 - r["test"]) if higher_better else r["test"] for r in rows if r["test"] is not None]
    ns = [r["n_train"] for r in rows if r["test"] is not None]
    power = fit_power_law(ns, errs)
    result = {"metric": m, "rows": rows, "power_law": power}
    if power is not None and errs:
        best_err = min(errs)
        result["n_for_half_error"] = samples_for(power, best_err / 2)
        result["error_at_2x"] = power["a"] * (2 * ns[-1]) ** (-power["b"])
    (out / "learning_curve.json").write_text(json.dumps(result, indent=2))
    plot_learning_curve(result, out / "learning_curve.png", title=f"{cfg.data.name} / {cfg.model.name}")
    result["out"] = str(out)
    return result


def _seed_row(per_seed: list[dict], seeds: list[int]) -> dict:
    """One fraction's runs over several seeds: means, sample stds and every value."""
    row = {"fraction": per_seed[0]["fraction"], "n_train": per_seed[0]["n_train"], "seeds": seeds,
           "run_dir": [r["run_dir"] for r in per_seed], "epochs": per_seed[0]["epochs"], "steps": per_seed[0]["steps"],
           "seconds": sum(r["seconds"] for r in per_seed)}
    for k in ("train", "val", "test", "train_loss", "val_loss", "test_loss"):
        vals = [r[k] for r in per_seed if r[k] is not None]
        if not vals:
            row[k] = None
            continue
        row[k] = float(np.mean(vals))
        row[f"{k}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        row[f"{k}_values"] = vals
    return row


def plot_learning_curve(result: dict, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lamina.plots import save_figure

    rows, m = result["rows"], result["metric"]
    n = [r["n_train"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, style in (("train", "o--"), ("val", "s-"), ("test", "^-")):
        ys = [r[key] for r in rows]
        if any(y is not None for y in ys):
            ys = [np.nan if y is None else y for y in ys]
            if key == "test" and any(f"{key}_std" in r for r in rows):  # spread over seeds
                ax.errorbar(n, ys, yerr=[r.get(f"{key}_std", 0.0) for r in rows], fmt=style, capsize=3,
                            label=f"{key} (mean +- std over {len(rows[0].get('seeds', []))} seeds)")
            else:
                ax.plot(n, ys, style, label=key)
    power = result.get("power_law")
    if power:  # the fitted error law, drawn as the metric it predicts, a little past the data
        grid = np.geomspace(min(n), 2 * max(n), 50)
        err = power["a"] * grid ** (-power["b"])
        ax.plot(grid, err if m == "loss" else 1 - err, ":", color="gray",
                label=f"fit: error ~ {power['a']:.2g} n^-{power['b']:.2f}")
    ax.set_xscale("log")
    ax.set_xticks(n, [str(v) for v in n])
    ax.minorticks_off()
    ax.set_xlabel("training samples")
    ax.set_ylabel(m)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, path, title)
