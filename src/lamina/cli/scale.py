"""`lamina scale`: a scaling-law sweep (lamina.search.scaling). Parses the sizes and the compute rule, prints one
line per run on stderr while it trains, then a table and the fitted exponents on stdout (or --json)."""

from __future__ import annotations

import argparse
import json
import math

_EPILOG = """compute rule (choose one):
  --tokens 1e6,4e6     every size trains for each token budget D (steps = D / (batch x block))
  --compute 1e13,4e13  every size gets D = C / (6 N) tokens for each FLOP budget C (N: non-embedding params)
sizes: inline 'n_layer=1,n_embd=32,n_head=2;n_layer=2,n_embd=64,n_head=4' or a YAML file with
  sizes:
    - {n_layer: 1, n_embd: 32, n_head: 2}
    - {n_layer: 2, n_embd: 64, n_head: 4}
Re-running the same command skips the runs already finished in the output folder.
example: lamina scale configs/shakespeare_char_gpt.yaml --sizes sizes.yaml --tokens 1e6,4e6 data.batch_size=32"""


def add_parsers(sub) -> None:
    s = sub.add_parser("scale", help="scaling-law sweep: train one model family at several sizes under a fixed "
                                     "token or compute budget; fit L = E + A N^-alpha (+ B D^-beta), with plot",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    s.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]",
                   help="a YAML config and/or dotted overrides applied to every run")
    s.add_argument("--sizes", required=True, help="model sizes: 'k=v,k=v;k=v,...' or a YAML file with a sizes: list")
    rule = s.add_mutually_exclusive_group(required=True)
    rule.add_argument("--tokens", help="comma-separated token budgets D, e.g. 1e6,4e6")
    rule.add_argument("--compute", help="comma-separated FLOP budgets C, e.g. 1e13,4e13 (D = C / 6N)")
    s.add_argument("--out", help="output folder (default: runs/<name>-scaling)")
    s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals (0: none)")
    s.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def _numbers(text: str, flag: str) -> list[float]:
    from lamina.errors import ConfigError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated positive numbers such as 1e6,4e6, got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag}: empty; give at least one budget, e.g. {flag} 1e6")
    bad = [v for v in values if not math.isfinite(v) or v <= 0]
    if bad:
        raise ConfigError(f"{flag}: budgets must be positive numbers, got {bad[0]:g}")
    return values


def _interval(fit: dict, name: str) -> str:
    parts = []
    for key, what in (("ci95_bootstrap", "bootstrap"), ("ci95_covariance", "covariance"), ("ci95_ols", "OLS")):
        ci = fit.get(key, {}).get(name)
        if ci:
            parts.append(f"[{ci[0]:.3f}, {ci[1]:.3f}] {what}")
    return f" (95% CI {'; '.join(parts)})" if parts else " (no interval: too few points)"


def _describe(fit: dict) -> str:
    q = fit["params"]
    r2 = f", R^2 {fit['r2']:.4f}" if fit.get("r2") is not None else ""
    edge = f"; at a bound: {', '.join(fit['at_bound'])}" if fit.get("at_bound") else ""
    if "B" in q:
        return (f"L = {q['E']:.3f} + {q['A']:.4g} N^-{q['alpha']:.3f} + {q['B']:.4g} D^-{q['beta']:.3f}: "
                f"alpha {q['alpha']:.3f}{_interval(fit, 'alpha')}, beta {q['beta']:.3f}{_interval(fit, 'beta')}"
                f"{r2}{edge}")
    return (f"L = {q['E']:.3f} + {q['A']:.4g} N^-{q['alpha']:.3f}: alpha {q['alpha']:.3f}{_interval(fit, 'alpha')}"
            f"{r2}{edge}")


def cmd_scale(a, console) -> int:
    from lamina.cli.main import _split_train_args
    from lamina.config import load_config
    from lamina.errors import ConfigError
    from lamina.search.scaling import parse_sizes, scaling_sweep

    path, overrides = _split_train_args(a.args)
    cfg = load_config(path, overrides)
    sizes = parse_sizes(a.sizes)
    tokens = _numbers(a.tokens, "--tokens") if a.tokens is not None else None
    compute = _numbers(a.compute, "--compute") if a.compute is not None else None
    if a.bootstrap < 0:
        raise ConfigError(f"--bootstrap: expected a non-negative integer, got {a.bootstrap}")
    if len(sizes) < 3:
        console.print(f"[yellow]note:[/] {len(sizes)} size(s): the runs train, but a power law in N needs at least 3 "
                      "sizes, so there will be no fit")
    status = None

    def progress(ev: dict) -> None:
        nonlocal status
        head = f"[{ev['index'] + 1}/{ev['total']}] {ev['label']} {ev['budget']}"
        if ev["phase"] == "start":
            status = console.status(f"{head}: training N={ev['N']:,} for {ev['steps']} steps ({ev['D']:.3g} tokens)")
            status.start()
            return
        if status is not None:
            status.stop()
            status = None
        how = "done before" if ev["resumed"] else f"{ev['seconds']:.1f}s"
        console.print(f"{head}  N={ev['N']:,}  D={ev['D']:.3g}  val loss {ev['val_loss']:.4f}  ({how})")

    try:
        r = scaling_sweep(cfg, sizes, tokens=tokens, compute=compute, out=a.out, bootstrap=a.bootstrap,
                          seed=a.seed, progress=progress)
    finally:
        if status is not None:
            status.stop()
    if a.json:
        print(json.dumps(r))
        return 0
    print(f"{'size':<36}{'N':>10}{'N total':>10}{'D':>10}{'C':>10}{'steps':>7}{'val loss':>10}{'s':>8}")
    for p in sorted(r["points"], key=lambda p: (p["budget"], p["N"])):
        print(f"{p['label']:<36}{p['N']:>10,}{p['N_total']:>10,}{p['D']:>10.3g}{p['C']:>10.3g}{p['steps']:>7}"
              f"{p['val_loss']:>10.4f}{p['seconds']:>8.1f}")
    sym = "D" if r["rule"] == "tokens" else "C"
    for row in r["fits"]["per_budget"]:
        fit = row["size_law"]
        if "params" in fit:
            print(f"{sym}={row['budget']:.3g}: {_describe(fit)}")
            pure = row.get("pure_power", {})
            if "params" in pure:
                q = pure["params"]
                print(f"    without E: L = {q['A']:.4g} N^-{q['alpha']:.3f}: alpha {q['alpha']:.3f}"
                      f"{_interval(pure, 'alpha')}")
        elif r["rule"] == "tokens":
            print(f"{sym}={row['budget']:.3g}: no fit: {fit['skipped']}")
        else:
            b = row["best"]
            print(f"{sym}={row['budget']:.3g}: lowest loss {b['val_loss']:.4f} at N={b['N']:,} (D={b['D']:.3g})")
    joint = r["fits"]["joint"]
    if "params" in joint:
        print(f"joint: {_describe(joint)}")
    elif len(r["budgets"]) > 1:
        print(f"joint: no fit: {joint['skipped']}")
    print(f"plot: {r['out']}/scaling.png")
    return 0


COMMANDS = {"scale": cmd_scale}
