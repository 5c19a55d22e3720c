"""`lamina federated`: federated learning on Flower (lamina.runs.federated) with one setting, or several side by
side (FedAvg / FedProx on IID / Dirichlet client splits, and the centralised baseline); prints test accuracy per
round, writes federated.json, the global model's checkpoint and the plots."""

from __future__ import annotations

import argparse
import json

_EPILOG = """settings (federated.* keys, in the config or as KEY=VALUE):
  federated.strategy=fedavg|fedprox (federated.mu)    federated.split=iid|dirichlet (federated.alpha)
  federated.clients=10 federated.rounds=20 federated.fraction_fit=0.5 federated.local_epochs=1
  federated.dropout_client=3 federated.dropout_round=2  (or federated.dropout_prob=0.1): clients leave mid-fit
  federated.clip=1.0 federated.noise=0.1                 differential privacy: Flower's server-side clipping
  federated.engine=inprocess|processes                   processes: Flower's gRPC server + client processes
--compare names: fedavg-iid, fedavg-dirichlet, fedprox-iid, fedprox-dirichlet, central
examples:
  lamina federated configs/federated_fashion.yaml
  lamina federated configs/federated_fashion.yaml --compare fedavg-iid,fedavg-dirichlet,fedprox-dirichlet,central
  lamina federated configs/federated_fashion.yaml federated.engine=processes federated.clients=4
  lamina eval runs/<run>     the global model after the last round"""


def add_parsers(sub) -> None:
    s = sub.add_parser("federated", help="federated learning on Flower: FedAvg / FedProx over IID or Dirichlet "
                                         "client splits, client sampling and dropouts; accuracy per round",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    s.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]", help="a YAML config and/or dotted overrides")
    s.add_argument("--compare", help="comma-separated settings to run on the same data and seed (default: the "
                                     "config's federated.strategy and federated.split alone)")
    s.add_argument("--out", help="output folder: a comparison's (default: runs/<name>-federated) or a single "
                                 "run's run folder (default: a new folder under logging.root)")
    s.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def cmd_federated(a, console) -> int:
    from lamina.cli.main import _split_train_args
    from lamina.config import load_config, to_yaml
    from lamina.runs.federated import compare_settings, parse_settings, require_flwr, run_federated

    path, overrides = _split_train_args(a.args)
    cfg = load_config(path, overrides)
    if a.print_config:
        print(to_yaml(cfg), end="")
        return 0
    names = parse_settings(a.compare) if a.compare is not None else None
    require_flwr()  # before any data is loaded
    f = cfg.federated

    def on_event(ev: dict) -> None:
        if a.json:
            return
        if ev["event"] == "setup":
            skew = f"label skew {ev['label_skew']:.3f}, " if ev.get("label_skew") is not None else ""
            console.print(f"[bold]{ev['setting']}[/]: {cfg.data.name}, {ev['clients']} client(s) of "
                          f"{min(ev['sizes'])}-{max(ev['sizes'])} samples, {skew}{f.rounds} rounds, engine "
                          f"{ev['engine']}, model {cfg.model.name}")
        elif ev["event"] == "round_end":
            who = ""
            if "sampled" in ev:
                who = f"  clients {ev['trained']}" + (f", failed {ev['failed']}" if ev["failed"] else "")
            console.print(f"  round {ev['round']:>3}: test acc {ev['test/acc']:.4f}  loss {ev['test/loss']:.4f}  "
                          f"({ev['round_s']:.1f}s){who}")

    if names is None:
        r = run_federated(cfg, on_event, run_dir=a.out)
        if a.json:
            print(json.dumps({k: v for k, v in r.items() if k != "rounds"}))
            return 0
        print(f"{r['setting']}: final test acc {r['final_acc']:.4f} after {f.rounds} rounds, {r['failures']} client "
              f"failure(s), loop {r['loop_s']:.1f}s  run: {r['run_dir']}")
        return 0
    out = a.out or f"{cfg.logging.root}/{cfg.name or cfg.data.name}-federated"
    s = compare_settings(cfg, names, out, on_event)
    if a.json:
        print(json.dumps(s))
        return 0
    print(f"{'setting':<20}{'final acc':>10}{'best acc':>10}{'skew':>7}{'fails':>6}{'loop s':>8}")
    for n, r in s["settings"].items():
        skew = f"{r['label_skew']:.3f}" if r["label_skew"] is not None else "-"
        print(f"{n:<20}{r['final_acc']:>10.4f}{r['best_acc']:>10.4f}{skew:>7}{r['failures']:>6}{r['loop_s']:>8.1f}")
    for strategy, p in s.get("non_iid_penalty", {}).items():
        print(f"non-IID penalty ({strategy}, IID - Dirichlet alpha {f.alpha}): {p:+.4f}")
    print(f"comparison: {s['out']}/comparison.json, {s['out']}/comparison.png")
    return 0


COMMANDS = {"federated": cmd_federated}
