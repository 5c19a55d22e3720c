"""Hybrid quantum layers (issue 16): a simulated variational circuit against a classical layer of the same
parameter count on a real task, and what the simulation costs as qubits grow.

Part 1 drives the CLI as a user would, once per setting, all seeds in one process:

    lamina train configs/quantum_digits.yaml model.head_kind={quantum,classical} model.n_qubits=N
        model.n_layers=L --seeds 0,1,...

on sklearn's 8x8 digits (1,797 images, 10 classes; stratified 70/10/20 split, seed 0, identical for every run;
the run seed changes only initialisation and batch order). The pairs (N, L) = (2, 1), (5, 2), (8, 3) are those
where the circuit's 3 * N * L weights equal exactly k layers of tanh(Linear(N, N)) (k = 1 each), so the twin has
the same parameter count, not merely a near one. Also: the same at (5, 2) on breast_cancer (569 x 30, 2 classes),
and logistic regression on the raw 64 pixels (`mlp` with depth 0) for scale. Test accuracy mean +- std (ddof=1)
over seeds, training time (wall) from each run's summary; every run on one intra-op thread (the config's
trainer.threads=1: the circuit's tiny ops gain nothing from a second thread and lose a lot to its barrier on a
busy machine).

Part 2 times the circuit alone, each qubit count in a fresh process on one thread: forward + backward of a
32-sample batch (QuantumLayer(N, 2 layers, strong)), forward under no_grad, the classical twin of the same size
for contrast, as CPU time of the thread (minimum over repeats; wall time is recorded too, but on a shared machine
it measures the queue), and the peak extra resident memory of the first forward + backward (VmHWM after
clear_refs, see _common.peak_rss_mib). It fits log2(CPU time) against N over N >= 8 (below that, fixed per-call
overhead dominates).

Load averages are recorded before/after every step; a start above the core count is flagged. Run it under nice:

    nice .venv/bin/python benchmarks/quantum.py --work /tmp/quantum-bench [--max-qubits 14]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    RESULTS,
    ROOT,
    cli_step,
    loadavg1,
    peak_rss_mib,
    print_table,
    start_work,
    write_result,
)

CONFIG = ROOT / "configs" / "quantum_digits.yaml"
FAST = ["--no-progress", "logging.tensorboard=false", "logging.plots=false"]
BATCH = 32


# ----- part 1: accuracy, quantum vs classical twin ----------------------------------------------------------------
def seeds_run(work: Path, name: str, args: list[str], seeds: list[int], steps: list[dict]) -> dict:
    f = work / "runs" / f"{name}-seeds" / "seeds.json"
    if not f.is_file():
        cli_step(name, ["train", *args, "--seeds", ",".join(map(str, seeds)), f"name={name}",
                        f"logging.root={work / 'runs'}", *FAST], work / f"{name}.log", steps)
    res = json.loads(f.read_text())
    accs = [r["test"]["test/acc"] for r in res["runs"]]
    summaries = [json.loads((Path(r["run_dir"]) / "summary.json").read_text()) for r in res["runs"]]
    train_s = [s["train_time_s"] for s in summaries]
    return {"acc_values": accs, "acc_mean": statistics.mean(accs),
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "train_s_mean": statistics.mean(train_s),
            "train_s_values": train_s, "params": summaries[0]["params"], "threads": summaries[0]["threads"],
            "seeds": seeds}


def accuracy(work: Path, seeds_main: list[int], seeds_other: list[int], steps: list[dict]) -> dict:
    out: dict = {"digits": {}, "breast_cancer": {}}
    for n, layers in ((2, 1), (5, 2), (8, 3)):
        seeds = seeds_main if (n, layers) == (5, 2) else seeds_other
        for kind in ("quantum", "classical"):
            out["digits"][f"{kind} n={n} L={layers}"] = {"n_qubits": n, "n_layers": layers, "head_kind": kind, **seeds_run(
                work, f"digits-{kind}-q{n}-l{layers}",
                [str(CONFIG), f"model.head_kind={kind}", f"model.n_qubits={n}", f"model.n_layers={layers}"], seeds, steps)}
    # the quantum config's model options do not fit mlp: the same data, optimizer and schedule, given inline
    out["digits"]["logistic regression (mlp depth=0, 64 pixels)"] = seeds_run(
        work, "digits-logreg", ["data.name=digits", "data.batch_size=32", "model.name=mlp", "model.depth=0",
                                "model.dropout=0.0", "optimizer.lr=0.01", "optimizer.weight_decay=0.0",
                                "schedule.name=onecycle", "task.label_smoothing=0.0", "trainer.max_epochs=30",
                                "trainer.monitor=val/acc", "trainer.monitor_mode=max", "trainer.threads=1"],
        seeds_other, steps)
    for kind in ("quantum", "classical"):
        out["breast_cancer"][f"{kind} n=5 L=2"] = {"n_qubits": 5, "n_layers": 2, "head_kind": kind, **seeds_run(
            work, f"cancer-{kind}", [str(CONFIG), "data.name=breast_cancer", f"model.head_kind={kind}"], seeds_other,
            steps)}
    return out


# ----- part 2: simulation cost as qubits grow --------------------------------------------------------------------
def cost_one(n: int) -> dict:
    """One qubit count, measured in this (fresh) process, on one thread.

    The machine is shared (other jobs keep the load above the core count), so wall time mostly measures the queue:
    each repeat records the CPU time of this thread (time.thread_time: with one intra-op thread all the work runs on
    it, and time spent descheduled is not counted) as well as the wall time, and the minimum over repeats is kept,
    the usual estimator when interference only ever adds time. Memory is measured first, on the very first forward
    + backward, before any warm-up could leave freed-but-cached heap that hides the allocation."""
    import torch

    from lamina.nn.quantum import (
        ClassicalTwin,
        QuantumLayer,
        quantum_param_count,
        state_vector_bytes,
    )

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer, x = QuantumLayer(n, 2, "strong"), torch.randn(BATCH, n)
    twin = ClassicalTwin(n, quantum_param_count(n, 2, "strong"))

    def step(m):
        m.zero_grad(set_to_none=True)
        m(x).sum().backward()

    peak, method = peak_rss_mib(lambda: step(layer))  # first call: includes building PennyLane's tape (small)

    def timed(fn, budget_s: float = 4.0, max_reps: int = 9) -> tuple[float, float]:
        fn()  # warm-up
        cpu, wall, t_all = [], [], time.perf_counter()
        while len(cpu) < max_reps and (len(cpu) < 3 or time.perf_counter() - t_all < budget_s):
            c0, t0 = time.thread_time(), time.perf_counter()
            fn()
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - t0)
        return min(cpu), min(wall)

    fb_cpu, fb_wall = timed(lambda: step(layer))
    with torch.no_grad():
        f_cpu, f_wall = timed(lambda: layer(x))
    tw_cpu, tw_wall = timed(lambda: step(twin), budget_s=0.5, max_reps=50)
    return {"n_qubits": n, "batch": BATCH, "params": layer.num_params, "threads": torch.get_num_threads(),
            "fwd_bwd_cpu_s": fb_cpu, "fwd_bwd_wall_s": fb_wall, "fwd_cpu_s": f_cpu, "fwd_wall_s": f_wall,
            "twin_fwd_bwd_cpu_s": tw_cpu, "twin_fwd_bwd_wall_s": tw_wall,
            "peak_extra_rss_mib": peak, "rss_method": method, "state_mib": state_vector_bytes(n, BATCH) / 2 ** 20}


def cost(qubits: list[int], steps: list[dict]) -> list[dict]:
    rows = []
    for n in qubits:
        before, t0 = loadavg1(), time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--cost-one", str(n)], check=False, capture_output=True, text=True,
                           cwd=ROOT)
        if p.returncode:
            raise SystemExit(f"cost at {n} qubits failed:\n{p.stderr[-2000:]}")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        steps.append({"step": f"cost {n} qubits", "load_before": before, "load_after": loadavg1(),
                      "wall_s": time.perf_counter() - t0})
        r = rows[-1]
        print(f"{n:2d} qubits: fwd+bwd {r['fwd_bwd_cpu_s'] * 1e3:9.2f} ms CPU ({r['fwd_bwd_wall_s'] * 1e3:.2f} wall)  "
              f"fwd {r['fwd_cpu_s'] * 1e3:8.2f} ms CPU  peak +{r['peak_extra_rss_mib']:.1f} MiB  (load {before:.2f})",
              flush=True)
    return rows


def doubling_fit(rows: list[dict], key: str, n_min: int = 8) -> dict | None:
    """Least squares of log2(time) on n over n >= n_min: time ~ c * 2^(slope * n); factor per qubit = 2^slope."""
    pts = [(r["n_qubits"], math.log2(r[key])) for r in rows if r["n_qubits"] >= n_min and r[key] > 0]
    if len(pts) < 2:
        return None
    mx, my = statistics.mean(p[0] for p in pts), statistics.mean(p[1] for p in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return {"over_n": [p[0] for p in pts], "log2_slope": slope, "factor_per_qubit": 2 ** slope}


# ----- plot ------------------------------------------------------------------------------------------------------
def plot(acc: dict, rows: list[dict], path: Path) -> Path:
    from lamina.plots import plt, save_figure

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, marker in (("quantum", "o"), ("classical", "s")):
        pts = sorted((v["n_qubits"], v["acc_mean"], v["acc_std"]) for k, v in acc["digits"].items()
                     if v.get("head_kind") == kind)
        a1.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker=marker, capsize=3,
                    label=f"{kind} ({'circuit' if kind == 'quantum' else 'tanh(Linear(n, n)) twin'})")
    lr = acc["digits"]["logistic regression (mlp depth=0, 64 pixels)"]
    a1.axhline(lr["acc_mean"], ls="--", color="gray", label=f"logistic regression, 64 px ({lr['acc_mean']:.3f})")
    a1.set_xlabel("qubits = width fed to the head (layers 1, 2, 3: equal parameter counts)")
    a1.set_ylabel("digits test accuracy (mean +- std over seeds)")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    ns = [r["n_qubits"] for r in rows]
    a2.semilogy(ns, [r["fwd_bwd_cpu_s"] * 1e3 for r in rows], "-o", label="circuit fwd+bwd (CPU ms)")
    a2.semilogy(ns, [r["fwd_cpu_s"] * 1e3 for r in rows], "-^", label="circuit fwd, no grad (CPU ms)")
    a2.semilogy(ns, [r["twin_fwd_bwd_cpu_s"] * 1e3 for r in rows], "-s", label="classical twin fwd+bwd (CPU ms)")
    a2.semilogy(ns, [max(r["peak_extra_rss_mib"], 1e-2) for r in rows], "--d", label="circuit peak extra RSS (MiB)")
    a2.set_xlabel(f"qubits (2 strongly entangling layers, batch {BATCH}, 1 thread)")
    a2.grid(alpha=0.3, which="both")
    a2.legend(fontsize=8)
    return save_figure(fig, path, "Hybrid quantum layer, classically simulated (PennyLane default.qubit), shared 2-core CPU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/quantum-bench")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="seeds of the headline pair (5 qubits, 2 layers)")
    ap.add_argument("--other-seeds", default="0,1,2", help="seeds of the other settings")
    ap.add_argument("--qubits", default="2,4,6,8,10,12,14,16")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--cost-one", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cost_one is not None:
        print(json.dumps(cost_one(a.cost_one)))
        return
    work, load0 = start_work(a.work)
    t_start, steps = time.perf_counter(), []
    acc = None
    if not a.skip_accuracy:
        acc = accuracy(work, [int(s) for s in a.seeds.split(",")], [int(s) for s in a.other_seeds.split(",")], steps)
        for data, rows in acc.items():
            print(f"\n{data}: test accuracy over seeds")
            print_table(["setting", "params", "acc mean", "std", "n", "train s"],
                        [[k, v["params"], v["acc_mean"], v["acc_std"], len(v["acc_values"]), v["train_s_mean"]]
                         for k, v in rows.items()])
    print("\nsimulation cost")
    rows = cost([int(q) for q in a.qubits.split(",")], steps)
    fits = {"fwd_bwd_cpu": doubling_fit(rows, "fwd_bwd_cpu_s"), "fwd_cpu": doubling_fit(rows, "fwd_cpu_s"),
            "peak_rss": doubling_fit([r for r in rows if r["peak_extra_rss_mib"] > 1], "peak_extra_rss_mib", 10)}
    print_table(["qubits", "params", "fwd+bwd CPU ms", "wall ms", "fwd CPU ms", "twin fwd+bwd CPU ms", "peak +MiB",
                 "state MiB"],
                [[r["n_qubits"], r["params"], r["fwd_bwd_cpu_s"] * 1e3, r["fwd_bwd_wall_s"] * 1e3, r["fwd_cpu_s"] * 1e3,
                  r["twin_fwd_bwd_cpu_s"] * 1e3, r["peak_extra_rss_mib"], r["state_mib"]] for r in rows])
    for k, f in fits.items():
        if f:
            print(f"{k}: x{f['factor_per_qubit']:.2f} per qubit over n = {f['over_n']}")
    load1 = loadavg1()
    payload = {"load_avg_1m_start": load0, "load_avg_1m_end": load1, "steps": steps,
               "wall_s": time.perf_counter() - t_start, "batch": BATCH, "cost": rows, "cost_fit": fits}
    if acc is not None:
        payload["accuracy"] = acc
        payload["plot"] = str(plot(acc, rows, RESULTS / "quantum.png").relative_to(ROOT))
    write_result("quantum", payload)
    print(f"load average (1 min): {load0:.2f} at start, {load1:.2f} at end; wall {payload['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
