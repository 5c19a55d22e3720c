"""Weight initialisation matched to the activation that follows a layer.

Why two schemes. A layer's output variance is `fan * Var(w) * Var(x)`; to keep signals (and gradients) at a
constant scale through depth, Var(w) must cancel the fan and the activation's effect on variance:

* **He / Kaiming** (He et al. 2015) for ReLU-like activations (relu, leaky_relu, elu, gelu, silu): ReLU zeroes
  half of its input, halving the variance, so Var(w) = gain^2 / fan with gain = sqrt(2) (sqrt(2 / (1 + a^2))
  for leaky ReLU with slope a). GELU and SiLU behave like smooth ReLUs and ELU like a ReLU near zero, so they
  use the ReLU gain too (the usual practice; the exact gains differ by a few percent).
  Convolutions use `fan_out` (out_channels * k * k), which preserves the variance of the *backward* pass,
  as torchvision/timm ResNets do; linear layers use `fan_in`, which preserves the forward pass.
* **Xavier / Glorot** (Glorot & Bengio 2010) for saturating or linear activations (tanh, sigmoid, identity):
  they are roughly linear around zero, so Var(w) = gain^2 * 2 / (fan_in + fan_out), a compromise between the
  forward and backward passes. Gain is 5/3 for tanh (offsets its contraction), 1 for sigmoid and identity
  (torch.nn.init.calculate_gain's values).

Biases start at zero (no reason to prefer a sign) and normalisation layers at the identity map (weight 1,
bias 0), so at step 0 they only normalise. Embeddings keep torch's N(0, 1) default.

Transformers use neither (`init_transformer_`): GPT-2 / BERT / Llama draw every Linear and Embedding weight
from N(0, 0.02^2), zero the biases, and GPT-2 (section 2.3) scales the projections that write into the residual
stream (`*.out_proj`) to N(0, (0.02 / sqrt(2 * n_layer))^2), so the residual stream's variance does not grow
with depth; post-LN BERT does not scale them (its blocks renormalise the stream after every sublayer).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch.nn as nn

from lamina.errors import ModelError, unknown_name
from lamina.nn.activations import ACTIVATIONS
from lamina.nn.positional import LearnedPositionalEmbedding

_HE = ("relu", "leaky_relu", "elu", "gelu", "silu")
_XAVIER_GAIN = {"tanh": 5.0 / 3.0, "sigmoid": 1.0, "identity": 1.0}
_LEAKY_SLOPE = 0.01  # same slope as activations.get_activation("leaky_relu")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)  # _NormBase: BatchNorm*/InstanceNorm*


def init_weights(module: nn.Module, nonlinearity: str = "relu") -> nn.Module:
    """Initialise every Conv/Linear/norm layer inside `module` for `nonlinearity`; returns `module`.

    Conv: He normal (fan_out) or Xavier normal; Linear: He normal (fan_in) or Xavier normal; biases 0;
    BatchNorm/GroupNorm/LayerNorm/InstanceNorm: weight 1, bias 0. See the module docstring for why.
    """
    act = str(nonlinearity).lower()
    if act not in ACTIVATIONS:
        raise ModelError(unknown_name("nonlinearity for init", nonlinearity, ACTIVATIONS))
    for m in module.modules():
        if isinstance(m, (*_CONVS, nn.Linear)):
            if act in _HE:
                mode = "fan_in" if isinstance(m, nn.Linear) else "fan_out"
                kind, a = ("leaky_relu", _LEAKY_SLOPE) if act == "leaky_relu" else ("relu", 0.0)
                nn.init.kaiming_normal_(m.weight, a=a, mode=mode, nonlinearity=kind)
            else:
                nn.init.xavier_normal_(m.weight, gain=_XAVIER_GAIN[act])
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _NORMS):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    return module



TRANSFORMER_STD = 0.02  # GPT-2 / BERT / Llama's initializer_range


def init_transformer_(module: nn.Module, n_layer: int | None = None, std: float = TRANSFORMER_STD,
                      residual_names: Iterable[str] = ("out_proj.weight",), layer_norms: bool = False) -> nn.Module:
    """GPT-2-style init of every layer inside `module`, in place; returns `module`. See the module docstring.

    Linear, Embedding and LearnedPositionalEmbedding weights N(0, std^2) and Linear biases 0, in `modules()`
    order (a weight tied to two modules is drawn twice, the second draw kept); then, when `n_layer` is given,
    every parameter whose name ends with one of `residual_names` N(0, (std / sqrt(2 n_layer))^2).
    `layer_norms`: also reset nn.LayerNorm to weight 1, bias 0 (BERT). The draws are in a fixed order, so a
    seed gives the same weights as the hand-written loops this replaces.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Embedding, LearnedPositionalEmbedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif layer_norms and isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if n_layer is not None:
        suffixes = tuple(residual_names)
        for name, p in module.named_parameters():
            if name.endswith(suffixes):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * n_layer))
    return module
