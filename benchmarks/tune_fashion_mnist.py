"""A 30-trial hyperparameter search on Fashion-MNIST, with and without pruning, and what it found (issue 15).

Runs through the CLI, exactly as a user would:

  1. `lamina tune configs/fashion_mnist.yaml --space configs/search/fashion_mnist_space.yaml --trials 30
     --jobs 2 --pruner median` on a proxy budget (20% of the training set, 6 epochs per trial), and the same
     search with `--pruner none`. Compute is compared as training samples (exact), epochs, training seconds and
     the command's CPU seconds (all processes); the best validation accuracy of both is compared with the
     seed-to-seed spread of the proxy (step 3).
  2. The pruned search's best.yaml at full data, and configs/fashion_mnist.yaml, both for the anchor's 8 epochs
     (../shared/ANCHORS.md: plain PyTorch CNN, 93.73% after 8 epochs), each with seeds 0, 1, 2
     (`lamina train ... --seeds 0,1,2`): test accuracy mean +- sample std and every value.
  3. Both searches' best.yaml at the proxy budget with seeds 0, 1, 2: the seed spread the two searches' best
     values are judged against, and whether the two best configs differ beyond it.

Every step that already has its output in --work is reused (a finished study re-run by the same command only
rewrites its outputs; a seeds.json is read as it is), so the script can be resumed. Load averages are
recorded before and after each step; a step started above the core count is flagged.

    nice .venv/bin/python benchmarks/tune_fashion_mnist.py --work /tmp/fm-tune [--epochs 8]

Needs optuna (`pip install -e ".[tune]"`) and the Fashion-MNIST data (Debian package dataset-fashion-mnist).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, cli_step, print_table, seed_runs, write_result  # noqa: E402

CONFIG = ROOT / "configs" / "fashion_mnist.yaml"
SPACE = ROOT / "configs" / "search" / "fashion_mnist_space.yaml"
PROXY = ["data.train_fraction=0.2", "trainer.max_epochs=6", "logging.tensorboard=false"]
ANCHOR = 0.9373  # ../shared/ANCHORS.md: plain PyTorch CNN on Fashion-MNIST, 8 epochs


def search(work: Path, pruner: str, trials: int, jobs: int, steps: list[dict]) -> dict:
    out = work / f"fm-{pruner}"
    done = out / "study.json"
    if done.is_file():  # finished earlier: read as it is (re-running would only rewrite the same outputs)
        s = json.loads(done.read_text())
        if s["cost"]["trials"] >= trials:
            return s
    cli_step(f"tune --pruner {pruner}", ["tune", str(CONFIG), "--space", str(SPACE), "--trials", str(trials), "--jobs",
                                     str(jobs), "--pruner", pruner, "--out", str(out), *PROXY],
         work / f"tune-{pruner}.log", steps)
    return json.loads((out / "study.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/lamina-fm-tune", help="studies and runs go here (reused if present)")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=8, help="epochs of the full-data comparison (the anchor's 8)")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    steps: list[dict] = []

    studies = {p: search(work, p, a.trials, a.jobs, steps) for p in ("median", "none")}
    best_yaml = Path(studies["median"]["best"]["config"])
    full = ["data.train_fraction=1", f"trainer.max_epochs={a.epochs}"]
    base = seed_runs(work, f"fm-base{a.epochs}", CONFIG, [f"trainer.max_epochs={a.epochs}"], steps)
    best = seed_runs(work, f"fm-best{a.epochs}", best_yaml, full, steps)
    proxy = seed_runs(work, "fm-best-proxy", best_yaml, [], steps)
    proxy_none = seed_runs(work, "fm-none-best-proxy", Path(studies["none"]["best"]["config"]), [], steps)

    rows, summary = [], {}
    for p, s in studies.items():
        c = s["cost"]
        summary[p] = {"best_val_acc": s["best"]["value"], "best_params": s["best"]["params"],
                      "trials": c["trials"], "complete": c["complete"], "pruned": c["pruned"],
                      "failed": c["failed"], "train_samples": c["train_samples"], "epochs": c["epochs"],
                      "train_time_s": c["train_time_s"], "command_cpu_s": c.get("command_cpu_s"),
                      "command_wall_s": c.get("command_wall_s"),
                      "energy_kwh": (c.get("energy") or {}).get("energy_kwh"),
                      "energy_source": (c.get("energy") or {}).get("source"),
                      "energy_runs": (c.get("energy") or {}).get("runs"),
                      "trial_rows": [{k: t.get(k) for k in ("number", "state", "value", "epochs", "samples",
                                                            "train_time_s", "params")} for t in s["trials"]]}
        rows.append([f"--pruner {p}", f"{c['complete']}/{c['pruned']}", f"{c['train_samples']:,}", c["epochs"],
                     f"{c['train_time_s'] / 60:.1f}", f"{(c.get('command_cpu_s') or 0) / 60:.1f}",
                     f"{s['best']['value']:.4f}"])
    m, n = summary["median"], summary["none"]
    saving = {"train_samples": 1 - m["train_samples"] / n["train_samples"], "epochs": 1 - m["epochs"] / n["epochs"],
              "train_time_s": 1 - m["train_time_s"] / n["train_time_s"]}
    if m["command_cpu_s"] and n["command_cpu_s"]:
        saving["command_cpu_s"] = 1 - m["command_cpu_s"] / n["command_cpu_s"]
    spread, spread_none = proxy["best_monitor"], proxy_none["best_monitor"]
    print_table(["search", "complete/pruned", "samples", "epochs", "train min", "CPU min", "best val/acc"], rows)
    print(f"pruning saves {saving['train_samples']:.1%} of training samples, {saving['train_time_s']:.1%} of "
          f"training time; best val/acc {m['best_val_acc']:.4f} vs {n['best_val_acc']:.4f} (proxy seed spread: "
          f"{spread['mean']:.4f} +- {spread['std']:.4f}); both best configs over seeds 0,1,2 at the proxy: "
          f"{spread['mean']:.4f} +- {spread['std']:.4f} (pruned) vs {spread_none['mean']:.4f} +- "
          f"{spread_none['std']:.4f} (unpruned)")
    acc_b, acc_t = base["test"]["test/acc"], best["test"]["test/acc"]
    print_table(["config (full data, %d epochs)" % a.epochs, "test acc mean", "std", "values"],
                [["configs/fashion_mnist.yaml", f"{acc_b['mean']:.4f}", f"{acc_b['std']:.4f}",
                  " ".join(f"{v:.4f}" for v in acc_b["values"])],
                 ["tuned best.yaml", f"{acc_t['mean']:.4f}", f"{acc_t['std']:.4f}",
                  " ".join(f"{v:.4f}" for v in acc_t["values"])],
                 ["plain PyTorch anchor", f"{ANCHOR:.4f}", "", ""]])
    gain = acc_t["mean"] - acc_b["mean"]
    write_result("tune_fashion_mnist", {
        "proxy": PROXY, "space": str(SPACE.relative_to(ROOT)), "searches": summary, "pruning_saving": saving,
        "proxy_seed_spread_val_acc": spread, "unpruned_best_proxy_seeds_val_acc": spread_none,
        "full_data": {"epochs": a.epochs, "base": acc_b, "tuned": acc_t, "gain": gain,
                      "gain_over_spread": gain / max(acc_b["std"], acc_t["std"], 1e-12),
                      "beats_anchor": acc_t["mean"] > ANCHOR, "anchor": ANCHOR,
                      "base_wall_s": base["wall_time_s"], "tuned_wall_s": best["wall_time_s"]},
        "steps": steps, "load_note": "a step with busy=true started above the core count: its times include "
                                     "other jobs' load"})


if __name__ == "__main__":
    main()
