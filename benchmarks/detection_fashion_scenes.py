"""Object detection on fashion_scenes (issue 17): configs/fashion_scenes_centernet.yaml trained end to end (COCO mAP
by pycocotools, CPU training throughput), then batch-1 inference latency of the trained detector in PyTorch eager
against ONNX Runtime (the same exported model, outputs checked for parity first), interleaved repeats.

    nice python benchmarks/detection_fashion_scenes.py --work /tmp/det-bench [--run RUN_DIR] [--repeats 300]
        [KEY=VALUE ...]      # config overrides, e.g. model.backbone=resnet18 (a zoo backbone under the FPN)

Load averages are recorded; a start above the core count is flagged.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, loadavg1, print_table, start_work, write_result  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/det-bench")
    ap.add_argument("--run", help="a trained run folder to reuse (default: train the config now)")
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--json", help="result path (default benchmarks/results/detection_fashion_scenes.json)")
    ap.add_argument("overrides", nargs="*", help="config overrides (KEY=VALUE)")
    a = ap.parse_args()
    work, load0 = start_work(a.work)
    result = {"load_before": load0, "overrides": a.overrides}
    from lamina import runs
    from lamina.config import load_config
    from lamina.deploy.export import eager_fn, export_onnx, onnx_fn, parity
    from lamina.runs.open import open_run

    run_dir = a.run
    if run_dir is None:
        cfg = load_config(str(ROOT / "configs" / "fashion_scenes_centernet.yaml"),
                          ["trainer.progress=false", "logging.tensorboard=false", "cost.energy=false",
                           f"logging.root={work / 'runs'}", *a.overrides])
        run_dir = runs.train(cfg).run_dir
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    result["train"] = {"run_dir": str(run_dir), "test": summary["test"], "best_monitor": summary["best_monitor"],
                       "best_epoch": summary["best_epoch"], "epochs": summary["epochs"],
                       "train_time_s": summary["train_time_s"], "train_samples_per_s": summary["train_samples_per_s"],
                       "params": summary["params"]}
    run = open_run(run_dir)
    model = run.model.eval().cpu()
    x = run.split("test").tensors["x"][:8]
    onnx_path = work / "centernet.onnx"
    info = export_onnx(model, (x[:2],), onnx_path, metadata={"model": run.cfg.model.name})
    kw = {info["input_names"][0]: x}
    par = parity(eager_fn(model), onnx_fn(onnx_path, threads=torch.get_num_threads()), kw)
    result["export"] = {"exporter": info["exporter"], "parity": par}
    eager, ort = eager_fn(model), onnx_fn(onnx_path, threads=torch.get_num_threads())
    one = {info["input_names"][0]: x[:1]}
    for f in (eager, ort):  # warm-up
        for _ in range(20):
            f(one)
    te, to = [], []
    l0 = loadavg1()
    with torch.inference_mode():
        for _ in range(a.repeats):  # interleaved, so load drifts hit both alike
            t = time.perf_counter()
            eager(one)
            te.append(time.perf_counter() - t)
            t = time.perf_counter()
            ort(one)
            to.append(time.perf_counter() - t)
    result["latency_batch1_ms"] = {"eager_median": 1e3 * statistics.median(te), "onnxruntime_median": 1e3 * statistics.median(to),
                                   "eager_p90": 1e3 * sorted(te)[int(0.9 * len(te))],
                                   "onnxruntime_p90": 1e3 * sorted(to)[int(0.9 * len(to))],
                                   "repeats": a.repeats, "threads": torch.get_num_threads(), "load": [l0, loadavg1()]}
    lat = result["latency_batch1_ms"]
    print_table(["test mAP@[.5:.95]", "mAP@.5", "train samples/s", "eager ms", "ORT ms", "speed-up"],
                [[summary["test"]["test/map"], summary["test"]["test/map_50"], summary["train_samples_per_s"],
                  lat["eager_median"], lat["onnxruntime_median"], lat["eager_median"] / lat["onnxruntime_median"]]])
    print(f"ONNX parity ({info['exporter']}): max abs diff {par['max_abs_diff']:.2e}")
    result["load_after"] = loadavg1()
    write_result("detection_fashion_scenes", result, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
