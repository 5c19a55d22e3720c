"""Hugging Face-layout folders (config.json + *.safetensors) mapped onto lamina's model families.

    model, info = load_hf_folder("path/to/all-MiniLM-L6-v2")     # a BERT encoder, mean pooling from 1_Pooling
    info == {"format": "hf", "family": "bert", "config": {...config.json...}, "tokenizer": ".../tokenizer.json",
             "pooling": "mean", "architecture": "BertModel", "files": [...], "unused": ["pooler.dense.weight", ...]}

Families: "bert" (BertModel, BertForMaskedLM, BertForSequenceClassification). The names come from the family's
own key map (lamina.models.bert.hf_bert_key_map), so this file holds no second copy of them; every tensor is
matched by name and its shape checked before it is copied (nanoGPT's from_pretrained). Strict: a tensor whose
name the family does not know, or a model tensor the folder does not provide, is a CheckpointError naming the
first few and the counts. Tensors the family knows but this model has no place for (the [CLS] pooler of a
mean-pooling encoder) and HF buffers (position_ids) are skipped and listed in info["unused"].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lamina.errors import CheckpointError

FAMILIES = ("bert",)
_HF_BUFFERS = ("embeddings.position_ids",)  # HF registers these as persistent buffers; nothing to load
_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                  "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}


def _names(keys, n: int = 5) -> str:
    """'a, b, c (+7 more)': the first few names and how many were left out."""
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"hub: {path}: not readable JSON ({e})") from None


def read_pooling(folder: Path) -> str | None:
    """The sentence-transformers pooling mode of a folder ("mean", "cls", ...) from 1_Pooling/config.json; None
    when the folder has none."""
    path = folder / "1_Pooling" / "config.json"
    if not path.exists():
        return None
    cfg = _read_json(path)
    modes = [mode for key, mode in _POOLING_MODES.items() if cfg.get(key)]
    if len(modes) != 1:
        raise CheckpointError(f"hub: {path}: expected exactly one pooling_mode_* set to true, got "
                              f"{modes or 'none'}")
    return modes[0]


def read_safetensors(folder: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every tensor of the folder's *.safetensors files (one file or shards), and the file names."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"hub: {folder}: no *.safetensors file; an HF-layout folder needs config.json and "
                              "model.safetensors (or shards); convert pytorch_model.bin with safetensors first")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        for key, value in load_file(str(f)).items():
            if key in state:
                raise CheckpointError(f"hub: {f.name}: tensor {key} also appears in another shard")
            state[key] = value
    return state, [f.name for f in files]


# ----- BERT ----------------------------------------------------------------------------------------------
def _bert_model(config: dict, pooling: str | None, state: dict, path: Path, dtype):
    """Build the lamina BERT model that config.json describes, in eval mode, uninitialised weights aside."""
    from lamina.models.bert import (
        BertClassifier,
        BertClassifierConfig,
        BertMaskedLM,
        BertMLMConfig,
    )

    for key, accepted in (("hidden_act", ("gelu",)), ("position_embedding_type", ("absolute", None))):
        if config.get(key) not in accepted:
            raise CheckpointError(f"hub: {path}/config.json: {key}={config.get(key)!r} is not supported by lamina's "
                                  f"bert; accepted: {', '.join(str(a) for a in accepted)}")
    try:
        common = {"vocab_size": config["vocab_size"], "block_size": config["max_position_embeddings"],
                  "n_layer": config["num_hidden_layers"], "n_head": config["num_attention_heads"],
                  "n_embd": config["hidden_size"], "ffn_hidden": config["intermediate_size"],
                  "type_vocab_size": config.get("type_vocab_size", 2),
                  "layer_norm_eps": config.get("layer_norm_eps", 1e-12), "pad_id": config.get("pad_token_id") or 0,
                  "dropout": config.get("hidden_dropout_prob", 0.1)}
    except KeyError as e:
        raise CheckpointError(f"hub: {path}/config.json: missing {e.args[0]!r}, which a BERT config needs") from None
    arch = (config.get("architectures") or ["BertModel"])[0]
    if arch == "BertForMaskedLM":
        model, name = BertMaskedLM(BertMLMConfig(**common)), "bert_mlm"
    elif arch in ("BertModel", "BertForSequenceClassification"):
        if pooling not in (None, "mean", "cls"):
            raise CheckpointError(f"hub: {path}/1_Pooling/config.json: pooling {pooling!r} is not supported by "
                                  "lamina's bert; accepted: mean, cls")
        pool = pooling or ("cls" if any(k.removeprefix("bert.").startswith("pooler.") for k in state) else "mean")
        num_classes = len(config.get("id2label") or {}) if arch == "BertForSequenceClassification" else 0
        model, name = BertClassifier(BertClassifierConfig(**common, num_classes=num_classes, pool=pool)), "bert"
    else:
        raise CheckpointError(f"hub: {path}/config.json: architecture {arch!r} is not supported; accepted: "
                              "BertModel, BertForMaskedLM, BertForSequenceClassification")
    model.model_name = name
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def map_bert_state(model, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy an HF BERT state dict into `model` by name, every shape checked; strict both ways (CheckpointError).
    Returns the checkpoint keys the family knows but this model does not use (e.g. the pooler under mean pooling)."""
    from lamina.models.bert import _hf_name, hf_bert_key_map

    key_map = hf_bert_key_map(model.cfg.n_layer)
    ours = model.state_dict()
    tied = {"lm_head.weight"} if getattr(model.cfg, "tie_weights", False) else set()  # it is wte
    loaded: set[str] = set()
    unknown, unused = [], []
    for key, value in state.items():
        hf = _hf_name(key)
        if hf in _HF_BUFFERS:
            unused.append(key)
            continue
        if hf not in key_map:
            unknown.append(key)
            continue
        name = key_map[hf]
        if name not in ours or name in tied:
            unused.append(key)
            continue
        if tuple(value.shape) != tuple(ours[name].shape):
            raise CheckpointError(f"hub: {source}: {key} has shape {tuple(value.shape)}, lamina's {name} expects "
                                  f"{tuple(ours[name].shape)}; config.json and the weights disagree")
        if name in loaded:
            continue  # the MLM bias under both of its HF names
        loaded.add(name)
    missing = [k for k in ours if k not in loaded and k not in tied]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} tensor(s) with no place in lamina's bert: {_names(unknown)}")
        if missing:
            parts.append(f"{len(missing)} model tensor(s) not in the checkpoint: {_names(missing)}")
        raise CheckpointError(f"hub: {source}: " + "; ".join(parts))
    with torch.no_grad():  # only now: a failed load leaves the model untouched
        for key, value in state.items():
            name = key_map.get(_hf_name(key))
            if name in loaded:
                ours[name].copy_(value.to(ours[name].dtype))  # state_dict tensors share the parameters' storage
    return sorted(unused)


# ----- the folder ----------------------------------------------------------------------------------------
def load_hf_folder(path: str | Path, family: str | None = None, **options):
    """(model, info) for a Hugging Face-layout folder; see the module docstring. Options: dtype (a torch dtype)."""
    path = Path(path)
    unknown_opts = set(options) - {"dtype"}
    if unknown_opts:
        raise CheckpointError(f"hub: unknown option(s) {', '.join(sorted(unknown_opts))} for an HF folder; "
                              "accepted: dtype")
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"hub: {path}: no config.json; an HF-layout folder needs config.json and "
                              "*.safetensors")
    config = _read_json(cfg_path)
    family = family or config.get("model_type")
    if family not in FAMILIES:
        raise CheckpointError(f"hub: {path}: family {family!r} (config.json model_type) is not supported for HF "
                              f"folders; accepted: {', '.join(FAMILIES)}")
    pooling = read_pooling(path)
    state, files = read_safetensors(path)
    model = _bert_model(config, pooling, state, path, options.get("dtype"))
    unused = map_bert_state(model, state, f"{path}/{files[0] if len(files) == 1 else '*.safetensors'}")
    tok = path / "tokenizer.json"
    info = {"format": "hf", "family": family, "config": config, "tokenizer": str(tok) if tok.exists() else None,
            "pooling": pooling or getattr(model.cfg, "pool", None),
            "architecture": (config.get("architectures") or ["BertModel"])[0], "files": files, "unused": unused}
    return model, info


__all__ = ["load_hf_folder", "map_bert_state", "read_pooling", "read_safetensors"]
