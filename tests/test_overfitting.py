"""Overfitting onset, the OverfittingMonitor callback, train_fraction subsets and the learning-curve tool."""

import json

import numpy as np
import warnings

import pytest
import torch

from lamina.config import load_config
from lamina.errors import ConfigError, DataError
from lamina.data.splits import train_subset
from lamina.runs import load_data
from lamina.trust.overfitting import (OverfittingMonitor, fit_power_law, learning_curve, overfitting_onset,
                                      samples_for)


def _hist(train, val):
    return [{"epoch": i + 1, "train/loss": t, "val/loss": v} for i, (t, v) in enumerate(zip(train, val))]


def test_onset_is_the_epoch_after_the_best_val_loss_when_train_keeps_falling():
    h = _hist([1.0, 0.7, 0.5, 0.35, 0.25, 0.18], [1.1, 0.8, 0.6, 0.65, 0.72, 0.8])
    r = overfitting_onset(h)
    assert r["overfitting"] and r["best_epoch"] == 3 and r["onset_epoch"] == 4
    assert r["gap"] == pytest.approx([0.1, 0.1, 0.1, 0.3, 0.47, 0.62])
    assert r["val_rise"] == pytest.approx(0.2) and r["train_drop_since_best"] == pytest.approx(0.32)
    assert "epoch 4" in r["advice"]


@pytest.mark.parametrize("train,val", [
    ([1.0, 0.7, 0.5, 0.4, 0.3], [1.1, 0.8, 0.6, 0.5, 0.45]),  # both still improving
    ([1.0, 0.7, 0.5, 0.6, 0.9], [1.1, 0.8, 0.6, 0.7, 1.0]),   # both worsen: divergence (lr), not overfitting
    ([1.0, 0.7, 0.5, 0.4, 0.3], [1.1, 0.8, 0.6, 0.62, 0.55]),  # one bump, then a new best
])
def test_no_onset_without_a_sustained_val_rise_while_train_improves(train, val):
    assert not overfitting_onset(_hist(train, val))["overfitting"]


def test_patience_and_min_rise_are_respected():
    h = _hist([1.0, 0.7, 0.5, 0.4], [1.1, 0.8, 0.6, 0.605])
    assert overfitting_onset(h, patience=1)["onset_epoch"] == 4
    assert not overfitting_onset(h, patience=2)["overfitting"]  # one worse epoch is not enough
    assert not overfitting_onset(h, patience=1, min_rise=0.01)["overfitting"]  # 0.8% above best < 1%


def test_missing_metrics_and_bad_patience_are_one_line_errors():
    with pytest.raises(DataError, match="needs 'train/loss' and 'val/loss'.*found: epoch, train/loss"):
        overfitting_onset([{"epoch": 1, "train/loss": 1.0}])
    with pytest.raises(ConfigError, match="patience"):
        overfitting_onset(_hist([1], [1]), patience=0)


def test_monitor_warns_once_naming_the_epoch():
    mon = OverfittingMonitor(patience=2)
    rows = _hist([1.0, 0.7, 0.5, 0.35, 0.25, 0.18], [1.1, 0.8, 0.6, 0.65, 0.72, 0.8])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for r in rows:
            mon.on_epoch_end(None, r)
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 1 and "since epoch 4" in msgs[0], msgs
    state = mon.state_dict()
    again = OverfittingMonitor()
    again.load_state_dict(json.loads(json.dumps(state)))  # checkpointed state round-trips through JSON
    assert again.found["onset_epoch"] == 4 and len(again.rows) == 6


def test_a_real_overfitting_run_is_detected(tmp_path):
    # 10% of digits, a wide MLP, no regularization, 40 epochs: memorizes the 126 images; val loss turns up
    from lamina.runs import train

    cfg = load_config(None, ["model.name=mlp", "model.width=512", "model.dropout=0", "data.train_fraction=0.1",
                             "trainer.max_epochs=40", "optimizer.lr=3e-3", "optimizer.weight_decay=0",
                             "schedule.name=constant", "task.label_smoothing=0", "data.batch_size=32",
                             "logging.tensorboard=false", "logging.plots=false", f"logging.root={tmp_path}",
                             "trainer.perf=false"])  # this hand-picked curve is the fp32 one
    mon = OverfittingMonitor()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = train(cfg, callbacks=[mon])
    r = overfitting_onset(res.history)
    assert r["overfitting"] and mon.found is not None and r["onset_epoch"] == mon.found["onset_epoch"]
    assert r["onset_epoch"] < 40 and res.history[-1]["train/loss"] < 0.05 and r["val_rise"] > 0
    assert any("overfitting" in str(x.message) for x in w)
    s = json.loads((res.run_dir / "summary.json").read_text())["overfitting"]  # what `lamina train` prints
    assert s["overfitting"] and s["onset_epoch"] == r["onset_epoch"] and "early_stopping" in s["advice"]


def test_train_fraction_keeps_every_class_in_proportion_and_leaves_val_test_whole():
    full = load_data(load_config(None, []))
    part = load_data(load_config(None, ["data.train_fraction=0.1"]))
    assert len(part.val) == len(full.val) and len(part.test) == len(full.test)
    counts, full_counts = torch.bincount(part.train.y, minlength=10), torch.bincount(full.train.y, minlength=10)
    assert (counts >= 1).all() and torch.allclose(counts.float(), full_counts * 0.1, atol=1)
    # rows are real training rows (a subset, not a resample): every kept image occurs in the full split
    full_rows = {tuple(r.flatten().tolist()) for r in full.train.x}
    assert all(tuple(r.flatten().tolist()) in full_rows for r in part.train.x[:20])
    again = load_data(load_config(None, ["data.train_fraction=0.1"]))
    assert torch.equal(again.train.x, part.train.x)  # seeded


def test_train_fraction_on_a_token_stream_is_a_prefix():
    from lamina.data.base import TensorData

    d = TensorData(ids=torch.arange(100))
    assert torch.equal(train_subset(d, 0.25, 0, "language_modeling").tensors["ids"], torch.arange(25))
    with pytest.raises(Exception, match="train_fraction"):
        load_config(None, ["data.train_fraction=0"])


def test_power_law_fit_recovers_exact_parameters():
    n = [100, 200, 400, 800]
    err = [3.0 * x ** -0.5 for x in n]
    p = fit_power_law(n, err)
    assert p["a"] == pytest.approx(3.0, rel=1e-9) and p["b"] == pytest.approx(0.5, rel=1e-9)
    assert samples_for(p, 3.0 * 1600 ** -0.5) == pytest.approx(1600, rel=1e-9)
    assert fit_power_law(n, [0.1, 0.1, 0.2, 0.3]) is None  # error does not fall with data: no extrapolation


def test_learning_curve_trains_each_fraction_with_equal_steps_and_writes_json_and_plot(tmp_path):
    cfg = load_config(None, ["trainer.max_epochs=2", "logging.plots=false", "model.channels=[8,16]"])
    seen = []
    r = learning_curve(cfg, (0.5, 0.25), out=tmp_path, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 2), (1, 2), (2, 2)]  # the progress protocol: runs done, before each run and at the end
    rows = r["rows"]
    assert [row["fraction"] for row in rows] == [0.25, 0.5] and rows[0]["n_train"] < rows[1]["n_train"]
    assert [row["epochs"] for row in rows] == [8, 4]  # same update budget for both points
    assert abs(rows[0]["steps"] - rows[1]["steps"]) <= 4
    assert r["metric"] == "acc" and all(0 <= row["test"] <= 1 for row in rows)
    assert (tmp_path / "learning_curve.png").stat().st_size > 5000
    assert json.loads((tmp_path / "learning_curve.json").read_text())["rows"][1]["fraction"] == 0.5
    with pytest.raises(ConfigError, match="fractions"):
        learning_curve(cfg, (0.0, 1.5), out=tmp_path)


def test_learning_curve_seeds_report_mean_std_and_every_value(tmp_path, capsys):
    from lamina.cli.main import main

    args = ["learning-curve", "--fractions", "0.5", "--seeds", "0,1", "--out", str(tmp_path / "lc"),
            "trainer.max_epochs=1", "logging.plots=false", "logging.tensorboard=false", "model.channels=[8,16]",
            f"logging.root={tmp_path}"]
    assert main(args) == 0
    row = json.loads((tmp_path / "lc" / "learning_curve.json").read_text())["rows"][0]
    tests = row["test_values"]
    assert row["seeds"] == [0, 1] and len(tests) == 2 and len(set(row["run_dir"])) == 2
    assert row["test"] == pytest.approx(np.mean(tests)) and row["test_std"] == pytest.approx(np.std(tests, ddof=1))
    cap = capsys.readouterr()
    assert f"+- {row['test_std']:.4f}" in cap.out
    assert cap.err.count("[1/1] training on 0.5 of the data") == 1  # a line per fraction, not per seed's run
