"""Hybrid quantum layer (lamina.nn.quantum) and the hybrid model family: hand-computed circuits, an independent
state-vector reference, gradients against the analytic derivative, batching, training, checkpoints, the classical
twin's parameter count, and the errors a user sees (bad n_qubits, missing pennylane) through the CLI."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lamina.errors import MissingDependencyError, ModelError
from lamina.models import create_model
from lamina.nn.quantum import (
    MAX_QUBITS,
    ClassicalTwin,
    QuantumLayer,
    quantum_param_count,
    state_vector_bytes,
    twin_depth,
)

pytest.importorskip("pennylane", reason="the quantum layer needs pennylane (pip install 'lamina[quantum]')")

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--no-progress", "logging.tensorboard=false", "logging.plots=false"]


def _set_weights(layer: QuantumLayer, w) -> None:
    with torch.no_grad():
        layer.qlayer.weights.copy_(torch.as_tensor(w, dtype=layer.qlayer.weights.dtype))


# ----- hand-computed circuits -----------------------------------------------------------------------------------
def test_one_qubit_is_cos_x_cos_w_and_gradients_match_the_analytic_derivative():
    # RY(x)|0> then RX(w): <Z> = cos(x) cos(w); d/dx = -sin(x) cos(w); d/dw = -cos(x) sin(w)
    layer = QuantumLayer(1, 1, "basic").double()
    x = torch.tensor([[0.3], [1.2], [-2.0]], dtype=torch.float64, requires_grad=True)
    _set_weights(layer, [[0.0]])
    torch.testing.assert_close(layer(x).detach(), torch.cos(x.detach()))  # no trainable rotation: <Z> = cos(x)
    w = 0.7
    _set_weights(layer, [[w]])
    out = layer(x)
    torch.testing.assert_close(out.detach(), torch.cos(x.detach()) * math.cos(w))
    out.sum().backward()
    torch.testing.assert_close(x.grad, -torch.sin(x.detach()) * math.cos(w))
    want_dw = float((-torch.cos(x.detach()) * math.sin(w)).sum())
    assert layer.qlayer.weights.grad.item() == pytest.approx(want_dw, abs=1e-10)


def test_two_qubits_with_a_cnot():
    # RY(x_i), RX(w_i) on each qubit, then CNOT(0 -> 1): a product state with z_i = cos(x_i) cos(w_i) before the
    # CNOT; after it Z_0 is unchanged and Z_1 reads Z_0 Z_1, so the outputs are (z_0, z_0 * z_1).
    layer = QuantumLayer(2, 1, "basic").double()
    w = torch.tensor([[0.4, -1.1]], dtype=torch.float64)
    _set_weights(layer, w)
    x = torch.tensor([[0.3, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    z = torch.cos(x) * torch.cos(w)
    torch.testing.assert_close(layer(x).detach(), torch.stack([z[:, 0], z[:, 0] * z[:, 1]], dim=1))


# ----- an independent state-vector reference for StronglyEntanglingLayers --------------------------------------
def _ry(t):
    c, s = math.cos(t / 2), math.sin(t / 2)
    return np.array([[c, -s], [s, c]], dtype=complex)


def _rz(t):
    return np.diag([np.exp(-0.5j * t), np.exp(0.5j * t)])


def _apply1(state, gate, wire, n):
    psi = np.moveaxis(state.reshape([2] * n), wire, 0)
    psi = np.tensordot(gate, psi, axes=(1, 0))
    return np.moveaxis(psi, 0, wire).reshape(-1)


def _cnot(state, c, t, n):
    psi = state.reshape([2] * n).copy()
    idx = [slice(None)] * n
    idx[c] = 1
    sub = psi[tuple(idx)]  # control = 1: flip the target (its axis moved down by one if after the control)
    psi[tuple(idx)] = np.flip(sub, axis=t - (t > c))
    return psi.reshape(-1)


def _reference(x, weights):
    """AngleEmbedding(RY) + StronglyEntanglingLayers (Rot = RZ(omega) RY(theta) RZ(phi), CNOT(i, i+l+1 mod n) in
    layer l) + <Z_i>, by explicit 2^n state vectors; wire 0 is the most significant bit (PennyLane's order)."""
    n = len(x)
    state = np.zeros(2 ** n, dtype=complex)
    state[0] = 1
    for i in range(n):
        state = _apply1(state, _ry(x[i]), i, n)
    for layer, w in enumerate(weights):
        for i in range(n):
            phi, theta, omega = w[i]
            state = _apply1(state, _rz(omega) @ _ry(theta) @ _rz(phi), i, n)
        r = layer % (n - 1) + 1  # PennyLane's default ranges
        for i in range(n):
            state = _cnot(state, i, (i + r) % n, n)
    probs = np.abs(state.reshape([2] * n)) ** 2
    return np.array([probs.take(0, axis=i).sum() - probs.take(1, axis=i).sum() for i in range(n)])


def test_strongly_entangling_layer_matches_an_independent_state_vector_simulation():
    torch.manual_seed(0)
    layer = QuantumLayer(3, 2, "strong").double()
    x = torch.randn(4, 3, dtype=torch.float64)
    w = layer.qlayer.weights.detach().numpy()
    got = layer(x).detach().numpy()
    want = np.stack([_reference(xi, w) for xi in x.numpy()])
    np.testing.assert_allclose(got, want, atol=1e-10)


def test_batch_equals_per_sample():
    torch.manual_seed(0)
    layer = QuantumLayer(4, 2)
    x = torch.randn(6, 4)
    batched = layer(x)
    single = torch.cat([layer(x[i:i + 1]) for i in range(6)])
    assert batched.shape == (6, 4) and single.shape == (6, 4)
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-6)
    assert (batched.abs() <= 1 + 1e-6).all()  # expectation values of Pauli Z


# ----- training, checkpoints -----------------------------------------------------------------------------------
def test_layer_trains_inside_a_model():
    # two Gaussian blobs; a quantum layer between two Linears must fit them (loss falls, accuracy near 1)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(32, 2, generator=g) + 1.5, torch.randn(32, 2, generator=g) - 1.5])
    y = torch.cat([torch.zeros(32), torch.ones(32)]).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), QuantumLayer(2, 2), torch.nn.Linear(2, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = model(x)
    assert F.cross_entropy(logits, y).item() < 0.5 * first
    assert (logits.argmax(1) == y).float().mean().item() >= 0.95
    assert model[1].qlayer.weights.grad is not None and model[1].qlayer.weights.grad.abs().sum() > 0


def test_state_dict_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = create_model("hybrid_mlp", in_features=13, num_classes=3).eval()
    x = torch.randn(5, 13)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    assert "mixer.qlayer.weights" in state and state["mixer.qlayer.weights"].shape == (2, 5, 3)
    save_file(state, str(tmp_path / "m.safetensors"))
    torch.manual_seed(1)
    twin = create_model("hybrid_mlp", in_features=13, num_classes=3).eval()
    with torch.no_grad():
        assert not torch.allclose(twin(x), model(x))
        twin.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
        assert torch.equal(twin(x), model(x))


# ----- the classical twin ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,layers,entangler", [(5, 2, "strong"), (4, 5, "strong"), (2, 1, "strong"),
                                                (4, 2, "strong"), (6, 3, "basic"), (8, 3, "strong")])
def test_twin_parameter_count_follows_the_stated_rule(n, layers, entangler):
    q = quantum_param_count(n, layers, entangler)
    twin = ClassicalTwin(n, q)
    count = sum(p.numel() for p in twin.parameters())
    assert count == twin.num_params == twin_depth(n, q) * (n * n + n)
    assert abs(count - q) <= max((n * n + n) / 2, n * n + n - q)  # nearest multiple of n^2 + n, at least one layer
    if q % (n * n + n) == 0:
        assert count == q  # exact when it can be
    layer = QuantumLayer(n, layers, entangler)
    assert layer.num_params == q == sum(p.numel() for p in layer.parameters())
    assert twin(torch.randn(3, n)).shape == (3, n)


def test_hybrid_models_differ_only_in_the_mixer():
    torch.manual_seed(0)
    q = create_model("hybrid_mlp", in_features=13, num_classes=3, head_kind="quantum")
    c = create_model("hybrid_mlp", in_features=13, num_classes=3, head_kind="classical")
    assert sum(p.numel() for p in q.parameters()) == sum(p.numel() for p in c.parameters())  # 5 qubits x 2: exact
    assert q.mixer_params() == c.mixer_params() == 30
    strip = {k for k in q.state_dict() if not k.startswith("mixer.")}
    assert strip == {k for k in c.state_dict() if not k.startswith("mixer.")}
    cnn = create_model("hybrid_cnn", in_chans=1, num_classes=4, n_qubits=3, n_layers=1)
    assert cnn(torch.randn(2, 1, 8, 8)).shape == (2, 4) and cnn.num_features == 3


def test_state_vector_memory_doubles_per_qubit():
    assert state_vector_bytes(10) == 8 * 1024 and state_vector_bytes(11, batch=3) == 3 * 2 * 8 * 1024


# ----- errors users see -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, MAX_QUBITS + 1, 2.5, True])
def test_bad_n_qubits_is_one_line_model_error(bad):
    with pytest.raises(ModelError) as err:
        QuantumLayer(bad)
    msg = str(err.value)
    assert msg == (f"model error: quantum layer: n_qubits must be an integer in [1, {MAX_QUBITS}] (simulation cost "
                   f"grows as 2^n_qubits), got {bad!r}")
    with pytest.raises(ModelError, match="hybrid_mlp: n_qubits must be an integer"):
        create_model("hybrid_mlp", n_qubits=bad)


def test_other_bad_options_are_one_line_model_errors():
    with pytest.raises(ModelError, match=r"unknown hybrid_mlp head_kind 'qantum' \(did you mean 'quantum'\?\)"):
        create_model("hybrid_mlp", head_kind="qantum")
    with pytest.raises(ModelError, match="unknown quantum layer entangler 'strng'"):
        QuantumLayer(2, 1, "strng")
    with pytest.raises(ModelError, match="n_layers must be a positive integer, got 0"):
        create_model("hybrid_cnn", n_layers=0)
    with pytest.raises(ModelError, match=r"expects \(B, 3\) angles, got \(2, 4\)"):
        QuantumLayer(3, 1)(torch.zeros(2, 4))


def test_missing_pennylane_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pennylane", None)  # `import pennylane` now raises ImportError
    with pytest.raises(MissingDependencyError) as err:
        QuantumLayer(2, 1)
    assert str(err.value) == ('missing dependency: pennylane is not installed; the quantum layer needs '
                              'pip install "lamina[quantum]"')
    with pytest.raises(MissingDependencyError):
        create_model("hybrid_mlp")
    # the classical twin needs no pennylane: the comparison's baseline runs without the extra
    assert create_model("hybrid_mlp", head_kind="classical")(torch.randn(2, 64)).shape == (2, 10)


# ----- through the CLI and the Trainer --------------------------------------------------------------------------
def test_cli_trains_the_hybrid_config_above_chance(tmp_path, capsys):
    from lamina.cli.main import main

    cfg = ROOT / "configs" / "quantum_digits.yaml"
    n = torch.get_num_threads()
    try:
        rc = main(["train", str(cfg), "trainer.max_epochs=3", f"logging.root={tmp_path}", "name=q", *FAST])
    finally:
        torch.set_num_threads(n)  # the config's trainer.threads=1 must not leak into later tests on this worker
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["model"] == "hybrid_mlp" and summary["test"]["test/acc"] > 0.4  # 10 classes: chance is 0.1
    best = load_file(str(tmp_path / "q" / "checkpoints" / "best" / "model.safetensors"))
    assert best["mixer.qlayer.weights"].shape == (2, 5, 3)


@pytest.mark.parametrize("args,want", [
    (["model.n_qubits=25"], f"model error: hybrid_mlp: n_qubits must be an integer in [1, {MAX_QUBITS}]"),
    (["model.head_kind=qantum"], "model error: unknown hybrid_mlp head_kind 'qantum'"),
])
def test_cli_bad_input_is_one_line_exit_2(args, want, tmp_path, capsys):
    from lamina.cli.main import main

    rc = main(["train", str(ROOT / "configs" / "quantum_digits.yaml"), *args, f"logging.root={tmp_path}", *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(want), err


def test_cli_missing_pennylane_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    from lamina.cli.main import main

    monkeypatch.setitem(sys.modules, "pennylane", None)
    rc = main(["train", str(ROOT / "configs" / "quantum_digits.yaml"), f"logging.root={tmp_path}", *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    want = 'missing dependency: pennylane is not installed; the quantum layer needs pip install "lamina[quantum]"'
    assert rc == 2 and err == [want], err


@pytest.mark.slow
def test_quantum_head_export_is_a_one_line_export_error(tmp_path):
    # complex state vectors: ONNX has no complex type and torch.export cannot trace PennyLane's tape; the user gets
    # one line naming both exporters' failures (the classical head exports: tests/test_export.py's "hybrid" case)
    pytest.importorskip("onnxscript")
    from lamina.deploy.export import ExportError, export_onnx

    model = create_model("hybrid_mlp", in_features=64, num_classes=10).eval()
    with pytest.raises(ExportError, match="hybrid_mlp: ONNX export failed with both exporters") as err:
        export_onnx(model, {"x": torch.randn(8, 64)}, tmp_path / "m.onnx")
    assert "\n" not in str(err.value) and not (tmp_path / "m.onnx").exists()
