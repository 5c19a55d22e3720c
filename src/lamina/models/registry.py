"""Model registry: `@register_model` on a factory, `create_model(name, **overrides)`, `list_models()`.

A factory takes keyword overrides of its family's config dataclass and returns an nn.Module.
Families live one per file in lamina/models/ and are imported by lamina/models/__init__.py.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from lamina.errors import ModelError, unknown_name


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    factory: Callable[..., nn.Module]
    description: str
    # Default input for the registry-wide contract tests and `lamina models`: per-sample shape.
    input_kind: str  # "image" | "vector" | "tokens" | "seq2seq" (source + target ids) | "multimodal"


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(family: str, input_kind: str = "image") -> Callable:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _REGISTRY:
            raise RuntimeError(f"model '{name}' registered twice")
        doc = (inspect.getdoc(fn) or "").splitlines()
        _REGISTRY[name] = ModelEntry(name, family, fn, doc[0] if doc else "", input_kind)
        return fn

    return deco


def list_models(family: str | None = None) -> list[str]:
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.family == family)


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise ModelError(unknown_name("model", name, _REGISTRY))
    return _REGISTRY[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; unknown names and unknown/invalid options raise ModelError (one line)."""
    entry = get_entry(name)
    try:
        model = entry.factory(**kwargs)
    except TypeError as e:  # unexpected keyword -> say which ones the family accepts
        msg = str(e)
        if "unexpected keyword" in msg or "got an unexpected" in msg:
            raise ModelError(f"{name}: {msg.split(': ', 1)[-1] if ': ' in msg else msg}") from None
        raise
    # how to build it again (checkpoints, lamina.hub.save_pretrained): the name, the options given, and every
    # option of the resolved config, so a later change of a default does not silently change an old model
    cfg = getattr(model, "cfg", None)
    resolved = ({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
                if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type) else None)
    model.lamina_spec = {"name": name, "options": dict(kwargs), "resolved": resolved}
    return model


def build_config(cfg_cls, name: str, base, overrides: dict):
    """Apply keyword overrides to a config dataclass, rejecting unknown fields with a clear message."""
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    bad = [k for k in overrides if k not in fields]
    if bad:
        raise ModelError(unknown_name(f"option for model {name}", bad[0], fields))
    return dataclasses.replace(base, **overrides)
