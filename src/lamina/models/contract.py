"""The classifier-model contract, stated once and checked from outside the models.

Every classifier-like model in lamina exposes:

* `forward(x) == forward_head(forward_features(x))`
* `forward_features(x)`: the backbone's output (a feature map for conv nets, a vector for MLPs)
* `forward_head(feats, pre_logits=False)`: pool (+ any pre-logit layers) then classify; with
  `pre_logits=True` it returns the pooled features, of width `num_features`
* `reset_classifier(num_classes)`: a new, freshly initialised head; `num_classes=0` -> `nn.Identity`
* `num_features: int`, `num_classes: int`, `cfg` (the typed config it was built from)
* `input_spec: tuple`: the per-sample input shape, `None` for free dims: `(1, None, None)` is a 1-channel
  image of any size, `(13,)` a vector of 13 features
* `model_name: str`: the registry name (set by the factory)
* image models may state `min_input_size`, the smallest side their downsampling handles cleanly
* conv backbones (cnn, resnet, efficientnet) also give `stage_features(x, upto=None)`: every stage's feature
  map, the pyramid a detector's neck reads, and `keep_stages(n)`, which drops the stages a neck never reads

Tools (trainer, explain, attacks, export) and the data layer use `check_input_shape` / `example_input`
instead of knowing any particular model.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lamina.errors import InputShapeError
from lamina.models.registry import build_config, create_model

_DEFAULT_SIDE = 32  # free image dims in example inputs: large enough for every 32x-downsampling backbone
_SMALL_SIDE = 8  # ...or this, when the model declares it handles small inputs (keeps tests fast)


def build_model(name: str, model_cls: type[nn.Module], base_cfg, overrides: dict) -> nn.Module:
    """What every registered factory does: apply overrides to a base config, build, stamp the name."""
    cfg = build_config(type(base_cfg), name, base_cfg, overrides)
    model = model_cls(cfg)
    model.model_name = name
    return model


def _model_name(model: nn.Module) -> str:
    return getattr(model, "model_name", type(model).__name__)


def format_spec(spec: tuple) -> str:
    """`(1, None, None)` -> `(B, 1, H, W)`; free dims are named by position for images, `D<i>` otherwise."""
    names = ("C", "H", "W") if len(spec) == 3 else tuple(f"D{i}" for i in range(len(spec)))
    return "(" + ", ".join(["B"] + [n if d is None else str(d) for d, n in zip(spec, names)]) + ")"


def _fmt_shape(shape: tuple) -> str:
    return "(" + ", ".join(["B"] + [str(int(d)) for d in shape]) + ")"


def run_stages(x: torch.Tensor, stages: nn.Sequential, upto: int | None = None) -> list[torch.Tensor]:
    """`stage_features` of the conv backbones (cnn, resnet, efficientnet): the output of each stage in order,
    stopping after stage `upto` when given. Detectors build their feature pyramids from these."""
    outs = []
    for i, stage in enumerate(stages):
        x = stage(x)
        outs.append(x)
        if upto is not None and i >= upto:
            break
    return outs


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, num_features): the pooled features before the classifier, the embedding tools that learn or probe
    representations (few-shot, self-supervised, k-NN) share."""
    return model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)


def check_input_shape(model: nn.Module, sample_shape: tuple) -> None:
    """Raise InputShapeError when a per-sample shape (no batch dim) does not fit `model.input_spec`.

    `None` in the spec matches any size. Models with `flattens_input = True` (the MLP) also accept any
    shape whose element count equals their vector width, e.g. 8x8 digits (1, 8, 8) for an MLP on 64 features.
    """
    spec = tuple(getattr(model, "input_spec", ()))
    shape = tuple(int(d) for d in sample_shape)
    if not spec:
        return  # the model states no contract
    if len(spec) == len(shape) and all(s is None or s == d for s, d in zip(spec, shape)):
        return
    if getattr(model, "flattens_input", False) and len(spec) == 1 and math.prod(shape) == spec[0]:
        return
    raise InputShapeError(
        f"model {_model_name(model)} expects input of shape {format_spec(spec)}, got {_fmt_shape(shape)}"
    )


def example_input(model_or_name: nn.Module | str, batch: int = 2) -> torch.Tensor:
    """A random batch matching the model's `input_spec` (free dims -> 32, or 8 when the model allows it)."""
    model = create_model(model_or_name) if isinstance(model_or_name, str) else model_or_name
    spec = tuple(model.input_spec)
    if hasattr(model, "vocab_size"):  # token models: ids of length min(block_size, 32)
        return torch.randint(0, model.vocab_size, (batch, min(int(model.block_size), _DEFAULT_SIDE)))
    side = getattr(model, "min_input_size", None)
    free = _DEFAULT_SIDE if side is None else min(_DEFAULT_SIDE, max(_SMALL_SIDE, int(side)))
    shape = tuple(free if d is None else int(d) for d in spec)
    return torch.randn(batch, *shape)


