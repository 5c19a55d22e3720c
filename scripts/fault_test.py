"""Fault test: kill one training worker mid-run and check the job recovers to the same final metrics.

    python scripts/fault_test.py [--nproc 2] [--strategy ddp|fsdp] [--kill-after-epoch 2] [KEY=VALUE ...]

1. An undisturbed run: `torchrun --nproc-per-node N -m lamina.cli.main train ...`.
2. The same run under `torchrun --max-restarts 1`; once the checkpoint of epoch `--kill-after-epoch` is on
   disk, this script waits a little (so the kill lands inside the next epoch) and SIGKILLs the rank-1 worker
   (found by its RANK in /proc/<pid>/environ). torchrun tears the group down and starts it again; the new
   workers find the run folder through runs/.elastic/<rdzv id>.txt and resume from `checkpoints/last`.
3. Both runs' per-epoch metrics (losses, accuracies) and test metrics are compared; wall-clock columns are
   left out. Exit 0 when the worker was killed, the job restarted and every compared number is equal.

Runs in CI through tests/test_distributed.py (digits, 2 processes, a few seconds an epoch).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SKIP = ("time", "samples_per_s", "lr")  # columns that are wall-clock or identical by construction


def torchrun(nproc: int, args: list[str], cwd: Path, log: Path, max_restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "-m", "lamina.cli.main", "train", "--no-progress", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # output to a file, not a pipe: nobody reads a pipe while we wait, and a full pipe would stall torchrun
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def worker_pid(parent: int, rank: int) -> int | None:
    """The pid of the descendant of `parent` whose environment says RANK=<rank>."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
            stat = (p / "stat").read_text()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in env):
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == parent or _descends(ppid, parent):
                return int(p.name)
    return None


def _descends(pid: int, ancestor: int) -> bool:
    for _ in range(8):
        if pid in (0, 1):
            return False
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


def epoch_of_last(run_dir: Path) -> int:
    meta = run_dir / "checkpoints" / "last" / "meta.json"
    try:
        return int(json.loads(meta.read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


def metrics(run_dir: Path) -> dict:
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    out = {f"epoch{r['epoch']}/{k}": float(v) for r in rows for k, v in r.items()
           if v and k != "epoch" and not any(s in k for s in SKIP)}
    summary = json.loads((run_dir / "summary.json").read_text())
    out.update({k: float(v) for k, v in summary["test"].items()})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--kill-after-epoch", type=int, default=2)
    ap.add_argument("--kill-delay", type=float, default=0.1, help="seconds after that checkpoint appears")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("overrides", nargs="*", help="training config: [CONFIG] KEY=VALUE ...")
    a = ap.parse_args(argv)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="lamina-fault-"))
    work.mkdir(parents=True, exist_ok=True)
    base = [*a.overrides, f"trainer.strategy={a.strategy}", "logging.tensorboard=false", "logging.plots=false"]

    t0 = time.perf_counter()
    clean = torchrun(a.nproc, [*base, "name=undisturbed"], work, work / "undisturbed.log")
    try:
        clean.wait(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(clean.pid, signal.SIGKILL)
        clean.wait()
    if clean.returncode != 0:
        print((work / "undisturbed.log").read_text()[-3000:])
        print(f"FAIL: the undisturbed run exited with {clean.returncode}")
        return 1
    t_clean = time.perf_counter() - t0

    t0 = time.perf_counter()
    faulty = torchrun(a.nproc, [*base, "name=faulty"], work, work / "faulty.log", max_restarts=1)
    run_dir = work / "runs" / "faulty"
    killed = None
    deadline = time.time() + a.timeout
    while faulty.poll() is None and time.time() < deadline:
        if killed is None and epoch_of_last(run_dir) >= a.kill_after_epoch:
            time.sleep(a.kill_delay)
            pid = worker_pid(faulty.pid, rank=1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = (pid, epoch_of_last(run_dir))
        time.sleep(0.05)
    if faulty.poll() is None:
        os.killpg(faulty.pid, signal.SIGKILL)
        faulty.wait()
    out_faulty = (work / "faulty.log").read_text()
    t_faulty = time.perf_counter() - t0
    if faulty.returncode != 0 or killed is None:
        print(out_faulty[-3000:])
        print(f"FAIL: faulty run exit {faulty.returncode}, killed {killed}")
        return 1

    m_clean, m_faulty = metrics(work / "runs" / "undisturbed"), metrics(run_dir)
    restarts = json.loads((run_dir / "summary.json").read_text()).get("restarts", 0)
    restarted = restarts > 0
    keys = sorted(set(m_clean) | set(m_faulty))
    diff = [k for k in keys if m_clean.get(k) != m_faulty.get(k)]
    final = [k for k in keys if k.startswith("test/")] or keys[-4:]
    print(f"workdir {work}")
    print(f"killed rank 1 (pid {killed[0]}) during epoch {killed[1] + 1} (last checkpoint: epoch {killed[1]}); "
          f"torchrun restarted the "
          f"workers ({restarts} restart(s)) and resumed from checkpoints/last")
    print(f"{'metric':<28} {'undisturbed':>14} {'killed+restarted':>18}")
    for k in final:
        print(f"{k:<28} {m_clean.get(k, float('nan')):>14.6f} {m_faulty.get(k, float('nan')):>18.6f}")
    print(f"compared {len(keys)} numbers (every epoch's losses/metrics + test): {len(diff)} differ")
    print(f"wall: undisturbed {t_clean:.1f}s, with the kill {t_faulty:.1f}s")
    result = {"killed_pid": killed[0], "killed_after_epoch": killed[1], "restarted": restarted,
              "compared": len(keys), "differ": diff, "undisturbed": m_clean, "faulty": m_faulty,
              "wall_s": {"undisturbed": t_clean, "faulty": t_faulty}}
    (work / "fault_test.json").write_text(json.dumps(result, indent=2))
    if not restarted:
        print("FAIL: the job did not restart (summary.json restarts = 0)")
        return 1
    if diff:
        for k in diff[:10]:
            print(f"  differs: {k}: {m_clean.get(k)} vs {m_faulty.get(k)}")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
