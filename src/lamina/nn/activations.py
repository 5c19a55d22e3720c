"""Activations by name: `get_activation("gelu")` -> a fresh nn.Module.

Configs name activations with strings (YAML-friendly); this is the one place that maps a name to a module,
so every family accepts the same set and rejects unknown names with the same one-line ModelError.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from lamina.errors import ModelError, unknown_name

# name -> constructor; each call returns a new module (modules hold no state here, but sharing one
# instance across layers would make printed models and hooks confusing).
_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,  # MobileNet / EfficientNet-Lite: bounded, quantizes well
    "leaky_relu": lambda: nn.LeakyReLU(0.01),  # torch's default slope; init.py uses the same slope for its gain
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),  # GPT-2's / T5 v1.1's "gelu_new"
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "identity": nn.Identity,
}

ACTIVATIONS: tuple[str, ...] = tuple(_FACTORIES)


def get_activation(name: str) -> nn.Module:
    """A new activation module for `name` (one of ACTIVATIONS); unknown names raise ModelError."""
    key = str(name).lower()
    if key not in _FACTORIES:
        raise ModelError(unknown_name("activation", name, ACTIVATIONS))
    return _FACTORIES[key]()
