"""Imbalanced binary classification on the thyroid table (issue 18; datasets/thyroid0387: 9,172 records, 2.49%
hyperthyroid): lamina's MLP with plain, class-weighted, focal and undersampled training against scikit-learn's
HistGradientBoostingClassifier and logistic regression on the same splits, and lamina's Trainer against a plain
hand-written PyTorch loop of the same MLP (training samples/s, in the same process, interleaved).

    python benchmarks/imbalanced_thyroid.py --work /tmp/imb [--seeds 0,1,2] [--epochs 20]

Every lamina number is `lamina train configs/thyroid_hyper.yaml` run in this process with the variant's overrides
and the seed (which also draws the stratified 70/10/20 split). Every model's decision threshold maximizes F1 on the
validation split and is applied to the test split (cost: 10 per missed positive, 1 per false alarm, mean per
record). The scikit-learn models read the same split (categorical columns one-hot, numeric standardized on the
training split, missing -> training mean).
Writes benchmarks/results/imbalanced_thyroid.json and imbalanced_thyroid_pr.png (PR curves of the first seed).
The machine's 1-minute load average is recorded before and after each step: the 2 cores are shared, so times
taken under a load above 2 include other jobs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, RESULTS, interleave, loadavg1, print_table, start_work, write_result  # noqa: E402

CONFIG = ROOT / "configs" / "thyroid_hyper.yaml"
VARIANTS = {
    "mlp_ce": ["task.class_weight=none"],
    "mlp_weighted": ["task.class_weight=balanced"],
    "mlp_focal": ["task.loss=focal", "task.gamma=2", "task.class_weight=none"],
    "mlp_under": ["task.class_weight=none", "data.resample=under", "data.resample_ratio=5"],
}
METRICS = ("pr_auc", "roc_auc", "recall_fpr_0.001", "recall_fpr_0.01", "f1", "cost")
COST_FN, COST_FP = 10.0, 1.0


def train_variant(work: Path, seed: int, name: str, extra: list[str]) -> dict:
    from lamina import runs
    from lamina.config import load_config

    cfg = load_config(str(CONFIG), ["trainer.progress=false", "cost.energy=false", "logging.plots=false",
                                    f"data.path={ROOT / 'datasets/thyroid0387/thyroid.csv.gz'}",
                                    f"logging.root={work / 'runs'}", f"seed={seed}", f"name={name}-{seed}", *extra])
    load0 = loadavg1()
    r = runs.train(cfg)
    s = r.summary
    test = {k.split("/", 1)[1]: v for k, v in s["test"].items()}
    return {"method": name, "seed": seed, **{k: test.get(k) for k in METRICS}, "threshold": test.get("threshold"),
            "train_time_s": s["train_time_s"], "train_samples_per_s": s["train_samples_per_s"],
            "run_dir": str(r.run_dir), "load_before": load0, "load_after": loadavg1()}


def bundle_for(seed: int, categorical: str = "onehot"):
    from lamina.data import load_dataset

    return load_dataset("table", path=ROOT / "datasets/thyroid0387/thyroid.csv.gz", target="hyperthyroid",
                        task="classification", drop=["record_id", "diagnosis", "TBG"], categorical=categorical,
                        seed=seed)


def sklearn_scores(bundle, seed: int) -> dict[str, tuple]:
    """{name: (val scores, test scores)} of HistGradientBoosting and logistic regression on the bundle's split."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    X, y = bundle.train.x.numpy(), bundle.train.y.numpy()
    out = {}
    t0 = time.perf_counter()
    hgb = HistGradientBoostingClassifier(random_state=seed).fit(X, y)
    out["hist_gbt"] = (hgb, time.perf_counter() - t0)
    t0 = time.perf_counter()
    lr = LogisticRegression(max_iter=5000, class_weight="balanced").fit(X, y)
    out["logreg_weighted"] = (lr, time.perf_counter() - t0)
    return {k: (torch.tensor(m.predict_proba(bundle.val.x.numpy())[:, 1]),
                torch.tensor(m.predict_proba(bundle.test.x.numpy())[:, 1]), t) for k, (m, t) in out.items()}


def evaluate_scores(name: str, seed: int, vs, ts, bundle, fit_s: float) -> dict:
    from lamina.tasks.binary import at_threshold, choose_threshold, ranking_metrics

    vy, ty = bundle.val.y, bundle.test.y
    t = choose_threshold(vs, vy, "max_f1", COST_FN, COST_FP)
    m = {**ranking_metrics(ts, ty), **at_threshold(ts, ty, t, COST_FN, COST_FP)}
    return {"method": name, "seed": seed, **{k: m.get(k) for k in METRICS}, "threshold": t, "train_time_s": fit_s}


# ----- Trainer vs a hand-written loop ----------------------------------------------------------------------------
def throughput(epochs: int, repeats: int) -> dict:
    """Training samples/s of the config's MLP on the seed-0 training split (class-weighted CE, AdamW, batch 128),
    through lamina's Trainer.fit and through a plain loop, interleaved A/B `repeats` times."""
    from lamina.config import load_config
    from lamina.data import make_loader
    from lamina.engine import Trainer
    from lamina.models import create_model
    from lamina.tasks.binary import BinaryTask

    cfg = load_config(str(CONFIG), ["trainer.progress=false", f"trainer.max_epochs={epochs}", "schedule.name=constant"])
    b = bundle_for(0, "embed")
    train = b.train
    opts = {"in_features": train.x.shape[1], "num_classes": 2, "cat_cardinalities": tuple(b.meta["cat_cardinalities"]),
            "width": 128, "depth": 2, "dropout": 0.1}
    task = BinaryTask(b.class_names, b.meta["class_counts"], class_weight="balanced")
    bs = cfg.data.batch_size

    def lamina_run() -> float:
        torch.manual_seed(0)
        model = create_model("mlp", **opts)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
        trainer = Trainer(cfg.trainer.model_copy(update={"device": "cpu", "log_every": 10_000}))
        trainer.fit(model, task, make_loader(train, bs, shuffle=True, seed=0, device="cpu"), None, opt, None)
        return trainer.samples_seen / trainer.train_time

    def hand_run() -> float:
        torch.manual_seed(0)
        model = create_model("mlp", **opts)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
        w = task.weight
        x, xc, y = train.x, train.tensors["x_cat"], train.y
        g = torch.Generator().manual_seed(0)
        n, seen = len(y), 0
        model.train()
        t0 = time.perf_counter()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                loss = torch.nn.functional.cross_entropy(model(x[idx], x_cat=xc[idx]), y[idx], weight=w)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                seen += len(idx)
        return seen / (time.perf_counter() - t0)

    ab = interleave({"lamina Trainer": lamina_run, "hand-written loop": hand_run}, repeats)
    rows, med = ab["runs"], ab["median_samples_per_s"]
    return {"epochs": epochs, "batch_size": bs, "train_rows": len(train), "threads": torch.get_num_threads(),
            "runs": rows, "median_samples_per_s": med,
            "trainer_over_hand": med["lamina Trainer"] / med["hand-written loop"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/imbalanced-bench")
    ap.add_argument("--json", help="result path (default benchmarks/results/imbalanced_thyroid.json)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--throughput-epochs", type=int, default=5)
    ap.add_argument("--throughput-repeats", type=int, default=3)
    a = ap.parse_args()
    work, load0 = start_work(a.work)
    seeds = [int(s) for s in a.seeds.split(",")]
    result: dict = {"load_before": load0, "args": vars(a), "cost_fn": COST_FN, "cost_fp": COST_FP}
    rows, curves = [], {}
    for seed in seeds:
        bundle = bundle_for(seed)
        for name, (vs, ts, fit_s) in sklearn_scores(bundle, seed).items():
            rows.append(evaluate_scores(name, seed, vs, ts, bundle, fit_s))
            if seed == seeds[0]:
                curves[name] = (ts, bundle.test.y)
        for name in a.variants.split(","):
            r = train_variant(work, seed, name, [f"trainer.max_epochs={a.epochs}", *VARIANTS[name]])
            rows.append(r)
            print(f"seed {seed} {name}: pr_auc {r['pr_auc']:.4f} f1 {r['f1']:.4f} (load {loadavg1():.2f})", flush=True)
            if seed == seeds[0]:
                curves[name] = _run_scores(r["run_dir"])
    methods = list(dict.fromkeys(r["method"] for r in rows))
    summary = {}
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        summary[m] = {k: statistics.mean(r[k] for r in rs) for k in METRICS}
        summary[m]["pr_auc_std"] = statistics.pstdev(r["pr_auc"] for r in rs)
        summary[m]["train_time_s_median"] = statistics.median(r["train_time_s"] for r in rs)
    result.update(runs=rows, summary=summary, prevalence_test=float(bundle_for(seeds[0]).test.y.float().mean()))
    print_table(["method", "PR-AUC", "std", "ROC AUC", "recall@FPR0.1%", "recall@FPR1%", "F1@val thr", "cost/record",
                 "train s"],
                [[m, v["pr_auc"], v["pr_auc_std"], v["roc_auc"], v["recall_fpr_0.001"], v["recall_fpr_0.01"], v["f1"],
                  v["cost"], v["train_time_s_median"]] for m, v in summary.items()])
    result["throughput"] = tp = throughput(a.throughput_epochs, a.throughput_repeats)
    print_table(["loop", "median samples/s"], [[k, v] for k, v in tp["median_samples_per_s"].items()]
                + [["Trainer / hand", tp["trainer_over_hand"]]])
    out = Path(a.json) if a.json else RESULTS / "imbalanced_thyroid.json"
    _plot(curves, out.with_name(out.stem + "_pr.png"), result["prevalence_test"])
    result["load_after"] = loadavg1()
    result["busy"] = max(load0, result["load_after"]) > 2
    write_result("imbalanced_thyroid", result, a.json)
    return 0


def _run_scores(run_dir: str):
    from lamina.runs.open import open_run

    run = open_run(run_dir)
    return run.task.split_scores(run.model, run.data().test, "cpu")


def _plot(curves: dict, path: Path, prevalence: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig, ax = plt.subplots(figsize=(5.8, 4.4))
    for name, (s, y) in curves.items():
        p, r, _ = precision_recall_curve(y.numpy(), s.numpy())
        ax.step(r, p, where="post", label=f"{name} (AP {average_precision_score(y.numpy(), s.numpy()):.3f})")
    ax.axhline(prevalence, color="gray", ls=":", label=f"random ({prevalence:.3f})")
    ax.set_xlabel("recall (hyperthyroid found)")
    ax.set_ylabel("precision")
    ax.set_title("thyroid0387 test split (seed 0)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
