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
from pathlib import Path

import torch

from lamina.errors import CheckpointError
from lamina.io import load_state, load_state_strict, save_state, write_folder

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
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a {FORMAT} file")
    return meta


def from_pretrained(path: str | Path, **overrides) -> torch.nn.Module:
    """The model saved by save_pretrained, weights loaded strictly; `overrides` change factory options that do
    not touch the weights' shapes (e.g. dropout)."""
    from lamina.models import create_model

    meta = read_pretrained_meta(path)
    opts = {k: _tuples(v) for k, v in (meta.get("resolved") or meta["options"]).items()}
    model = create_model(meta["model"], **{**opts, **overrides})
    weights = load_state(Path(path) / "model.safetensors")  # tied weights come back under every name
    load_state_strict(model, weights, str(path), labels={
        "head": f"does not fit model {meta['model']}", "missing": "missing ({n})", "unexpected": "unexpected ({n})",
        "shape": "shape mismatches ({n})"})
    return model


