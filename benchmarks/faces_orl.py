"""Face recognition on the ORL database (issue 17): identification (5 images of each of the 40 people train, the
other 5 test) and verification on people never seen in training (10 of 40 held out), ArcFace vs CosFace vs
softmax vs batch-hard triplets, against eigenfaces and raw pixels on the same splits, and the published results.

    python benchmarks/faces_orl.py --work /tmp/faces [--seeds 0,1,2] [--epochs 60] [KEY=VALUE ...]

Every lamina number is `lamina train configs/orl_faces_arcface.yaml` (identification) or
`configs/orl_faces_verify.yaml` (verification) run in this process with task.loss and seed changed; the seed
also draws the split (which 5 images train, which 10 people are held out), so each seed is a different split,
as in Lawrence et al. (1997), whose numbers are averages over random 5/5 splits.
* identification: gallery_top1 (templates enrolled from the 5 training images of each person, nearest one)
  is the number comparable across losses (a triplet model has no trained class head); top1 uses the head.
* baselines on identical splits: eigenfaces (PCA on the training pixels, as many components as training images
  allow up to 100, whitened; 1-nearest neighbour by cosine) and raw pixels (1-NN, cosine).
* verification: every pair of the held-out people's 100 images (450 genuine, 4,500 impostor); ROC AUC, EER,
  TAR at FAR 1% and 0.1%; eigenfaces fitted on the training people's images.
Writes benchmarks/results/faces_orl.json and faces_orl_roc.png (ROC curves of the first verification split).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, RESULTS, loadavg1, print_table, start_work, write_result  # noqa: E402

PUBLISHED = {"Lawrence et al. 1997, SOM + CNN (5/5 random splits)": 0.962,
             "Lawrence et al. 1997, eigenfaces": 0.895,
             "Samaria 1994, pseudo-2D HMM": 0.95}
LOSSES = ("arcface", "cosface", "softmax", "triplet")


def train(work: Path, config: str, seed: int, loss: str, extra: list[str]) -> dict:
    from lamina import runs
    from lamina.config import load_config

    cfg = load_config(str(ROOT / "configs" / config),
                      ["trainer.progress=false", "logging.tensorboard=false", "cost.energy=false",
                       f"logging.root={work / 'runs'}", f"seed={seed}", f"task.loss={loss}",
                       f"name={Path(config).stem}-{loss}-{seed}", *extra])
    r = runs.train(cfg)
    s = r.summary
    return {"seed": seed, "loss": loss, "run_dir": str(r.run_dir), **s["test"], "epochs": s["epochs"],
            "train_time_s": s["train_time_s"], "train_samples_per_s": s["train_samples_per_s"],
            "params": s["params"]}


def _pixels(data) -> np.ndarray:
    return data.x.flatten(1).numpy().astype(np.float64)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)


def baselines_identification(bundle) -> dict:
    from sklearn.decomposition import PCA

    tr, te = _pixels(bundle.train), _pixels(bundle.test)
    ytr, yte = bundle.train.y.numpy(), bundle.test.y.numpy()
    out = {}
    pca = PCA(n_components=min(100, len(tr) - 1), whiten=True, random_state=0).fit(tr)
    for name, (a, b) in {"eigenfaces": (pca.transform(tr), pca.transform(te)), "pixels": (tr, te)}.items():
        pred = ytr[(_unit(b) @ _unit(a).T).argmax(1)]
        out[name] = float((pred == yte).mean())
    return out


def embeddings_of(run_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    from lamina.runs.open import open_run
    from lamina.tasks.faces import embed_all

    run = open_run(run_dir)
    test = run.data().test
    return embed_all(run.model, test.x, run.device), test.y


def baseline_verification(bundle) -> tuple[dict, torch.Tensor]:
    from sklearn.decomposition import PCA

    from lamina.tasks.faces import pair_scores, verification

    pca = PCA(n_components=min(100, len(bundle.train) - 1), whiten=True, random_state=0).fit(_pixels(bundle.train))
    e = torch.tensor(pca.transform(_pixels(bundle.test)), dtype=torch.float32)
    return verification(*pair_scores(e, bundle.test.y)), e


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/faces-bench")
    ap.add_argument("--json", help="result path (default benchmarks/results/faces_orl.json)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--verify-losses", default="arcface,triplet")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    work, load0 = start_work(a.work)
    from lamina.data import load_dataset
    from lamina.tasks.faces import pair_scores

    seeds = [int(s) for s in a.seeds.split(",")]
    extra = [f"trainer.max_epochs={a.epochs}", *a.overrides]
    result: dict = {"load_before": load0, "args": vars(a), "published_identification": PUBLISHED}

    # ----- identification: 5 train / 5 test per person ----------------------------------------------------------
    ident, base = [], []
    for s in seeds:
        bundle = load_dataset("faces", seed=s)
        base.append({"seed": s, **baselines_identification(bundle)})
        for loss in a.losses.split(","):
            r = train(work, "orl_faces_arcface.yaml", s, loss, extra)
            ident.append(r)
            print(f"identification seed {s} {loss}: gallery_top1 {r['test/gallery_top1']:.4f} "
                  f"(load {loadavg1():.2f})", flush=True)
    summary = {}
    for loss in a.losses.split(","):
        rs = [r for r in ident if r["loss"] == loss]
        g = [r["test/gallery_top1"] for r in rs]
        summary[loss] = {"gallery_top1_mean": statistics.mean(g), "gallery_top1_std": statistics.pstdev(g),
                         "nn_top1_mean": statistics.mean(r["test/nn_top1"] for r in rs),
                         "eer_closed_set_mean": statistics.mean(r["test/eer"] for r in rs),
                         "train_samples_per_s_median": statistics.median(r["train_samples_per_s"] for r in rs),
                         "train_time_s_median": statistics.median(r["train_time_s"] for r in rs)}
    for name in ("eigenfaces", "pixels"):
        v = [b[name] for b in base]
        summary[name] = {"gallery_top1_mean": statistics.mean(v), "gallery_top1_std": statistics.pstdev(v)}
    result.update(identification_runs=ident, identification_baselines=base, identification=summary)
    print_table(["method", "top-1 (mean over splits)", "std", "train s", "samples/s"],
                [[k, v["gallery_top1_mean"], v["gallery_top1_std"], v.get("train_time_s_median", "-"),
                  v.get("train_samples_per_s_median", "-")] for k, v in summary.items()]
                + [[f"published: {k}", v, "", "", ""] for k, v in PUBLISHED.items()])

    # ----- verification on 10 unseen people --------------------------------------------------------------------
    ver, curves = [], {}
    for s in seeds:
        bundle = load_dataset("faces", protocol="verification", holdout_identities=10, val_per_person=2, seed=s)
        m, e = baseline_verification(bundle)
        ver.append({"seed": s, "loss": "eigenfaces", **{f"test/{k}": v for k, v in m.items()}})
        if s == seeds[0]:
            curves["eigenfaces"] = pair_scores(e, bundle.test.y)
        for loss in a.verify_losses.split(","):
            r = train(work, "orl_faces_verify.yaml", s, loss, extra)
            ver.append(r)
            print(f"verification seed {s} {loss}: EER {r['test/eer']:.4f} (load {loadavg1():.2f})", flush=True)
            if s == seeds[0]:
                curves[loss] = pair_scores(*embeddings_of(r["run_dir"]))
    vsum = {}
    for loss in ["eigenfaces", *a.verify_losses.split(",")]:
        rs = [r for r in ver if r["loss"] == loss]
        vsum[loss] = {k: statistics.mean(r[f"test/{k}"] for r in rs)
                      for k in ("roc_auc", "eer", "tar_far_1e-2", "tar_far_1e-3")}
        vsum[loss]["eer_std"] = statistics.pstdev(r["test/eer"] for r in rs)
    result.update(verification_runs=ver, verification=vsum)
    print_table(["method", "ROC AUC", "EER", "EER std", "TAR@FAR1%", "TAR@FAR0.1%"],
                [[k, v["roc_auc"], v["eer"], v["eer_std"], v["tar_far_1e-2"], v["tar_far_1e-3"]]
                 for k, v in vsum.items()])
    _plot(curves, Path(a.json).with_name(Path(a.json).stem + "_roc.png") if a.json else RESULTS / "faces_orl_roc.png")
    result["load_after"] = loadavg1()
    write_result("faces_orl", result, a.json)
    return 0


def _plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, (s, genuine) in curves.items():
        fpr, tpr, _ = roc_curve(genuine.numpy(), s.numpy())
        ax.plot(fpr, tpr, label=name)
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_xlabel("false accept rate (impostor pairs)")
    ax.set_ylabel("true accept rate (genuine pairs)")
    ax.set_title("ORL, 10 people unseen in training")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
