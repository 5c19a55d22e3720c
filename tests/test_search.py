"""lamina tune / nas / lr-find / --seeds: search spaces, studies that resume, pruning, Pareto fronts, seed spread.

Trials train the digits CNN for a few steps (well under a second each), so these are real end-to-end searches.
"""

import json
import math
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

optuna = pytest.importorskip("optuna")

from lamina.cli.main import main  # noqa: E402
from lamina.config import load_config  # noqa: E402
from lamina.errors import ConfigError  # noqa: E402
from lamina.search.space import SearchSpace, apply_values, parse_param, split_key  # noqa: E402

# energy tracking off (CodeCarbon's start/stop per trial); the pruning test turns it on to check pruned trials' cost
FAST = ["trainer.progress=false", "logging.tensorboard=false", "logging.plots=false", "cost.energy=false",
        "trainer.max_epochs=2", "data.batch_size=256"]


def _space(tmp_path, spec: dict, name="space.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(spec))
    return str(p)


SPACE = {"optimizer.lr": {"type": "log", "low": 1e-3, "high": 3e-2},
         "model.channels": {"type": "categorical", "choices": [[16, 32], [32, 64]]}}


def _err(capsys, argv):
    rc = main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


# ----- spaces ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, expected", [
    ({"type": "log", "low": 1e-2, "high": 1e-3}, "inverted range low=0.01 high=0.001"),
    ({"type": "uniform", "low": 0.1, "high": 0.1}, "empty range low=0.1 high=0.1"),
    ({"type": "categorical", "choices": [64]}, "at least 2 choices, got 1"),
    ({"type": "categorical", "choices": []}, "at least 2 choices, got 0"),
    ({"type": "log", "low": 0, "high": 1}, "a log range needs low > 0"),
    ({"type": "int", "low": 1.5, "high": 4}, "integer low/high/step"),
    ({"type": "normal", "low": 1, "high": 2}, "type must be one of log, uniform, int, categorical"),
    ({"type": "uniform", "low": 0, "high": 1, "bogus": 1}, "unknown field 'bogus'"),
    ({"type": "uniform", "low": "a", "high": 1}, "low must be a finite number"),
    ([1, 2], "expected a mapping"),
])
def test_bad_param_specs_are_one_line(spec, expected):
    with pytest.raises(ConfigError) as e:
        parse_param("optimizer.lr", spec)
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("key, value, expected", [
    ("optimizer.lrr", {"type": "log", "low": 1e-3, "high": 1e-2}, "did you mean 'lr'"),
    ("model.chanels", {"type": "categorical", "choices": [[8], [16]]}, "did you mean 'channels'"),
    ("model.channels[7]", {"type": "categorical", "choices": [8, 16]}, "index 7 is out of range"),
    ("data.val_fractio", {"type": "uniform", "low": 0.1, "high": 0.2}, "did you mean 'val_fraction'"),
    ("trainer.max_epochs", {"type": "int", "low": 0, "high": 3}, "trainer.max_epochs"),  # 0 is not a valid value
    ("model.dropout", {"type": "uniform", "low": 0.0, "high": 1.5}, "dropout must be in [0, 1)"),
])
def test_space_keys_and_bounds_are_checked_before_any_trial(key, value, expected):
    cfg = load_config(None, [])
    with pytest.raises(ConfigError) as e:
        SearchSpace.from_dict({key: value}).check(cfg)
    assert expected in str(e.value), str(e.value)


def test_indexed_keys_and_nested_spaces():
    assert split_key("model.stages[1][0]") == ["model", "stages", 1, 0]
    cfg = load_config("configs/fashion_mnist.yaml", [])
    c = apply_values(cfg, {"model.channels[1]": 80, "model.kernel_size": 5, "optimizer.lr": 0.004})
    assert c.model.options["channels"] == [32, 80, 128]  # cnn_medium's default with one stage changed
    assert c.model.options["kernel_size"] == 5 and c.optimizer.lr == 0.004
    nested = SearchSpace.from_dict({"optimizer": {"lr": {"type": "log", "low": 1e-4, "high": 1e-2}}})
    assert nested.keys == ["optimizer.lr"]
    with pytest.raises(ConfigError, match="expected a mapping"):
        SearchSpace.from_dict({})


# ----- tune end to end ------------------------------------------------------------------------------------
def test_tune_writes_a_best_config_that_trains_and_resumes(tmp_path, capsys):
    space = _space(tmp_path, SPACE)
    out = tmp_path / "study"
    argv = ["tune", "--space", space, "--trials", "3", "--out", str(out), "--pruner", "none",
            f"logging.root={tmp_path}", *FAST]
    assert main(argv) == 0
    s = json.loads((out / "study.json").read_text())
    assert [t["state"] for t in s["trials"]] == ["complete"] * 3
    best = min(s["trials"], key=lambda t: t["value"])  # val/loss is minimised
    assert s["best"]["number"] == best["number"] and math.isclose(s["best"]["value"], best["value"])
    assert s["cost"]["trials"] == 3 and s["cost"]["train_samples"] > 0 and s["cost"]["epochs"] == 6
    for f in ("history.png", "parallel.png", "study.html", "study.db", "best.yaml"):
        assert (out / f).is_file(), f
    # best.yaml is the base config with the best values, and `lamina train` runs it
    cfg = load_config(out / "best.yaml", [])
    assert math.isclose(cfg.optimizer.lr, best["params"]["optimizer.lr"])
    assert list(cfg.model.options["channels"]) == list(best["params"]["model.channels"])
    # the objective is the best epoch's validation value, recorded in the trial's own run folder
    hist = [float(r.split(",")[header.index("val/loss")]) for header in
            [open(Path(best["run_dir"]) / "metrics.csv").readline().strip().split(",")]
            for r in open(Path(best["run_dir"]) / "metrics.csv").read().splitlines()[1:] if r.split(",")[0].isdigit()]
    assert math.isclose(best["value"], min(hist), rel_tol=1e-6)
    capsys.readouterr()
    assert main(["train", str(out / "best.yaml"), f"logging.root={tmp_path}", *FAST]) == 0
    # same command with more trials: the 3 finished ones are kept, one more is run
    assert main([*argv[:4], "4", *argv[5:]]) == 0
    s2 = json.loads((out / "study.json").read_text())
    assert len(s2["trials"]) == 4 and s2["trials"][:3] == s["trials"][:3]
    # a different space on the same folder is refused (its trials would mix two searches)
    capsys.readouterr()
    other = _space(tmp_path, {**SPACE, "optimizer.weight_decay": {"type": "uniform", "low": 0.0, "high": 0.1}},
                   "other.yaml")
    rc, err = _err(capsys, ["tune", "--space", other, "--trials", "5", "--out", str(out), *FAST])
    assert rc == 2 and len(err) == 1 and "started with a different space" in err[0]


@pytest.mark.parametrize("args, expected", [
    (["--trials", "0"], "--trials: expected an integer in 1..10000, got 0"),
    (["--trials", "-3"], "--trials: expected an integer in 1..10000, got -3"),
    (["--pruner", "sometimes"], "--pruner: expected one of median, hyperband, none"),
    (["--jobs", "many"], "--jobs: expected 'auto' or an integer"),
    (["--metric", "test/acc"], "test metrics are never searched on"),
    (["--storage", "sqlite:////nonexistent-dir/x.db"], "--storage: cannot open sqlite:////nonexistent-dir/x.db"),
    (["--seeds", "0,x"], "--seeds: expected comma-separated integers"),
])
def test_tune_bad_input_is_one_line(tmp_path, capsys, args, expected):
    space = _space(tmp_path, SPACE)
    rc, err = _err(capsys, ["tune", "--space", space, "--out", str(tmp_path / "s"), *args, *FAST])
    assert rc == 2 and len(err) == 1 and expected in err[0], err


def test_bad_space_file_and_storage_file_are_one_line(tmp_path, capsys):
    bad = _space(tmp_path, {"optimizer.lr": {"type": "log", "low": 1e-2, "high": 1e-3}})
    rc, err = _err(capsys, ["tune", "--space", bad, "--out", str(tmp_path / "s"), *FAST])
    assert rc == 2 and err == ["config error: search space: optimizer.lr: inverted range low=0.01 high=0.001; "
                               "expected low < high"]
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all")
    rc, err = _err(capsys, ["tune", "--space", _space(tmp_path, SPACE), "--storage", f"sqlite:///{junk}",
                            "--out", str(tmp_path / "s2"), *FAST])
    assert rc == 2 and len(err) == 1 and "is not an SQLite database" in err[0]


def test_missing_optuna_names_the_extra(tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "optuna" or name.startswith("optuna."):
            raise ImportError("no optuna")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    rc, err = _err(capsys, ["tune", "--space", _space(tmp_path, SPACE), *FAST])
    assert rc == 2 and err == ['missing dependency: tune and nas need the optuna package: pip install "lamina[tune]"']


def test_pruning_reporter_stops_a_trial_below_the_median(tmp_path):
    from lamina.search.tune import PruningReporter

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=3,
                                                                                          n_warmup_steps=1))
    for v in (0.8, 0.85, 0.9):  # finished trials that reached these values at epoch 1
        t = study.ask()
        t.report(v, 1)
        study.tell(t, v)
    fake = SimpleNamespace(dist=SimpleNamespace(is_main=True, world_size=1), epoch=1, train_time=1.0,
                           samples_seen=100)
    good = PruningReporter(study.ask(), "val/acc", prune=True)
    good.on_epoch_end(fake, {"val/acc": 0.95})  # above the median: goes on
    bad = PruningReporter(study.ask(), "val/acc", prune=True)
    with pytest.raises(optuna.TrialPruned):
        bad.on_epoch_end(fake, {"val/acc": 0.5})
    off = PruningReporter(study.ask(), "val/acc", prune=False)
    off.on_epoch_end(fake, {"val/acc": 0.5})  # --pruner none: reported, never stopped
    with pytest.raises(ConfigError, match="val/accuracy is not a metric of this run"):
        PruningReporter(study.ask(), "val/accuracy", prune=True).on_epoch_end(fake, {"val/acc": 0.5,
                                                                                     "val/loss": 1.0})


def test_pruning_in_a_real_study_saves_epochs(tmp_path, capsys):
    """Hyperband on a space where half the learning rates cannot learn: pruned trials stop early."""
    space = _space(tmp_path, {"optimizer.lr": {"type": "log", "low": 1e-6, "high": 3e-2}})
    out = tmp_path / "hb"
    assert main(["tune", "--space", space, "--trials", "8", "--out", str(out), "--pruner", "hyperband",
                 "--sampler", "random", f"logging.root={tmp_path}", *FAST[:-2], "trainer.max_epochs=4",
                 "data.batch_size=256", "cost.energy=true"]) == 0
    s = json.loads((out / "study.json").read_text())
    pruned = [t for t in s["trials"] if t["state"] == "pruned"]
    assert pruned and all(t["epochs"] < 4 for t in pruned)
    assert s["cost"]["epochs"] < 8 * 4
    # pruned trials' partial runs count toward the search's FLOPs (and energy, where CodeCarbon is installed)
    assert all(t["cost"]["flops"]["samples_seen"] == t["samples"] for t in s["trials"])
    assert s["cost"]["energy"]["runs"] == 8


def test_a_killed_trial_is_failed_and_retried_on_resume(tmp_path):
    from lamina.search.study import counted, open_storage, recover_stale, sqlite_url

    storage = open_storage(sqlite_url(tmp_path / "study.db"))
    study = optuna.create_study(study_name="tune", storage=storage, direction="minimize")
    done = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(done, 0.5)
    t = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    x = t.params["x"]
    t.set_user_attr("pid", 2 ** 22 + 12345)  # no such process
    t.set_user_attr("host", socket.gethostname())
    live = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    live.set_user_attr("pid", os.getppid())  # alive: another worker's trial, left alone
    live.set_user_attr("host", socket.gethostname())
    assert counted(study) == 3
    assert recover_stale(study) == 1
    states = {tr.number: tr.state.name for tr in study.get_trials()}
    assert states == {0: "COMPLETE", 1: "FAIL", 2: "RUNNING", 3: "WAITING"}  # 3: trial 1's values, enqueued
    assert counted(study) == 2  # the interrupted trial does not count: its values run again
    retry = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    assert retry.params["x"] == x  # the stopped trial's values come first
    assert study.get_trials()[0].value == 0.5  # nothing finished was lost


def test_parallel_jobs_share_one_study_and_stop_at_the_total(tmp_path, capsys):
    """Two processes fill one study to exactly --trials; the parent prints every worker's trials once."""
    out = tmp_path / "par"
    assert main(["tune", "--space", _space(tmp_path, SPACE), "--trials", "4", "--jobs", "2", "--out", str(out),
                 "--pruner", "none", f"logging.root={tmp_path}", *FAST[:-2], "trainer.max_epochs=1",
                 "data.batch_size=256"]) == 0
    s = json.loads((out / "study.json").read_text())
    assert len(s["trials"]) == 4 and all(t["state"] == "complete" for t in s["trials"])
    assert len({t["run_dir"] for t in s["trials"]}) == 4
    printed = capsys.readouterr()
    lines = [ln for ln in (printed.out + printed.err).splitlines() if ln.startswith("trial ")]
    assert sorted(int(ln.split()[1]) for ln in lines) == [0, 1, 2, 3], lines


def test_trials_that_never_report_or_diverge_end_the_search(tmp_path, capsys):
    """A trial shorter than an epoch never reports its metric: 3 such trials in a row are one line, exit 2 (not
    an endless loop of failed trials); a diverged trial (NaN) is a failed trial that counts toward --trials."""
    rc, err = _err(capsys, ["tune", "--space", _space(tmp_path, SPACE), "--trials", "10", "--out",
                            str(tmp_path / "short"), f"logging.root={tmp_path}", *FAST, "trainer.max_steps=2"])
    assert rc == 2 and err[-1].startswith("config error: val/loss was never reported"), err
    s = optuna.load_study(study_name="tune", storage=f"sqlite:///{tmp_path / 'short' / 'study.db'}")
    assert [t.state.name for t in s.trials] == ["FAIL"] * 3
    out = tmp_path / "nan"
    big = _space(tmp_path, {"optimizer.lr": {"type": "log", "low": 1e6, "high": 1e8}}, "big.yaml")
    assert main(["tune", "--space", big, "--trials", "2", "--out", str(out), "--pruner", "none",
                 f"logging.root={tmp_path}", *FAST, "optimizer.name=sgd"]) == 0
    st = json.loads((out / "study.json").read_text())
    assert len(st["trials"]) == 2 and {t["state"] for t in st["trials"]} <= {"fail", "complete"}


def test_watcher_reports_finished_trials_once_in_order(tmp_path):
    from lamina.search.study import TrialWatcher, open_storage, sqlite_url

    study = optuna.create_study(storage=open_storage(sqlite_url(tmp_path / "s.db")), direction="minimize")
    x = {"x": optuna.distributions.FloatDistribution(0, 1)}
    old = study.ask(x)
    study.tell(old, 0.1)  # finished before the watcher started (a resumed study): not reported again
    seen = []
    w = TrialWatcher(study, seen.append)
    running = study.ask(x)
    w.poll()
    assert seen == []  # nothing new has finished
    pruned = study.ask(x)
    pruned.report(0.7, 1)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    study.tell(running, 0.3)
    w.poll()
    w.poll()
    assert [(o.number, o.state) for o in seen] == [(2, "pruned"), (1, "complete")]
    assert seen[0].value == pytest.approx(0.7) and seen[1].value == pytest.approx(0.3)


@pytest.mark.distributed
def test_tune_under_torchrun_trains_every_trial_on_both_ranks(tmp_path):
    """torchrun with 2 processes: rank 0 owns the study and broadcasts each trial's values; both ranks train it
    (DDP), only rank 0 reports, and the study holds exactly --trials trials."""
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "tests") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "lamina.cli.main", "tune", "--space", _space(tmp_path, SPACE), "--trials", "2", "--out", str(out),
           "--pruner", "median", f"logging.root={tmp_path}", *FAST[:-2], "trainer.max_epochs=1",
           "data.batch_size=256"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    s = json.loads((out / "study.json").read_text())
    assert [t["state"] for t in s["trials"]] == ["complete", "complete"]
    for t in s["trials"]:
        run = Path(t["run_dir"])
        meta = json.loads((run / "summary.json").read_text())
        assert meta["world_size"] == 2
        cfg = load_config(run / "config.yaml", [])
        assert math.isclose(cfg.optimizer.lr, t["params"]["optimizer.lr"])
    assert (out / "best.yaml").is_file()


# ----- seeds -------------------------------------------------------------------------------------------
def test_mean_std_is_the_sample_spread():
    from lamina.search.seeds import format_seeds, mean_std

    m = mean_std([0.9, 0.92, 0.94])
    assert math.isclose(m["mean"], 0.92) and math.isclose(m["std"], float(np.std([0.9, 0.92, 0.94], ddof=1)))
    assert mean_std([0.5])["std"] == 0.0
    assert format_seeds({"test": {"test/acc": m}}) == "test/acc 0.9200 +- 0.0200 (n=3: 0.9000 0.9200 0.9400)"


def test_train_seeds_reports_every_value(tmp_path, capsys):
    assert main(["train", "--seeds", "0,1", f"logging.root={tmp_path}", *FAST]) == 0
    out = tmp_path / "digits-small_cnn-seeds"
    r = json.loads((out / "seeds.json").read_text())
    accs = [run["test"]["test/acc"] for run in r["runs"]]
    assert r["seeds"] == [0, 1] and r["test"]["test/acc"]["values"] == accs
    assert math.isclose(r["test"]["test/acc"]["std"], float(np.std(accs, ddof=1)))
    assert (out / "digits-small_cnn-seed1" / "summary.json").is_file()
    assert "test/acc" in capsys.readouterr().err
    rc, err = _err(capsys, ["train", "--seeds", "1,1"])
    assert rc == 2 and err == ["config error: --seeds: expected distinct integers in 0..2**63-1 such as 0,1,2, "
                               "got '1,1'"]


# ----- lr range test -----------------------------------------------------------------------------------
def test_lr_schedule_and_smoothing_by_hand():
    from lamina.search.lr_find import lr_schedule, smooth, suggest

    lrs = lr_schedule(1e-6, 1.0, 7)
    assert math.isclose(lrs[0], 1e-6) and math.isclose(lrs[-1], 1.0) and math.isclose(lrs[3], 1e-3)
    assert smooth([1, 2, 3, 4, 5], window=3) == [1.5, 2.0, 3.0, 4.0, 4.5]
    # loss falls fastest (per decade of lr) between 1e-3 and 1e-2, has its minimum at 1e-1
    lr = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    loss = [2.0, 1.95, 1.9, 1.0, 0.8, 3.0]
    s, _ = suggest(lr, loss)
    assert s in (1e-3, 1e-2)


def test_lr_find_on_digits(tmp_path, capsys):
    assert main(["lr-find", "--steps", "60", "--out", str(tmp_path / "lr"), "--json", *FAST]) == 0
    r = json.loads(capsys.readouterr().out)
    assert 1e-5 < r["suggested_lr"] < r["lr_at_min"] <= 10
    saved = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert saved["losses"][0] > saved["min_loss"]  # the range test found lrs that learn
    assert (tmp_path / "lr" / "lr_find.png").is_file()
    rc, err = _err(capsys, ["lr-find", "--start", "1", "--end", "0.1"])
    assert rc == 2 and err == ["config error: --start/--end: expected start < end, got 1 >= 0.1"]


# ----- architecture search -------------------------------------------------------------------------------
def test_pareto_front_by_hand():
    from lamina.search.nas import dominates, pareto_front

    pts = [{"metric": 0.90, "params": 100, "latency_ms": 1.0}, {"metric": 0.92, "params": 200, "latency_ms": 1.0},
           {"metric": 0.89, "params": 150, "latency_ms": 2.0}, {"metric": 0.90, "params": 100, "latency_ms": 0.5}]
    assert dominates(pts[3], pts[0], True) and not dominates(pts[0], pts[1], True)
    front = pareto_front(pts, maximize=True)
    assert front == [pts[1], pts[3]]


def test_nas_front_configs_run_and_base_is_trial_0(tmp_path, capsys):
    space = _space(tmp_path, {"model.channels[0]": {"type": "categorical", "choices": [16, 64]},
                              "model.kernel_size": {"type": "categorical", "choices": [3, 5]}})
    out = tmp_path / "nas"
    assert main(["nas", "--space", space, "--trials", "3", "--out", str(out), "--latency-repeats", "5",
                 "--sampler", "random", f"logging.root={tmp_path}", *FAST]) == 0
    s = json.loads((out / "study.json").read_text())
    assert s["base"]["number"] == 0 and s["trials"][0]["params"] == {"model.channels[0]": 64, "model.kernel_size": 3}
    assert s["base"]["params"] == 75978  # small_cnn's parameter count (`lamina models`)
    assert s["front"] and (out / "pareto.png").is_file() and (out / "study.html").is_file()
    b = s["base"]
    for t in s["trials"][1:]:  # beat_base: a better metric (val/loss: lower) with fewer params or lower latency
        if t["state"] == "complete":
            m, n, lat = t["value"]
            assert (t["number"] in s["beat_base"]) == (m < b["metric"] and (n < b["params"] or lat < b["latency_ms"]))
    for p in s["front"]:
        cfg = load_config(p["config"], [])
        assert cfg.model.options["channels"][0] == p["params"]["model.channels[0]"]
    capsys.readouterr()
    rc, err = _err(capsys, ["nas", "--space", _space(tmp_path, SPACE, "s2.yaml"), "--out", str(tmp_path / "n2"),
                            *FAST])
    assert rc == 2 and len(err) == 1 and "optimizer.lr: an architecture search varies model options" in err[0]


def test_cpu_latency_is_measured_single_threaded():
    import torch

    from lamina.search.nas import cpu_latency_ms

    seen = []

    class Task:
        def forward(self, model, batch):
            seen.append(torch.get_num_threads())
            return model(batch["x"])

    ms = cpu_latency_ms(torch.nn.Linear(4, 2), {"x": torch.zeros(1, 4)}, Task(), repeats=5, warmup=2)
    assert ms > 0 and set(seen) == {1}
