"""Fairness: per-group metrics of a classifier, group-fairness differences, and one mitigation (reweighting).

Metrics come from fairlearn (MetricFrame, demographic_parity_difference, equalized_odds_difference); what
lamina adds is the multiclass reading of them, the plumbing to a trained run, and the mitigation.

For a K-class task (`fairness_report`):
  - per group: n, accuracy, macro recall over the classes present in y_true (sklearn recall_score average="macro"),
    and the selection rate of every class (share of the group's samples predicted as that class);
  - accuracy_difference / accuracy_ratio: max - min and min / max of the per-group accuracy (the headline gap);
  - demographic parity and equalized odds are binary notions; here they are taken ONE-VS-REST per class: for
    class k, y_true == k and y_pred == k are the binary labels, and fairlearn's demographic_parity_difference
    (max - min over groups of P(pred = k)) and equalized_odds_difference (the larger of the TPR and FPR gaps
    between groups, fairlearn's "worst_case") are computed. Reported per class, their mean over classes
    ("dp_difference_mean", "eo_difference_mean", the summary numbers) and their worst class ("..._max").
    DP here is meaningful only when the groups have similar class mixes (FSDD's splits are balanced per speaker:
    every speaker says every digit equally often), else it also measures base-rate differences.

Mitigation (`mitigate_run(method="reweight")`): group reweighting. Every training sample gets the weight
w_g = N / (G * n_g) of its group g (N training samples, G groups, n_g of them in g: inverse frequency, mean 1),
and the loss is the weighted mean of the per-sample loss sum_i w_i l_i / sum_i w_i (the convention of
F.cross_entropy(weight=...)). `ReweightedTask` wraps any task whose loss is per-sample cross-entropy of
`outputs.logits` (classification, fusion) without touching it: composition, not a flag in tasks/. The model is
retrained from scratch with the run's own config into <run>/mitigated-reweight/, a normal run folder, and both
runs are audited on the same split.

Group metadata: a data set that supports audits puts meta["groups"] = {"tensor": <per-sample id tensor name>,
<attribute>: [value of id 0, value of id 1, ...], ...} into its bundle and adds the id tensor with the loader
option `groups=True` (fsdd_fusion: tensor "speaker", attributes speaker / gender / accent / language).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lamina.errors import ConfigError, DataError, unknown_name


# ----- metrics ---------------------------------------------------------------------------------
def _as_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def fairness_report(y_true, y_pred, groups, labels=None, group_name: str = "group") -> dict:
    """Per-group metrics and fairness differences of multiclass predictions (see the module docstring).

    y_true, y_pred: (N,) class ids; groups: (N,) group values (str or int); labels: the classes to take one-vs-rest
    (default: those in y_true or y_pred). Returns a json-able dict.
    """
    from fairlearn.metrics import (MetricFrame, count, demographic_parity_difference, equalized_odds_difference,
                                   selection_rate)
    from sklearn.metrics import accuracy_score, recall_score

    y_true, y_pred, groups = _as_numpy(y_true), _as_numpy(y_pred), _as_numpy(groups)
    if not (len(y_true) == len(y_pred) == len(groups)) or len(y_true) == 0:
        raise DataError(f"fairness_report: y_true, y_pred and groups must be equally long and non-empty, got "
                        f"{len(y_true)}, {len(y_pred)}, {len(groups)}")
    groups = np.array([str(g) for g in groups], dtype=object)
    labels = sorted(set(y_true.tolist()) | set(y_pred.tolist())) if labels is None else list(labels)
    present = sorted(set(y_true.tolist()))
    frame = MetricFrame(
        metrics={"n": count, "accuracy": accuracy_score,
                 "recall_macro": partial(recall_score, labels=present, average="macro", zero_division=0)},
        y_true=y_true, y_pred=y_pred, sensitive_features=groups)
    by_group = {str(g): {"n": int(r["n"]), "accuracy": float(r["accuracy"]), "recall_macro": float(r["recall_macro"])}
                for g, r in frame.by_group.iterrows()}
    per_class, dp, eo = {}, [], []
    for k in labels:
        t, p = (y_true == k).astype(int), (y_pred == k).astype(int)
        sel = MetricFrame(metrics=selection_rate, y_true=t, y_pred=p, sensitive_features=groups).by_group
        for g, v in sel.items():
            by_group[str(g)].setdefault("selection_rate", {})[str(k)] = float(v)
        d = float(demographic_parity_difference(t, p, sensitive_features=groups))
        e = float(equalized_odds_difference(t, p, sensitive_features=groups))
        per_class[str(k)] = {"dp_difference": d, "eo_difference": e}
        dp.append(d)
        eo.append(e)
    accs = [r["accuracy"] for r in by_group.values()]
    worst = min(by_group, key=lambda g: by_group[g]["accuracy"])
    return {
        "group": group_name, "n": int(len(y_true)), "groups": sorted(by_group), "labels": [str(k) for k in labels],
        "overall": {"accuracy": float(frame.overall["accuracy"]), "recall_macro": float(frame.overall["recall_macro"])},
        "by_group": by_group,
        "accuracy_difference": float(max(accs) - min(accs)),
        "accuracy_ratio": float(min(accs) / max(accs)) if max(accs) > 0 else float("nan"),
        "recall_difference": float(frame.difference()["recall_macro"]),
        "worst_group": worst,
        "dp_difference_mean": float(np.nanmean(dp)), "dp_difference_max": float(np.nanmax(dp)),
        "eo_difference_mean": float(np.nanmean(eo)), "eo_difference_max": float(np.nanmax(eo)),
        "per_class": per_class,
        "definitions": "accuracy_difference = max - min per-group accuracy; dp/eo = fairlearn "
                       "demographic_parity_difference / equalized_odds_difference (worst of TPR, FPR gaps) of "
                       "class k one-vs-rest, mean and max over classes",
    }


# ----- groups ----------------------------------------------------------------------------------
def group_tables(meta: dict, group: str, data_name: str = "data") -> tuple[str, list[str]]:
    """(id tensor name, value of each id) for attribute `group` of a bundle's meta["groups"]."""
    tables = (meta or {}).get("groups")
    if not tables or "tensor" not in tables:
        raise DataError(f"data set '{data_name}' has no group metadata (meta['groups']); fairness audits need a "
                        "data set that labels its samples with groups, e.g. fsdd_fusion")
    accepted = [k for k in tables if k != "tensor"]
    if group not in accepted:
        raise ConfigError(f"group: {unknown_name('group', group, accepted)}")
    return tables["tensor"], [str(v) for v in tables[group]]


def group_weights(ids, values: list[str]) -> tuple[torch.Tensor, dict]:
    """Inverse-frequency weights: (per-id weight tensor, {group value: weight}); w_g = N / (G * n_g) over the
    samples' ids, so the per-sample weights average to 1 and every group carries the same total weight."""
    ids = torch.as_tensor(ids).long()
    names = np.array(values, dtype=object)[ids.numpy()]
    uniq, counts = np.unique(names, return_counts=True)
    n, g = len(ids), len(uniq)
    per_value = {str(u): n / (g * int(c)) for u, c in zip(uniq, counts)}
    per_id = torch.tensor([per_value.get(v, 1.0) for v in values], dtype=torch.float32)
    return per_id, per_value


class ReweightedTask:
    """A task whose training loss is the weighted mean of per-sample cross-entropy, the weight of a sample looked
    up by its group id (batch[key]); every other attribute is the wrapped task's. Composition over tasks/: the
    wrapped task must produce `logits` (a tensor, or outputs with `.logits`) scored against batch["y"]."""

    def __init__(self, task, id_weights: torch.Tensor, key: str = "speaker"):
        self.task, self.key = task, key
        self.id_weights = torch.as_tensor(id_weights, dtype=torch.float32)

    def __getattr__(self, name):  # everything but loss: the wrapped task's
        return getattr(self.__dict__["task"], name)

    def loss(self, outputs, batch) -> torch.Tensor:
        if self.key not in batch:
            raise DataError(f"reweighting: the batch has no '{self.key}' group tensor; it holds "
                            f"{', '.join(sorted(batch))} (load the data with groups=True)")
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        per = F.cross_entropy(logits.float(), batch["y"], reduction="none",
                              label_smoothing=getattr(self.task, "label_smoothing", 0.0))  # (B,)
        w = self.id_weights.to(per.device)[batch[self.key].long()]  # (B,)
        return (w * per).sum() / w.sum()


# ----- a trained run ---------------------------------------------------------------------------
def load_group_data(run):
    """The data set of `run` (a lamina.runs.Run: same name, options, seed -> same splits) with its per-sample
    group ids."""
    from lamina.runs import load_data

    cfg = run.cfg
    data_cfg = cfg.data.model_copy(deep=True)
    if not data_cfg.options.get("groups"):
        setattr(data_cfg, "groups", True)
    try:
        return load_data(cfg.model_copy(update={"data": data_cfg}), run.folder.tokenizer)
    except (ConfigError, DataError) as e:  # the loader has no groups= option
        if "'groups'" in str(e) or "groups:" in str(e):
            raise DataError(f"data set '{cfg.data.name}' has no group metadata (no groups= option); fairness audits "
                            "need a data set that labels its samples with groups, e.g. fsdd_fusion") from None
        raise


@torch.no_grad()
def collect_predictions(model, task, loader, key: str, device="cpu") -> dict[str, torch.Tensor]:
    """logits (N, K), y (N,) and group ids (N,) of `model` over `loader`, on CPU."""
    model = model.to(device).eval()
    logits, ys, ids = [], [], []
    for batch in loader:
        if key not in batch:
            raise DataError(f"fairness: the batch has no '{key}' group tensor; it holds {', '.join(sorted(batch))}")
        out = task.forward(model, batch)
        logits.append((out.logits if hasattr(out, "logits") else out).float().cpu())
        ys.append(batch["y"].cpu())
        ids.append(batch[key].cpu())
    return {"logits": torch.cat(logits), "y": torch.cat(ys), "ids": torch.cat(ids)}


def plot_fairness(reports: dict[str, dict], path, title: str = "") -> Path:
    """Per-group accuracy bars, one colour per report ("before", "after", ...), overall accuracy as dashed lines."""
    from lamina.plots import plt, save_figure  # the project's Agg backend set-up

    groups = sorted({g for r in reports.values() for g in r["by_group"]})
    fig, ax = plt.subplots(figsize=(1.3 * len(groups) * max(len(reports), 1) + 2.5, 3.8))
    width = 0.8 / len(reports)
    x = np.arange(len(groups))
    for i, (name, r) in enumerate(reports.items()):
        acc = [r["by_group"].get(g, {}).get("accuracy", 0.0) for g in groups]
        bars = ax.bar(x + (i - (len(reports) - 1) / 2) * width, acc, width, label=f"{name} (gap "
                      f"{r['accuracy_difference']:.3f}, EO {r['eo_difference_mean']:.3f})", alpha=0.85)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.axhline(r["overall"]["accuracy"], ls="--", lw=1, color=bars.patches[0].get_facecolor())
    ax.set_xticks(x, [f"{g}\n(n={next(iter(reports.values()))['by_group'].get(g, {}).get('n', 0)})" for g in groups])
    lo = min(r["by_group"][g]["accuracy"] for r in reports.values() for g in r["by_group"])
    ax.set_ylim(max(0.0, lo - 0.1), 1.03)
    ax.set_ylabel("accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path, title)


def audit_fairness(run_dir: str | Path, group: str = "accent", which: str = "best", split: str = "test",
                   write: bool = True) -> dict:
    """Fairness report of a trained run's predictions on `split`, grouped by `group`; writes fairness.json and
    fairness.png (per-group accuracy) into the run folder."""
    from lamina.runs import open_run

    if split not in ("train", "val", "test"):
        raise ConfigError(f"split: {unknown_name('split', split, ('train', 'val', 'test'))}")
    run = open_run(run_dir, which)
    model, task, facts, ckpt = run.model, run.task, run.facts, run.checkpoint
    bundle = load_group_data(run)
    key, values = group_tables(bundle.meta, group, bundle.name)
    data = getattr(bundle, split)
    if data is None:
        raise DataError(f"data set '{bundle.name}' has no {split} split")
    device = run.device
    pred = collect_predictions(model, task, task.eval_loader(data, bundle, run.cfg.data, device), key, device)
    names = [values[i] for i in pred["ids"].tolist()]
    labels = list(range(int(facts.num_outputs or pred["logits"].shape[1])))
    rep = fairness_report(pred["y"], pred["logits"].argmax(1), names, labels=labels, group_name=group)
    rep.update(checkpoint=str(ckpt), split=split, data=bundle.name,
               data_split=(bundle.meta or {}).get("split"), speakers=(bundle.meta or {}).get("speakers"))
    if write:
        root = run.folder.path
        (root / "fairness.json").write_text(json.dumps(rep, indent=2))
        plot_fairness({"model": rep}, root / "fairness.png",
                      f"{bundle.name} {split}: accuracy by {group} (gap {rep['accuracy_difference']:.3f})")
    return rep


def train_reweighted(run_dir: str | Path, group: str = "accent", out_dir: str | Path | None = None,
                     which: str = "best", uniform: bool = False, callbacks=()) -> Path:
    """Retrain the run's config from scratch with inverse-frequency group weights on the loss (`uniform=True`:
    every weight 1, the unweighted control through the same code path); returns the new run folder.
    `callbacks`: the training's own (the CLI's progress bar), as lamina.runs.train takes them."""
    from lamina.runs import open_run, train

    opened = open_run(run_dir, which)
    cfg, root = opened.cfg, opened.folder.path
    out = Path(out_dir) if out_dir is not None else root / ("control-uniform" if uniform else "mitigated-reweight")
    data_cfg = cfg.data.model_copy(deep=True)
    setattr(data_cfg, "groups", True)  # batches carry the per-sample group id the weights are looked up by
    cfg = cfg.model_copy(update={"data": data_cfg, "name": out.name,
                                 "logging": cfg.logging.model_copy(update={"tensorboard": False})})
    weights: dict = {}

    def reweight(task, bundle):
        if task.name not in ("classification", "fusion"):
            raise ConfigError(f"task: reweighting supports classification and fusion runs, not {task.name}")
        key, values = group_tables(bundle.meta, group, bundle.name)
        id_w, per_value = group_weights(bundle.train.tensors[key], values)
        if uniform:
            id_w, per_value = torch.ones_like(id_w), {g: 1.0 for g in per_value}
        weights.update(per_value)
        return ReweightedTask(task, id_w, key)

    out = train(cfg, callbacks=callbacks, run_dir=out, task_wrapper=reweight).run_dir
    (out / "weights.json").write_text(json.dumps({"group": group, "uniform": uniform, "weights": weights}, indent=2))
    return out


METHODS = ("reweight",)


def mitigate_run(run_dir: str | Path, method: str = "reweight", group: str = "accent", which: str = "best",
                 split: str = "test", out_dir: str | Path | None = None, callbacks=()) -> dict:
    """Apply a mitigation and audit before / after on `split`; writes mitigation.json and fairness_mitigation.png
    into the run folder. method "reweight": retrain with inverse-frequency group weights (module docstring);
    `callbacks` go to that training."""
    if method not in METHODS:
        raise ConfigError(f"method: {unknown_name('mitigation method', method, METHODS)}")
    before = audit_fairness(run_dir, group, which, split)
    new = train_reweighted(run_dir, group, out_dir, which, callbacks=callbacks)
    after = audit_fairness(new, group, which, split)
    weights = json.loads((new / "weights.json").read_text())["weights"]

    def headline(r):
        return {"overall_accuracy": r["overall"]["accuracy"], "accuracy_difference": r["accuracy_difference"],
                "dp_difference_mean": r["dp_difference_mean"], "eo_difference_mean": r["eo_difference_mean"],
                "dp_difference_max": r["dp_difference_max"], "eo_difference_max": r["eo_difference_max"],
                "accuracy_by_group": {g: v["accuracy"] for g, v in r["by_group"].items()}}

    out = {"method": method, "group": group, "split": split, "weights": weights, "mitigated_run": str(new),
           "summary": {"before": headline(before), "after": headline(after)}, "before": before, "after": after}
    from lamina.runs import RunFolder

    root = RunFolder.locate(run_dir, which)[0].path
    (root / "mitigation.json").write_text(json.dumps(out, indent=2))
    plot_fairness({"before": before, f"after ({method})": after}, root / "fairness_mitigation.png",
                  f"{before['data']} {split}: accuracy by {group}, {method}")
    return out


__all__ = ["fairness_report", "group_tables", "group_weights", "ReweightedTask", "collect_predictions",
           "plot_fairness", "audit_fairness", "train_reweighted", "mitigate_run", "METHODS"]
