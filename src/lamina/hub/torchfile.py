"""Torch state files (.pt/.pth/.bin/.ckpt) mapped onto lamina's model families, every tensor checked.

    model, info = load_torch_file("efficientnet-lite0-57934424.pth", family="efficientnet_lite0")
    info == {"format": "torch", "family": "efficientnet_lite0", "path": "...", "factory": {...},
             "preprocess": {"resize": 224, "crop": 224, "mean": [0.498, ...], "std": [0.502, ...]}}

Files are read with `torch.load(weights_only=True, map_location="cpu")` only (zip and legacy formats both work);
a file that needs arbitrary unpickling is refused with the global it asked for. A container dict
({"state_dict": ...}, {"model": ...}) is unwrapped, a "module." prefix (DataParallel) stripped. Each family is
one FAMILIES entry: model factory kwargs, a key map (source name -> lamina name, built from the model) and the
preprocessing its weights expect; add a family by adding an entry.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lamina.errors import CheckpointError
from lamina.io import load_state_strict

# Lite variants (TF EfficientNet-Lite, and lukemelas' Lite fork) were trained on RGB scaled as (x*255 - 127) / 128,
# i.e. mean 127/255, std 128/255 -- not the usual ImageNet mean/std (espresso photo: p=0.95 vs 0.84 with those).
# Geometry as in the PyTorch port these weights ship for (lukemelas' EfficientNet-PyTorch and its Lite fork,
# whose documented eval transform is Resize(224) + CenterCrop(224), bilinear): the short side to 224, no crop
# margin. (TF's 32 px crop padding = resize 256 crops the cat photo's face and flips tiger cat / Egyptian cat.)
_LITE_PREPROCESS = {"resize": 224, "crop": 224, "mean": [127.0 / 255] * 3, "std": [128.0 / 255] * 3,
                    "interpolation": "bilinear"}


def _lukemelas_map(model: nn.Module) -> dict[str, str]:
    from lamina.models.efficientnet import lukemelas_key_map

    return lukemelas_key_map(model)


# family -> (model name for create_model, factory kwargs, key-map builder, preprocessing)
FAMILIES: dict[str, tuple[str, dict, Callable[[nn.Module], dict[str, str]], dict]] = {
    "efficientnet_lite0": ("efficientnet_lite0", {"padding": "same"}, _lukemelas_map, _LITE_PREPROCESS),
}

_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "params")


def _read(path: Path) -> dict:
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - weights_only refusal or any corrupt / non-torch file
        msg = str(e)
        glob = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        if glob:  # a pickled class/function: weights_only refuses to import it
            raise CheckpointError(f"hub: {path}: torch.load(weights_only=True) refused it: Unsupported global: "
                                  f"{glob.group(1)} (it pickles a Python object, not only tensors); re-save with "
                                  "torch.save(model.state_dict())") from None
        detail = re.search(r"WeightsUnpickler error: ([^\n]+)", msg)
        first = detail.group(1) if detail else (msg.strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"hub: {path}: not a readable torch file ({type(e).__name__}: {first})") from None
    return obj


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {"state_dict": {...}} / {"model": {"state_dict": ...}} / plain
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
                continue
        kind = type(obj).__name__
        keys = sorted(map(str, obj))[:8] if isinstance(obj, dict) else []
        raise CheckpointError(f"hub: {path}: expected a state dict of tensors (or one under "
                              f"{'/'.join(_CONTAINER_KEYS)}), got {kind} with keys {keys}")
    if not (isinstance(obj, dict) and obj):
        raise CheckpointError(f"hub: {path}: no tensors found")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_torch_file(path: str | Path, family: str | None = None, **options):
    """(model in eval mode, info) for a torch state file of a known family; every name and shape is checked.

    options go to the model factory, over the family's defaults (every tensor must still match by name and shape).
    """
    from lamina.models.registry import create_model

    path = Path(path)
    if family is None:
        raise CheckpointError(f"hub: {path}: a torch state file carries no architecture; pass family= one of "
                              f"{sorted(FAMILIES)}")
    if family not in FAMILIES:
        from lamina.errors import did_you_mean

        raise CheckpointError(f"hub: unknown torch-file family {family!r}{did_you_mean(family, FAMILIES)}; "
                              f"known: {sorted(FAMILIES)}")
    name, kwargs, key_map_fn, preprocess = FAMILIES[family]
    factory = {**kwargs, **options}
    sd = _unwrap(_read(path), path)
    model = create_model(name, **factory)
    key_map = key_map_fn(model)
    load_state_strict(model, sd, f"hub: {path}:", rename=key_map, limit=8, labels={
        "head": f"not a {family} checkpoint in the expected layout", "unexpected": "unmatched in file",
        "missing": "missing from file", "shape": "shape mismatch for {n} tensors"},
        show_missing=lambda k, file_name={ours: theirs for theirs, ours in key_map.items()}: file_name.get(k, k))
    model.eval()
    info = {"format": "torch", "family": family, "path": str(path), "factory": factory,
            "preprocess": dict(preprocess), "tensors": len(sd)}
    return model, info


__all__ = ["FAMILIES", "load_torch_file"]
