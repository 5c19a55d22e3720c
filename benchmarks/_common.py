"""Shared helpers for benchmark scripts: timing, table printing, JSON results with machine facts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def timeit(fn, sync=None) -> float:
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def print_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text)
    return text


def write_result(name: str, payload: dict, path: str | Path | None = None) -> Path:
    """benchmarks/results/<name>.json (or `path`, e.g. a device machine's output folder) with when and machine."""
    out = Path(path) if path else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": machine(), **payload}
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {out}")
    return out


def _status_kib(field: str) -> int:
    import re

    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def peak_rss_mib(call) -> tuple[float, str]:
    """(peak extra resident memory in MiB while `call()` runs, how it was measured), on Linux CPU.

    torch keeps no CPU allocator statistics and tracemalloc does not see its allocations, so: reset the
    process's high-water mark (writing "5" to /proc/self/clear_refs sets VmHWM to the current VmRSS, Linux
    >= 4.0), run the call, read VmHWM. Run it in a fresh process so freed-but-cached heap cannot hide an
    allocation. Without a writable clear_refs it falls back to ru_maxrss (the import's own peak may mask a
    small call's)."""
    before = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (clear_refs not writable)"
    call()
    if method.startswith("VmHWM"):
        peak = _status_kib("VmHWM")
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - before) / 1024, method


# ----- benchmarks that drive the CLI (search studies, seed runs) ----------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def loadavg1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def cli_step(name: str, args: list[str], log: Path, steps: list[dict]) -> None:
    """`lamina ARGS` as a user runs it, output to `log`; appends wall time and the load before/after to `steps`
    (busy: it started above the core count, so its times include other jobs)."""
    import subprocess
    import sys

    before, t0 = loadavg1(), time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-m", "lamina.cli.main", *args], cwd=ROOT, stdout=f,
                           stderr=subprocess.STDOUT)
    if p.returncode:
        raise SystemExit(f"{name} failed ({p.returncode}); see {log}")
    steps.append({"step": name, "load_before": before, "load_after": loadavg1(), "wall_s": time.perf_counter() - t0,
                  "busy": before > (os.cpu_count() or 1)})


def seed_runs(work: Path, name: str, config: Path, extra: list[str], steps: list[dict]) -> dict:
    """`lamina train CONFIG --seeds 0,1,2` under <work>/final, unless its seeds.json is already there."""
    f = work / "final" / f"{name}-seeds" / "seeds.json"
    if not f.is_file():
        cli_step(f"train {name} --seeds 0,1,2", ["train", str(config), "--seeds", "0,1,2", "--no-progress",
                                                 f"name={name}", f"logging.root={work / 'final'}",
                                                 "logging.tensorboard=false", *extra], work / f"{name}.log", steps)
    return json.loads(f.read_text())


def start_work(folder: str) -> tuple[Path, float]:
    """The benchmark's work folder (created) and the 1-min load average at its start, flagged when it is above the
    core count (the times that follow then include other jobs)."""
    work = Path(folder)
    work.mkdir(parents=True, exist_ok=True)
    load0 = loadavg1()
    if load0 > (os.cpu_count() or 1):
        print(f"warning: 1-min load average {load0:.2f} is above the {os.cpu_count()} cores; times include other jobs")
    return work, load0


def other_cpu_cores(seconds: float = 1.0) -> float:
    """Cores' worth of CPU time the machine spent over `seconds` while this process slept: the other jobs' share
    right now (the 1-min load average also counts this benchmark's own previous run, for a minute)."""
    def snap():
        vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait
    try:
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return (1 - (i1 - i0) / max(1, t1 - t0)) * (os.cpu_count() or 1)


def busy(load: float) -> bool:
    """A step that started with the 1-min load above the core count shares the machine: its times include others."""
    return load > (os.cpu_count() or 1)


def refuse_if_busy(allow_busy: bool, others_limit: float | None = None) -> tuple[float, float | None]:
    """At a benchmark's start: (1-min load, other jobs' cores right now if `others_limit` is given). Exits with one
    line when the load is above the core count or other jobs use more than `others_limit` cores, unless
    `allow_busy` (then the run is recorded and flagged)."""
    load = loadavg1()
    others = other_cpu_cores() if others_limit is not None else None
    if (busy(load) or (others is not None and others > others_limit)) and not allow_busy:
        now = f", other jobs using {others:.2f} cores right now" if others is not None else ""
        raise SystemExit(f"refusing to start: 1-min load average {load:.2f} (cores: {os.cpu_count()}){now}; times "
                         f"would measure other jobs. Wait, or pass --allow-busy to record a flagged run")
    return load, others


def timed_step(rows: list, name: str, fn, key: str = "method", quiet: tuple = ("examples", "predictions")) -> dict:
    """Run fn() -> dict, add its name, the load before/after, wall seconds and the busy flag; append and print it
    (without the keys in `quiet`, e.g. long example lists)."""
    before, t0 = loadavg1(), time.perf_counter()
    out = fn()
    out.update({key: name, "load_before": before, "load_after": loadavg1(),
                "wall_s": round(time.perf_counter() - t0, 1), "busy": busy(before)})
    rows.append(out)
    print({k: v for k, v in out.items() if k not in quiet}, flush=True)
    return out


def interleave(loops: dict, repeats: int) -> dict:
    """Throughput A/B: each loop (name -> fn() returning samples/s) once per repeat, in turn, so slow drifts of
    the machine hit every loop alike. Returns every run (with its load) and the median per loop."""
    rows = []
    for r in range(repeats):
        for name, fn in loops.items():
            before = loadavg1()
            sps = fn()
            rows.append({"loop": name, "repeat": r, "samples_per_s": sps, "load_before": before,
                         "load_after": loadavg1(), "busy": busy(before)})
            print(f"{name} repeat {r}: {sps:.1f} samples/s (load {before:.2f} -> {loadavg1():.2f})", flush=True)
    med = {k: statistics.median(x["samples_per_s"] for x in rows if x["loop"] == k) for k in loops}
    return {"runs": rows, "median_samples_per_s": med}
