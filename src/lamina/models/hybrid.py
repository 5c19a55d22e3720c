"""Hybrid quantum-classical classifiers: a registered backbone, a simulated variational circuit, a linear head.

    x -> backbone (mlp / small_cnn, no head) -> pooled (B, F) -> Linear(F, n_qubits) -> mixer -> (B, n_qubits)
      -> Linear(n_qubits, num_classes) -> logits
    mixer = QuantumLayer(n_qubits, n_layers)        head_kind="quantum"  (PennyLane TorchLayer on default.qubit)
          | ClassicalTwin(n_qubits, same #params)   head_kind="classical" (k x tanh(Linear(n, n)), nearest count)

The circuit is the only part that differs between the two head kinds: same backbone, same projection to the
qubits, same head, same Trainer, so a comparison of the two measures the circuit against a classical layer of
equal size, nothing else. The backbone is an existing family built through the registry (composition), so the
hybrid models inherit its input handling (the MLP flattens 8x8 digits; the CNN takes any image size).

`forward_features` returns the mixer's output, (B, n_qubits) values in [-1, 1]; `num_features = n_qubits`.
Simulation cost grows as 2^n_qubits (lamina.nn.quantum), so defaults stay at 5 qubits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lamina.errors import ModelError, unknown_name
from lamina.models.contract import build_model
from lamina.models.registry import create_model, register_model
from lamina.nn.quantum import (
    ClassicalTwin,
    QuantumLayer,
    check_quantum_options,
    quantum_param_count,
)

HEAD_KINDS = ("quantum", "classical")


@dataclass
class _CircuitOptions:
    n_qubits: int = 5  # one qubit per angle fed to the circuit; cost doubles per qubit, 5 keeps tests fast
    # entangling layers: 2 let every qubit reach every other through the CNOT rings, and 5 qubits x 2 strong layers
    # = 30 weights = exactly one Linear(5, 5) + tanh, so the classical twin matches the count with no remainder
    n_layers: int = 2
    entangler: str = "strong"  # StronglyEntanglingLayers (3 angles per qubit per layer); "basic": 1 angle
    head_kind: str = "quantum"  # "classical": the circuit swapped for tanh Linear layers of the same parameter count
    head_dropout: float = 0.0  # before the final Linear; the n_qubits-wide bottleneck regularises enough on small data

    def _check_circuit(self, who: str) -> None:
        check_quantum_options(self.n_qubits, self.n_layers, self.entangler, "Y", who=who)
        if self.head_kind not in HEAD_KINDS:
            raise ModelError(unknown_name(f"{who} head_kind", self.head_kind, HEAD_KINDS))
        if not 0.0 <= self.head_dropout < 1.0:
            raise ModelError(f"{who}: head_dropout must be in [0, 1), got {self.head_dropout}")


@dataclass
class HybridMLPConfig(_CircuitOptions):
    in_features: int = 64  # sklearn digits flattened (8x8); the data set sets it in a run
    num_classes: int = 10  # 0 -> no head, forward returns the circuit's outputs
    depth: int = 0  # classical hidden layers before the circuit; 0: the inputs are projected straight to the qubits
    width: int = 32  # their width (mlp's `width`), used when depth > 0

    def __post_init__(self):
        self._check_circuit("hybrid_mlp")
        if self.in_features < 1 or self.num_classes < 0 or self.depth < 0 or self.width < 1:
            raise ModelError(f"hybrid_mlp: need in_features >= 1, num_classes >= 0, depth >= 0, width >= 1; got "
                             f"{self.in_features}, {self.num_classes}, {self.depth}, {self.width}")


@dataclass
class HybridCNNConfig(_CircuitOptions):
    in_chans: int = 1  # grayscale digits / Fashion-MNIST
    num_classes: int = 10  # 0 -> no head
    channels: tuple[int, ...] = (16, 32)  # small_cnn stages; narrow: the circuit, not the CNN, is the bottleneck

    def __post_init__(self):
        self._check_circuit("hybrid_cnn")
        self.channels = tuple(int(c) for c in self.channels)
        if self.in_chans < 1 or self.num_classes < 0:
            raise ModelError(f"hybrid_cnn: need in_chans >= 1 and num_classes >= 0, got {self.in_chans}, "
                             f"{self.num_classes}")


def make_mixer(n_qubits: int, n_layers: int, entangler: str, head_kind: str) -> nn.Module:
    """The swappable part: the circuit, or its classical twin of (nearly) equal parameter count."""
    if head_kind == "quantum":
        return QuantumLayer(n_qubits, n_layers, entangler)
    return ClassicalTwin(n_qubits, quantum_param_count(n_qubits, n_layers, entangler))


class HybridClassifier(nn.Module):
    """A classical backbone (built by the registry with no head) -> projection -> mixer -> linear head."""

    def __init__(self, cfg, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.input_spec = backbone.input_spec
        self.flattens_input = getattr(backbone, "flattens_input", False)
        if getattr(backbone, "min_input_size", None) is not None:
            self.min_input_size = backbone.min_input_size
        # angles = a linear map of the features: standardized inputs land mostly within a few radians
        self.proj = nn.Linear(backbone.num_features, cfg.n_qubits)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.mixer = make_mixer(cfg.n_qubits, cfg.n_layers, cfg.entangler, cfg.head_kind)
        self.num_features = cfg.n_qubits
        self.drop = nn.Dropout(cfg.head_dropout)
        self.reset_classifier(cfg.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)  # (B, F)
        return self.mixer(self.proj(feats))  # (B, n_qubits), in [-1, 1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.xavier_uniform_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def mixer_params(self) -> int:
        return sum(p.numel() for p in self.mixer.parameters())


def _named_backbone(model: HybridClassifier) -> HybridClassifier:
    model.backbone.model_name = model.model_name  # the backbone's shape errors name the model the user built
    return model


def _mlp_hybrid(cfg: HybridMLPConfig) -> HybridClassifier:
    backbone = create_model("mlp", in_features=cfg.in_features, num_classes=0, depth=cfg.depth, width=cfg.width,
                            dropout=0.0)
    return HybridClassifier(cfg, backbone)


def _cnn_hybrid(cfg: HybridCNNConfig) -> HybridClassifier:
    return HybridClassifier(cfg, create_model("small_cnn", in_chans=cfg.in_chans, num_classes=0,
                                              channels=cfg.channels))


@register_model("hybrid", input_kind="vector")
def hybrid_mlp(**kwargs) -> HybridClassifier:
    """Vectors -> (MLP) -> n-qubit simulated circuit (PennyLane) or its equal-size classical twin -> linear head."""
    return _named_backbone(build_model("hybrid_mlp", _mlp_hybrid, HybridMLPConfig(), kwargs))


@register_model("hybrid", input_kind="image")
def hybrid_cnn(**kwargs) -> HybridClassifier:
    """Images -> small CNN -> n-qubit simulated circuit (PennyLane) or its equal-size classical twin -> linear head."""
    return _named_backbone(build_model("hybrid_cnn", _cnn_hybrid, HybridCNNConfig(), kwargs))
