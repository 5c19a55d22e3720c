"""Federated learning on Fashion-MNIST (issue 16): FedAvg on IID and Dirichlet (alpha 0.1) client splits, FedProx on
the Dirichlet split, against centralised training on the same data and local epochs, over seeds; a run with client
sampling and random dropouts; Flower's real gRPC engine with client processes; and the Flower loop's overhead over
a hand-written PyTorch FedAvg loop of the same algorithm.

Part 1 drives the CLI as a user would, once per seed:

    lamina federated configs/federated_fashion.yaml seed=S
        --compare fedavg-iid,fedavg-dirichlet,fedprox-dirichlet,central --out WORK/cmp-sS --json

and reports the final-round test accuracy as mean +- std over seeds, and the non-IID penalty (FedAvg IID minus FedAvg
Dirichlet, per seed). Part 2: fedavg-iid with half the clients sampled per round and each sampled client dropping
out mid-fit with probability 0.1. Part 3: the gRPC engine (Flower's start_server + one process per client), 4
clients, 3 rounds, one client process exiting mid-fit. Part 3b: FedProx's mu swept, and FedAvg vs FedProx at 3
local epochs (seed 0). Part 4 runs, in this process and interleaved, lamina's loop (runs.federated.run_federated:
Flower's Server, strategy and client manager, lamina's Trainer on each client, central test and an atomic
checkpoint after every round) and a plain loop written here without lamina or Flower (the same MLP init,
partitions, Adam, batch size, rounds, central test per round); both times include the per-round test. Load
averages are recorded; a start above the core count is flagged.

    nice .venv/bin/python benchmarks/federated_fashion.py --work /tmp/fl-bench [--seeds 0,1,2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, cli_step, loadavg1, print_table, start_work, write_result  # noqa: E402

CONFIG = ROOT / "configs" / "federated_fashion.yaml"
SETTINGS = ["fedavg-iid", "fedavg-dirichlet", "fedprox-dirichlet", "central"]
# one torch thread everywhere: on this shared 2-core machine two OpenMP threads per process stall whenever other
# jobs hold the cores (a probe saw 80 MLP steps take 32 s at 2 threads and 0.14 s at 1), which would swamp the
# comparison; the MLP gains little from a second thread anyway
QUIET = ["trainer.progress=false", "logging.tensorboard=false", "trainer.threads=1"]


def _std(xs):
    return statistics.stdev(xs) if len(xs) > 1 else None


def quality(work: Path, seeds: list[int], steps: list[dict]) -> dict:
    per_seed = []
    for seed in seeds:
        d = work / f"cmp-s{seed}"
        if not (d / "comparison.json").is_file():
            cli_step(f"federated compare seed {seed}",
                     ["federated", str(CONFIG), f"seed={seed}", *QUIET, f"logging.root={work / 'runs'}",
                      "--compare", ",".join(SETTINGS), "--out", str(d), "--json"], work / f"cmp-s{seed}.log", steps)
        per_seed.append(json.loads((d / "comparison.json").read_text()))
    agg = {}
    for s in SETTINGS:
        accs = [r["settings"][s]["final_acc"] for r in per_seed]
        # the last 5 rounds' mean: non-IID curves swing by ~0.01 from round to round, one round is a noisy reading
        last5 = [statistics.mean(r["settings"][s]["acc_per_round"][-5:]) for r in per_seed]
        agg[s] = {"final_acc_values": accs, "final_acc_mean": statistics.mean(accs), "final_acc_std": _std(accs),
                  "last5_mean_values": last5, "last5_mean": statistics.mean(last5), "last5_std": _std(last5),
                  "label_skew_mean": statistics.mean(r["settings"][s]["label_skew"] for r in per_seed),
                  "loop_s_mean": statistics.mean(r["settings"][s]["loop_s"] for r in per_seed),
                  "acc_per_round_seed0": per_seed[0]["settings"][s]["acc_per_round"]}
    pen = [r["non_iid_penalty"]["fedavg"] for r in per_seed]
    pen5 = [a - b for a, b in zip(agg["fedavg-iid"]["last5_mean_values"], agg["fedavg-dirichlet"]["last5_mean_values"])]
    prox_gain = [r["settings"]["fedprox-dirichlet"]["final_acc"] - r["settings"]["fedavg-dirichlet"]["final_acc"]
                 for r in per_seed]
    out = {"seeds": seeds, "settings": agg,
           "non_iid_penalty_fedavg": {"values": pen, "mean": statistics.mean(pen), "std": _std(pen)},
           "non_iid_penalty_fedavg_last5": {"values": pen5, "mean": statistics.mean(pen5), "std": _std(pen5)},
           "fedprox_minus_fedavg_dirichlet": {"values": prox_gain, "mean": statistics.mean(prox_gain),
                                              "std": _std(prox_gain)},
           "plot": str(work / f"cmp-s{seeds[0]}" / "comparison.png"), "rounds": per_seed[0]["rounds"],
           "clients": per_seed[0]["clients"], "alpha": per_seed[0]["alpha"], "mu": per_seed[0]["mu"]}
    print(f"\nFashion-MNIST, {out['clients']} clients, {out['rounds']} rounds, 1 local epoch, seeds {seeds}")
    print_table(["setting", "final acc mean", "std", "last-5 mean", "std", "label skew", "loop s"],
                [[s, f"{r['final_acc_mean']:.4f}", f"{r['final_acc_std']:.4f}" if r["final_acc_std"] else "-",
                  f"{r['last5_mean']:.4f}", f"{r['last5_std']:.4f}" if r["last5_std"] else "-",
                  f"{r['label_skew_mean']:.3f}", f"{r['loop_s_mean']:.1f}"] for s, r in agg.items()])
    print(f"non-IID penalty (FedAvg IID - Dirichlet alpha {out['alpha']}): {out['non_iid_penalty_fedavg']['mean']:+.4f}"
          f"  per seed {[round(p, 4) for p in pen]}; on the last-5-round means {statistics.mean(pen5):+.4f}")
    return out


def sampled(work: Path, steps: list[dict]) -> dict:
    d = work / "sampled"
    f = d / "federated.json"
    if not f.is_file():
        cli_step("federated fedavg-iid fraction 0.5 dropout 0.1",
                 ["federated", str(CONFIG), *QUIET, f"logging.root={work / 'runs'}", "federated.fraction_fit=0.5",
                  "federated.dropout_prob=0.1", "--out", str(d), "--json"], work / "sampled.log", steps)
    r = json.loads(f.read_text())
    rows = r["rounds"][1:]
    out = {"final_acc": r["rounds"][-1]["test/acc"], "failures": r["failures"],
           "sampled_per_round": [len(x["sampled"]) for x in rows], "failed_per_round": [x["failed"] for x in rows],
           "loop_s": r["loop_s"]}
    print(f"\nfedavg-iid, 5 of 10 clients per round, dropout probability 0.1: final acc {out['final_acc']:.4f}, "
          f"{out['failures']} dropouts over {len(rows)} rounds")
    return out


def grpc(work: Path, steps: list[dict]) -> dict:
    d = work / "grpc"
    f = d / "federated.json"
    if not f.is_file():
        cli_step("federated processes engine", ["federated", str(CONFIG), *QUIET, f"logging.root={work / 'runs'}",
                                                "federated.engine=processes", "federated.clients=4",
                                                "federated.rounds=3", "federated.dropout_client=2",
                                                "federated.dropout_round=2", "--out", str(d), "--json"],
                 work / "grpc.log", steps)
    r = json.loads(f.read_text())
    out = {"final_acc": r["rounds"][-1]["test/acc"], "rounds": [{k: x.get(k) for k in ("round", "test/acc", "trained",
                                                                                         "failed", "round_s")}
                                                                for x in r["rounds"]],
           "client_exitcodes": r.get("client_exitcodes"), "loop_s": r["loop_s"]}
    print(f"\ngRPC engine, 4 client processes, 3 rounds, client 2 exits in round 2: final acc {out['final_acc']:.4f}, "
          f"exit codes {out['client_exitcodes']}, loop {out['loop_s']:.1f}s")
    return out


def prox(work: Path, seeds: list[int], steps: list[dict]) -> dict:
    """FedProx against FedAvg on the Dirichlet split: mu 0.01 on every seed, mu 1.0 on the first (mu 0.1 is part 1's),
    at 1 local epoch; and both at 3 local epochs, first seed (more local work, more client drift: where the
    proximal term is meant to help)."""
    out = {"mu_sweep": {}, "local_epochs_3": {}}
    for mu, mu_seeds in ((0.01, seeds), (1.0, seeds[:1])):
        runs = []
        for seed in mu_seeds:
            d = work / (f"prox-mu{mu}" if seed == seeds[0] else f"prox-mu{mu}-s{seed}")
            if not (d / "federated.json").is_file():
                cli_step(f"federated fedprox-dirichlet mu {mu} seed {seed}",
                         ["federated", str(CONFIG), *QUIET, f"logging.root={work / 'runs'}", f"seed={seed}",
                          "federated.strategy=fedprox", "federated.split=dirichlet", f"federated.mu={mu}", "--out",
                          str(d), "--json"], work / f"{d.name}.log", steps)
            accs = [x["test/acc"] for x in json.loads((d / "federated.json").read_text())["rounds"]]
            runs.append({"seed": seed, "final_acc": accs[-1], "last5_mean": statistics.mean(accs[-5:])})
        out["mu_sweep"][str(mu)] = {"runs": runs, "final_acc_mean": statistics.mean(r["final_acc"] for r in runs),
                                    "last5_mean": statistics.mean(r["last5_mean"] for r in runs)}
    d = work / "local3"
    if not (d / "comparison.json").is_file():
        cli_step("federated local_epochs 3", ["federated", str(CONFIG), *QUIET, f"logging.root={work / 'runs'}",
                                              f"seed={seeds[0]}", "federated.local_epochs=3", "--compare",
                                              "fedavg-dirichlet,fedprox-dirichlet", "--out", str(d), "--json"],
                 work / "local3.log", steps)
    c = json.loads((d / "comparison.json").read_text())
    out["local_epochs_3"] = {n: {"final_acc": v["final_acc"], "last5_mean": statistics.mean(v["acc_per_round"][-5:])}
                             for n, v in c["settings"].items()}
    print("\nFedProx on Dirichlet alpha 0.1, 1 local epoch: "
          + ", ".join(f"mu {m}: final {v['final_acc_mean']:.4f}, last-5 {v['last5_mean']:.4f} "
                      f"(seeds {[r['seed'] for r in v['runs']]})" for m, v in out["mu_sweep"].items()))
    print("3 local epochs, seed 0: " + ", ".join(f"{n}: final {v['final_acc']:.4f}, last-5 {v['last5_mean']:.4f}"
                                                 for n, v in out["local_epochs_3"].items()))
    return out


# ----- part 4: a hand-written FedAvg loop ---------------------------------------------------------------------
def hand_fedavg(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, parts: list[torch.Tensor],
                xt: torch.Tensor, yt: torch.Tensor, rounds: int, batch: int, lr: float,
                seed: int) -> tuple[float, float]:
    """FedAvg as one writes it in plain PyTorch: every client trains a copy of the global model for one epoch with
    a fresh Adam, the server averages the state dicts weighted by sample count, then tests. (seconds, final acc)"""
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    acc = 0.0
    for _ in range(rounds):
        states, sizes = [], []
        for idx in parts:
            local = copy.deepcopy(model)
            local.train()
            opt = torch.optim.Adam(local.parameters(), lr=lr)
            xc, yc = x[idx], y[idx]
            perm = torch.randperm(len(xc), generator=g)
            for s in range(0, len(xc), batch):
                b = perm[s:s + batch]
                loss = F.cross_entropy(local(xc[b]), yc[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            states.append(local.state_dict())
            sizes.append(len(idx))
        n = sum(sizes)
        model.load_state_dict({k: sum(st[k] * (m / n) for st, m in zip(states, sizes)) for k in states[0]})
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(xt[s:s + 2000]).argmax(1) == yt[s:s + 2000]).sum())
                          for s in range(0, len(xt), 2000))
        acc = correct / len(xt)
    return time.perf_counter() - t0, acc


def overhead(repeats: int, rounds: int) -> dict:
    from lamina.config import load_config
    from lamina.runs.build import build_run_model
    from lamina.runs.federated import make_setup, run_federated

    cfg = load_config(str(CONFIG), [*QUIET, "logging.plots=false", "logging.root=/tmp/lamina-fl-overhead",
                                    f"federated.rounds={rounds}", "federated.fraction_fit=1.0"])
    torch.set_num_threads(1)  # the hand-written loop too (lamina's Trainer sets it from trainer.threads=1)
    s = make_setup(cfg)
    init = build_run_model(cfg, s.facts)  # the same init run_federated starts from (same seeded state)
    x, y = s.bundle.train.x, s.bundle.train.y
    xt, yt = s.bundle.test.x, s.bundle.test.y
    lam, hand, accs = [], [], {"lamina": [], "hand": []}
    for r in range(repeats):  # interleaved, so drifts in machine load hit both alike
        l0 = time.perf_counter()
        res = run_federated(cfg)
        lam.append(res["loop_s"])
        accs["lamina"].append(res["final_acc"])
        t, acc = hand_fedavg(copy.deepcopy(init), x, y, s.parts, xt, yt, rounds, cfg.data.batch_size,
                             cfg.optimizer.lr, cfg.seed + r)
        hand.append(t)
        accs["hand"].append(acc)
        print(f"  repeat {r}: lamina {lam[-1]:.1f}s (acc {res['final_acc']:.4f}, "
              f"wall {time.perf_counter() - l0:.1f}s), "
              f"hand-written {t:.1f}s (acc {acc:.4f})")
    ml, mh = statistics.median(lam), statistics.median(hand)
    print(f"\noverhead: FedAvg IID, {cfg.federated.clients} clients, {rounds} rounds, 1 local epoch, test every round")
    print_table(["loop", "median s", "final acc"],
                [["hand-written PyTorch", f"{mh:.2f}", f"{statistics.mean(accs['hand']):.4f}"],
                 ["lamina (Flower)", f"{ml:.2f}", f"{statistics.mean(accs['lamina']):.4f}"]])
    # the fastest repeat of each: what the loops cost when no other job interrupts them (timeit's rule); the
    # medians swing with the shared machine's load
    print(f"ratio lamina / hand-written: {ml / mh:.3f} (medians), {min(lam) / min(hand):.3f} (fastest repeats)")
    return {"rounds": rounds, "clients": cfg.federated.clients, "lamina_s": lam, "hand_s": hand, "ratio": ml / mh,
            "ratio_min": min(lam) / min(hand),
            "acc": accs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/lamina-fl-bench")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--overhead-rounds", type=int, default=10)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: quality,sampled,grpc,prox,overhead")
    a = ap.parse_args()
    skip = set(a.skip.split(","))
    work, load0 = start_work(a.work)
    # parts already in the work folder are read back, not rerun: their steps (times, loads) and earlier overhead
    # measurements are kept there so the result always carries all of them
    log = work / "steps.json"
    kept = json.loads(log.read_text()) if log.is_file() else {"steps": [], "overhead_runs": []}
    steps: list[dict] = kept["steps"]
    result = {"config": str(CONFIG.relative_to(ROOT)), "load_before": load0, "torch_threads": 1,
              "note": "the machine is shared: times include other jobs when a step's load_before exceeds the cores"}
    if "quality" not in skip:
        result["quality"] = quality(work, [int(s) for s in a.seeds.split(",")], steps)
    if "sampled" not in skip:
        result["sampled"] = sampled(work, steps)
    if "grpc" not in skip:
        result["grpc"] = grpc(work, steps)
    if "prox" not in skip:
        result["prox"] = prox(work, [int(s) for s in a.seeds.split(",")], steps)
    if "overhead" not in skip:
        l0 = loadavg1()
        result["overhead"] = overhead(a.repeats, a.overhead_rounds)
        result["overhead_load"] = [l0, loadavg1()]
        o = result["overhead"]
        kept["overhead_runs"].append({"ratio": o["ratio"], "ratio_min": o["ratio_min"], "lamina_s": o["lamina_s"],
                                      "hand_s": result["overhead"]["hand_s"], "load": result["overhead_load"]})
        result["overhead_runs"] = kept["overhead_runs"]
        for r in kept["overhead_runs"]:
            r.setdefault("ratio_min", min(r["lamina_s"]) / min(r["hand_s"]))
        print(f"overhead ratio over {len(kept['overhead_runs'])} run(s) of this script: medians "
              + ", ".join(f"{r['ratio']:.3f}" for r in kept["overhead_runs"]) + "; fastest repeats "
              + ", ".join(f"{r['ratio_min']:.3f}" for r in kept["overhead_runs"]))
    log.write_text(json.dumps(kept, indent=2))
    result["steps"] = steps
    result["load_after"] = loadavg1()
    out = write_result("federated_fashion", result)
    if "quality" in result:  # the seed-0 comparison figure next to the JSON
        import shutil

        png = Path(result["quality"]["plot"])
        if png.is_file():
            shutil.copyfile(png, out.with_suffix(".png"))
            print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
