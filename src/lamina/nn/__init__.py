"""Reusable layers with no model knowledge."""

from lamina.nn.activations import ACTIVATIONS, get_activation
from lamina.nn.init import init_weights

__all__ = ["ACTIVATIONS", "get_activation", "init_weights"]
