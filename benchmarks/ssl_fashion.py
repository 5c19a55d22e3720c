"""Self-supervised learning on Fashion-MNIST (issue 16): SimCLR, BYOL and MAE encoders against a random encoder and
a supervised one (linear probe and k-NN on the 10,000 test images), label efficiency (fine-tuning with 1% and 10%
of the labels, SSL-initialised vs from scratch), and SimCLR in lamina against a hand-written loop built on
lightly's NTXentLoss + SimCLRProjectionHead (same encoder, views, optimizer, schedule, epochs, batch): time and
probe accuracy in one run.

All in one process so the comparisons share the machine. Every stage's result is written as soon as it ends
(partial JSON), a failing stage is recorded and the others still run. Load averages are recorded; on a CPU
machine a start above the core count is flagged.

    python benchmarks/ssl_fashion.py --work /tmp/ssl-bench [--epochs 30 --mae-epochs 40] [--smoke]
    # on a machine without the Debian package: --data-root <folder with the 4 IDX .gz files>
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, loadavg1, machine, print_table, start_work  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Bench:
    def __init__(self, a):
        self.a = a
        self.work, load0 = start_work(a.work)
        self.result = {"args": vars(a), "load_before": load0, "machine": machine(), "stages": {}}
        self.out = Path(a.json) if a.json else ROOT / "benchmarks" / "results" / ("ssl_fashion_smoke.json" if a.smoke
                                                                                  else "ssl_fashion.json")
        common = ["trainer.progress=false", "logging.tensorboard=false", "cost.energy=false",
                  f"logging.root={self.work / 'runs'}"]
        if a.data_root:
            common.append(f"data.root={a.data_root}")
        if a.smoke:  # a minute on a CPU: the script's plumbing, not its numbers
            common.append("data.train_fraction=0.05")
        self.common = common

    def cfg(self, config: str, extra: list[str]):
        from lamina.config import load_config

        return load_config(str(ROOT / config), [*self.common, *extra])

    def save(self):
        self.result["load_after"] = loadavg1()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.result, indent=2, default=str))

    def stage(self, name: str, fn):
        print(f"--- {name}", flush=True)
        l0, t0 = loadavg1(), time.perf_counter()
        try:
            res = fn()
            status = "ok"
        except Exception as e:  # noqa: BLE001 - one failed stage must not lose the others
            traceback.print_exc()
            res, status = {"error": f"{type(e).__name__}: {e}"}, "error"
        self.result["stages"][name] = {"status": status, "wall_s": time.perf_counter() - t0, "load_before": l0,
                                       "load_after": loadavg1(), **(res or {})}
        print(json.dumps({k: v for k, v in self.result["stages"][name].items() if k != "history"}, default=str)[:600],
              flush=True)
        self.save()
        return res


def probe_fresh(b: Bench, config: str) -> dict:
    """Linear probe / k-NN of the config's model freshly initialised (seeded): the floor."""
    from lamina.data import make_loader
    from lamina.data.transforms import eval_transforms
    from lamina.engine import seed_everything
    from lamina.engine.precision import select_device
    from lamina.runs.build import build_run_model, data_facts, load_data, task_class
    from lamina.runs.ssl import probe

    cfg = b.cfg(config, [])
    seed_everything(cfg.seed)
    bundle = load_data(cfg)
    model = build_run_model(cfg, data_facts(bundle, task_class(cfg, bundle)))
    dev = select_device(cfg.trainer.device)
    norm = eval_transforms(cfg.data.augment)
    return probe(model, make_loader(bundle.train, 1000, device=dev, transform=norm),
                 make_loader(bundle.test, 1000, device=dev, transform=norm), dev)


def supervised(b: Bench) -> dict:
    from lamina.runs import train
    from lamina.runs.ssl import probe_run

    r = train(b.cfg("configs/fashion_mnist.yaml", [f"trainer.max_epochs={b.a.sup_epochs}"]))
    p = probe_run(r.run_dir)
    return {"run_dir": str(r.run_dir), "test_acc": r.summary["test"].get("test/acc"),
            "train_time_s": r.summary["train_time_s"], "probe": p}


def pretrain_stage(b: Bench, config: str, epochs: int) -> dict:
    from lamina.runs.ssl import pretrain

    r = pretrain(b.cfg(config, [f"trainer.max_epochs={epochs}"]))
    r.pop("config", None)
    r["steps_per_s"] = r["steps"] / r["train_time_s"]
    return r


def finetune(b: Bench, config: str, source: str | None, frac: float, steps: int) -> dict:
    from lamina.runs import train

    extra = [f"data.train_fraction={frac}", f"trainer.max_steps={steps}", "trainer.max_epochs=100000"]
    if source:
        extra.append(f"model.pretrained={source}")
    r = train(b.cfg(config, extra))
    return {"test_acc": r.summary["test"].get("test/acc"), "best_val": r.summary["best_monitor"],
            "steps": r.summary["steps"], "train_time_s": r.summary["train_time_s"]}


def mlm_transfer(b: Bench) -> dict:
    """Masked-LM pretraining on Tiny Shakespeare (configs/shakespeare_bert_mlm.yaml), then speaker identification
    (configs/shakespeare_speakers_bert.yaml) fine-tuned from that run folder vs trained from scratch."""
    from lamina.runs import train

    text = [f"data.path={b.a.text_path}"] if b.a.text_path else []
    smoke = ["trainer.max_steps=5"] if b.a.smoke else []
    common = [c for c in b.common if not c.startswith(("data.root", "data.train_fraction"))]
    from lamina.config import load_config

    def cfg(config, extra):
        return load_config(str(ROOT / config), [*common, *text, *smoke, *extra])

    mlm = train(cfg("configs/shakespeare_bert_mlm.yaml", [f"trainer.max_epochs={b.a.mlm_epochs}"]))
    out = {"mlm": {"run_dir": str(mlm.run_dir), "epochs": mlm.summary["epochs"], "steps": mlm.summary["steps"],
                   "val_loss": mlm.summary["best_monitor"], "val_acc": mlm.summary["final"].get("val/acc"),
                   "train_time_s": mlm.summary["train_time_s"]}}
    for name, extra in (("scratch", []), ("from_mlm", [f"model.pretrained={mlm.run_dir}"])):
        r = train(cfg("configs/shakespeare_speakers_bert.yaml", extra))
        out[name] = {"test_acc": r.summary["test"].get("test/acc"), "best_val": r.summary["best_monitor"],
                     "epochs": r.summary["epochs"], "train_time_s": r.summary["train_time_s"]}
    return out


def hand_simclr(b: Bench, epochs: int, use_lightly: bool) -> dict:
    """SimCLR written as a user would without lamina: a plain loop over GPU-resident images; with lightly's loss
    and projection head when lightly imports (else the same two written in torch). Same encoder, views,
    optimizer, warmup-cosine schedule, batch and epochs as configs/ssl_simclr_fashion.yaml."""
    import torch.nn.functional as F

    from lamina.engine import seed_everything
    from lamina.engine.precision import select_device
    from lamina.models import create_model
    from lamina.models.contract import pooled_features
    from lamina.runs.build import load_data
    from lamina.runs.objectives.ssl import mlp_head, nt_xent, views
    from lamina.runs.ssl import probe
    from lamina.data import make_loader

    cfg = b.cfg("configs/ssl_simclr_fashion.yaml", [f"trainer.max_epochs={epochs}"])
    seed_everything(cfg.seed)
    dev = select_device(cfg.trainer.device)
    bundle = load_data(cfg)
    X = bundle.train.tensors["x"].to(dev)
    enc = create_model(cfg.model.name, num_classes=10, in_chans=1).to(dev)
    if cfg.trainer.channels_last:
        enc = enc.to(memory_format=torch.channels_last)
    if use_lightly:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        head = SimCLRProjectionHead(enc.num_features, cfg.ssl.proj_hidden, cfg.ssl.proj_dim).to(dev)
        crit = NTXentLoss(temperature=cfg.ssl.temperature)
        loss_fn = crit
    else:
        head = mlp_head(enc.num_features, cfg.ssl.proj_hidden, cfg.ssl.proj_dim).to(dev)
        loss_fn = lambda z1, z2: nt_xent(z1, z2, cfg.ssl.temperature)[0]  # noqa: E731
    params = [*enc.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    bs = cfg.data.batch_size
    spe = len(X) // bs
    total, warm = spe * epochs, cfg.schedule.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    view = views(cfg.ssl)
    g = torch.Generator().manual_seed(cfg.seed)
    sync()
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g).to(dev)
        for i in range(spe):
            x = X[perm[i * bs:(i + 1) * bs]]
            v = torch.cat([view({"x": x}, g)["x"], view({"x": x}, g)["x"]])
            if cfg.trainer.channels_last:
                v = v.contiguous(memory_format=torch.channels_last)
            z = head(pooled_features(enc, v))
            loss = loss_fn(*z.chunk(2))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    sync()
    secs = time.perf_counter() - t0
    from lamina.data.transforms import eval_transforms

    norm = eval_transforms(cfg.data.augment)
    p = probe(enc, make_loader(bundle.train, 1000, device=dev, transform=norm),
              make_loader(bundle.test, 1000, device=dev, transform=norm), dev)
    return {"library": "lightly" if use_lightly else "torch", "train_time_s": secs, "steps": total,
            "steps_per_s": total / secs, "final_loss": float(loss.detach()), "probe": p}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = result["stages"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    names, lin, knn = [], [], []
    for key, label in (("random_cnn", "random cnn"), ("simclr", "SimCLR"), ("byol", "BYOL"),
                       ("hand_simclr", "SimCLR (lightly loop)"), ("supervised", "supervised"),
                       ("random_vit", "random ViT"), ("mae", "MAE (ViT)")):
        s = st.get(key, {})
        p = s.get("probe", s if "linear_probe" in s else None)
        if s.get("status") == "ok" and p:
            names.append(label), lin.append(p["linear_probe"]), knn.append(p["knn"])
    x = range(len(names))
    ax1.bar([i - 0.2 for i in x], lin, 0.4, label="linear probe")
    ax1.bar([i + 0.2 for i in x], knn, 0.4, label="k-NN (k=20)")
    ax1.set_xticks(list(x), names, rotation=30, ha="right")
    ax1.set_ylim(0.5, 1.0)
    ax1.set_ylabel("test accuracy (frozen encoder)")
    ax1.legend()
    ax1.set_title("Fashion-MNIST: representation quality")
    le = st.get("label_efficiency", {}).get("runs", {})
    fracs = sorted({float(k.split("@")[1]) for k in le})
    inits = sorted({k.split("@")[0] for k in le}, key=lambda s: ("vit" in s, "scratch" not in s, s))
    w = 0.8 / max(1, len(inits))
    for j, init in enumerate(inits):
        ys = [le.get(f"{init}@{f}", {}).get("test_acc") or 0 for f in fracs]
        ax2.bar([i + (j - (len(inits) - 1) / 2) * w for i in range(len(fracs))], ys, w, label=init)
    ax2.set_xticks(range(len(fracs)), [f"{f:.0%} labels" for f in fracs])
    ax2.set_ylim(0.5, 1.05)
    ax2.set_ylabel("test accuracy (fine-tuned)")
    ax2.legend(fontsize=8, ncol=3, loc="upper left")
    ax2.set_title("label efficiency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/ssl-bench")
    ap.add_argument("--json", help="result path (default benchmarks/results/ssl_fashion.json)")
    ap.add_argument("--data-root", help="Fashion-MNIST folder (default: the Debian package's)")
    ap.add_argument("--epochs", type=int, default=30, help="SimCLR / BYOL / lightly-loop pretraining epochs")
    ap.add_argument("--mae-epochs", type=int, default=40)
    ap.add_argument("--sup-epochs", type=int, default=8, help="the supervised anchor (configs/fashion_mnist.yaml)")
    ap.add_argument("--finetune-steps", type=int, default=500, help="optimizer steps of each label-efficiency run")
    ap.add_argument("--mlm-epochs", type=int, default=4, help="masked-LM pretraining epochs (its config: 4)")
    ap.add_argument("--text-path", help="Tiny Shakespeare input.txt (default: ../shared/data/tinyshakespeare)")
    ap.add_argument("--fractions", default="0.01,0.1")
    ap.add_argument("--smoke", action="store_true", help="5%% of the data, 1 epoch each: checks the plumbing")
    ap.add_argument("--skip", default="", help="comma-separated stages to skip")
    a = ap.parse_args()
    if a.smoke:
        a.epochs, a.mae_epochs, a.sup_epochs, a.finetune_steps = 1, 1, 1, 20
    b = Bench(a)
    skip = set(filter(None, a.skip.split(",")))
    st = b.result["stages"]
    run = lambda name, fn: None if name in skip else b.stage(name, fn)  # noqa: E731

    run("random_cnn", lambda: probe_fresh(b, "configs/ssl_simclr_fashion.yaml"))
    run("random_vit", lambda: probe_fresh(b, "configs/ssl_mae_fashion.yaml"))
    run("supervised", lambda: supervised(b))
    run("simclr", lambda: pretrain_stage(b, "configs/ssl_simclr_fashion.yaml", a.epochs))
    run("byol", lambda: pretrain_stage(b, "configs/ssl_byol_fashion.yaml", a.epochs))
    run("mae", lambda: pretrain_stage(b, "configs/ssl_mae_fashion.yaml", a.mae_epochs))

    def lightly_ok() -> bool:
        try:
            import lightly.loss  # noqa: F401
            return True
        except Exception as e:  # noqa: BLE001 - lightly needs a torchvision that imports beside this torch
            print(f"lightly does not import here ({type(e).__name__}: {str(e)[:120]}); hand loop in torch")
            return False

    run("hand_simclr", lambda: hand_simclr(b, a.epochs, lightly_ok()))

    def label_efficiency() -> dict:
        runs = {}
        sources = [("cnn scratch", "configs/fashion_mnist.yaml", None),
                   ("cnn SimCLR", "configs/fashion_mnist.yaml", "simclr"),
                   ("cnn BYOL", "configs/fashion_mnist.yaml", "byol"),
                   ("vit scratch", "configs/fashion_mnist_vit.yaml", None),
                   ("vit MAE", "configs/fashion_mnist_vit.yaml", "mae")]
        for frac in [float(f) for f in a.fractions.split(",")]:
            for name, config, src in sources:
                if src and st.get(src, {}).get("status") != "ok":
                    continue
                key = f"{name}@{frac}"
                try:
                    runs[key] = finetune(b, config, st[src]["run_dir"] if src else None, frac, a.finetune_steps)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    runs[key] = {"error": f"{type(e).__name__}: {e}"}
                print(key, runs[key], flush=True)
                st["label_efficiency"] = {"status": "partial", "runs": runs}
                b.save()
        return {"runs": runs, "steps": a.finetune_steps}

    run("label_efficiency", label_efficiency)
    run("mlm_transfer", lambda: mlm_transfer(b))
    b.save()

    rows = []
    for key in ("random_cnn", "simclr", "byol", "hand_simclr", "supervised", "random_vit", "mae"):
        s = st.get(key, {})
        p = s.get("probe", s if "linear_probe" in s else {})
        rows.append([key, s.get("status"), p.get("linear_probe"), p.get("knn"), s.get("train_time_s"),
                     s.get("steps_per_s")])
    print_table(["encoder", "status", "linear probe", "k-NN", "train s", "steps/s"], rows)
    le = st.get("label_efficiency", {}).get("runs", {})
    print_table(["fine-tune", "test acc", "steps"], [[k, v.get("test_acc"), v.get("steps")] for k, v in le.items()])
    mt = st.get("mlm_transfer", {})
    if mt.get("status") == "ok":
        print(f"speaker identification test acc: scratch {mt['scratch']['test_acc']:.4f}, from the MLM run "
              f"{mt['from_mlm']['test_acc']:.4f}")
    if st.get("simclr", {}).get("status") == "ok" and st.get("hand_simclr", {}).get("status") == "ok":
        ratio = st["simclr"]["train_time_s"] / st["hand_simclr"]["train_time_s"]
        b.result["simclr_time_ratio_lamina_over_hand"] = ratio
        print(f"SimCLR training time, lamina / hand loop ({st['hand_simclr']['library']}): {ratio:.3f}")
    b.save()
    try:
        plot(b.result, b.out.with_suffix(".png"))
        print(f"wrote {b.out} and {b.out.with_suffix('.png')}")
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
