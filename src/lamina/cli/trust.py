"""The trust and insight verbs: calibrate, explain, attack, fairness, learning-curve, report, audit.

Each parses, checks the optional packages it needs up front (one line naming the extra), calls one library
function and prints a short table; the numbers also land as JSON/PNG in the run folder.
"""

from __future__ import annotations

import argparse
import importlib
import json


def _need(module: str, what: str, extra: str = "trust") -> None:
    from lamina.errors import MissingDependencyError

    try:
        importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f'{what} needs the {module} package: pip install "lamina[{extra}]"') from None


def _run(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="RUN_DIR")
    p.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint of the run")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def add_parsers(sub) -> None:
    c = sub.add_parser("calibrate", help="expected calibration error and temperature scaling fitted on validation data")
    _run(c)
    c.add_argument("--bins", type=int, default=15)
    c.add_argument("--no-progress", action="store_true", help="no progress bar (val, then test batches)")

    e = sub.add_parser("explain", help="attributions for test examples: saliency, integrated_gradients, smoothgrad, "
                                       "gradcam, occlusion, attention_rollout (ViT); token IG for text")
    _run(e)
    e.add_argument("--method", default="integrated_gradients")
    e.add_argument("-n", type=int, default=8, help="test examples to explain")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--out", help="folder for the PNG/npz (default: RUN_DIR/explain)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar (examples attributed)")

    a = sub.add_parser("attack", help="clean vs adversarial accuracy (fgsm, pgd, apgd) on the test split")
    _run(a)
    a.add_argument("--attack", default="pgd", help="fgsm | pgd | apgd")
    a.add_argument("--eps", type=float, default=0.1, help="budget in input units (pixels in [0, 1])")
    a.add_argument("--steps", type=int, default=20)
    a.add_argument("--norm", default="linf", help="linf | l2")
    a.add_argument("--alpha", type=float, default=None, help="step size (default 2.5 * eps / steps)")
    a.add_argument("-n", type=int, default=None, help="first N test samples (default: all)")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")

    f = sub.add_parser("fairness", help="per-group accuracy and fairness differences; --mitigate retrains")
    _run(f)
    f.add_argument("--group", default="accent", help="a group attribute of the data (fsdd_fusion: speaker, accent, "
                                                      "gender)")
    f.add_argument("--split", default="test", choices=["train", "val", "test"])
    f.add_argument("--mitigate", default=None, help="reweight: retrain with inverse-frequency group weights")
    f.add_argument("--no-progress", action="store_true", help="no live progress bar (--mitigate's retraining)")

    lc = sub.add_parser("learning-curve", help="train one config on growing subsets of its training data; "
                                               "metric vs training-set size with plot")
    lc.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
    lc.add_argument("--fractions", default="0.1,0.25,0.5,1", help="comma-separated fractions in (0, 1]")
    lc.add_argument("--out", help="output folder (default: runs/<name>-learning-curve)")
    lc.add_argument("--equal-epochs", action="store_true",
                    help="same epochs for every subset (default: same optimizer steps)")
    lc.add_argument("--seeds", help="train every fraction once per seed (e.g. 0,1,2): mean +- std per point")
    lc.add_argument("--json", action="store_true")
    lc.add_argument("--no-progress", action="store_true", help="no progress bar")
    lc.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    r = sub.add_parser("report", help="write RUN_DIR/report.html: one self-contained page (config, curves, "
                                      "confusion, and every trust result computed so far)")
    r.add_argument("path", metavar="RUN_DIR")
    r.add_argument("--out", help="write the page here instead")
    r.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    au = sub.add_parser("audit", help="compute every trust check that applies (calibration, gradient health, "
                                      "explanations, robustness, fairness), then write the report")
    _run(au)
    au.add_argument("--eps", type=float, default=0.1, help="PGD L-inf budget (input units)")
    au.add_argument("--steps", type=int, default=20)
    au.add_argument("-n", type=int, default=1000, help="test samples to attack")
    au.add_argument("--group", default=None, help="fairness group attribute (default: accent when the data has it)")
    au.add_argument("--skip", default="", help="comma-separated parts to skip: calibration,gradients,explain,"
                                               "robust,fairness")
    au.add_argument("--no-progress", action="store_true", help="no progress bar (calibration, attack)")


def _print_json(a, obj) -> bool:
    if a.json:
        print(json.dumps(obj, default=str))
    return a.json


def cmd_calibrate(a, console) -> int:
    from lamina.cli.progress import progress_bar
    from lamina.trust.calibration import calibrate_run

    with progress_bar(console, "calibrate", a.no_progress) as progress:
        r = calibrate_run(a.path, a.which, a.bins, progress=progress)
    if _print_json(a, {k: v for k, v in r.items() if not k.startswith("bins")}):
        return 0
    print(f"temperature {r['temperature']:.4f} (fitted on {r['n_val']} validation samples; test n={r['n_test']})")
    print(f"{'':8}{'ECE':>9}{'NLL':>9}{'acc':>9}")
    for k in ("before", "after"):
        s = r[k]
        print(f"{k:8}{s['ece']:9.4f}{s['nll']:9.4f}{s['acc']:9.4f}")
    return 0


def cmd_explain(a, console) -> int:
    _need("captum", "lamina explain")
    from lamina.cli.progress import progress_bar
    from lamina.trust.explain import explain_run

    with progress_bar(console, "explain", a.no_progress) as progress:
        r = explain_run(a.path, method=a.method, n=a.n, split=a.split, which=a.which, out=a.out, progress=progress)
    if _print_json(a, r):
        return 0
    for k in ("png", "npz", "html"):
        if r.get(k):
            print(f"{k:5} {r[k]}")
    for i, ex in enumerate(r.get("examples", [])):
        conf = ex.get("confidence")
        print(f"#{i} label={ex.get('label_name', ex.get('label'))} pred={ex.get('pred_name', ex.get('pred'))}"
              + (f" (conf {conf:.2f})" if conf is not None else ""))
    ig = r.get("ig_completeness")
    if ig:
        print(f"IG completeness: mean |sum attr - (f(x)-f(x0))| = {ig['mean_abs_delta']:.2e} "
              f"(max {ig['max_abs_delta']:.2e})")
    return 0


def cmd_attack(a, console) -> int:
    from lamina.cli.progress import progress_bar
    from lamina.trust.robust import attack_run

    with progress_bar(console, f"{a.attack} attack", a.no_progress) as progress:
        r = attack_run(a.path, attack=a.attack, eps=a.eps, steps=a.steps, norm=a.norm, alpha=a.alpha, n=a.n,
                       which=a.which, progress=progress)
    if _print_json(a, r):
        return 0
    steps = "" if r["attack"] == "fgsm" else f", {r['steps']} steps"
    print(f"{r['attack']} {r['norm']} eps {r['eps']:g}{steps} on {r['n']} test samples ({r['seconds']:.1f}s)")
    print(f"clean accuracy   {r['clean_acc']:.4f}")
    print(f"robust accuracy  {r['robust_acc']:.4f}")
    return 0


def _fair_rows(rep: dict) -> None:
    print(f"{'group':<16}{'n':>6}{'accuracy':>10}{'recall':>9}")
    for g, v in rep["by_group"].items():
        print(f"{g:<16}{v['n']:>6}{v['accuracy']:>10.4f}{v['recall_macro']:>9.4f}")
    print(f"overall accuracy {rep['overall']['accuracy']:.4f}; accuracy gap (max - min) {rep['accuracy_difference']:.4f}"
          f"; demographic parity diff mean {rep['dp_difference_mean']:.4f} (max {rep['dp_difference_max']:.4f})"
          f"; equalized odds diff mean {rep['eo_difference_mean']:.4f} (max {rep['eo_difference_max']:.4f})")


def cmd_fairness(a, console) -> int:
    _need("fairlearn", "lamina fairness")
    from lamina.trust import fairness

    if a.mitigate:
        from lamina.cli.progress import RichProgress

        bar = [] if a.no_progress else [RichProgress(console)]  # the retraining is a whole run
        r = fairness.mitigate_run(a.path, method=a.mitigate, group=a.group, which=a.which, split=a.split,
                                  callbacks=bar)
        if _print_json(a, r["summary"] | {"mitigated_run": r["mitigated_run"]}):
            return 0
        print(f"before ({a.path}):")
        _fair_rows(r["before"])
        print(f"after {a.mitigate} ({r['mitigated_run']}):")
        _fair_rows(r["after"])
        return 0
    r = fairness.audit_fairness(a.path, group=a.group, which=a.which, split=a.split)
    if _print_json(a, r):
        return 0
    _fair_rows(r)
    return 0


def cmd_learning_curve(a, console) -> int:
    from lamina.cli.main import _split_train_args
    from lamina.config import load_config
    from lamina.errors import ConfigError
    from lamina.trust.overfitting import curve_fractions, learning_curve

    path, overrides = _split_train_args(a.args)
    cfg = load_config(path, overrides)
    try:
        fractions = [float(x) for x in a.fractions.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--fractions: expected comma-separated numbers in (0, 1], got {a.fractions!r}") from None
    from lamina.cli.search import parse_seeds

    from lamina.cli.progress import progress_bar

    seeds = parse_seeds(a.seeds)
    order, per = curve_fractions(fractions), len(seeds or [None])
    with progress_bar(console, "learning curve", a.no_progress) as bar:
        def runs_done(done: int, total: int) -> None:  # a line as each fraction starts (its first seed's run)
            if done < total and done % per == 0:
                console.print(f"[{done // per + 1}/{len(order)}] training on {order[done // per]:g} of the data ...")
            if bar is not None:
                bar(done, total)

        r = learning_curve(cfg, fractions, out=a.out, equal_steps=not a.equal_epochs, seeds=seeds,
                           progress=runs_done)
    if _print_json(a, r):
        return 0
    m = r["metric"]
    print(f"{'fraction':>9}{'n_train':>9}{'epochs':>8}{'train ' + m:>12}{'val ' + m:>10}{'test ' + m:>11}{'s':>7}")
    for row in r["rows"]:
        cells = [f"{row[k]:>{w}.4f}" if row[k] is not None else " " * w for k, w in (("train", 12), ("val", 10),
                                                                                       ("test", 11))]
        spread = (f"  +- {row['test_std']:.4f} ({' '.join(f'{v:.4f}' for v in row['test_values'])})"
                  if "test_std" in row else "")
        print(f"{row['fraction']:>9g}{row['n_train']:>9}{row['epochs']:>8}{''.join(cells)}{row['seconds']:>7.1f}"
              f"{spread}")
    if r.get("power_law"):
        p = r["power_law"]
        print(f"test error ~ {p['a']:.3g} * n^-{p['b']:.3f}: about {r['error_at_2x']:.4f} with twice the data")
    print(f"plot: {r['out']}/learning_curve.png")
    return 0


def cmd_report(a, console) -> int:
    from lamina.report.html import build_report

    print(build_report(a.path, a.out))
    return 0


def cmd_audit(a, console) -> int:
    from lamina.errors import ConfigError
    from lamina.trust.audit import PARTS, audit_run

    skip = tuple(s.strip() for s in a.skip.split(",") if s.strip())
    bad = [s for s in skip if s not in PARTS]
    if bad:
        raise ConfigError(f"--skip: unknown part '{bad[0]}'; parts: {', '.join(PARTS)}")
    for part in ("explain",):
        if part not in skip:
            _need("captum", "lamina audit (explanations; or --skip explain)")
    from lamina.cli.progress import progress_bar

    with progress_bar(console, "audit", a.no_progress) as bar:
        r = audit_run(a.path, which=a.which, eps=a.eps, steps=a.steps, n_attack=a.n, group=a.group, skip=skip,
                      on_part=lambda part: console.print(f"audit: {part} ..."), progress=bar)
    if _print_json(a, r):
        return 0
    for part in PARTS:
        v = r[part]
        if v["status"] == "done":
            res = v["result"]
            brief = ", ".join(f"{k} {x:.4g}" if isinstance(x, float) else f"{k} {x}" for k, x in res.items()
                              if not isinstance(x, (dict, list)) and k != "png")
            if "findings" in res:
                brief = "; ".join(res["findings"]) + (f", {brief}" if brief else "")
            print(f"{part:<12} {v['seconds']:6.1f}s  {brief}")
        else:
            print(f"{part:<12} skipped  {v['reason']}")
    print(f"report: {r['report']}")
    return 0


COMMANDS = {"calibrate": cmd_calibrate, "explain": cmd_explain, "attack": cmd_attack, "fairness": cmd_fairness,
            "learning-curve": cmd_learning_curve, "report": cmd_report, "audit": cmd_audit}
