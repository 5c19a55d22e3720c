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

# Blockwise (flash-style) exact attention and the chunk primitives ring attention builds on.
from lamina.nn.blockwise_attention import (  # noqa: E402
    BlockwiseAttention,
    BlockwiseKernel,
    use_blockwise_attention,
    attention_chunk_backward,
    attention_chunk_forward,
    blockwise_attention,
    merge_attention,
)

__all__ += [
    "blockwise_attention", "BlockwiseAttention", "attention_chunk_forward", "attention_chunk_backward",
    "merge_attention", "BlockwiseKernel", "use_blockwise_attention", "ring_attention", "RingAttention",
]

# Ring attention (context parallelism over a torch.distributed process group).
from lamina.nn.ring_attention import RingAttention, ring_attention  # noqa: E402

# LoRA: a low-rank adapter swapped in for nn.Linear from outside (apply_lora), plus merge / save helpers.
from lamina.nn.lora import (  # noqa: E402
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    remove_lora,
    trainable_fraction,
    unmerge_lora,
)

__all__ += [
    "LoRALinear", "apply_lora", "merge_lora", "unmerge_lora", "remove_lora", "lora_state_dict",
    "load_lora_state_dict", "trainable_fraction",
]

# Input normalization in front of a model ((x - mean) / std): attacks, adversarial training, pretrained inputs.
from lamina.nn.preprocess import Normalize, Normalized  # noqa: E402

__all__ += ["Normalize", "Normalized"]
