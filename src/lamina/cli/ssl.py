"""`lamina pretrain` (self-supervised pretraining, lamina.runs.ssl) and `lamina probe` (linear-probe and k-NN
accuracy of any run's frozen features)."""

from __future__ import annotations

import argparse
import json

_EPILOG = """methods (ssl.* keys, in the config or as KEY=VALUE):
  ssl.method=simclr   contrastive, two views per image (ssl.temperature, ssl.proj_dim, ssl.crop_scale, ssl.jitter)
  ssl.method=byol     online network predicts a momentum target's view (ssl.momentum)
  ssl.method=mae      masked autoencoder on a ViT (ssl.mask_ratio, ssl.decoder_dim, ssl.decoder_depth)
the run folder it writes is a pretrained source:
  lamina train configs/fashion_mnist.yaml model.pretrained=runs/<ssl run> data.train_fraction=0.01
examples:
  lamina pretrain configs/ssl_simclr_fashion.yaml
  lamina pretrain configs/ssl_mae_fashion.yaml trainer.max_epochs=2
  lamina probe runs/<run> [--random]"""


def add_parsers(sub) -> None:
    s = sub.add_parser("pretrain", help="self-supervised pretraining on unlabelled images (SimCLR, BYOL, MAE); "
                                        "the encoder is probed and can be fine-tuned with model.pretrained=RUN",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    s.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]", help="a YAML config and/or dotted overrides")
    s.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    s.add_argument("--out", help="run folder to write (default: runs/<name>-<timestamp>)")
    s.add_argument("--no-probe", action="store_true", help="skip the linear / k-NN probes after training")
    s.add_argument("--no-progress", action="store_true", help="no live progress bar")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p = sub.add_parser("probe", help="linear-probe and k-NN test accuracy of a run's frozen features")
    p.add_argument("run", help="a run folder (supervised, self-supervised or fine-tuned, image classification data)")
    p.add_argument("--random", action="store_true", help="probe the same architecture freshly initialised instead")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def _probe_line(console, r: dict) -> None:
    console.print(f"linear probe {r['linear_probe']:.4f}   k-NN (k={r['knn_k']}) {r['knn']:.4f}   "
                  f"({r['features']} features; {r['train']:,} train / {r['test']:,} test images; "
                  f"encode {r['encode_s']:.1f} s, fit {r['probe_s']:.1f} s)")


def cmd_pretrain(a, console) -> int:
    from lamina.cli.main import _split_train_args
    from lamina.config import load_config
    from lamina.runs.ssl import pretrain

    path, overrides = _split_train_args(a.args)
    cfg = load_config(path, overrides)
    if a.print_config:
        from lamina.config import to_yaml

        print(to_yaml(cfg), end="")
        return 0
    callbacks = []
    if cfg.trainer.progress and not a.no_progress and not a.json:
        from lamina.cli.progress import RichProgress

        callbacks.append(RichProgress(console, header=False))

    def on_event(ev: dict) -> None:
        if a.json:
            return
        if ev["event"] == "start":
            console.print(f"[bold]lamina pretrain[/]: {ev['method']} on {ev['images']:,} unlabelled "
                          f"{cfg.data.name} images, {cfg.model.name} encoder ({ev['encoder_params']:,} params; "
                          f"{ev['learner_params']:,} with the method's heads), {ev['steps']:,} steps")
        elif ev["event"] == "probe":
            console.print("probing the frozen encoder on the labelled train / test splits ...")

    r = pretrain(cfg, callbacks, on_event, a.out, probe_after=not a.no_probe)
    if a.json:
        print(json.dumps({k: v for k, v in r.items() if k != "config"}, default=str))
        return 0
    last = r["history"][-1] if r["history"] else {}
    console.print(f"trained {r['epochs']} epochs / {r['steps']:,} steps in {r['train_time_s']:.0f} s; final "
                  f"train/loss {last.get('train/loss', float('nan')):.4f}")
    if "probe" in r:
        _probe_line(console, r["probe"])
    console.print(f"run folder: {r['run_dir']}  (fine-tune: model.pretrained={r['run_dir']})")
    return 0


def cmd_probe(a, console) -> int:
    from lamina.runs.ssl import probe_run

    r = probe_run(a.run, random=a.random)
    if a.json:
        print(json.dumps(r, default=str))
        return 0
    what = "freshly initialised " + r["model"] if r["random"] else r["model"]
    console.print(f"[bold]lamina probe[/]: {what} from {r['run_dir']}")
    _probe_line(console, r)
    return 0


COMMANDS = {"pretrain": cmd_pretrain, "probe": cmd_probe}
