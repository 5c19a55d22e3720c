"""`lamina fewshot`: train an encoder on some classes and test N-way K-shot episodes on held-out classes
(lamina.runs.fewshot); prints accuracy with its 95% interval and, on Omniglot, the error on Lake et al.'s runs."""

from __future__ import annotations

import argparse
import json

_EPILOG = """examples:
  lamina fewshot configs/fewshot_omniglot.yaml                          # prototypical network, 5-way 1-shot
  lamina fewshot configs/fewshot_omniglot.yaml fewshot.shots=5
  lamina fewshot configs/fewshot_omniglot.yaml fewshot.method=baseline fewshot.head=logistic
  lamina fewshot configs/fewshot_fashion.yaml                           # held-out Fashion-MNIST classes"""


def add_parsers(sub) -> None:
    s = sub.add_parser("fewshot", help="few-shot learning: prototypical networks or a pretrained-encoder baseline, "
                                       "N-way K-shot episodes on held-out classes with 95%% intervals",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    s.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]", help="a YAML config and/or dotted overrides")
    s.add_argument("--no-progress", action="store_true", help="no live progress bar")
    s.add_argument("--json", action="store_true", help="print the result as JSON (without per-episode values)")
    s.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def cmd_fewshot(a, console) -> int:
    from lamina.cli.main import _split_train_args
    from lamina.config import load_config
    from lamina.runs.fewshot import train_fewshot

    path, overrides = _split_train_args(a.args)
    cfg = load_config(path, overrides)
    f = cfg.fewshot
    callbacks = []
    if cfg.trainer.progress and not a.no_progress:
        from lamina.cli.progress import RichProgress

        callbacks.append(RichProgress(console, header=False))

    def on_event(ev: dict) -> None:
        if ev["event"] == "start":
            console.print(f"[bold]lamina fewshot[/]: {f.method} on {cfg.data.name}, model {cfg.model.name} "
                          f"({ev['params']:,} params), {ev['train_classes']} training classes ({ev['train_samples']:,} "
                          f"samples), tested on {ev['test_classes']} held-out classes: {f.ways}-way {f.shots}-shot, "
                          f"{f.test_episodes} episodes")
        elif ev["event"] == "trained":
            console.print(f"trained in {ev['seconds']:.1f}s; testing")

    r = train_fewshot(cfg, callbacks, on_event)
    if a.json:
        print(json.dumps({k: v for k, v in r.items() if k not in ("episode_acc", "history")}))
        return 0
    for h, m in r["heads"].items():
        print(f"{r['method']} ({h} head): {f.ways}-way {f.shots}-shot accuracy {m['acc'] * 100:.2f}% "
              f"+- {m['ci95'] * 100:.2f} (95% CI, {m['episodes']} episodes)")
    if r["one_shot_runs"]:
        o = r["one_shot_runs"]
        print(f"Lake et al. 20-way one-shot runs: error {o['error'] * 100:.1f}% ({o['trials']} trials)")
    print(f"run: {r['run_dir']}")
    return 0


COMMANDS = {"fewshot": cmd_fewshot}
