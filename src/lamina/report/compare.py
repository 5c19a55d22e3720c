"""`lamina compare RUN RUN ...`: several finished runs side by side.

One row per run (data, model, task, size, length, best monitored value, final metrics, time, precision, cost)
and their curves overlaid: train/val loss, the main metric and the learning rate per epoch (metrics.csv) and,
when a run logged them, per step (steps.csv). The same facts feed the terminal (the CLI draws a table and
sparklines from `compare_table` / `curves` / `sparkline`) and a self-contained HTML page (`write_compare_page`,
built with lamina.report.page). Each run folder's comparisons.json lists the pages that include it, so its
report links to them.

Runs are read through RunFolder (summary.json, metrics.csv, steps.csv); nothing is recomputed. Runs written by
another lamina major.minor version are refused: their summaries may name or mean things differently.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from lamina.errors import ConfigError, DataError
from lamina.io import atomic_write_text
from lamina.report.html import typed_rows

SPARK = "▁▂▃▄▅▆▇█"
MAX_LINKS = 50  # comparisons.json keeps the newest pages; a run compared every day stays small


@dataclass
class ComparedRun:
    name: str
    folder: object  # lamina.runs.RunFolder
    summary: dict
    history: list[dict]  # metrics.csv: one row per epoch
    steps: list[dict] = field(default_factory=list)  # steps.csv: one row per logged step, when present


# ----- reading runs ---------------------------------------------------------------------------------------
def _version_key(v: str) -> tuple[int, int] | None:
    m = re.match(r"^(\d+)\.(\d+)", v) if isinstance(v, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def _read_csv(path: Path) -> list[dict]:
    """Rows of a CSV written by lamina's loggers, numbers as floats; [] when the file is absent."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return []
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    return typed_rows(rows)


def read_run(path: str | Path) -> ComparedRun:
    """One finished run, checked: a run folder with summary.json written by this lamina major.minor."""
    from lamina import __version__
    from lamina.runs import RunFolder

    p = Path(path)
    if not RunFolder.is_run(p) or not (p / "checkpoints").is_dir():
        raise DataError(f"{path}: not a run folder (expected a folder with checkpoints/ from `lamina train`)")
    folder = RunFolder(p)
    try:
        summary = json.loads(folder.summary.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: has no summary.json; the run did not finish (resume it with `lamina train "
                        f"--resume {path}`)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{folder.summary}: not a readable JSON file ({e})") from None
    if not isinstance(summary, dict):
        raise DataError(f"{folder.summary}: expected a JSON object, got {type(summary).__name__}")
    wrote = summary.get("lamina_version")
    here = _version_key(__version__)
    if wrote is None:
        raise DataError(f"{path}: summary.json has no lamina_version (written by a lamina older than 0.1, or not "
                        f"by `lamina train`); compare runs trained with lamina {here[0]}.{here[1]}")
    if _version_key(wrote) != here:
        raise DataError(f"{path}: written by lamina {str(wrote)[:40]}, this is lamina {__version__}; compare runs "
                        f"trained with lamina {here[0]}.{here[1]}")
    return ComparedRun(p.name, folder, summary, _read_csv(folder.metrics), _read_csv(folder.steps))


def load_runs(paths: list[str | Path]) -> list[ComparedRun]:
    """The runs to compare: at least two distinct run folders of one task."""
    chosen = list({Path(p).resolve(): p for p in reversed(paths)}.values())[::-1]  # a folder named twice: once
    if len(chosen) < 2:
        raise ConfigError(f"compare: needs at least two different run folders, got {len(chosen)}")
    runs = [read_run(p) for p in chosen]
    tasks = list(dict.fromkeys(str(r.summary.get("task")) for r in runs))
    if len(tasks) > 1:
        raise ConfigError(f"compare: runs of different tasks ({', '.join(tasks)}); compare runs of one task")
    names = [r.name for r in runs]
    for r in runs:  # two folders of one name (runs/a/x and runs/b/x): tell them apart
        if names.count(r.name) > 1:
            r.name = f"{r.folder.path.parent.name}/{r.name}"
    return runs


# ----- what is compared ------------------------------------------------------------------------------------
def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def main_metric(runs: list[ComparedRun]) -> str | None:
    """The metric the curves show beside the loss: the first non-loss test metric of the first run (acc, bleu,
    mae, ...) that the epoch rows carry as val/<m> (else train/<m>)."""
    keys = [k.split("/", 1)[1] for r in runs for k in (r.summary.get("test") or {}) if "/" in k]
    for m in dict.fromkeys(k for k in keys if k != "loss"):
        for split in ("val", "train"):
            if any(f"{split}/{m}" in row for r in runs for row in r.history):
                return f"{split}/{m}"
    return None


def compare_table(runs: list[ComparedRun]) -> tuple[list[str], list[dict]]:
    """(columns, one row per run) with raw values (numbers stay numbers): the last epoch's validation metrics and
    the test metrics of the best checkpoint."""
    metrics = list(dict.fromkeys(k for r in runs for k in (r.summary.get("test") or {})
                                 if isinstance(r.summary.get("test"), dict)))
    rows = []
    for r in runs:
        s = r.summary
        data = s.get("data") if isinstance(s.get("data"), dict) else {}
        perf = s.get("perf") if isinstance(s.get("perf"), dict) else {}
        cost = s.get("cost") if isinstance(s.get("cost"), dict) else {}
        test = s.get("test") if isinstance(s.get("test"), dict) else {}
        row = {"run": r.name, "data": data.get("name"), "model": s.get("model"), "task": s.get("task"),
               "params": s.get("params"), "epochs": s.get("epochs"), "steps": s.get("steps"),
               "monitor": s.get("monitor"), "best": s.get("best_monitor"), "best epoch": s.get("best_epoch")}
        final = s.get("final") if isinstance(s.get("final"), dict) else {}
        row.update({f"last {k}": v for k, v in final.items() if str(k).startswith("val/")})  # the last epoch's
        row.update({m: test.get(m) for m in metrics})
        row.update({"train s": s.get("train_time_s"), "samples/s": s.get("train_samples_per_s"),
                    "precision": s.get("precision") or perf.get("precision"), "device": s.get("device")})
        if any(isinstance(x.summary.get("cost"), dict) for x in runs):
            row["kWh"] = cost.get("energy_kwh")
            row["g CO2e"] = cost["co2e_kg"] * 1000 if _real(cost.get("co2e_kg")) else None
        rows.append(row)
    cols = list(dict.fromkeys(k for row in rows for k in row))
    return cols, rows


def curves(runs: list[ComparedRun]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """{curve: {run: (x, y)}}: train/val loss, the main metric and lr per epoch; loss and lr per step when a
    run has steps.csv. Curves no run has are left out."""
    keys = ["train/loss", "val/loss"] + [k for k in (main_metric(runs),) if k] + ["lr"]
    out: dict[str, dict] = {}
    for key in keys:
        per_run = {}
        for r in runs:
            pts = [(row["epoch"], row[key]) for row in r.history if _real(row.get("epoch")) and _real(row.get(key))]
            if pts:
                per_run[r.name] = tuple(map(list, zip(*pts)))
        if per_run:
            out[key] = per_run
    for key, label in (("train/loss_step", "train/loss per step"), ("lr", "lr per step")):
        per_run = {}
        for r in runs:
            pts = [(row["step"], row[key]) for row in r.steps if _real(row.get("step")) and _real(row.get(key))]
            if pts:
                per_run[r.name] = tuple(map(list, zip(*pts)))
        if per_run:
            out[label] = per_run
    return out


def sparkline(values: list[float], width: int = 24, lo: float | None = None, hi: float | None = None) -> str:
    """A one-line text curve: `values` resampled to at most `width` cells, scaled into [lo, hi] (default: the
    values' own range; pass a shared range to compare runs by eye)."""
    vals = [v for v in values if _real(v)]
    if not vals:
        return ""
    if len(vals) > width:  # mean of each of `width` equal stretches
        step = len(vals) / width
        vals = [sum(chunk) / len(chunk) for chunk in
                (vals[int(i * step):max(int((i + 1) * step), int(i * step) + 1)] for i in range(width))]
    lo = min(vals) if lo is None else lo
    hi = max(vals) if hi is None else hi
    if hi - lo <= 1e-12 * max(abs(hi), abs(lo), 1.0):
        return SPARK[len(SPARK) // 2] * len(vals)
    top = len(SPARK) - 1
    return "".join(SPARK[min(top, max(0, round((v - lo) / (hi - lo) * top)))] for v in vals)


# ----- the page ---------------------------------------------------------------------------------------------
def _plot(series: dict[str, dict[str, tuple[list, list]]], path: Path) -> Path | None:
    from lamina.plots import plt, save_figure

    if not series:
        return None
    n = len(series)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    names = list(dict.fromkeys(name for per_run in series.values() for name in per_run))
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    for ax, (key, per_run) in zip(axes.flat, series.items()):
        for name, (x, y) in per_run.items():
            ax.plot(x, y, "-", marker="o" if len(x) <= 40 else None, ms=3, color=colors[name], label=name)
        ax.set_title(key)
        ax.set_xlabel("step" if "per step" in key else "epoch")
        if key.startswith("lr") and all(v > 0 for _, y in per_run.values() for v in y):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return save_figure(fig, path)


def default_page(runs: list[ComparedRun]) -> Path:
    """Beside the first run (its logging.root): compare-<name>-<name>....html; long lists end in a short hash."""
    stem = "-".join(re.sub(r"[^A-Za-z0-9._-]+", "_", r.folder.path.name) for r in runs)
    if len(stem) > 120:
        stem = stem[:100] + "-" + hashlib.sha1(stem.encode()).hexdigest()[:10]
    return runs[0].folder.path.parent / f"compare-{stem}.html"


def write_compare_page(runs: list[ComparedRun], out: str | Path | None = None) -> Path:
    """The comparison page (table, overlaid curves, each run's config link); records it in every run's
    comparisons.json. Returns its path."""
    from lamina.report import page

    path = Path(out) if out else default_page(runs)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--html: expected a .html file name, got {str(out)[:200]}")
    if not path.parent.is_dir():
        raise ConfigError(f"--html: folder {path.parent} does not exist")
    cols, rows = compare_table(runs)
    series = curves(runs)
    with tempfile.TemporaryDirectory() as tmp:
        png = _plot(series, Path(tmp) / "curves.png")
        figure = page.image(png, "overlaid training curves") if png else ""
    links = "".join(f"<li><code>{page.esc(r.folder.path)}</code></li>" for r in runs)
    sections = [
        page.section("runs", "Runs", f'<div style="overflow-x:auto">{page.table(rows, cols)}</div>',
                     "test metrics of each run's best checkpoint; best = its monitored value at the best epoch"),
        page.section("curves", "Curves", figure, "per epoch from metrics.csv; per step from steps.csv when present"),
        page.section("folders", "Run folders", f"<ul>{links}</ul>"),
    ]
    task = runs[0].summary.get("task")
    page.write_page(path, f"lamina compare: {len(runs)} runs", f"{task} runs: " + ", ".join(r.name for r in runs),
                    sections, nav={"runs": "Runs", "curves": "Curves", "folders": "Folders"})
    for r in runs:
        record_comparison(r.folder, path, [x.name for x in runs])
    return path


def record_comparison(folder, page_path: Path, names: list[str]) -> None:
    """Add the page to the run's comparisons.json (newest last, one entry per page)."""
    entries = comparisons(folder)
    entries = [e for e in entries if e["page"] != str(page_path.resolve())]
    entries.append({"page": str(page_path.resolve()), "runs": names,
                    "time": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")})
    atomic_write_text(folder.comparisons, json.dumps(entries[-MAX_LINKS:], indent=1) + "\n")


def comparisons(folder) -> list[dict]:
    """The run's recorded comparison pages whose files still exist ([] when none; a damaged file counts as none)."""
    try:
        data = json.loads(folder.comparisons.read_text())
    except (OSError, ValueError):
        return []
    out = []
    for e in data if isinstance(data, list) else []:
        page_path = e.get("page") if isinstance(e, dict) else None
        if not isinstance(page_path, str) or not page_path.endswith(".html") or not Path(page_path).is_file():
            continue
        runs = e.get("runs")
        out.append({"page": page_path, "runs": [str(x) for x in runs] if isinstance(runs, list) else [],
                    "time": str(e.get("time", ""))})
    return out


def compare_runs(paths: list[str | Path], html: str | Path | None = None) -> dict:
    """Read and check the runs, write the page; {"runs", "columns", "rows", "curves", "page"} for the caller."""
    runs = load_runs(paths)
    cols, rows = compare_table(runs)
    page_path = write_compare_page(runs, html)
    return {"runs": runs, "columns": cols, "rows": rows, "curves": curves(runs), "page": page_path}


__all__ = ["ComparedRun", "read_run", "load_runs", "compare_table", "curves", "main_metric", "sparkline",
           "write_compare_page", "record_comparison", "comparisons", "compare_runs"]
