"""One self-contained HTML page per run: `lamina report RUN_DIR` -> RUN_DIR/report.html.

The page reads what the run folder holds (config.yaml, summary.json with the run's cost, metrics.csv, the PNGs, and the JSON
that `lamina audit` / calibrate / attack / fairness / explain / learning-curve write) and renders a section
for each part present; nothing is recomputed except the overfitting check (a pass over metrics.csv). Images
are embedded as base64 data URIs and the style sheet is inline, so the file can be mailed or archived alone;
there is no script, so there is nothing to fail in a browser's console.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from lamina.errors import DataError

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1080px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.2em;margin:0 0 12px;border-bottom:1px solid #dde1e7;padding-bottom:6px}
section{background:#fff;border:1px solid #e3e6eb;border-radius:8px;padding:16px 20px;margin:16px 0}
.sub{color:#5b6474;margin:0 0 8px}.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{background:#fff;border:1px solid #e3e6eb;border-radius:8px;padding:10px 14px;min-width:120px}
.card b{display:block;font-size:1.25em}.card span{color:#5b6474;font-size:.85em}
table{border-collapse:collapse;font-size:.9em;margin:8px 0}th,td{border-bottom:1px solid #e8ebef;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f1f3f6}
img{max-width:100%;height:auto;border:1px solid #eef0f3;margin:6px 0}
pre{background:#f3f4f7;padding:10px;overflow:auto;font-size:.85em;max-height:420px}
.warn{color:#9a3412;font-weight:600}.ok{color:#166534;font-weight:600}
nav a{margin-right:12px;color:#2753a3;text-decoration:none;font-size:.9em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:8px}
"""


# ----- small renderers ------------------------------------------------------------------------------
def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _num(v) -> str:
    if isinstance(v, bool) or v is None:
        return _esc("" if v is None else v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return _esc(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return _esc(v)


def _fmt(v, spec: str) -> str:
    """A number from a file formatted with `spec`; anything else (a string, a list, null) escaped as it is."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, spec)
    return _esc(v)


def _dict(v) -> dict:
    """A JSON object from a file, or {} when the file holds another type there."""
    return v if isinstance(v, dict) else {}


def _rows(v) -> list[dict]:
    return [r for r in v if isinstance(r, dict)] if isinstance(v, list) else []


def _table(rows: list[dict], cols: list[str] | None = None) -> str:
    if not rows:
        return ""
    cols = cols or list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_num(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv(d: dict) -> str:
    return _table([{"": k, "value": v} for k, v in _dict(d).items() if not isinstance(v, (dict, list))],
                  ["", "value"])


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _section(sid: str, title: str, body: str, sub: str = "") -> tuple[str, str]:
    sub = f'<p class="sub">{sub}</p>' if sub else ""
    return sid, f'<section id="{sid}"><h2>{_esc(title)}</h2>{sub}{body}</section>'


def _history(run: Path) -> list[dict]:
    try:
        with open(run / "metrics.csv", newline="") as f:  # RunFolder.metrics (not imported: report stays light)
            rows = list(csv.DictReader(f))
    except OSError:
        return []
    return typed_rows(rows)


def typed_rows(rows) -> list[dict]:
    """csv.DictReader rows with numbers as floats, empty cells and a ragged row's extra cells dropped."""
    out = []
    for r in rows:
        row = {}
        for k, v in r.items():
            if k is None or not isinstance(v, str) or v == "":  # extra cells of a ragged row, empty cells
                continue
            try:
                row[k] = float(v)
            except ValueError:
                row[k] = v
        out.append(row)
    return out


# ----- sections ---------------------------------------------------------------------------------------
def _overview(run: Path, summary: dict) -> str:
    test = _dict(summary.get("test"))
    cards = [(str(k).split("/", 1)[-1], v) for k, v in test.items()][:6]
    cards += [("params", summary.get("params")), ("epochs", summary.get("epochs")),
              ("train time (s)", summary.get("train_time_s")), ("device", summary.get("device"))]
    html_cards = "".join(f'<div class="card"><b>{_num(v)}</b><span>{_esc(k)}</span></div>' for k, v in cards
                         if v is not None)
    data = _dict(summary.get("data"))
    facts = {"model": summary.get("model"), "task": summary.get("task"), "data": data.get("name"),
             "train / val / test": f"{data.get('train', 0)} / {data.get('val', 0)} / {data.get('test', 0)}",  # escaped by _kv
             "best epoch": summary.get("best_epoch"), "monitor": summary.get("monitor"),
             "best monitor": summary.get("best_monitor"), "precision": summary.get("precision"),
             "strategy": summary.get("strategy"), "world size": summary.get("world_size"),
             "torch": summary.get("torch")}
    return f'<div class="cards">{html_cards}</div>' + _kv({k: v for k, v in facts.items() if v is not None})


def _curves(run: Path, history: list[dict]) -> str:
    png = run / "curves.png"
    if not png.is_file() and history:
        from lamina.plots import plot_curves

        png = plot_curves(history, run / "curves.png")
    last = {k: v for k, v in (history[-1] if history else {}).items() if "/" in k and "samples_per_s" not in k}
    return _img(png, "training curves") + (_kv(last) if last else "")


def _overfitting(history: list[dict]) -> str:
    from lamina.runs.overfitting import overfitting_onset

    try:
        r = overfitting_onset(history, min_rise=0.01)  # same rule as the run's summary: <1% rises are noise
    except (DataError, ValueError, TypeError):  # metrics.csv without the losses, or with text where numbers go
        return ""
    if r["overfitting"]:
        verdict = f'<p class="warn">Overfitting began at epoch {_esc(r["onset_epoch"])}. {_esc(r["advice"])}.</p>'
    else:
        verdict = (f'<p class="ok">No overfitting detected: validation loss is at or near its best (epoch '
                   f'{_esc(r["best_epoch"])}) or still following training loss.</p>')
    rows = [{"epoch": e, "val - train loss": g} for e, g in zip(r["epochs"], r["gap"])]
    return verdict + _kv({"best epoch": r["best_epoch"], "best val loss": r["best_val"],
                          "gap at best": r["gap_at_best"], "final gap": r["final_gap"],
                          "val rise since best": r["val_rise"]}) + _table(rows)


def _calibration(run: Path) -> str:
    c = _json(run / "calibration.json")
    if not c or not isinstance(c, dict):
        return ""
    t = c.get("temperature")
    t = f"{t:.3f}" if isinstance(t, (int, float)) and not isinstance(t, bool) else t  # _table escapes the cell
    rows = [{**_dict(c.get("before")), "": "before"}, {**_dict(c.get("after")), "": f"after (T = {t})"}]
    return (_table(rows, ["", "ece", "nll", "acc"]) + _img(run / "calibration.png", "reliability diagram")
            + f'<p class="sub">temperature fitted on {_esc(c.get("n_val"))} validation samples, measured on '
              f'{_esc(c.get("n_test"))} test samples; {_esc(c.get("n_bins"))} bins.</p>')


def _gradients(run: Path) -> str:
    g = _json(run / "gradient_health.json")
    if not g or not isinstance(g, dict):
        return ""
    findings = _rows(g.get("findings"))
    verdict = ("".join(f'<p class="warn">{_esc(f.get("kind"))} at {_esc(f.get("layer"))} ({_num(f.get("value"))}): '
                       f'{_esc(f.get("suggestion"))}</p>' for f in findings)
               or '<p class="ok">Healthy: no vanishing, exploding, dead or saturated layers.</p>')
    rows = [{**_dict(r), "layer": n} for n, r in _dict(g.get("report")).items()]
    return verdict + _table(rows, ["layer", "kind", "grad_norm", "weight_norm", "grad_weight_ratio", "dead_frac",
                                   "saturation"])


def _explanations(run: Path) -> str:
    d = run / "explain"
    if not d.is_dir():
        return ""
    imgs = [_img(p, p.stem) + f"<p class='sub'>{_esc(p.stem)}</p>" for p in sorted(d.glob("*.png"))]
    info = [_json(p) for p in sorted(d.glob("*.json"))]
    rows = []
    for i in info:
        if isinstance(i, dict):
            rows.append({k: v for k, v in i.items() if not isinstance(v, (dict, list))})
    return _table(rows) + '<div class="grid">' + "".join(f"<div>{x}</div>" for x in imgs) + "</div>"


def _robustness(run: Path) -> str:
    files = sorted(run.glob("attack_*.json")) or sorted(run.glob("attack.json"))  # one file per budget, else the last
    keys = ("attack", "norm", "eps", "steps", "n", "clean_acc", "robust_acc", "seconds")
    rows = [{k: a.get(k) for k in keys} for a in map(_json, files) if isinstance(a, dict)]
    return _table(rows, list(keys))


def _fairness(run: Path) -> str:
    parts = []
    f = _json(run / "fairness.json")
    if isinstance(f, dict) and isinstance(f.get("by_group"), dict):
        rows = [{str(f.get("group", "group")): g, "n": v.get("n"), "accuracy": v.get("accuracy"),
                 "recall (macro)": v.get("recall_macro")} for g, v in f["by_group"].items() if isinstance(v, dict)]
        parts.append(_table(rows) + _kv({
            "split": f.get("data_split") or f.get("split"), "overall accuracy": _dict(f.get("overall")).get("accuracy"),
            "accuracy gap (max - min)": f.get("accuracy_difference"), "worst group": f.get("worst_group"),
            "demographic parity diff (mean over classes)": f.get("dp_difference_mean"),
            "equalized odds diff (mean over classes)": f.get("eo_difference_mean")})
            + _img(run / "fairness.png", "accuracy by group"))
    m = _json(run / "mitigation.json")
    if isinstance(m, dict) and isinstance(m.get("summary"), dict):
        rows = []
        for stage, h in m["summary"].items():
            h = _dict(h)
            rows.append({"": stage, "overall acc": h.get("overall_accuracy"), "gap": h.get("accuracy_difference"),
                         "DP diff": h.get("dp_difference_mean"), "EO diff": h.get("eo_difference_mean"),
                         **{str(g): a for g, a in _dict(h.get("accuracy_by_group")).items()}})
        parts.append(f"<p class='sub'>mitigation: {_esc(m.get('method'))} by {_esc(m.get('group'))} (retrained run "
                     f"{_esc(m.get('mitigated_run'))})</p>" + _table(rows)
                     + _img(run / "fairness_mitigation.png", "accuracy by group before and after mitigation"))
    return "".join(parts)


def _learning_curve(run: Path) -> str:
    lc = _json(run / "learning_curve.json")
    if not lc or not isinstance(lc, dict):
        return ""
    keys = ("fraction", "n_train", "train", "val", "test", "seconds")
    rows = [{k: r.get(k) for k in keys} for r in _rows(lc.get("rows"))]
    note = ""
    if isinstance(lc.get("power_law"), dict):
        p = lc["power_law"]
        note = (f"<p class='sub'>test error ~ {_fmt(p.get('a'), '.3g')} * n^-{_fmt(p.get('b'), '.3f')}; at twice "
                "the data: "
                f"{_num(lc.get('error_at_2x'))}; half the best error needs ~{_num(lc.get('n_for_half_error'))} "
                "samples.</p>")
    return _table(rows) + note + _img(run / "learning_curve.png", "learning curve")


def _si(v, unit: str) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return _esc("" if v is None else v)
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= factor:
            return f"{v / factor:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}"


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _cost(summary: dict) -> str:
    """summary["cost"] (runs/cost.py): energy and CO2e with their marking, per component, and FLOPs."""
    c = _dict(summary.get("cost"))
    if not c:
        return ""
    f = _dict(c.get("flops"))
    kwh, kg, wall = c.get("energy_kwh"), c.get("co2e_kg"), c.get("wall_time_s")
    cards = [(f"{kwh:.3g} kWh" if _real(kwh) else "not measured", "energy"),
             (f"{kg * 1000:.3g} g" if _real(kg) else "", f"CO2e ({c.get('country')})"),
             (f"{wall:.1f} s" if _real(wall) else "", "wall time")]
    html_cards = "".join(f'<div class="card"><b>{_esc(v)}</b><span>{_esc(k)}</span></div>' for v, k in cards if v)
    html_cards += "".join(f'<div class="card"><b>{_si(v, "FLOP")}</b><span>{k}</span></div>'
                          for v, k in ((f.get("forward_per_sample"), "forward / sample"),
                                       (f.get("training"), "training")) if _real(v))
    source = c.get("source")
    cls = {"measured": "ok", "not measured": "warn"}.get(source, "sub")
    verdict = f'<p class="{cls}">{_esc(source)}: {_esc(c.get("explanation"))}</p>' if source else ""
    parts = [{"component": k, "kWh": p.get("kwh"), "mean W": p.get("power_w"), "source": p.get("source"),
              "method": p.get("method")} for k, p in _dict(c.get("components")).items() if isinstance(p, dict)]
    facts = {"CO2e (kg)": kg, "g CO2e / kWh": c.get("g_co2e_per_kwh"), "tracked": c.get("tracked"),
             "tracked (s)": c.get("tracked_s"), "scope": c.get("scope"), "tracker": c.get("tracker"),
             "forward FLOPs / sample": f.get("forward_per_sample"),
             "training FLOPs / sample (fwd + bwd)": f.get("train_per_sample"), "samples seen": f.get("samples_seen"),
             "training FLOPs": f.get("training"), "FLOP count": f.get("note"), "FLOP method": f.get("method")}
    return (f'<div class="cards">{html_cards}</div>' + verdict
            + _table(parts, ["component", "kWh", "mean W", "source", "method"])
            + _kv({k: v for k, v in facts.items() if v is not None}))


def _comparisons(folder, page: Path) -> str:
    """Links to the `lamina compare` pages that include this run, relative to the report's own folder."""
    import os
    from urllib.parse import quote

    from lamina.report.compare import comparisons

    rows = []
    for e in reversed(comparisons(folder)):  # newest first
        href = quote(Path(os.path.relpath(e["page"], page.resolve().parent)).as_posix())
        rows.append(f'<li><a href="{_esc(href)}">{_esc(Path(e["page"]).name)}</a> '
                    f'<span class="sub">{_esc(", ".join(e["runs"]))}; {_esc(e["time"])}</span></li>')
    return f"<ul>{''.join(rows)}</ul>" if rows else ""


# ----- the page ---------------------------------------------------------------------------------------
def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's report.html (or `out`) and return its path."""
    from lamina.runs.folder import RunFolder

    run, folder = Path(run_dir), RunFolder(run_dir)
    if not folder.config.is_file():
        raise DataError(f"{run}: not a run folder (no config.yaml); pass the folder `lamina train` printed")
    summary = _dict(_json(folder.summary))
    history = _history(run)
    name = run.name
    path = Path(out) if out else run / "report.html"
    parts = [
        _section("overview", "Overview", _overview(run, summary), "test metrics of the best checkpoint"),
        _section("curves", "Training curves", _curves(run, history)),
        _section("overfitting", "Overfitting", _overfitting(history),
                 "validation vs training loss per epoch; onset = first epoch after the best validation loss, "
                 "when validation then keeps rising while training loss falls"),
        _section("confusion", "Confusion matrix", _img(folder.confusion, "confusion matrix")),
        _section("calibration", "Calibration", _calibration(run),
                 "expected calibration error before and after temperature scaling"),
        _section("gradients", "Gradient health", _gradients(run),
                 "per-layer gradient norms of the trained model on one training batch"),
        _section("explanations", "Explanations", _explanations(run)),
        _section("robustness", "Robustness", _robustness(run), "clean vs adversarial accuracy"),
        _section("fairness", "Fairness", _fairness(run)),
        _section("learning-curve", "Learning curve", _learning_curve(run)),
        _section("cost", "Cost", _cost(summary),
                 "energy and CO2e of training (CodeCarbon), each figure marked measured or estimated; FLOPs "
                 "counted on one batch"),
        _section("comparisons", "Comparisons", _comparisons(folder, path), "`lamina compare` pages with this run"),
    ]
    config = folder.config.read_text(errors="replace")
    parts.append(_section("config", "Config", f"<pre>{_esc(config)}</pre>",
                          f"re-run with <code>lamina train {_esc(folder.config)}</code>"))
    shown = [(sid, body) for sid, body in parts if _has_content(body)]
    titles = {"overview": "Overview", "curves": "Curves", "overfitting": "Overfitting", "confusion": "Confusion",
              "calibration": "Calibration", "gradients": "Gradients", "explanations": "Explanations",
              "robustness": "Robustness", "fairness": "Fairness", "learning-curve": "Learning curve",
              "cost": "Cost", "comparisons": "Comparisons", "config": "Config"}
    nav = "".join(f'<a href="#{sid}">{titles[sid]}</a>' for sid, _ in shown)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>lamina report: {_esc(name)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{_esc(name)}</h1><p class='sub'>lamina run report, {stamp}</p><nav>{nav}</nav>"
            + "".join(body for _, body in shown) + "</main></body></html>")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def _has_content(section: str) -> bool:
    """A section whose body holds more than its heading and sub-line."""
    body = section.split("</h2>", 1)[1]
    if body.startswith('<p class="sub">'):
        body = body.split("</p>", 1)[1]
    return body.replace("</section>", "").strip() != ""
