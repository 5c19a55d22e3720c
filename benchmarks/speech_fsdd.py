"""Speech recognition on spoken digit sequences (issue 17): configs/fsdd_ctc.yaml trained end to end, word and
character error rates on two held-out speakers with greedy and prefix-beam decoding, and training throughput.

    python benchmarks/speech_fsdd.py --work /tmp/speech [--epochs 15] [--seeds 0] [KEY=VALUE ...]
    python benchmarks/speech_fsdd.py --throughput-only      # samples/s of a short CPU run, no quality numbers

The quality run is `lamina train configs/fsdd_ctc.yaml` in this process (the same as the CLI). Throughput is the
Trainer's own train_samples_per_s. Load averages are recorded; a start above the core count is flagged.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, loadavg1, print_table, start_work, write_result  # noqa: E402


def train_once(work: Path, seed: int, extra: list[str]) -> dict:
    from lamina import runs
    from lamina.config import load_config

    cfg = load_config(str(ROOT / "configs" / "fsdd_ctc.yaml"),
                      ["trainer.progress=false", "logging.tensorboard=false", "cost.energy=false",
                       f"logging.root={work / 'runs'}", f"seed={seed}", *extra])
    r = runs.train(cfg)
    s = r.summary
    return {"seed": seed, "run_dir": str(r.run_dir), **{k: v for k, v in s["test"].items()},
            "best_val_wer": s["best_monitor"], "epochs": s["epochs"], "steps": s["steps"],
            "train_time_s": s["train_time_s"], "train_samples_per_s": s["train_samples_per_s"],
            "device": s["device"], "params": s["params"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/speech-bench")
    ap.add_argument("--json", help="result path (default benchmarks/results/speech_fsdd.json)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--throughput-only", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true", help="quality runs only (e.g. on a GPU machine)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    work, load0 = start_work(a.work)
    result = {"load_before": load0, "args": vars(a)}
    # throughput: 320 utterances, one epoch, on this machine's CPU threads
    tp = None if a.skip_throughput else train_once(work, 0, ["data.train_size=320", "data.val_size=40", "data.test_size=40",
                              "trainer.max_epochs=1", "trainer.device=cpu", *a.overrides])
    if tp is not None:
        result["cpu_throughput"] = {"train_samples_per_s": tp["train_samples_per_s"], "load_after": loadavg1()}
        print(f"CPU training throughput: {tp['train_samples_per_s']:.1f} utterances/s")
    if not a.throughput_only:
        runs = [train_once(work, int(s), [f"trainer.max_epochs={a.epochs}", *a.overrides])
                for s in a.seeds.split(",")]
        result["runs"] = runs
        keys = ("test/wer", "test/cer", "test/wer_beam", "test/cer_beam")
        result["mean"] = {k: statistics.mean(r[k] for r in runs) for k in keys}
        print_table(["seed", "WER greedy", "CER greedy", "WER beam 8", "CER beam 8", "train s", "samples/s"],
                    [[r["seed"], r["test/wer"], r["test/cer"], r["test/wer_beam"], r["test/cer_beam"],
                      r["train_time_s"], r["train_samples_per_s"]] for r in runs])
    result["load_after"] = loadavg1()
    write_result("speech_fsdd", result, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
