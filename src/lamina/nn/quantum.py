"""A hybrid quantum layer (PennyLane `qml.qnn.TorchLayer`, simulated on `default.qubit`) and its classical twin.

    x (B, n) angles -> AngleEmbedding (RY(x_i) on qubit i) -> entangling layers (trainable) -> <Z_i> -> (B, n)

What it is: a parameterised circuit evaluated by a *classical state-vector simulator*. The state of n qubits is
2^n complex amplitudes, every gate is a dense update of that vector, and backprop keeps the intermediate states,
so time and memory grow about 2^n (`MAX_QUBITS` bounds n, see below). Nothing here runs on quantum hardware and
nothing here can show a quantum advantage; it lets lamina's models and Trainer carry a variational circuit as a
layer, and lets that layer be compared, fairly, with a classical layer of the same parameter count.

Design choices, and why:
* The layer is square, (B, n_qubits) -> (B, n_qubits): one angle per qubit in, one expectation per qubit out.
  Mapping the model's features to n angles is an ordinary nn.Linear that belongs to the model; keeping it out of
  the layer means that swapping the circuit for `ClassicalTwin` (composition, not a flag) changes only the part
  under comparison.
* PennyLane, not a hand-written simulator: it is the maintained reference for these circuits (templates, gradient
  methods, devices) and its TorchLayer registers the circuit weights as an ordinary nn.Parameter, so state_dict,
  optimizers and safetensors checkpoints work unchanged. It is imported lazily: `import lamina.nn` stays cheap and
  works without the `quantum` extra.
* `diff_method="backprop"`: autograd through the simulator's state, one forward + one backward per batch. The
  parameter-shift rule (what hardware would need) costs two circuit runs per parameter.
* Inputs are batched with PennyLane's parameter broadcasting (one simulation of a (B, 2^n) state), not a Python
  loop over samples.
* Outputs are expectation values in [-1, 1]; the twin ends in tanh so both feed the head on the same range.
"""

from __future__ import annotations

import torch
from torch import nn

from lamina.errors import MissingDependencyError, ModelError, unknown_name

# Simulation cost is exponential in qubits: a batch of B states holds B * 2^n complex64 amplitudes (8 bytes each),
# and backprop keeps about a hundred such states for 2 strongly entangling layers (benchmarks/quantum.py measured
# 1.6 GiB of peak memory for 16 MiB batched states at 16 qubits, and x1.9 time and memory per added qubit). At 20
# qubits one 64-sample batch would need ~50 GiB: past this bound training cannot fit in a workstation's memory, so a
# larger value is a mistake, not a plan.
MAX_QUBITS = 20
ENTANGLERS = {
    "strong": 3,  # StronglyEntanglingLayers: Rot(phi, theta, omega) per qubit per layer + a CNOT ring (3 params)
    "basic": 1,  # BasicEntanglerLayers: one RX per qubit per layer + a CNOT ring (1 param)
}
ROTATIONS = ("X", "Y", "Z")


def _pennylane():
    try:
        import pennylane as qml
    except ImportError:
        raise MissingDependencyError('pennylane is not installed; the quantum layer needs pip install "lamina[quantum]"'
                                     ) from None
    return qml


def check_quantum_options(n_qubits: int, n_layers: int, entangler: str = "strong", rotation: str = "Y",
                          who: str = "quantum layer") -> None:
    """One-line ModelErrors for bad circuit options (called by the layer and by configs that build one)."""
    if isinstance(n_qubits, bool) or not isinstance(n_qubits, int) or not 1 <= n_qubits <= MAX_QUBITS:
        raise ModelError(f"{who}: n_qubits must be an integer in [1, {MAX_QUBITS}] (simulation cost grows as "
                         f"2^n_qubits), got {n_qubits!r}")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ModelError(f"{who}: n_layers must be a positive integer, got {n_layers!r}")
    if entangler not in ENTANGLERS:
        raise ModelError(unknown_name(f"{who} entangler", entangler, ENTANGLERS))
    if rotation not in ROTATIONS:
        raise ModelError(unknown_name(f"{who} embedding rotation", rotation, ROTATIONS))


def quantum_param_count(n_qubits: int, n_layers: int, entangler: str = "strong") -> int:
    """Trainable circuit weights: n_layers * n_qubits * (3 for "strong", 1 for "basic")."""
    return n_layers * n_qubits * ENTANGLERS[entangler]


class QuantumLayer(nn.Module):
    """(B, n_qubits) -> (B, n_qubits): angle embedding, `n_layers` trainable entangling layers, PauliZ per qubit.

    The circuit weights are one nn.Parameter, `qlayer.weights` of shape (n_layers, n_qubits, 3) ("strong") or
    (n_layers, n_qubits) ("basic"), initialised uniformly in [0, 2 pi) (TorchLayer's default: rotations are
    periodic, so no scale is special).
    """

    def __init__(self, n_qubits: int = 4, n_layers: int = 2, entangler: str = "strong", rotation: str = "Y"):
        super().__init__()
        check_quantum_options(n_qubits, n_layers, entangler, rotation)
        qml = _pennylane()
        self.n_qubits, self.n_layers, self.entangler, self.rotation = n_qubits, n_layers, entangler, rotation
        wires = list(range(n_qubits))
        template = qml.StronglyEntanglingLayers if entangler == "strong" else qml.BasicEntanglerLayers

        @qml.qnode(qml.device("default.qubit", wires=n_qubits), interface="torch", diff_method="backprop")
        def circuit(inputs, weights):
            qml.AngleEmbedding(inputs, wires=wires, rotation=rotation)
            template(weights, wires=wires)
            return [qml.expval(qml.PauliZ(w)) for w in wires]

        shape = (n_layers, n_qubits, 3) if entangler == "strong" else (n_layers, n_qubits)
        self.qlayer = qml.qnn.TorchLayer(circuit, {"weights": shape})

    @property
    def num_params(self) -> int:
        return quantum_param_count(self.n_qubits, self.n_layers, self.entangler)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.n_qubits:
            raise ModelError(f"quantum layer expects (B, {self.n_qubits}) angles, got {tuple(x.shape)}")
        out = self.qlayer(x)  # (B, n_qubits); a batch of 1 is squeezed by PennyLane in some versions
        return out.reshape(x.shape[0], self.n_qubits).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"n_qubits={self.n_qubits}, n_layers={self.n_layers}, entangler={self.entangler}, "
                f"rotation={self.rotation}, params={self.num_params}")


def twin_depth(n: int, target: int) -> int:
    """Number k of square tanh layers in `ClassicalTwin(n)` whose parameter count k * (n^2 + n) is nearest `target`
    (k >= 1). The count moves in steps of n^2 + n, so |twin - target| <= (n^2 + n) / 2 once target >= n^2 + n; it
    is exact when n^2 + n divides target, e.g. 5 qubits x 2 strongly entangling layers = 30 = 5 * 5 + 5."""
    return max(1, round(target / (n * n + n)))


class ClassicalTwin(nn.Module):
    """(B, n) -> (B, n): k layers of tanh(Linear(n, n)), k chosen so the parameter count matches a quantum layer's
    (`twin_depth`). Same input, same output shape and range ([-1, 1]) as `QuantumLayer`, and like the circuit it
    keeps all n dimensions (a narrower hidden layer would match the count by adding a bottleneck the circuit does
    not have), so a model can swap one for the other and nothing else changes."""

    def __init__(self, n_features: int, target_params: int):
        super().__init__()
        if n_features < 1 or target_params < 1:
            raise ModelError(f"classical twin: need n_features >= 1 and target_params >= 1, got "
                             f"{n_features}, {target_params}")
        self.n_features, self.target_params = n_features, target_params
        self.depth = twin_depth(n_features, target_params)
        self.layers = nn.ModuleList(nn.Linear(n_features, n_features) for _ in range(self.depth))
        for fc in self.layers:  # Xavier with tanh's gain: every layer feeds a tanh
            nn.init.xavier_uniform_(fc.weight, gain=5.0 / 3.0)
            nn.init.zeros_(fc.bias)

    @property
    def num_params(self) -> int:
        return self.depth * (self.n_features ** 2 + self.n_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc in self.layers:
            x = torch.tanh(fc(x))  # (B, n)
        return x

    def extra_repr(self) -> str:
        return f"n_features={self.n_features}, depth={self.depth}, params={self.num_params} (target {self.target_params})"


def state_vector_bytes(n_qubits: int, batch: int = 1, bytes_per_amplitude: int = 8) -> int:
    """Memory of one batched state vector: batch * 2^n amplitudes (complex64 = 8 bytes)."""
    return batch * (2 ** n_qubits) * bytes_per_amplitude


__all__ = [
    "ENTANGLERS",
    "MAX_QUBITS",
    "ClassicalTwin",
    "QuantumLayer",
    "check_quantum_options",
    "quantum_param_count",
    "state_vector_bytes",
    "twin_depth",
]
