"""Recommendation on MovieTweetings (issue 18): popularity and item-kNN against matrix factorisation, a two-tower
model and NeuMF on the same leave-last-out split, full ranking (all 2,414 movies minus the user's own),
recall@10/20 and NDCG@10/20; and training samples/s of lamina's Trainer against a hand-written PyTorch loop of MF.

    python benchmarks/recsys_movietweetings.py [--seeds 0,1,2] [--work /tmp/recsys-bench] [--repeats 3]

* data: datasets/movietweetings (MovieTweetings 100K snapshot, 5-core: 4,333 users, 2,414 movies, 68,055 ratings,
  MIT); each user's latest movie is the test item, the one before it the validation item. Leave-last-out draws
  nothing at random, so every seed sees the same split; seeds change initialisation and negatives.
* every lamina number is `lamina train configs/movietweetings_recsys.yaml` with the overrides in MODELS, run in
  this process; the checkpoint of the best validation NDCG@10 is tested. The overrides were chosen on the
  validation split (a handful of settings per model, listed in the result JSON); the test split was not used to
  choose anything.
* baselines, deterministic: popularity; item-kNN (cosine, k neighbours per item, k chosen on validation). And a
  time-aware reference that no id-only model can match: popularity over the few days before each user's held-out
  interaction (window chosen on validation), which measures how much of "the next movie" is simply what was new.
* Trainer vs hand loop: the same MF, BPR with one uniformly sampled unseen negative, AdamW, batch 1024, one thread,
  `--epochs` epochs; lamina's Trainer.fit over its loader vs a plain loop (randperm, index, sample, step),
  interleaved A/B `--repeats` times, median samples/s. Other jobs share this machine: the 1-minute load average
  is recorded before and after every run and flagged when above the core count.
No published full-ranking leave-last-out number exists for this subset; the baselines are the reference.
Writes benchmarks/results/recsys_movietweetings.json and recsys_movietweetings.png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, RESULTS, busy, interleave, loadavg1, print_table, start_work, write_result  # noqa: E402

CONFIG = ROOT / "configs" / "movietweetings_recsys.yaml"
METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")
# name -> overrides of the config (chosen on the validation split; see the module docstring)
MODELS = {  # key -> (label, overrides)
    "mf": ("mf (BPR, 1 negative: the config)", []),
    "mf8": ("mf (BPR, 8 negatives)", ["task.negatives=8"]),
    "two_tower": ("two_tower (in-batch softmax, dropout 0.3)",
                  ["model.name=two_tower", "task.loss=in_batch", "model.dropout=0.3", "optimizer.weight_decay=0.1"]),
    "ncf": ("ncf (NeuMF, BPR)", ["model.name=ncf", "task.loss=bpr", "task.negatives=1", "data.eval_batch_size=256"]),
}
TRIED = [  # (overrides, validation NDCG@10 of the best epoch, that epoch), seed 0, one run each
    ("model.name=mf model.dim=64 task.negatives=1", 0.0938, 2),
    ("model.name=mf model.dim=64 task.negatives=8", 0.0966, 2),
    ("model.name=mf model.dim=64 optimizer.weight_decay=0.1", 0.094, 2),
    ("model.name=mf model.dim=64 optimizer.weight_decay=1.0", 0.0943, 2),
    ("model.name=mf model.dim=32 task.negatives=8 optimizer.lr=3e-3", 0.0906, 3),
    ("model.name=mf task.loss=softmax task.negatives=64", 0.0927, 2),
    ("model.name=mf task.loss=bce task.negatives=4", 0.0866, 2),
    ("model.name=mf trainer.max_epochs=4", 0.088, 4),
    ("model.name=mf trainer.max_epochs=3", 0.0887, 1),
    ("model.name=mf schedule.name=constant optimizer.lr=1e-3 trainer.max_epochs=15", 0.0947, 3),
    ("model.name=mf model.dim=128 trainer.max_epochs=6", 0.0883, 1),
    ("model.name=two_tower task.loss=softmax task.negatives=64 trainer.max_epochs=10", 0.0828, 2),
    ("model.name=two_tower task.loss=in_batch trainer.max_epochs=20", 0.0881, 2),
    ("model.name=two_tower task.loss=softmax task.negatives=64 trainer.max_epochs=20", 0.0838, 1),
    ("model.name=two_tower task.loss=softmax task.negatives=64 model.temperature=0.2 trainer.max_epochs=20", 0.0861, 6),
    ("model.name=two_tower task.loss=bpr task.negatives=1 model.normalize=false trainer.max_epochs=20", 0.0867, 2),
    ("model.name=ncf task.loss=bce task.negatives=4 trainer.max_epochs=20", 0.0849, 3),
    ("model.name=ncf task.loss=bpr task.negatives=1 trainer.max_epochs=20", 0.0898, 3),
    ("model.name=mf task.loss=in_batch trainer.max_epochs=20", 0.0952, 2),
    ("model.name=mf task.loss=softmax task.negatives=64 optimizer.lr=3e-3", 0.0941, 3),
    ("model.name=two_tower task.loss=in_batch optimizer.lr=1e-3", 0.0859, 5),
    ("model.name=two_tower task.loss=in_batch model.dropout=0.3 optimizer.weight_decay=0.1", 0.0888, 7),
    ("model.name=two_tower task.loss=in_batch model.embed_dim=32 model.tower=[64,32] model.temperature=0.05", 0.0874, 2),
    ("model.name=ncf task.loss=bpr task.negatives=1 optimizer.lr=3e-3 optimizer.weight_decay=0.1", 0.0874, 3),
    ("model.name=ncf task.loss=bce task.negatives=4 model.dropout=0.3 optimizer.lr=3e-3", 0.0867, 5),
    ("model.name=mf task.loss=bpr model.dim=128 optimizer.lr=3e-3", 0.0937, 3),
]
KNN_K = (20, 50, 100, 200, None)


def train(work: Path, key: str, seed: int, extra: list[str]) -> dict:
    from lamina import runs
    from lamina.config import load_config

    cfg = load_config(str(CONFIG), ["trainer.progress=false", "logging.tensorboard=false", "logging.plots=false",
                                    "cost.energy=false", "trainer.threads=1", f"logging.root={work / 'runs'}",
                                    f"seed={seed}", f"name={key}-{seed}", *MODELS[key][1], *extra])
    load0, t0 = loadavg1(), time.perf_counter()
    r = runs.train(cfg)
    s = r.summary
    return {"model": MODELS[key][0], "seed": seed, **{k.removeprefix("test/"): v for k, v in s["test"].items()},
            "best_epoch": s["best_epoch"], "epochs": s["epochs"], "train_time_s": s["train_time_s"],
            "wall_s": time.perf_counter() - t0, "train_samples_per_s": s["train_samples_per_s"],
            "params": s["params"], "load_before": load0, "load_after": loadavg1(), "run_dir": str(r.run_dir)}


def baselines(bundle) -> tuple[list[dict], dict]:
    from lamina.models.recsys import ItemKNN, Popularity
    from lamina.tasks.recommendation import RecommendationTask, evaluate_ranking

    nu, ni = bundle.meta["n_users"], bundle.meta["n_items"]
    task = RecommendationTask(nu, ni)
    u, i = bundle.train.tensors["user"], bundle.train.tensors["item"]
    rows = [{"model": "popularity", **evaluate_ranking(Popularity.fit(u, i, nu, ni), task, bundle, "test"),
             "val_ndcg@10": evaluate_ranking(Popularity.fit(u, i, nu, ni), task, bundle, "val")["ndcg@10"]}]
    val = {}
    for k in KNN_K:
        val[str(k)] = evaluate_ranking(ItemKNN.fit(u, i, nu, ni, k=k), task, bundle, "val")["ndcg@10"]
    best = max(val, key=val.get)
    k = None if best == "None" else int(best)
    t0 = time.perf_counter()
    knn = ItemKNN.fit(u, i, nu, ni, k=k)
    fit_s = time.perf_counter() - t0
    rows.append({"model": f"item-kNN (cosine, k={best})", **evaluate_ranking(knn, task, bundle, "test"),
                 "val_ndcg@10": val[best], "fit_s": fit_s})
    return rows, {"item_knn_val_ndcg@10_by_k": val, "item_knn_k": best}


# ----- a time-aware reference -------------------------------------------------------------------------------------
RECENT_DAYS = (3, 7, 14, 30)


def recent_popularity(bundle) -> tuple[list[dict], dict]:
    """Popularity over the training interactions of the `days` days before each user's held-out interaction (its
    own timestamp, so nothing after it is counted). Not an id-only model: it reads the timestamps, which the
    other models never see; it measures how much of the held-out movie is explained by what was new that week.
    The window is chosen on the validation split."""
    import numpy as np
    import pandas as pd

    from lamina.tasks.recommendation import RecommendationTask, evaluate_ranking

    nu, ni = bundle.meta["n_users"], bundle.meta["n_items"]
    df = pd.read_csv(bundle.meta["path"], dtype={"user_id": str, "item_id": str})
    df["u"] = df.user_id.map({u: i for i, u in enumerate(bundle.extras["user_ids"])})
    df["i"] = df.item_id.map({m: i for i, m in enumerate(bundle.extras["item_ids"])})
    df = df.sort_values(["u", "timestamp"], kind="stable")  # the loader's order: by user, then time, then file
    df["day"] = (df.timestamp - df.timestamp.min()) // 86400
    pos, n = df.groupby("u").cumcount(), df.groupby("u").u.transform("size")
    train = df[pos < n - 2]
    when = {"val": df[pos == n - 2], "test": df[pos == n - 1]}
    assert (when["test"].i.to_numpy() == bundle.test.tensors["item"].numpy()).all()  # the same split as the loader
    cum = np.zeros((int(df.day.max()) + 2, ni))
    np.add.at(cum, (train.day.to_numpy() + 1, train.i.to_numpy()), 1)
    cum = torch.tensor(cum.cumsum(0), dtype=torch.float32)  # cum[d, i]: training interactions with i before day d

    class Recent(torch.nn.Module):
        def __init__(self, split: str, days: int):
            super().__init__()
            self.day = torch.tensor(when[split].day.to_numpy(), dtype=torch.long)  # (n_users,), users in order
            self.days = days

        def forward(self, user, items=None):
            d = self.day[user]
            return cum[d] - cum[(d - self.days).clamp(min=0)]

    task = RecommendationTask(nu, ni)
    val = {str(w): evaluate_ranking(Recent("val", w), task, bundle, "val")["ndcg@10"] for w in RECENT_DAYS}
    best = int(max(val, key=val.get))
    row = {"model": f"recent popularity ({best} days; reads time)",
           **evaluate_ranking(Recent("test", best), task, bundle, "test"), "val_ndcg@10": val[str(best)]}
    return [row], {"recent_popularity_val_ndcg@10_by_days": val, "recent_popularity_days": best}


# ----- Trainer vs a hand-written loop ----------------------------------------------------------------------------
def throughput(bundle, epochs: int, repeats: int) -> dict:
    """Training samples/s of MF + BPR (one sampled negative), AdamW lr 1e-2, batch 1024, one thread: lamina's
    Trainer.fit over the task's loader vs a plain loop, interleaved A/B `repeats` times."""
    from types import SimpleNamespace

    from lamina.config.schema import TrainerConfig
    from lamina.data.interactions import UserItems
    from lamina.engine import Trainer
    from lamina.models import create_model
    from lamina.tasks.recommendation import RecommendationTask

    torch.set_num_threads(1)
    nu, ni = bundle.meta["n_users"], bundle.meta["n_items"]
    bs, lr = 1024, 1e-2
    task = RecommendationTask(nu, ni, loss="bpr", negatives=1)
    users, items = bundle.train.tensors["user"], bundle.train.tensors["item"]
    seen = UserItems.from_pairs(users, items, nu, ni)

    def lamina_run() -> float:
        torch.manual_seed(0)
        model = create_model("mf", n_users=nu, n_items=ni)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        loader = task.train_loader(bundle, SimpleNamespace(batch_size=bs, augment=[]), 0, "cpu")
        trainer = Trainer(TrainerConfig(max_epochs=epochs, device="cpu", threads=1, progress=False, log_every=10_000))
        trainer.fit(model, task, loader, None, opt, None)
        return trainer.samples_seen / trainer.train_time

    def hand_run() -> float:
        torch.manual_seed(0)
        model = create_model("mf", n_users=nu, n_items=ni)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(0)
        n, done = len(users), 0
        model.train()
        t0 = time.perf_counter()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            for s in range(0, n, bs):
                idx = perm[s:s + bs]
                u, i = users[idx], items[idx]
                neg = seen.sample_negatives(u, 1, g)
                scores = model(u, torch.cat([i[:, None], neg], 1))
                loss = -torch.nn.functional.logsigmoid(scores[:, :1] - scores[:, 1:]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += len(idx)
        return done / (time.perf_counter() - t0)

    ab = interleave({"lamina Trainer": lamina_run, "hand-written loop": hand_run}, repeats)
    rows, med = ab["runs"], ab["median_samples_per_s"]
    return {"epochs": epochs, "batch_size": bs, "train_rows": len(users), "threads": 1, "runs": rows,
            "median_samples_per_s": med, "trainer_over_hand": med["lamina Trainer"] / med["hand-written loop"]}


def summarise(rows: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        out[name] = {m: (statistics.mean(r[m] for r in mine),
                         statistics.stdev(r[m] for r in mine) if len(mine) > 1 else 0.0) for m in METRICS}
        out[name]["n"] = len(mine)
    return out


def plot(summary: dict, path: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(10, 4.2))
    w = 0.8 / len(METRICS)
    for j, m in enumerate(METRICS):
        xs = [i + (j - (len(METRICS) - 1) / 2) * w for i in range(len(names))]
        ax.bar(xs, [summary[n][m][0] for n in names], w, yerr=[summary[n][m][1] for n in names], capsize=2,
               label=m)
    ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_ylabel("test metric (full ranking)")
    ax.set_title(f"MovieTweetings 5-core, leave-last-out ({note})", fontsize=10)
    ax.legend(fontsize=8, ncol=4)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/recsys-bench")
    ap.add_argument("--json", help="result path (default benchmarks/results/recsys_movietweetings.json)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of each throughput run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every model run")
    a = ap.parse_args()
    work, load0 = start_work(a.work)
    from lamina.data import load_dataset

    bundle = load_dataset("interactions")
    result: dict = {"load_before": load0, "args": vars(a), "data": {**bundle.summary(), **bundle.meta},
                    "models": MODELS, "tried_on_validation": TRIED}
    rows, knn = baselines(bundle)
    recent, rec = recent_popularity(bundle)
    rows += recent
    result["baselines"] = {**knn, **rec, "rows": rows}
    for r in rows:
        print(f"{r['model']}: recall@10 {r['recall@10']:.4f} ndcg@10 {r['ndcg@10']:.4f}", flush=True)
    runs_ = []
    for key in a.models.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            r = train(work, key, seed, a.overrides)
            runs_.append(r)
            print(f"{r['model']} seed {seed}: recall@10 {r['recall@10']:.4f} ndcg@10 {r['ndcg@10']:.4f} best epoch "
                  f"{r['best_epoch']}/{r['epochs']} {r['train_samples_per_s']:.0f} samples/s "
                  f"(load {r['load_before']:.2f} -> {r['load_after']:.2f})", flush=True)
    result["runs"] = runs_
    summary = summarise(rows + runs_)
    result["summary"] = summary
    result["throughput"] = tp = throughput(bundle, a.epochs, a.repeats)
    result["load_after"] = loadavg1()
    loads = [x for r in runs_ for x in (r["load_before"], r["load_after"])] + [load0, result["load_after"]]
    result["max_load"] = max(loads)
    result["busy"] = busy(max(loads))
    headers = ["model", "n", *METRICS]
    table = [[n, s["n"], *[f"{s[m][0]:.4f} ± {s[m][1]:.4f}" if s["n"] > 1 else f"{s[m][0]:.4f}" for m in METRICS]]
             for n, s in summary.items()]
    print()
    result["table"] = print_table(headers, table)
    med = tp["median_samples_per_s"]
    print()
    result["throughput_table"] = print_table(
        ["loop", "median samples/s"], [[k, f"{v:.0f}"] for k, v in med.items()]
        + [["Trainer / hand", f"{tp['trainer_over_hand']:.3f}"]])
    note = f"load {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores"
    if result["busy"]:
        print(f"warning: the 1-min load average reached {max(loads):.2f} (> {os.cpu_count()} cores): samples/s and "
              "times include other jobs")
    out = write_result("recsys_movietweetings", result, a.json)
    plot(summary, (Path(a.json).parent if a.json else RESULTS) / "recsys_movietweetings.png",
         f"{len(a.seeds.split(','))} seeds; {note}")
    print(f"result: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
