"""Data bigger than memory: train on an image folder whose decoded float32 tensors are several times a memory limit,
and compare the streaming path's images/s with the in-memory path's on a subset that fits.

(a) Writes Fashion-MNIST (the Debian dataset-fashion-mnist IDX files) as PNG files, one folder per class, upscaled
    bilinearly to --size pixels so that --images of them decode to float32 far beyond --limit-gb.
(b) `lamina train data.name=image_folder ...` on the whole folder (auto choice: the decoded size is over
    data.memory_budget = --limit-gb, so the run streams from files) for --steps steps, as a subprocess whose data
    segment is capped by RLIMIT_DATA = --limit-gb (per process, inherited by its decoding workers; RLIMIT_AS is not
    usable beside torch's large virtual reservations) while this script samples the proportional resident memory
    (PSS) of the whole process tree (training process + workers, psutil) every 50 ms: the peak must stay below
    the limit.
(c) images/s of training on a --subset that fits, in memory (data.in_memory=true) and streamed
    (data.in_memory=false), interleaved --repeats times; the ratio in-memory / streaming is the cost of streaming
    (target: <= 1.5). images/s = the run's train_samples_per_s: samples over the time of its training epochs,
    which includes waiting for batches (start-up, the up-front decoding of the in-memory path and evaluation are
    not in it). A streamed split decodes each image once into its uint8 temp-file cache (data.decode_cache=auto),
    so its first epoch pays the PNG decoding and later ones read the cache: the table gives both, per epoch.

The model is an MLP (2 x 256) on the gray images: cheap enough per step that decoding is not hidden behind the
model, so the ratio is a fair worst case for the streaming path. The 1-min load average is recorded before and
after every step; the script refuses to run the timing part when the machine is busy (unless --allow-busy).

    python benchmarks/out_of_core.py [--images 30000] [--size 256] [--limit-gb 1.5] [--steps 300] [--allow-busy]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, busy, loadavg1, print_table, refuse_if_busy, write_result

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def build_folder(out: Path, n: int, size: int) -> dict:
    """The first n Fashion-MNIST training images as size x size PNGs (bilinear upscale), <out>/<class>/<i>.png."""
    from PIL import Image

    from lamina.data.files import read_idx

    marker = out / f".built-{n}-{size}"
    if marker.is_file():
        return json.loads(marker.read_text())
    t0 = time.perf_counter()
    x = read_idx(FMNIST / "train-images-idx3-ubyte.gz", limit=n)
    y = read_idx(FMNIST / "train-labels-idx1-ubyte.gz", limit=n)
    for c in CLASSES:
        (out / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.fromarray(x[i]).resize((size, size), Image.BILINEAR)
        im.save(out / CLASSES[int(y[i])] / f"{i:06d}.png", compress_level=1)
    disk = sum(f.stat().st_size for f in out.rglob("*.png"))
    info = {"images": n, "size": size, "png_bytes": disk, "decoded_float32_bytes": n * size * size * 4,
            "build_s": round(time.perf_counter() - t0, 1)}
    marker.write_text(json.dumps(info))
    return info


def tree_rss(pid: int) -> int:
    """Resident memory of the process tree as PSS (proportional set size): pages shared by the forked workers and
    the training process count once in the sum, as they do in the machine's RAM (plain RSS would count them in
    every worker)."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_full_info().pss
        except psutil.NoSuchProcess:
            pass
    return total


def train(name: str, args: list[str], work: Path, limit_bytes: int | None = None) -> dict:
    """`lamina train ARGS` as a subprocess (RLIMIT_DATA = limit_bytes when given); its summary, wall time, load
    before/after and the peak resident memory of its process tree."""
    log = work / f"{name}.log"

    def cap():
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))

    before, t0 = loadavg1(), time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "lamina.cli.main", "train", *args, "--no-progress",
                              f"logging.root={work / 'runs'}", f"name={name}", "logging.tensorboard=false",
                              "logging.plots=false"], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, preexec_fn=cap)
        peak = [0]

        def watch():
            while p.poll() is None:
                peak[0] = max(peak[0], tree_rss(p.pid))
                time.sleep(0.05)

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        rc = p.wait()
        t.join()
    if rc:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"{name} failed (exit {rc}): {tail[0]}; see {log}")
    run = next(Path(x) for x in reversed(log.read_text().splitlines()) if x.strip() and Path(x.strip()).is_dir())
    s = json.loads((run / "summary.json").read_text())
    epochs = []  # per finished epoch (a run stopped inside its first epoch has none)
    if (run / "metrics.csv").is_file():
        with open(run / "metrics.csv", newline="") as f:
            epochs = [float(r["train/samples_per_s"]) for r in csv.DictReader(f)]
    return {"run": name, "images_per_s": s["train_samples_per_s"], "steps": s["steps"], "data_path": s["data_path"],
            "first_epoch_images_per_s": epochs[0] if epochs else None,
            "later_epochs_images_per_s": float(np.median(epochs[1:])) if len(epochs) > 1 else None,
            "test_acc": s["test"].get("test/acc"), "peak_rss_bytes": peak[0],
            "wall_s": round(time.perf_counter() - t0, 1),
            "load_before": before, "load_after": loadavg1(), "busy": busy(before)}


def main() -> int | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/lamina_out_of_core", help="image folder and runs (default %(default)s)")
    ap.add_argument("--images", type=int, default=30000)
    ap.add_argument("--size", type=int, default=256, help="side in pixels after upscaling (default %(default)s)")
    ap.add_argument("--limit-gb", type=float, default=1.5, help="memory limit of the training process tree (GB)")
    ap.add_argument("--budget-gb", type=float, help="data.memory_budget of the big run (default: --limit-gb)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--subset", type=int, default=3000, help="images of the in-memory vs streaming comparison")
    ap.add_argument("--timing-steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--skip-timing", action="store_true", help="only (a) and (b)")
    ap.add_argument("--skip-big", action="store_true", help="only (a) and (c), e.g. to rerun the timing quietly")
    ap.add_argument("--allow-busy", action="store_true", help="run the timing part even on a busy machine (flagged)")
    ap.add_argument("--out", help="results JSON (default benchmarks/results/out_of_core.json)")
    a = ap.parse_args()
    if not FMNIST.is_dir():
        raise SystemExit(f"{FMNIST} not found: install the Debian package dataset-fashion-mnist")
    work = Path(a.work)
    load_start = loadavg1()
    info = build_folder(work / "images", a.images, a.size)
    print(f"(a) {info['images']} PNGs at {a.size}x{a.size}: {info['png_bytes'] / 1e9:.2f} GB on disk, "
          f"{info['decoded_float32_bytes'] / 1e9:.2f} GB as float32 tensors (limit {a.limit_gb} GB)", flush=True)
    common = ["data.name=image_folder", "model.name=mlp", f"data.batch_size={a.batch_size}",
              "data.eval_batch_size=256", "trainer.max_epochs=1000"]
    limit = int(a.limit_gb * 1e9)
    result = {"folder": info, "limit_gb": a.limit_gb, "load_start": load_start}
    big = None
    if not a.skip_big:
        big = train("stream_big", [*common, f"data.path={work / 'images'}", f"trainer.max_steps={a.steps}",
                                   f"data.memory_budget={a.budget_gb or a.limit_gb}"], work, limit_bytes=limit)
        big["limit_bytes"] = limit
        big["under_limit"] = big["peak_rss_bytes"] < limit
        result["big"] = big
        print(f"(b) {big['steps']} steps under RLIMIT_DATA {a.limit_gb} GB: peak resident memory (PSS) of the tree "
              f"{big['peak_rss_bytes'] / 1e9:.2f} GB, data {info['decoded_float32_bytes'] / limit:.1f}x the limit; "
              f"{big['images_per_s']:.0f} images/s; {big['data_path']}", flush=True)
    if not a.skip_timing:
        try:
            load, _ = refuse_if_busy(a.allow_busy)
        except SystemExit as e:  # keep (a) and (b): write them, say why the timing is missing
            print(e)
            result["timing_skipped"] = str(e)
            a.skip_timing = True
    if not a.skip_timing:
        sub = work / "subset"
        if not (sub / f".subset-{a.subset}").is_file():
            for c in CLASSES:
                (sub / c).mkdir(parents=True, exist_ok=True)
            files = sorted((work / "images").rglob("*.png"))
            for f in files:
                if int(f.stem) < a.subset and not (sub / f.parent.name / f.name).exists():
                    os.link(f, sub / f.parent.name / f.name)
            (sub / f".subset-{a.subset}").write_text("")
        runs = []
        for r in range(a.repeats):
            for mode in ("true", "false"):
                row = train(f"subset_{'mem' if mode == 'true' else 'stream'}_{r}",
                            [*common, f"data.path={sub}", f"data.in_memory={mode}",
                             f"trainer.max_steps={a.timing_steps}"],
                            work)
                row["in_memory"] = mode == "true"
                runs.append(row)
                print(f"    {row['run']}: {row['images_per_s']:.0f} images/s (epoch 1 "
                      f"{row['first_epoch_images_per_s'] or 0:.0f}, later {row['later_epochs_images_per_s'] or 0:.0f}), "
                      f"peak PSS {row['peak_rss_bytes'] / 1e9:.2f} GB "
                      f"(load {row['load_before']:.2f} -> {row['load_after']:.2f})", flush=True)

        def median(key, m):
            vals = [x[key] for x in runs if x["in_memory"] == m and x[key] is not None]
            return float(np.median(vals)) if vals else float("nan")

        med = {m: median("images_per_s", m) for m in (True, False)}
        result["timing"] = {"subset": a.subset, "steps": a.timing_steps, "runs": runs, "load_before": load,
                            "in_memory_images_per_s": med[True], "streaming_images_per_s": med[False],
                            "first_epoch": {"in_memory": median("first_epoch_images_per_s", True),
                                            "streaming": median("first_epoch_images_per_s", False)},
                            "later_epochs": {"in_memory": median("later_epochs_images_per_s", True),
                                             "streaming": median("later_epochs_images_per_s", False)},
                            "slowdown": med[True] / med[False], "busy": any(x["busy"] for x in runs) or busy(load)}
    result["load_end"] = loadavg1()
    rows = [] if big is None else [["streamed, whole folder", info["images"],
                                    f"{info['decoded_float32_bytes'] / 1e9:.2f}",
                                    f"{big['peak_rss_bytes'] / 1e9:.2f}", f"{big['images_per_s']:.0f}"]]
    if "timing" in result:
        t = result["timing"]
        mem_rss = max(x["peak_rss_bytes"] for x in t["runs"] if x["in_memory"])
        str_rss = max(x["peak_rss_bytes"] for x in t["runs"] if not x["in_memory"])
        sub_gb = f"{a.subset * a.size * a.size * 4 / 1e9:.2f}"
        rows += [["in memory, subset", a.subset, sub_gb, f"{mem_rss / 1e9:.2f}", f"{t['in_memory_images_per_s']:.0f}"],
                 ["streamed, subset", a.subset, sub_gb, f"{str_rss / 1e9:.2f}", f"{t['streaming_images_per_s']:.0f}"]]
    print_table(["path", "images", "decoded GB", "peak PSS GB", "images/s"], rows)
    if "timing" in result:
        t = result["timing"]
        print(f"streaming costs {t['slowdown']:.2f}x the in-memory time per image (target <= 1.5)"
              f"{' [busy machine]' if t['busy'] else ''}; first epoch (decoding) "
              f"{t['first_epoch']['in_memory'] / t['first_epoch']['streaming']:.2f}x, later epochs (uint8 cache) "
              f"{t['later_epochs']['in_memory'] / t['later_epochs']['streaming']:.2f}x")
    print(f"load average: {load_start:.2f} at start, {result['load_end']:.2f} at end")
    if big is None and "timing" not in result:  # nothing measured: keep the results file as it is
        return 2
    out = Path(a.out) if a.out else None
    prev = out or Path(__file__).resolve().parent / "results" / "out_of_core.json"
    if big is None and prev.is_file():  # --skip-big: keep the earlier run's (b)
        result["big"] = json.loads(prev.read_text()).get("big")
    write_result("out_of_core", result, out)


if __name__ == "__main__":
    raise SystemExit(main())
