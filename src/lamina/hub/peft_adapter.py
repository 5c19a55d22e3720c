"""PEFT LoRA adapters in: a PEFT folder (adapter_config.json + adapter_model.safetensors) onto lamina's gpt, llama or
bert model, as lamina.nn.lora LoRALinear modules.

    model, _ = lamina.hub.load("path/to/hf-base")          # the base the adapter was trained on
    wrapped = load_peft_adapter(model, "path/to/adapter")   # ["blocks.0.attn.q_proj", ...]; model now computes
                                                            # what PeftModel.from_pretrained(base, adapter) does

From the CLI: `--adapter FOLDER` on `lamina eval / generate / predict` (lamina.runs.open_run(adapter=)) puts one on
a run's model; `model.adapter=FOLDER` (with model.pretrained=<its base>, finetune.mode=lora) trains on from one.

Where each HF module lives in lamina comes from lamina.hub.hf_write.hf_spec (itself the readers' key maps inverted),
so the three directions cannot disagree. GPT-2's fused c_attn adapter (A: (r, C), B: (3C, r)) becomes one adapter
on each of q_proj, k_proj, v_proj with the same A and that slot's rows of B: exactly the same update, split; a
slot whose rows of B are all zero gets none. Scaling is PEFT's: lora_alpha / r (alpha_pattern / rank_pattern per
module), or lora_alpha / sqrt(r) with use_rslora. modules_to_save tensors (a classifier head trained in full) are
copied into the model's own modules. What lamina's LoRA does not implement (DoRA, trained biases, other PEFT
methods) and any tensor without a place is one CheckpointError line; shapes are read from the header and checked
before any tensor is loaded.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn as nn

from lamina.errors import CheckpointError, ModelError


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module whose name ends with it (as a regex)."""
    for key, value in (patterns or {}).items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", module)
        except re.error as e:
            raise CheckpointError(f"hub: adapter_config.json: pattern {key!r:.60} is not a regular expression ({e})") \
                from None
        if hit:
            return value
    return default


def _conv1d(spec, hf: str) -> bool:
    """GPT-2's block layers are Conv1D, their weights stored (in, out); its lm_head is a plain Linear."""
    return spec.family == "gpt2" and hf.startswith("transformer.h.")


def _numbers(patterns, kind) -> bool:
    """None, or a {pattern: positive number} mapping (rank_pattern, alpha_pattern)."""
    return patterns is None or isinstance(patterns, dict) and all(
        isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool) and v > 0 for k, v in patterns.items())


def _config(folder: Path) -> dict:
    from lamina.hub.hf import _read_json

    path = folder / "adapter_config.json"
    if not path.is_file():
        raise CheckpointError(f"hub: {folder}: no adapter_config.json; a PEFT adapter folder holds adapter_config.json "
                              "and adapter_model.safetensors")
    cfg = _read_json(path)
    checks = (("peft_type", cfg.get("peft_type") == "LORA", "LORA"), ("use_dora", not cfg.get("use_dora"), "false"),
              ("bias", cfg.get("bias", "none") == "none", "none"),
              ("r", isinstance(cfg.get("r"), int) and not isinstance(cfg["r"], bool) and cfg["r"] > 0,
               "a positive integer"),
              ("lora_alpha", isinstance(cfg.get("lora_alpha"), (int, float)) and cfg["lora_alpha"] > 0,
               "a positive number"),
              ("lora_dropout", isinstance(cfg.get("lora_dropout") or 0.0, (int, float))
               and 0 <= (cfg.get("lora_dropout") or 0.0) < 1, "a number in [0, 1)"),
              ("rank_pattern", _numbers(cfg.get("rank_pattern"), int), "a mapping of module patterns to ranks"),
              ("alpha_pattern", _numbers(cfg.get("alpha_pattern"), (int, float)),
               "a mapping of module patterns to alphas"))
    for key, ok, accepted in checks:
        if not ok:
            raise CheckpointError(f"hub: {path}: {key}={cfg.get(key)!r} is not supported by lamina's LoRA; "
                                  f"accepted: {accepted}")
    return cfg


def load_peft_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Wrap the Linears a PEFT LoRA adapter targets with LoRALinear and load its tensors; returns the wrapped
    lamina module names. Everything else is frozen (lamina.nn.lora.apply_lora)."""
    from safetensors.torch import load_file

    from lamina.hub.hf_write import hf_spec
    from lamina.io import state_shapes
    from lamina.nn.lora import apply_lora, lora_modules

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"hub: {folder}: no such folder; a PEFT adapter is a folder holding adapter_config.json "
                              "and adapter_model.safetensors (e.g. from `lamina export RUN --format peft`)")
    cfg = _config(folder)
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"hub: {folder}: no adapter_model.safetensors (a .bin adapter is a pickle; convert it "
                              "with safetensors first)")
    if lora_modules(model):
        raise CheckpointError("hub: the model already carries LoRA adapters; load a PEFT adapter into a plain base")
    try:
        spec = hf_spec(model)  # where each HF module lives in this model
    except ModelError as e:  # a model with no HF layout has no PEFT names either
        raise CheckpointError(f"hub: {folder}: a PEFT adapter goes onto a model with a Hugging Face layout; "
                              f"{e.args[0].removeprefix('hf export: ')}") from None
    to_ours: dict[str, list[tuple[str, int | None]]] = {}
    for ours, (hf, slot) in spec.modules.items():
        to_ours.setdefault(hf, []).append((ours, slot))
    shapes = state_shapes(path)  # header only: names and shapes checked before anything is read
    prefix = "base_model.model."
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    saved: dict[str, str] = {}  # modules_to_save tensors: HF name -> file key
    unknown = []
    for key, shape in shapes.items():
        name = key.removeprefix(prefix)
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", name)
        if m and m.group(1) in to_ours:
            pairs.setdefault(m.group(1), {})[m.group(2)] = shape
        elif name in spec.state and key.startswith(prefix):
            saved[name] = key
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"hub: {path}: {len(unknown)} tensor(s) with no place in lamina's {spec.family}: "
                              f"{', '.join(sorted(unknown)[:3])}{' ...' if len(unknown) > 3 else ''}")
    for hf, p in pairs.items():
        if set(p) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"hub: {path}: {hf} has {', '.join(sorted(p))} but not both lora_A and lora_B")
        r = p["lora_A"][0]
        w = spec.state[f"{hf}.weight"].shape  # HF layout: (out, in), or GPT-2's Conv1D (in, out)
        out_f, in_f = (w[1], w[0]) if _conv1d(spec, hf) else (w[0], w[1])
        if p["lora_A"] != (r, in_f) or p["lora_B"] != (out_f, r):
            raise CheckpointError(f"hub: {path}: {hf}: lora_A {p['lora_A']} / lora_B {p['lora_B']} do not fit a "
                                  f"({out_f}, {in_f}) layer of rank {r}")
        if _pattern_value(cfg.get("rank_pattern"), hf, cfg["r"]) != r:
            raise CheckpointError(f"hub: {path}: {hf} has rank {r}, adapter_config.json says "
                                  f"{_pattern_value(cfg.get('rank_pattern'), hf, cfg['r'])}")
    for hf, key in saved.items():
        if shapes[key] != tuple(spec.state[hf].shape):
            raise CheckpointError(f"hub: {path}: {key} has shape {shapes[key]}, the model's {hf} "
                                  f"{tuple(spec.state[hf].shape)}")
    tensors = load_file(str(path))
    wrapped = []
    dropout = float(cfg.get("lora_dropout") or 0.0)
    for hf in sorted(pairs):
        A, B = tensors[f"{prefix}{hf}.lora_A.weight"], tensors[f"{prefix}{hf}.lora_B.weight"]
        r = A.shape[0]
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), hf, cfg["lora_alpha"]))
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        for ours, slot in to_ours[hf]:
            rows = B if slot is None else B.chunk(3, dim=0)[slot]  # c_attn's rows: q, k, v
            if slot is not None and not rows.any():
                continue  # an adapter that leaves this slot alone
            apply_lora(model, [ours], rank=r, alpha=scaling * r, dropout=dropout)
            lora = model.get_submodule(ours)
            with torch.no_grad():
                lora.lora_A.copy_(A)
                lora.lora_B.copy_(rows)
            wrapped.append(ours)
    if saved:
        hf_to_lamina = {}
        for ours, (hf, slot) in spec.modules.items():
            if slot is None:
                for kind in ("weight", "bias"):
                    hf_to_lamina[f"{hf}.{kind}"] = f"{ours}.{kind}"
        params = dict(model.named_parameters())
        with torch.no_grad():
            for hf, key in saved.items():
                name = hf_to_lamina.get(hf)
                if name not in params:
                    raise CheckpointError(f"hub: {path}: modules_to_save tensor {key} has no place in the model")
                value = tensors[key]
                params[name].copy_(value.t() if value.dim() == 2 and _conv1d(spec, hf) else value)
    return wrapped


__all__ = ["load_peft_adapter"]
