"""`lamina compare RUN RUN ...`: a table of the runs and their curves as sparklines, plus an HTML page
(lamina.report.compare)."""

from __future__ import annotations

import argparse
import math

_CURVE_W = 28


def add_parsers(sub) -> None:
    c = sub.add_parser("compare", help="compare finished runs of one task: a table (data, model, size, best and "
                                       "test metrics, time, precision, cost) and overlaid curves; writes an HTML page")
    c.add_argument("runs", nargs="*", metavar="RUN_DIR", help="two or more run folders")
    c.add_argument("--html", metavar="PATH", help="write the page here (default: compare-<runs>.html beside the "
                                                  "first run)")
    c.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}" if abs(v) >= 100 else f"{v:.4f}"
    return str(v)


def cmd_compare(a, console) -> int:
    from rich.markup import escape
    from rich.table import Table

    from lamina.report.compare import compare_runs, sparkline

    r = compare_runs(a.runs, a.html)
    # one column per run, one row per fact: a handful of runs fits an 80-column terminal
    table = Table("", *(escape(row["run"]) for row in r["rows"]),
                  title=f"{len(r['runs'])} {escape(str(r['runs'][0].summary.get('task')))} runs")
    for col in r["columns"][1:]:
        table.add_row(escape(col), *(escape(_cell(row.get(col))) for row in r["rows"]))  # file text, not markup
    console.print(table)
    width = max(len(x.name) for x in r["runs"])
    for key, per_run in r["curves"].items():
        ys = [y for _, vals in per_run.values() for y in vals]
        lo, hi = min(ys), max(ys)  # one scale for all runs: the sparklines compare by eye
        console.print(f"[bold]{escape(key)}[/] ({_cell(lo)} .. {_cell(hi)})")
        for name, (_, vals) in per_run.items():
            console.print(f"  {escape(name):<{width}}  {sparkline(vals, _CURVE_W, lo, hi):<{_CURVE_W}}  "
                          f"{_cell(vals[0])} -> {_cell(vals[-1])}", highlight=False)
    console.print(f"page: [bold]{escape(str(r['page']))}[/]")
    print(r["page"])  # stdout: machine-readable
    return 0


COMMANDS = {"compare": cmd_compare}
