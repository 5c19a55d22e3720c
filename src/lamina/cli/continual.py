"""`lamina continual`: train a config on a continual-learning stream (lamina.runs.continual) with one strategy or
several side by side; prints the accuracy matrix and ACC / BWT, writes stream.json and the plots."""

from __future__ import annotations

import argparse
import json

_EPILOG = """streams (continual.* keys, in the config or as KEY=VALUE):
  continual.stream=split continual.scenario=class     Split: disjoint class groups, one head (class-incremental)
  continual.stream=split continual.scenario=task      the same groups, each scored among its own classes
  continual.stream=permuted continual.scenario=domain Permuted pixels: every class, a new pixel order each time
strategies: naive, replay (continual.buffer_size), ewc (continual.ewc_lambda), lwf (continual.lwf_alpha), joint
examples:
  lamina continual configs/continual_fashion.yaml --strategies naive,replay,ewc,lwf,joint
  lamina continual configs/continual_fashion.yaml continual.scenario=task continual.strategy=ewc"""


def add_parsers(sub) -> None:
    s = sub.add_parser("continual", help="continual learning: train on a stream of experiences (Split or Permuted) "
                                         "with naive / replay / EWC / LwF / joint; accuracy matrix, ACC, BWT",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    s.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]", help="a YAML config and/or dotted overrides")
    s.add_argument("--strategies", help="comma-separated strategies to compare on the same stream (default: "
                                        "continual.strategy alone)")
    s.add_argument("--out", help="output folder of a comparison (default: runs/<name>-continual)")
    s.add_argument("--no-progress", action="store_true", help="no live progress bar")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def _matrix(matrix: list[list[float]], classes: list[list[int]], joint: bool) -> None:
    """Rows: after training through experience i (a joint run: once, on all); columns: tested on experience j."""
    print("after \\ on  " + "".join(f"{'e' + str(j):>8}" for j in range(len(matrix[0]))))
    for i, row in enumerate(matrix):
        label = "joint" if joint else f"e{i}"
        print(f"{label:<12}" + "".join(f"{v:>8.4f}" for v in row))
    print("classes     " + "".join(f"{'/'.join(map(str, c)):>8}" for c in classes))


def cmd_continual(a, console) -> int:
    from lamina.cli.main import _split_train_args
    from lamina.config import load_config
    from lamina.runs.continual import compare_strategies, parse_strategies, train_stream

    path, overrides = _split_train_args(a.args)
    cfg = load_config(path, overrides)
    names = parse_strategies(a.strategies) if a.strategies is not None else None
    callbacks = []
    if cfg.trainer.progress and not a.no_progress:
        from lamina.cli.progress import RichProgress

        callbacks.append(RichProgress(console, header=False))
    current = {"strategy": names[0] if names else cfg.continual.strategy, "header": False}
    c = cfg.continual

    def on_event(ev: dict) -> None:
        if not current["header"] and ev["event"] == "experience_start":  # after the data and settings were accepted
            current["header"] = True
            console.print(f"[bold]lamina continual[/]: {cfg.data.name} {c.stream} stream, {c.experiences} "
                          f"experiences, {c.scenario}-incremental, model {cfg.model.name}, "
                          f"{cfg.trainer.max_epochs} epoch(s) each")
        if ev["event"] == "strategy_start":
            current["strategy"] = ev["strategy"]
        elif ev["event"] == "experience_start":
            what = "all experiences (joint)" if current["strategy"] == "joint" else \
                f"experience {ev['experience'] + 1}/{ev['experiences']}"
            console.print(f"[bold]{current['strategy']}[/] {what}: classes {ev['classes']}, {ev['train']:,} samples")
        elif ev["event"] == "experience_end":
            row = "  ".join(f"{v:.3f}" for v in ev["row"])
            console.print(f"  test acc per experience: {row}  ({ev['train_s']:.1f}s)")

    if names is None:
        r = train_stream(cfg, None, callbacks, on_event)
        if a.json:
            print(json.dumps({k: v for k, v in r.items() if k != "history"}))
            return 0
        _matrix(r["matrix"], r["classes"], r["strategy"] == "joint")
        bwt = f"  BWT {r['bwt']:+.4f}" if "bwt" in r else ""
        print(f"{r['strategy']}: ACC {r['acc']:.4f}{bwt}  train {r['train_time_s']:.1f}s  run: {r['run_dir']}")
        return 0
    out = a.out or f"{cfg.logging.root}/{cfg.name or cfg.data.name + '-' + c.stream + '-' + c.scenario}-continual"
    s = compare_strategies(cfg, names, out, callbacks, on_event)
    if a.json:
        print(json.dumps(s))
        return 0
    print(f"{'strategy':<10}{'ACC':>8}{'BWT':>9}{'train s':>9}  final row")
    for n, r in s["strategies"].items():
        bwt = f"{r['bwt']:>+9.4f}" if "bwt" in r else f"{'-':>9}"
        print(f"{n:<10}{r['acc']:>8.4f}{bwt}{r['train_time_s']:>9.1f}  "
              + " ".join(f"{v:.3f}" for v in r["matrix"][-1]))
    print(f"comparison: {s['out']}/comparison.json, {s['out']}/comparison.png")
    return 0


COMMANDS = {"continual": cmd_continual}
