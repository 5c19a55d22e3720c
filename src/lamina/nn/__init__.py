"""Reusable layers with no model knowledge."""

from lamina.nn.activations import ACTIVATIONS, get_activation
from lamina.nn.attention import (
    KVCache,
    MultiHeadAttention,
    attention_weights,
    causal_mask,
    reference_attention,
    repeat_kv,
)
from lamina.nn.droppath import DropPath, drop_path
from lamina.nn.feedforward import FeedForward, SwiGLU
from lamina.nn.init import init_weights
from lamina.nn.norms import NORM_KINDS, RMSNorm, make_norm
from lamina.nn.patch import PatchEmbed
from lamina.nn.positional import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    rotate_half,
    sinusoidal_table,
)

__all__ = [
    "ACTIVATIONS", "get_activation", "init_weights",
    "MultiHeadAttention", "KVCache", "reference_attention", "attention_weights", "causal_mask", "repeat_kv",
    "LearnedPositionalEmbedding", "SinusoidalPositionalEncoding", "RotaryEmbedding", "rotate_half",
    "sinusoidal_table",
    "RMSNorm", "make_norm", "NORM_KINDS",
    "FeedForward", "SwiGLU",
    "PatchEmbed", "DropPath", "drop_path",
]
