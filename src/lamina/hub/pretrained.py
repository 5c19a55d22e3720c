"""lamina's own pretrained format: a folder a fine-tuned model round-trips through.

    <dir>/model.safetensors     the weights (lamina.io.save_state: a tied tensor stored once, its other names
                                in the metadata; folders written before that, with clones, load too)
    <dir>/lamina_model.json     {"format": ..., "model": registered name, "options": factory options given,
                                "resolved": every option of its config (defaults included), ...extra}

`create_model` records the name and options on every model it builds (`model.lamina_spec`), so
`save_pretrained(model, dir)` needs nothing else, and `from_pretrained(dir)` rebuilds the same architecture
and loads the weights strictly (every tensor present, every shape equal). Files are written to a temporary
folder and renamed into place, like checkpoints.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lamina.errors import CheckpointError
from lamina.io import check_state, load_state, load_state_strict, save_state, state_shapes, write_folder

FORMAT = "lamina-pretrained-1"


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    raise CheckpointError(f"save_pretrained: model option value {v!r} ({type(v).__name__}) cannot be saved as JSON")


def _tuples(v):
    # configs take tuples (channels, cat_cardinalities, ...); JSON gives lists back
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def save_pretrained(model: torch.nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    spec = getattr(model, "lamina_spec", None)
    if spec is None:
        raise CheckpointError("save_pretrained: the model was not built by lamina.models.create_model (no "
                              "lamina_spec), so it could not be rebuilt; build it with create_model(name, ...)")
    def write(tmp: Path) -> None:
        save_state(tmp / "model.safetensors", model)
        # "options": what was given; "resolved": every option of the config, defaults included, so the folder
        # rebuilds the same model after a default changes (folders without it fall back to "options")
        meta = {"format": FORMAT, "model": spec["name"], "options": _jsonable(spec["options"]),
                "params": sum(p.numel() for p in model.parameters()), **(extra or {})}
        if spec.get("resolved") is not None:
            meta["resolved"] = _jsonable(spec["resolved"])
        (tmp / "lamina_model.json").write_text(json.dumps(meta, indent=2))

    return write_folder(path, write)


def read_pretrained_meta(path: str | Path) -> dict:
    p = Path(path) / "lamina_model.json"
    if not p.is_file():
        raise CheckpointError(f"{path} is not a lamina pretrained folder (no lamina_model.json); make one with "
                              "lamina.hub.save_pretrained(model, folder)")
    try:
        meta = json.loads(p.read_text())
    except RecursionError:
        raise CheckpointError(f"{p}: not readable JSON (nested too deeply)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: not readable JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p}: expected a JSON object at the top level, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a {FORMAT} file")
    return meta


def from_pretrained(path: str | Path, **overrides) -> torch.nn.Module:
    """The model saved by save_pretrained, weights loaded strictly; `overrides` change factory options that do
    not touch the weights' shapes (e.g. dropout)."""
    from lamina.models import create_model

    meta = read_pretrained_meta(path)
    opts, name = meta.get("resolved") or meta.get("options"), meta.get("model")
    if not isinstance(opts, dict) or not isinstance(name, str):
        raise CheckpointError(f"{path}/lamina_model.json: needs \"model\" (a name) and \"options\" (an object)")
    opts = {k: _tuples(v) for k, v in opts.items()}
    labels = {"head": f"does not fit model {name}", "missing": "missing ({n})", "unexpected": "unexpected ({n})",
              "shape": "shape mismatches ({n})"}
    # lamina_model.json says how big to build: build on the meta device (no memory) and compare every shape with
    # the safetensors header before allocating, so huge declared options cost nothing
    weights_path = Path(path) / "model.safetensors"
    shapes = state_shapes(weights_path)
    try:
        with torch.device("meta"):
            declared = create_model(name, **{**opts, **overrides})
    except NotImplementedError:  # a model whose construction reads tensor values cannot be built on meta
        declared = None
    if declared is not None:
        from lamina.hub import check_built_size

        check_state(declared, shapes, str(path), labels=labels)
        check_built_size(declared, sum(math.prod(s) for s in shapes.values()), str(weights_path))
        del declared
    model = create_model(name, **{**opts, **overrides})
    weights = load_state(weights_path)  # tied weights come back under every name
    load_state_strict(model, weights, str(path), labels=labels)
    return model


