"""Spoken digits by accent, speaker-held-out: leave one speaker out, six times.

For each of FSDD's 6 speakers: train configs/fsdd_digits.yaml on the other 5 (data.split=speaker), then retrain
it with accent reweighting (lamina.trust.fairness.train_reweighted); predict the held-out speaker with both.
The 6 held-out sets (3,000 recordings) are pooled and audited by the accent of their speaker, before and after.
Writes <root>/loso_fairness.json and prints one line per fold and the two audits.

    python scripts/fsdd_fairness_loso.py --epochs 8 --seed 0 --root runs/fsdd-loso
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SPEAKERS = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]


def held_out_predictions(run: Path, group: str) -> tuple[list, list, list]:
    from lamina.runs import open_run
    from lamina.trust.fairness import load_group_data, collect_predictions, group_tables

    opened = open_run(run, "best")
    model, task = opened.model, opened.task
    bundle = load_group_data(opened)
    key, values = group_tables(bundle.meta, group, bundle.name)
    pred = collect_predictions(model, task, task.eval_loader(bundle.test, bundle, opened.cfg.data, "cpu"), key)
    return pred["y"].tolist(), pred["logits"].argmax(1).tolist(), [values[i] for i in pred["ids"].tolist()]


def main(argv=None) -> int:
    from lamina.config import load_config
    from lamina.runs import train
    from lamina.trust.fairness import fairness_report, train_reweighted

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default="runs/fsdd-loso")
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "fsdd_digits.yaml"))
    a = ap.parse_args(argv)
    pooled = {"before": ([], [], []), "after": ([], [], [])}
    for spk in SPEAKERS:
        t0 = time.perf_counter()
        cfg = load_config(a.config, ["data.split=speaker", f"data.test_speaker={spk}", f"seed={a.seed}",
                                     f"trainer.max_epochs={a.epochs}", f"logging.root={a.root}", f"name=loso-{spk}",
                                     "logging.plots=false", "logging.tensorboard=false", "trainer.progress=false"])
        base = train(cfg).run_dir
        runs = {"before": base, "after": train_reweighted(base, group="accent")}
        accs = []
        for stage, run in runs.items():
            y, p, g = held_out_predictions(run, "accent")
            for acc_list, vals in zip(pooled[stage], (y, p, g)):
                acc_list.extend(vals)
            accs.append(sum(int(u == v) for u, v in zip(y, p)) / len(y))
        print(f"held out {spk:<9} accuracy before {accs[0]:.4f} after {accs[1]:.4f} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    out = {stage: fairness_report(*pooled[stage], labels=range(10), group_name="accent") for stage in pooled}
    Path(a.root).mkdir(parents=True, exist_ok=True)
    (Path(a.root) / "loso_fairness.json").write_text(json.dumps(out, indent=2))
    for stage, r in out.items():
        by = "  ".join(f"{g} {v['accuracy']:.3f}" for g, v in r["by_group"].items())
        print(f"{stage:<6} overall {r['overall']['accuracy']:.4f}  gap {r['accuracy_difference']:.4f}  "
              f"DP mean {r['dp_difference_mean']:.4f}  EO mean {r['eo_difference_mean']:.4f}  |  {by}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
