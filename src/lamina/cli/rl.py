"""`lamina rl train|eval`: PPO and DQN on Gymnasium environments (lamina.runs.rl)."""

from __future__ import annotations

import argparse
import json

_EPILOG = """examples:
  lamina rl train configs/cartpole_ppo.yaml                      # PPO, 8 environments, 100k steps
  lamina rl train configs/cartpole_dqn.yaml seed=1               # DQN with double-Q targets
  lamina rl train configs/cartpole_ppo.yaml rl.env=Acrobot-v1 rl.total_steps=200000
  lamina rl eval runs/cartpole-ppo --episodes 20 --frames cartpole.png"""


def add_parsers(sub) -> None:
    r = sub.add_parser("rl", help="reinforcement learning: PPO and DQN on Gymnasium environments",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    verbs = r.add_subparsers(dest="rl_cmd", required=True, metavar="{train,eval}")
    t = verbs.add_parser("train", help="train a policy; writes a run folder")
    t.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]", help="a YAML config and/or dotted overrides")
    t.add_argument("--no-progress", action="store_true", help="no live progress bar")
    t.add_argument("--seeds", help="train once per seed (e.g. 0,1,2): returns over seeds with a 95%% band "
                                   "(<name>-seeds/seeds.json and returns.png)")
    e = verbs.add_parser("eval", help="greedy episodes of a trained policy")
    e.add_argument("run", help="a run folder written by `lamina rl train`")
    e.add_argument("--episodes", type=int, default=10)
    e.add_argument("--seed", type=int, default=20_000, help="seed of the first episode (the next ones count up)")
    e.add_argument("--which", choices=["best", "last"], default="best")
    e.add_argument("--frames", metavar="PNG", help="draw the first episode's rendered frames as a strip")
    e.add_argument("--video", metavar="GIF", help="record the first episode as an animated GIF (real time)")
    for p in (r, t, e):
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def cmd_rl(a, console) -> int:
    if a.rl_cmd == "eval":
        from lamina.runs.rl import evaluate_rl

        res = evaluate_rl(a.run, a.episodes, a.seed, a.which, a.frames, video=a.video)
        if a.json:
            print(json.dumps(res))
        else:
            console.print(f"{res['algo'].upper()} on {res['env']}: return [bold]{res['mean']:.1f}[/] ± "
                          f"{res['std']:.1f} over {res['episodes']} greedy episodes"
                          + (f"; frames -> {res['frames']}" if "frames" in res else "")
                          + (f"; video ({res['video_frames']} frames) -> {res['video']}" if "video" in res else ""))
        return 0
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from lamina.cli.main import _split_train_args
    from lamina.config import load_config
    from lamina.runs.rl import train_rl

    path, overrides = _split_train_args(a.args)
    cfg = load_config(path, overrides)
    show = not (a.no_progress or a.json or not cfg.trainer.progress)
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console, transient=True,
                   disable=not show)
    state = {"job": None, "last": None}

    def on_event(ev: dict) -> None:
        if ev["event"] == "start":
            if not a.json:
                console.print(f"[bold]lamina rl[/]: {ev['algo'].upper()} on {ev['env']} ({ev['obs_dim']} observations, "
                              f"{ev['n_actions']} actions), {ev['total_steps']:,} steps -> {ev['run_dir']}")
            state["job"] = bar.add_task("steps", total=ev["total_steps"], info="")
        elif ev["event"] == "episode":
            state["last"] = ev["return"]
            bar.update(state["job"], completed=ev["step"], info=f"last return {ev['return']:.0f}")
        elif ev["event"] == "eval" and not a.json:
            bar.console.print(f"  step {ev['step']:>9,}: greedy return {ev['mean']:.1f} ± {ev['std']:.1f}")

    if a.seeds:
        from lamina.cli.search import parse_seeds
        from lamina.runs.rl import train_rl_seeds

        seeds = parse_seeds(a.seeds)
        with bar:
            res = train_rl_seeds(cfg, seeds, on_event)
        if a.json:
            print(json.dumps(res))
        else:
            f = res["final"]
            console.print(f"{len(seeds)} seeds: final greedy return [bold]{f['mean']:.1f}[/] ± {f['std']:.1f} "
                          f"({', '.join(f'{v:.1f}' for v in f['values'])}); {res['folder']}/returns.png")
        return 0
    with bar:
        s = train_rl(cfg, on_event)
    if a.json:
        print(json.dumps(s))
    else:
        console.print(f"done in {s['wall_s']:.0f}s ({s['steps_per_s']:.0f} steps/s): best greedy return "
                      f"[bold]{s['best_eval']:.1f}[/] at step {s['best_step']:,}, final {s['final_eval']:.1f}; "
                      f"run folder {s['run_dir']}")
    return 0


COMMANDS = {"rl": cmd_rl}
