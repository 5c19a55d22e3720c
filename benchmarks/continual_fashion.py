"""Continual learning on Fashion-MNIST (issue 16): Split (class- and task-incremental) and Permuted (domain) streams,
naive / replay / EWC / LwF against joint training, over seeds; and the loop's overhead against a hand-written
PyTorch loop of the same algorithms.

Part 1 drives the CLI as a user would, once per stream and seed:

    lamina continual configs/continual_fashion.yaml [continual.scenario=task | continual.stream=permuted
        continual.scenario=domain] seed=S --strategies naive,replay,ewc,lwf,joint --out WORK/... --json

and reports ACC and BWT as mean +- std over the seeds. Part 2 runs, in this process and interleaved, lamina's
stream loop (runs.continual.train_stream) and a plain loop written here without lamina (same MLP, Adam, batch,
shuffling, reservoir buffer, per-sample Fisher), for naive, replay and EWC on Split class-incremental, 1 epoch
per experience; it compares training + strategy time (evaluation excluded on both sides). Load averages are
recorded; a start above the core count is flagged.

    nice .venv/bin/python benchmarks/continual_fashion.py --work /tmp/cl-bench [--seeds 0,1,2] [--skip-quality]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, cli_step, loadavg1, print_table, start_work, write_result  # noqa: E402

CONFIG = ROOT / "configs" / "continual_fashion.yaml"
STREAMS = {"split-class": [], "split-task": ["continual.scenario=task"],
           "permuted-domain": ["continual.stream=permuted", "continual.scenario=domain"]}
STRATS = ["naive", "replay", "ewc", "lwf", "joint"]


def quality(work: Path, seeds: list[int], permuted_seeds: list[int], steps: list[dict]) -> dict:
    out = {}
    for stream, extra in STREAMS.items():
        per_seed = []
        for seed in (permuted_seeds if stream.startswith("permuted") else seeds):
            d = work / f"{stream}-s{seed}"
            if not (d / "comparison.json").is_file():
                cli_step(f"continual {stream} seed {seed}",
                         ["continual", str(CONFIG), *extra, f"seed={seed}", "trainer.progress=false",
                          "logging.tensorboard=false", f"logging.root={work / 'runs'}", "--strategies",
                          ",".join(STRATS), "--out", str(d)], work / f"{stream}-s{seed}.log", steps)
            per_seed.append(json.loads((d / "comparison.json").read_text()))
        agg = {}
        for s in STRATS:
            accs = [r["strategies"][s]["acc"] for r in per_seed]
            row = {"acc_values": accs, "acc_mean": statistics.mean(accs),
                   "acc_std": statistics.stdev(accs) if len(accs) > 1 else None,
                   "train_s_mean": statistics.mean(r["strategies"][s]["train_time_s"] for r in per_seed)}
            if s != "joint":
                bwts = [r["strategies"][s]["bwt"] for r in per_seed]
                row.update(bwt_values=bwts, bwt_mean=statistics.mean(bwts),
                           bwt_std=statistics.stdev(bwts) if len(bwts) > 1 else None)
            agg[s] = row
        out[stream] = {"seeds": [r["seed"] for r in per_seed], "strategies": agg,
                       "matrix_seed0": {s: per_seed[0]["strategies"][s]["matrix"] for s in STRATS},
                       "plot": str(work / f"{stream}-s{per_seed[0]['seed']}" / "comparison.png")}
        print(f"\n{stream} (seeds {out[stream]['seeds']})")
        print_table(["strategy", "ACC mean", "std", "BWT mean", "std", "train s"],
                    [[s, f"{r['acc_mean']:.4f}", f"{r['acc_std']:.4f}" if r["acc_std"] is not None else "-",
                      f"{r['bwt_mean']:+.4f}" if "bwt_mean" in r else "-",
                      f"{r['bwt_std']:.4f}" if r.get("bwt_std") is not None else "-", f"{r['train_s_mean']:.1f}"]
                     for s, r in agg.items()])
    return out


# ----- part 2: a hand-written loop of the same algorithms -----------------------------------------------------
def hand_loop(strategy: str, exps, model, batch: int, lr: float, epochs: int, buffer_size: int, ewc_lambda: float,
              ewc_samples: int, seed: int) -> float:
    """What a user would write without lamina; returns training + strategy seconds (no evaluation)."""
    from torch.func import functional_call, grad, vmap

    t = 0.0
    g = torch.Generator().manual_seed(seed)
    buf_x = buf_y = None
    seen = 0
    anchors = []  # EWC: (fisher, theta*) per past experience
    for k, (x, y) in enumerate(exps):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        t0 = time.perf_counter()
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for s in range(0, len(x), batch):
                idx = perm[s:s + batch]
                xb, yb = x[idx], y[idx]
                if strategy == "replay" and seen:
                    r = torch.randint(min(seen, buffer_size), (batch,), generator=g)
                    xb, yb = torch.cat([xb, buf_x[r]]), torch.cat([yb, buf_y[r]])
                loss = F.cross_entropy(model(xb), yb)
                for fisher, star in anchors:
                    loss = loss + ewc_lambda / 2 * sum((fisher[n] * (p - star[n]).pow(2)).sum()
                                                       for n, p in model.named_parameters())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        if k + 1 < len(exps):
            if strategy == "replay":
                if buf_x is None:
                    buf_x, buf_y = torch.empty((buffer_size, *x.shape[1:])), torch.empty(buffer_size, dtype=y.dtype)
                for i in range(len(x)):  # Algorithm R, one sample at a time
                    j = seen if seen < buffer_size else int(torch.randint(seen + 1, (1,), generator=g))
                    if j < buffer_size:
                        buf_x[j], buf_y[j] = x[i], y[i]
                    seen += 1
            elif strategy == "ewc":
                model.eval()
                params = {n: p.detach() for n, p in model.named_parameters()}
                pick = torch.randperm(len(x), generator=g)[:ewc_samples]

                def nll(p, xi, yi):
                    return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

                grads = vmap(grad(nll), in_dims=(None, 0, 0))(params, x[pick], y[pick])
                anchors.append(({n: gr.pow(2).mean(0) for n, gr in grads.items()},
                                {n: p.clone() for n, p in params.items()}))
        t += time.perf_counter() - t0
    return t


def overhead(repeats: int) -> dict:
    from lamina.config import load_config
    from lamina.data import load_dataset
    from lamina.data.streams import split_stream
    from lamina.models import create_model
    from lamina.runs.continual import train_stream

    cfg = load_config(str(CONFIG), ["trainer.max_epochs=1", "trainer.progress=false", "logging.tensorboard=false",
                                    "logging.plots=false", "logging.root=/tmp/lamina-cl-overhead"])
    c = cfg.continual
    b = load_dataset("fashion_mnist", seed=cfg.seed)
    exps = [(e.train.x, e.train.y) for e in split_stream(b.train, b.val, b.test, 10, c.experiences)]
    rows, raw = [], {}
    for strategy in ("naive", "replay", "ewc"):
        lam, hand = [], []
        for r in range(repeats):  # interleaved, so drifts in machine load hit both alike
            res = train_stream(cfg, strategy)
            lam.append(sum(t["train_s"] + t["strategy_s"] for t in res["timings"]))
            torch.manual_seed(cfg.seed)
            model = create_model("mlp", in_features=784, num_classes=10, depth=2, width=400, dropout=0.0)
            hand.append(hand_loop(strategy, exps, model, cfg.data.batch_size, cfg.optimizer.lr, 1, c.buffer_size,
                                  c.ewc_lambda, c.ewc_samples, r))
        ml, mh = statistics.median(lam), statistics.median(hand)
        raw[strategy] = {"lamina_s": lam, "hand_s": hand, "ratio": ml / mh}
        rows.append([strategy, f"{mh:.2f}", f"{ml:.2f}", f"{ml / mh:.3f}"])
    print("\noverhead: Split Fashion-MNIST, class-incremental, 1 epoch per experience, training + strategy time")
    print_table(["strategy", "hand-written loop s", "lamina s", "x hand"], rows)
    return raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/lamina-cl-bench")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--permuted-seeds", default="0")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    a = ap.parse_args()
    work, load0 = start_work(a.work)
    steps: list[dict] = []
    result = {"config": str(CONFIG.relative_to(ROOT)), "load_before": load0}
    if not a.skip_quality:
        result["quality"] = quality(work, [int(s) for s in a.seeds.split(",")],
                                    [int(s) for s in a.permuted_seeds.split(",")], steps)
    if not a.skip_overhead:
        l0 = loadavg1()
        result["overhead"] = overhead(a.repeats)
        result["overhead_load"] = [l0, loadavg1()]
    result["steps"] = steps
    result["load_after"] = loadavg1()
    write_result("continual_fashion", result)


if __name__ == "__main__":
    main()
