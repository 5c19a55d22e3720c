"""Scaling law of the char-level GPT on Tiny Shakespeare: six sizes from ~12k to ~790k non-embedding parameters
(64x), each trained for fixed token budgets, fitted as L(N) = E + A N^-alpha per budget and jointly as
L(N, D) = E + A N^-alpha + B D^-beta (lamina.search.scaling; the same sweep as `lamina scale`).

Setting: configs/shakespeare_char_gpt.yaml (block 64, AdamW lr 2e-3, betas (0.9, 0.99), weight decay 0.1, cosine to
1e-4, grad clip 1.0, no dropout, no biases) with batch 32 (2048 tokens per step) instead of 12, so that the small
models are not all per-step overhead. Every size gets the same hyperparameters (no per-size lr tuning); each
run's cosine ends at its own last step and its warmup is min(100, steps / 10). The validation loss is exact: one
pass over the whole validation split (the last 10% of the text, 111k characters) at the end of each run.

Threads: one by default. On this 2-core machine shared with other jobs, torch's two OpenMP threads spin at barriers
whenever a core is taken; measured under a load average of 3-5, a step of the 790k model took 177 ms with one thread
and 2070 ms with two (benchmarks/gpt_char.py saw the same). The 1-minute load average is recorded before, after and
at the end of every run.

    nice python benchmarks/scaling_char_gpt.py [--tokens 5e5,1e6,4e6] [--threads 1] [--out DIR]

Runs live in benchmarks/results/raw/scaling_char_gpt (git-ignored); re-running continues a stopped sweep and
re-fits. Writes results/scaling_char_gpt.json and results/scaling_char_gpt.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from _common import RESULTS, print_table, write_result
from lamina.config import load_config
from lamina.search.scaling import parse_sizes, scaling_sweep

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("n_layer=1,n_embd=32,n_head=2; n_layer=1,n_embd=48,n_head=3; n_layer=2,n_embd=48,n_head=3; "
         "n_layer=3,n_embd=64,n_head=4; n_layer=4,n_embd=80,n_head=4; n_layer=4,n_embd=128,n_head=4")
KAPLAN_ALPHA_N = 0.076  # Kaplan et al. 2020, eq. 1.1: L(N) = (N_c / N)^0.076, converged large models


def loadavg() -> list[float]:
    return [float(x) for x in open("/proc/loadavg").read().split()[:3]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="5e5,1e6,4e6")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", default=str(RESULTS / "raw" / "scaling_char_gpt"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(ROOT / "configs" / "shakespeare_char_gpt.yaml",
                      [f"data.batch_size={a.batch_size}", f"trainer.threads={a.threads}"])
    tokens = [float(x) for x in a.tokens.split(",")]
    load_before, t0, loads = loadavg(), time.perf_counter(), []

    def progress(ev):
        if ev["phase"] != "done":
            print(f"[{ev['index'] + 1}/{ev['total']}] {ev['label']} {ev['budget']}: training N={ev['N']:,} for "
                  f"{ev['steps']} steps ...", flush=True)
            return
        loads.append({"run": f"{ev['label']} {ev['budget']}", "loadavg_1m": loadavg()[0], "resumed": ev["resumed"]})
        how = "done before" if ev["resumed"] else f"{ev['seconds']:.1f}s"
        print(f"[{ev['index'] + 1}/{ev['total']}] {ev['label']} {ev['budget']}  N={ev['N']:,}  D={ev['D']:.3g}  "
              f"val loss {ev['val_loss']:.4f}  ({how})", flush=True)

    r = scaling_sweep(cfg, parse_sizes(SIZES), tokens=tokens, out=a.out, bootstrap=a.bootstrap, progress=progress)
    wall, load_after = time.perf_counter() - t0, loadavg()

    pts = sorted(r["points"], key=lambda p: (p["budget"], p["N"]))
    print_table(["size", "N (non-emb)", "N total", "D", "steps", "C=6ND", "val loss", "s"],
                [[p["label"], p["N"], p["N_total"], f"{p['D']:.3g}", p["steps"], f"{p['C']:.3g}",
                  round(p["val_loss"], 4), round(p["seconds"], 1)] for p in pts])
    fits = []
    for row in r["fits"]["per_budget"]:
        f = row["size_law"]
        if "params" not in f:
            print(f"D={row['budget']:.3g}: no fit ({f['skipped']})")
            continue
        q, ci = f["params"], f.get("ci95_bootstrap", {}).get("alpha")
        cov = f.get("ci95_covariance", {}).get("alpha")
        pp = row["pure_power"]
        pure, pure_ci = pp["params"]["alpha"], pp.get("ci95_bootstrap", {}).get("alpha")
        fits.append({"D": row["budget"], **q, "alpha_ci95_bootstrap": ci, "alpha_ci95_covariance": cov,
                     "r2": f["r2"], "at_bound": f.get("at_bound"), "pure_power_alpha": pure,
                     "pure_power_alpha_ci95_bootstrap": pure_ci,
                     "pure_power_alpha_ci95_ols": pp.get("ci95_ols", {}).get("alpha"),
                     "pure_power_r2_log": pp["r2_log"]})
        print(f"D={row['budget']:.3g}: L = {q['E']:.3f} + {q['A']:.4g} N^-{q['alpha']:.3f}  alpha 95% CI "
              f"{ci and [round(c, 3) for c in ci]} (bootstrap), {cov and [round(c, 3) for c in cov]} (covariance); "
              f"R^2 {f['r2']:.4f}; without E: alpha {pure:.3f} {pure_ci and [round(c, 3) for c in pure_ci]}")
    joint = r["fits"]["joint"]
    if "params" in joint:
        q = joint["params"]
        print(f"joint: L = {q['E']:.3f} + {q['A']:.4g} N^-{q['alpha']:.3f} + {q['B']:.4g} D^-{q['beta']:.3f}; "
              f"95% CI {joint.get('ci95_bootstrap')}; R^2 {joint['r2']:.4f}")
    else:
        print(f"joint: no fit ({joint['skipped']})")
    print(f"wall {wall:.0f}s (runs: {sum(p['seconds'] for p in pts):.0f}s); load average 1m before {load_before[0]} "
          f"after {load_after[0]}; Kaplan's alpha_N {KAPLAN_ALPHA_N}")
    shutil.copyfile(Path(r["out"]) / "scaling.png", RESULTS / "scaling_char_gpt.png")
    # a sweep continued later (more budgets) keeps the earlier invocations' wall time and load averages
    session = {"tokens": tokens, "wall_s": wall, "loadavg_before": load_before, "loadavg_after": load_after,
               "trained": sum(not x["resumed"] for x in loads),
               "loadavg_per_run": [x for x in loads if not x["resumed"]]}
    previous = RESULTS / "scaling_char_gpt.json"
    sessions = []
    if previous.is_file():
        old = json.loads(previous.read_text())
        if old.get("out") == r["out"]:
            keys = ("tokens", "wall_s", "loadavg_before", "loadavg_after", "loadavg_per_run")
            sessions = old.get("sessions") or [{k: old[k] for k in keys if k in old}]
    sessions = [x for x in sessions if x.get("trained", 1)]  # a re-fit that trained nothing adds no wall time
    if session["trained"]:
        sessions.append(session)
    write_result("scaling_char_gpt", {
        "config": "configs/shakespeare_char_gpt.yaml", "overrides": [f"data.batch_size={a.batch_size}"],
        "threads": a.threads, "tokens": tokens, "sizes": SIZES, "wall_s": sum(x["wall_s"] for x in sessions),
        "runs_s": sum(p["seconds"] for p in pts), "sessions": sessions, "points": pts, "fits_per_budget": fits,
        "joint": joint, "kaplan_alpha_n": KAPLAN_ALPHA_N, "out": r["out"]})


if __name__ == "__main__":
    main()
