"""Calibration: hand-computed ECE, torchmetrics parity, temperature scaling, and a trained digits run."""

import json

import pytest
import torch
import torch.nn.functional as F

from lamina.errors import DataError, InputShapeError
from lamina.trust.calibration import (
    TemperatureScaler,
    ece_from_bins,
    expected_calibration_error,
    plot_reliability,
    reliability_bins,
)


def _tiny():
    # top-1 confidences .9 (right), .8 (wrong), .6 (right), .7 (right), .55 (wrong)
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.7, 0.3], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 0, 0])
    return probs, labels


def test_ece_hand_computed():
    probs, labels = _tiny()
    # every top-1 confidence >= .5 -> one occupied bin of 5: acc 3/5, conf (.9+.8+.6+.7+.55)/5 = .71
    expected = abs(3 / 5 - 0.71)
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(expected, abs=1e-6)
    b = reliability_bins(probs, labels, n_bins=2)
    assert b["count"] == [0, 5] and b["bin_edges"] == [0.0, 0.5, 1.0]
    assert b["accuracy"][1] == pytest.approx(0.6) and b["confidence"][1] == pytest.approx(0.71)
    # 3 bins [0,1/3), [1/3,2/3), [2/3,1]: {.6, .55} acc 1/2 conf .575; {.9, .8, .7} acc 2/3 conf .8
    expected3 = (2 * abs(0.5 - 0.575) + 3 * abs(2 / 3 - 0.8)) / 5
    assert expected_calibration_error(probs, labels, n_bins=3) == pytest.approx(expected3, abs=1e-6)
    assert ece_from_bins(reliability_bins(probs, labels, 3)) == pytest.approx(expected3, abs=1e-6)


def test_torchmetrics_agrees_with_bins_and_logits_accepted():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=g) * 3
    labels = torch.randint(0, 7, (500,), generator=g)
    for n in (5, 15):
        tm = expected_calibration_error(logits, labels, n_bins=n)
        assert tm == pytest.approx(ece_from_bins(reliability_bins(logits, labels, n)), abs=1e-5)
        assert tm == pytest.approx(expected_calibration_error(logits.softmax(1), labels, n_bins=n), abs=1e-6)
    # logits that happen to lie in [0, 1] are still logits (rows do not sum to 1)
    small = torch.rand(50, 3, generator=g)
    y = torch.randint(0, 3, (50,), generator=g)
    assert expected_calibration_error(small, y, 4) == pytest.approx(
        expected_calibration_error(small.softmax(1), y, 4), abs=1e-6)


def test_errors_are_one_line():
    with pytest.raises(InputShapeError, match="expected shape"):
        expected_calibration_error(torch.rand(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputShapeError, match="labels"):
        TemperatureScaler().fit(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(DataError, match="empty"):
        TemperatureScaler().fit(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="labels"):
        reliability_bins(torch.rand(4, 3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(DataError, match="norm"):
        expected_calibration_error(torch.rand(4, 3), torch.zeros(4, dtype=torch.long), norm="l3")


def _overconfident(k=3.0, n=4000, c=5, seed=0):
    """Labels drawn from softmax(true_logits): true_logits are calibrated, true_logits * k over-confident."""
    g = torch.Generator().manual_seed(seed)
    true_logits = torch.randn(n, c, generator=g) * 1.5
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
    return true_logits * k, labels


def test_temperature_keeps_argmax():
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        logits = torch.randn(300, 10, generator=g) * 4
        labels = torch.randint(0, 10, (300,), generator=g)
        s = TemperatureScaler()
        t = s.fit(logits, labels)
        assert t > 0
        assert torch.equal(s.transform(logits).argmax(1), logits.argmax(1))
    s.temperature = 0.01
    assert torch.equal(s.transform(logits).argmax(1), logits.argmax(1))


def test_temperature_recovers_k_and_lowers_nll_ece():
    logits, labels = _overconfident(k=3.0)
    val, test = slice(0, 2000), slice(2000, None)
    s = TemperatureScaler()
    t = s.fit(logits[val], labels[val])
    assert t == pytest.approx(3.0, rel=0.15)
    scaled = s.transform(logits[test])
    assert F.cross_entropy(scaled, labels[test]) < F.cross_entropy(logits[test], labels[test])
    before = expected_calibration_error(logits[test], labels[test])
    after = expected_calibration_error(scaled, labels[test])
    assert after < before and after < 0.05


def test_plot_reliability(tmp_path):
    logits, labels = _overconfident(n=500)
    b = reliability_bins(logits, labels, 10)
    p = plot_reliability(b, reliability_bins(logits / 3, labels, 10), tmp_path / "r.png", "t")
    assert p.stat().st_size > 1000


def test_calibrate_run_digits(digits_run_copy):
    from lamina.runs import evaluate
    from lamina.trust.calibration import calibrate_run

    run = digits_run_copy  # the shared digits run (conftest), copied: calibrate_run writes into it
    out = calibrate_run(run)
    assert (run / "calibration.json").is_file() and (run / "calibration.png").is_file()
    saved = json.loads((run / "calibration.json").read_text())
    assert saved["temperature"] == pytest.approx(out["temperature"]) and out["temperature"] > 0
    assert out["before"]["acc"] == out["after"]["acc"]
    assert out["before"]["acc"] == pytest.approx(evaluate(run)["test/acc"], abs=1e-6)
    assert out["after"]["ece"] <= out["before"]["ece"] + 0.01
    print("digits:", {k: out[k] for k in ("temperature", "before", "after")})
