"""Gradient health: a deep sigmoid MLP is diagnosed "vanishing" at an early layer, a ReLU+LayerNorm residual one is
healthy; the callback records per-layer norms under the Trainer and warns; dead-ReLU and saturation probes."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.data import InMemoryLoader, load_dataset
from lamina.engine import Trainer
from lamina.tasks import ClassificationTask
from lamina.trust.gradients import GradientHealth, PlainMLP, ResidualMLP, diagnose, gradient_health

DEPTH, WIDTH = 20, 64


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _batch(bundle, n=256):
    x, y = bundle.train.tensors["x"][:n], bundle.train.tensors["y"][:n]
    return x.float(), y


def _first_last(report):
    norms = [(n, r["grad_norm"]) for n, r in report.items() if "grad_norm" in r]
    return norms[0][1] / norms[-1][1]


def test_sigmoid_mlp_vanishes_residual_is_healthy(digits):
    torch.manual_seed(0)
    batch = _batch(digits)
    bad = gradient_health(PlainMLP(), F.cross_entropy, batch)
    good = gradient_health(ResidualMLP(), F.cross_entropy, batch)
    assert len([r for r in bad.values() if "grad_norm" in r]) == DEPTH
    fb, fg = diagnose(bad), diagnose(good)
    vanish = [f for f in fb if f.kind == "vanishing"]
    assert vanish and vanish[0].layer == "layers.0" and vanish[0].value < 1e-3
    assert "residual" in vanish[0].suggestion and "Kaiming" in vanish[0].suggestion
    assert not [f for f in fg if f.kind in ("vanishing", "exploding")]
    assert _first_last(bad) < 1e-6 and 1e-2 < _first_last(good) < 1e2


def test_callback_under_trainer_records_and_warns(digits):
    torch.manual_seed(0)
    sub = digits.train.subset(torch.arange(256))
    cb = GradientHealth(every_n_steps=2)
    trainer = Trainer(max_epochs=1, device="cpu", callbacks=[cb])
    with pytest.warns(RuntimeWarning, match="vanishing at layer 'layers.0'"):
        trainer.fit(PlainMLP(), ClassificationTask(10), InMemoryLoader(sub, 32, shuffle=False))
    assert len([r for r in cb.report.values() if "grad_norm" in r]) == DEPTH
    assert all(r["update_ratio"] > 0 for r in cb.report.values() if r["kind"] == "weight")
    row = trainer.history[-1]
    assert row["grad/min_layer_norm"] < 1e-3 * row["grad/max_layer_norm"]
    assert "act/max_saturation" in row
    assert any(f.kind == "vanishing" for f in cb.findings)


def test_dead_relu_fraction_is_one_for_negative_inputs():
    model = nn.Sequential(nn.Identity(), nn.ReLU(), nn.Linear(8, 1))
    x = -torch.rand(32, 8) - 0.1
    rep = gradient_health(model, lambda out: out.sum(), x)
    assert rep["1"]["dead_frac"] == 1.0
    assert any(f.kind == "dead_relu" and f.layer == "1" for f in diagnose(rep))
    rep = gradient_health(model, lambda out: out.sum(), torch.rand(32, 8) + 0.1)
    assert rep["1"]["dead_frac"] == 0.0


def test_tanh_saturation_detected():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    small = gradient_health(model, lambda out: out.sum(), torch.randn(64, 8) * 0.01)
    huge = gradient_health(model, lambda out: out.sum(), torch.randn(64, 8) * 1e3)
    assert small["1"]["saturation"] < 0.05 and huge["1"]["saturation"] > 0.9
    assert any(f.kind == "saturation" and f.layer == "1" for f in diagnose(huge))
