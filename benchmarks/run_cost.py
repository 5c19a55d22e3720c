"""What a training run costs, and what counting it costs (issue 15).

Runs `lamina train` (the default job) and `lamina train configs/fashion_mnist.yaml` through the CLI and reads
each run's summary.json: wall time, energy (kWh), CO2e, how the energy was obtained (measured / estimated /
mixed), forward FLOPs per sample and training FLOPs. The default job also runs with `cost.energy=false
cost.flops=false`, alternating with the default, to give the overhead of the tracker and the FLOP count: as a
difference of median wall times (noisy on a shared machine) and as the time the run itself clocked on them
(summary cost.overhead_s). The load average is read before and after each run; a run that starts with a load
above the core count is flagged (its times are then not comparable).

    nice .venv/bin/python benchmarks/run_cost.py [--repeats 3] [--skip-fashion]

(--skip-fashion keeps the Fashion-MNIST entry of the last results file.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, print_table, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAMINA = [sys.executable, "-m", "lamina.cli.main"]
OFF = ["cost.energy=false", "cost.flops=false"]


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def run(args: list[str], root: Path) -> dict:
    cores = os.cpu_count() or 1
    before = loadavg()
    t0 = time.perf_counter()
    p = subprocess.run([*LAMINA, "train", *args, "--no-progress", f"logging.root={root}", "logging.tensorboard=false"],
                       cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = loadavg()
    if p.returncode:
        raise SystemExit(f"lamina train {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    summary = json.loads((Path(p.stdout.strip().splitlines()[-1]) / "summary.json").read_text())
    cost = summary.get("cost", {})
    flops = cost.get("flops", {})
    cost_line = next((ln for ln in p.stderr.splitlines() if ln.startswith("cost:")), "")
    return {"args": args, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "process_wall_s": wall, "run_wall_s": summary["wall_time_s"],
            "train_time_s": summary["train_time_s"], "test": summary["test"],
            "energy_kwh": cost.get("energy_kwh"), "co2e_kg": cost.get("co2e_kg"), "country": cost.get("country"),
            "source": cost.get("source"), "explanation": cost.get("explanation"),
            "components": cost.get("components"), "tracked_s": cost.get("tracked_s"),
            "forward_flops_per_sample": flops.get("forward_per_sample"),
            "train_flops_per_sample": flops.get("train_per_sample"), "training_flops": flops.get("training"),
            "samples_seen": flops.get("samples_seen"), "overhead_s": cost.get("overhead_s"),
            "cli_line": cost_line, "load_before": before, "load_after": after,
            "loaded": before[0] > cores}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="default-job runs with and without cost, alternating")
    ap.add_argument("--skip-fashion", action="store_true", help="leave out the Fashion-MNIST run (~7 min on 2 cores); "
                    "the last results file's entry is kept")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="run_cost-") as tmp:
        root = Path(tmp)
        with_cost, without = [], []
        for i in range(a.repeats):  # alternate, so a change in the machine's load hits both alike
            with_cost.append(run([], root))
            without.append(run(OFF, root))
            print(f"default job {i + 1}/{a.repeats}: with cost {with_cost[-1]['process_wall_s']:.1f} s, without "
                  f"{without[-1]['process_wall_s']:.1f} s", flush=True)
        fashion = None if a.skip_fashion else run(["configs/fashion_mnist.yaml"], root)
    previous = RESULTS / "run_cost.json"
    if fashion is None and previous.is_file():  # --skip-fashion keeps the last Fashion-MNIST measurement
        old = json.loads(previous.read_text())
        if old.get("fashion_mnist"):
            fashion = {**old["fashion_mnist"], "measured_at": old["fashion_mnist"].get("measured_at", old.get("when"))}
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    overhead = {
        "process_wall_s_with": med(with_cost, "process_wall_s"), "process_wall_s_without": med(without, "process_wall_s"),
        "run_wall_s_with": med(with_cost, "run_wall_s"), "run_wall_s_without": med(without, "run_wall_s"),
        "clocked_s": {k: statistics.median((r["overhead_s"] or {}).get(k, 0.0) for r in with_cost)
                      for k in ("flop_count_s", "tracker_start_s", "tracker_stop_s")},
    }
    overhead["process_wall_diff_s"] = overhead["process_wall_s_with"] - overhead["process_wall_s_without"]
    overhead["run_wall_diff_s"] = overhead["run_wall_s_with"] - overhead["run_wall_s_without"]
    overhead["clocked_total_s"] = sum(overhead["clocked_s"].values())
    rows = []
    for name, r in [("default (median run)", sorted(with_cost, key=lambda r: r["run_wall_s"])[len(with_cost) // 2]),
                    *([("fashion_mnist", fashion)] if fashion else [])]:
        rows.append([name, r["run_wall_s"], r["energy_kwh"], (r["co2e_kg"] or 0) * 1000, r["source"],
                     r["forward_flops_per_sample"], r["training_flops"], f"{r['load_before'][0]:.2f}",
                     f"{r['load_after'][0]:.2f}", "LOADED" if r["loaded"] else ""])
    print_table(["run", "wall s", "kWh", "g CO2e", "source", "fwd FLOP/sample", "training FLOP", "load before",
                 "load after", "flag"], rows)
    print(f"tracker + FLOP count overhead (default job): wall {overhead['run_wall_diff_s']:+.2f} s of "
          f"{overhead['run_wall_s_without']:.1f} s (median of {a.repeats}); clocked {overhead['clocked_total_s']:.2f} s "
          f"({', '.join(f'{k} {v:.2f}' for k, v in overhead['clocked_s'].items())})")
    write_result("run_cost", {"cores": os.cpu_count(), "default_with_cost": with_cost, "default_without_cost": without,
                              "overhead": overhead, "fashion_mnist": fashion,
                              "note": "load averages from /proc/loadavg (1, 5, 15 min) before and after each run; "
                                      "'loaded' when the 1-min load before the start exceeds the core count"})


if __name__ == "__main__":
    main()
