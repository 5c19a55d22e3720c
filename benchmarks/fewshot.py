"""Few-shot learning (issue 16): Omniglot and held-out Fashion-MNIST classes, prototypical networks against the
supervised-encoder baseline, a random encoder, and on Lake et al.'s 20 one-shot runs the Modified Hausdorff
Distance baseline of the Omniglot repository (computed here from its definition, Dubuisson & Jain 1994); then
the episodic loop's overhead against a hand-written prototypical-network loop.

    nice .venv/bin/python benchmarks/fewshot.py --work /tmp/fs-bench

Every lamina number comes from `lamina fewshot CONFIG ... --json` run as a user would; 600 test episodes, 15
queries per class, 95% intervals. Load averages before and after each step are recorded.
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

OMNI = ROOT / "configs" / "fewshot_omniglot.yaml"
FASHION = ["data.name=fashion_mnist", "fewshot.train_classes=[0,1,2,3,4]", "fewshot.train_ways=5",
           "data.batch_size=128"]


def jobs() -> list[tuple[str, list[str]]]:
    j = []
    for shots in (1, 5):
        j.append((f"omniglot protonet {shots}-shot", [str(OMNI), f"fewshot.shots={shots}"]))
        j.append((f"omniglot baseline {shots}-shot", [str(OMNI), f"fewshot.shots={shots}", "fewshot.method=baseline",
                                                      "trainer.max_epochs=30"]))
        j.append((f"fashion protonet {shots}-shot", [str(OMNI), *FASHION, f"fewshot.shots={shots}",
                                                     "fewshot.episodes=3000"]))
        j.append((f"fashion baseline {shots}-shot", [str(OMNI), *FASHION, f"fewshot.shots={shots}",
                                                     "fewshot.method=baseline", "trainer.max_epochs=3"]))
    return j


def mhd_error() -> dict:
    """Modified Hausdorff distance nearest neighbour on the 20 runs at full 105 px resolution (stroke pixels as
    point sets): the baseline the Omniglot repository ships for this task."""
    from lamina.data.omniglot import load_one_shot_runs

    def points(img):
        return torch.nonzero(img[0] > 0.5).float()

    def mhd(a, b):
        d = torch.cdist(a, b)
        return max(float(d.min(1).values.mean()), float(d.min(0).values.mean()))

    wrong = total = 0
    for r in load_one_shot_runs(size=105):
        sup = [points(s) for s in r.support]
        for q, ans in zip(r.query, r.answer):
            pq = points(q)
            pred = min(range(len(sup)), key=lambda i: mhd(pq, sup[i]))
            wrong += int(pred != int(ans))
            total += 1
    return {"error": wrong / total, "trials": total}


def random_encoder(shots: int) -> dict:
    """An untrained Conv-4 with the prototype rule on the Omniglot test episodes: what training adds."""
    from lamina.config import load_config
    from lamina.data.episodes import EpisodeSampler
    from lamina.runs.fewshot import _encoder, fewshot_split, one_shot_runs
    from lamina.runs.objectives.fewshot import evaluate_episodes

    cfg = load_config(str(OMNI), [f"fewshot.shots={shots}"])
    torch.manual_seed(0)
    d = fewshot_split(cfg)
    model = _encoder(cfg, d["input_shape"], 136)
    s = EpisodeSampler(d["test"], 5, shots, 15, 600, seed=cfg.seed + 1)
    r = evaluate_episodes(model, s)
    return {"acc": r["acc"], "ci95": r["ci95"], "one_shot_runs_error": one_shot_runs(model, d["runs"], "cpu")["error"]}


def overhead(repeats: int, episodes: int) -> dict:
    """lamina's episodic Trainer loop vs a hand-written prototypical-network loop: same encoder, Adam, episodes."""
    from lamina.config import load_config
    from lamina.data.episodes import EpisodeSampler
    from lamina.engine import Trainer
    from lamina.runs.fewshot import _encoder, fewshot_split
    from lamina.runs.objectives.fewshot import ProtoNetTask

    cfg = load_config(str(OMNI), ["trainer.progress=false", "schedule.name=constant"])
    d = fewshot_split(cfg)
    lam, hand = [], []
    for r in range(repeats):
        torch.manual_seed(r)
        model = _encoder(cfg, d["input_shape"], 136)
        s = EpisodeSampler(d["train"], 20, 1, 5, episodes, seed=r)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        tr = Trainer(cfg.trainer.model_copy(update={"max_epochs": 1, "log_every": 10**6}))
        t0 = time.perf_counter()
        tr.fit(model, ProtoNetTask(), s, None, opt, None)
        lam.append(time.perf_counter() - t0)
        torch.manual_seed(r)
        model = _encoder(cfg, d["input_shape"], 136)
        s = EpisodeSampler(d["train"], 20, 1, 5, episodes, seed=r)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        t0 = time.perf_counter()
        model.train()
        for b in s:  # what a user writes
            z = model.forward_head(model.forward_features(b["x"]), pre_logits=True)
            protos = z[:20].reshape(20, 1, -1).mean(1)
            loss = F.cross_entropy(-torch.cdist(z[20:], protos).pow(2), b["y"][20:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        hand.append(time.perf_counter() - t0)
    return {"episodes": episodes, "lamina_s": lam, "hand_s": hand,
            "ratio": statistics.median(lam) / statistics.median(hand)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/lamina-fs-bench")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    work, load0 = start_work(a.work)
    steps, results = [], {}
    for name, args in jobs():
        out = work / (name.replace(" ", "-") + ".json")
        step_file = out.with_suffix(".step.json")
        if not out.is_file():
            log = work / (name.replace(" ", "-") + ".log")
            mine: list[dict] = []
            cli_step(name, ["fewshot", *args, "trainer.progress=false", "logging.tensorboard=false",
                            f"logging.root={work / 'runs'}", "--json"], log, mine)
            out.write_text(log.read_text().strip().splitlines()[-1])
            step_file.write_text(json.dumps(mine[0]))
        if step_file.is_file():  # a finished job read again keeps the wall time and loads it ran with
            steps.append(json.loads(step_file.read_text()))
        results[name] = json.loads(out.read_text())
    rows = []
    for name, r in results.items():
        for h, m in r["heads"].items():
            o = r.get("one_shot_runs")
            rows.append([name, h, f"{m['acc'] * 100:.2f} +- {m['ci95'] * 100:.2f}",
                         f"{o['error'] * 100:.1f}%" if o else "-", f"{r['train_time_s']:.0f}"])
    l0 = loadavg1()
    extra = {"mhd_one_shot_runs": mhd_error(), "random_encoder": {s: random_encoder(s) for s in (1, 5)}}
    extra["load"] = [l0, loadavg1()]
    for s, r in extra["random_encoder"].items():
        rows.append([f"omniglot random encoder {s}-shot", "centroid", f"{r['acc'] * 100:.2f} +- {r['ci95'] * 100:.2f}",
                     f"{r['one_shot_runs_error'] * 100:.1f}%", "0"])
    rows.append(["Modified Hausdorff distance (1-NN, 105 px)", "-", "-",
                 f"{extra['mhd_one_shot_runs']['error'] * 100:.1f}%", "0"])
    print_table(["job", "head", "5-way acc % (95% CI, 600 episodes)", "20-way 1-shot runs error", "train s"], rows)
    l1 = loadavg1()
    ov = overhead(a.repeats, 300)
    ov["load"] = [l1, loadavg1()]
    print(f"overhead: lamina {statistics.median(ov['lamina_s']):.2f}s vs hand-written "
          f"{statistics.median(ov['hand_s']):.2f}s for {ov['episodes']} episodes: {ov['ratio']:.3f}x")
    write_result("fewshot", {"results": {k: {kk: vv for kk, vv in v.items() if kk != "history"}
                                         for k, v in results.items()},
                             **extra, "overhead": ov, "steps": steps, "load_before": load0,
                             "load_after": loadavg1()})


if __name__ == "__main__":
    main()
