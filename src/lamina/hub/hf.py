"""Hugging Face-layout folders (config.json + *.safetensors) mapped onto lamina's model families.

    model, info = load_hf_folder("path/to/all-MiniLM-L6-v2")     # a BERT encoder, mean pooling from 1_Pooling
    info == {"format": "hf", "family": "bert", "config": {...config.json...}, "tokenizer": ".../tokenizer.json",
             "pooling": "mean", "architecture": "BertModel", "files": [...], "unused": ["pooler.dense.weight", ...]}

Families: "bert" (BertModel, BertForMaskedLM, BertForSequenceClassification, BertForQuestionAnswering), "llama" (LlamaForCausalLM),
"gpt2" (GPT2LMHeadModel, GPT2Model; lamina's GPT), "t5" (T5ForConditionalGeneration), "vit" (ViTForImageClassification)
and "resnet" (ResNetForImageClassification). The family comes from config.json's model_type (else its
architectures). BERT, Llama, T5, ViT and ResNet names come from the family's own key map (lamina.models.bert.
hf_bert_key_map, lamina.models.llama.hf_llama_key_map, lamina.models.t5.hf_t5_key_map, lamina.models.vit.
hf_vit_key_map, lamina.models.resnet.hf_resnet_key_map), so this file holds no second copy of them; GPT-2's Conv1D weights are
stored (in, out) and c_attn fuses q, k, v, so they are transposed and split here. Every tensor is
matched by name and its shape checked before it is copied (nanoGPT's from_pretrained). Strict: a tensor whose
name the family does not know, or a model tensor the folder does not provide, is a CheckpointError naming the
first few and the counts. Tensors the family knows but this model has no place for (the [CLS] pooler of a
mean-pooling encoder, an lm_head that a tied model shares with its embedding) and HF buffers (position_ids,
GPT-2's attn.bias mask) are skipped and listed in info["unused"].
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lamina.errors import CheckpointError
from lamina.io import load_state_strict

FAMILIES = ("bert", "llama", "gpt2", "t5", "vit", "resnet")
_ARCHITECTURES = {"BertModel": "bert", "BertForMaskedLM": "bert", "BertForSequenceClassification": "bert",
                  "BertForQuestionAnswering": "bert",
                  "LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2",
                  "T5ForConditionalGeneration": "t5", "ViTForImageClassification": "vit",
                  "ResNetForImageClassification": "resnet"}
_DEFAULT_ARCH = {"bert": "BertModel", "llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel",
                 "t5": "T5ForConditionalGeneration", "vit": "ViTForImageClassification",
                 "resnet": "ResNetForImageClassification"}
_HF_BUFFERS = ("embeddings.position_ids",)  # HF registers these as persistent buffers; nothing to load
_DECODER_BUFFERS = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")  # older transformers saved these
_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                  "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}


_MAX_JSON_BYTES = 16 << 20  # config.json files are a few KB; the biggest tokenizer configs stay far below this


def _read_json(path: Path) -> dict:
    """A JSON object from a file, or one CheckpointError line (unreadable, too big, too deep, not an object)."""
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise CheckpointError(f"hub: {path}: {path.stat().st_size:,} bytes is too big for a config file "
                                  f"(at most {_MAX_JSON_BYTES:,})")
        value = json.loads(path.read_text())
    except RecursionError:
        raise CheckpointError(f"hub: {path}: not readable JSON (nested too deeply)") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"hub: {path}: not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"hub: {path}: expected a JSON object at the top level, got {type(value).__name__}")
    return value


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


def _safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"hub: {folder}: no *.safetensors file; an HF-layout folder needs config.json and "
                              "model.safetensors (or shards); convert pytorch_model.bin with safetensors first")
    return files


def read_safetensors_shapes(folder: Path) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """name -> shape of every tensor of the folder's *.safetensors files, from their headers only (nothing is
    loaded), and the file names; a bad header or a tensor in two shards is one CheckpointError line."""
    from lamina.io import state_shapes

    shapes: dict[str, tuple[int, ...]] = {}
    files = _safetensors_files(folder)
    for f in files:
        for key, shape in state_shapes(f).items():
            if key in shapes:
                raise CheckpointError(f"hub: {f.name}: tensor {key} also appears in another shard")
            shapes[key] = shape
    return shapes, [f.name for f in files]


def read_safetensors(folder: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every tensor of the folder's *.safetensors files (one file or shards), and the file names."""
    from safetensors.torch import load_file

    files = _safetensors_files(folder)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors = load_file(str(f))
        except Exception as e:  # noqa: BLE001 - SafetensorError (bad header or data), OSError: not readable
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"hub: {f}: not a readable safetensors file ({first})") from None
        for key, value in tensors.items():
            if key in state:
                raise CheckpointError(f"hub: {f.name}: tensor {key} also appears in another shard")
            state[key] = value
    return state, [f.name for f in files]


# ----- BERT ----------------------------------------------------------------------------------------------
def _finish(model, name: str, dtype):
    """Name the built model (messages, `lamina models`), cast it if asked, eval mode (weights come next)."""
    model.model_name = name
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _bert_model(config: dict, pooling: str | None, state: dict, path: Path, dtype):
    """Build the lamina BERT model that config.json describes, in eval mode, uninitialised weights aside."""
    from lamina.models.bert import (
        BertClassifier,
        BertClassifierConfig,
        BertMaskedLM,
        BertMLMConfig,
        BertSpanQA,
        BertSpanQAConfig,
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
    elif arch == "BertForQuestionAnswering":
        model, name = BertSpanQA(BertSpanQAConfig(**common)), "bert_qa"
    elif arch in ("BertModel", "BertForSequenceClassification"):
        if pooling not in (None, "mean", "cls"):
            raise CheckpointError(f"hub: {path}/1_Pooling/config.json: pooling {pooling!r} is not supported by "
                                  "lamina's bert; accepted: mean, cls")
        pool = pooling or ("cls" if any(k.removeprefix("bert.").startswith("pooler.") for k in state) else "mean")
        num_classes = len(config.get("id2label") or {}) if arch == "BertForSequenceClassification" else 0
        model, name = BertClassifier(BertClassifierConfig(**common, num_classes=num_classes, pool=pool)), "bert"
    else:
        raise CheckpointError(f"hub: {path}/config.json: architecture {arch!r} is not supported; accepted: "
                              "BertModel, BertForMaskedLM, BertForSequenceClassification, BertForQuestionAnswering")
    return _finish(model, name, dtype)


def _labels(family: str, checkpoint: str = "the checkpoint") -> dict[str, str]:
    return {"head": "", "unexpected": f"{{n}} tensor(s) with no place in lamina's {family}",
            "missing": f"{{n}} model tensor(s) not in {checkpoint}",
            "shape": "{n} tensor(s) whose shape config.json and the weights disagree on",
            "shape_entry": "{key} has shape {got}, lamina's {name} expects {want}",
            "shape_entry_same": "{key} has shape {got}, lamina expects {want}"}


def map_bert_state(model, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy an HF BERT state dict into `model` by name, every shape checked; strict both ways (CheckpointError).
    Returns the checkpoint keys the family knows but this model does not use (e.g. the pooler under mean pooling)."""
    from lamina.models.bert import hf_name, hf_bert_key_map

    key_map = hf_bert_key_map(model.cfg.n_layer)
    ours = model.state_dict()
    tied = {"lm_head.weight"} if getattr(model.cfg, "tie_weights", False) else set()  # it is wte
    load: dict[str, torch.Tensor] = {}
    unused = []
    for key, value in state.items():
        hf = hf_name(key)
        name = key_map.get(hf)
        if hf in _HF_BUFFERS or (name is not None and (name not in ours or name in tied)):
            unused.append(key)
        else:
            load[key] = value  # the MLM bias may come under both of its HF names: the same tensor twice
    load_state_strict(model, load, f"hub: {source}", rename=lambda k: key_map.get(hf_name(k)),
                      optional=tied, labels=_labels("bert"))
    return sorted(unused)


# ----- decoders: Llama, GPT-2 -------------------------------------------------------------------------------
def _map_decoder_state(model, state: dict[str, torch.Tensor], convert, hf_name, family: str,
                       source: str) -> list[str]:
    """Copy an HF decoder state dict into `model`, every shape checked; strict both ways (CheckpointError), as
    map_bert_state. `convert(key, value)` gives the (lamina name, tensor) pairs of one checkpoint tensor, or None
    for a name the family does not know; `hf_name(name)` the checkpoint name a missing lamina tensor comes from.
    Returns the checkpoint keys loaded nowhere (buffers, a tied lm_head)."""
    ours = model.state_dict()
    tied = {"lm_head.weight"} if model.lm_head.weight is model.wte.weight else set()  # it is wte
    staged: dict[str, torch.Tensor] = {}  # checkpoint key (or key:part of a fused tensor) -> tensor
    to_ours: dict[str, str] = {}
    unused = []
    for key, value in state.items():
        if key.endswith(_DECODER_BUFFERS):
            unused.append(key)
            continue
        pairs = convert(key, value)
        if pairs is None or any(name not in ours for name, _ in pairs):  # e.g. a layer past n_layer
            staged[key] = value  # no rename: reported as having no place
            continue
        if all(name in tied for name, _ in pairs):
            unused.append(key)
            continue
        for name, tensor in pairs:  # GPT-2's fused c_attn gives three tensors
            shown = key if len(pairs) == 1 else f"{key}[{name.rsplit('.', 2)[-2]}]"
            staged[shown], to_ours[shown] = tensor, name
    load_state_strict(model, staged, f"hub: {source}", rename=to_ours, optional=tied, labels=_labels(family),
                      show_missing=lambda k: f"{k} ({hf_name(k)})")
    return sorted(unused)


def _llama_model(config: dict, path: Path, dtype):
    """lamina's Llama for a LlamaForCausalLM config.json (lamina.models.llama.llama_config_from_hf), in eval mode."""
    from lamina.errors import ModelError
    from lamina.models.llama import Llama, llama_config_from_hf

    try:
        cfg = llama_config_from_hf(config)
    except KeyError as e:
        raise CheckpointError(f"hub: {path}/config.json: missing {e.args[0]!r}, which a Llama config needs") from None
    except ModelError as e:
        raise CheckpointError(f"hub: {path}/config.json: {e}") from None
    model = Llama(cfg)
    return _finish(model, "llama", dtype)


def map_llama_state(model, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy an HF LlamaForCausalLM state dict into lamina's Llama by lamina.models.llama.hf_llama_key_map (HF's
    q/k rows are already in the rotate-half RoPE layout lamina uses: no permutation)."""
    from lamina.models.llama import hf_llama_key_map

    key_map = hf_llama_key_map(model.cfg.n_layer)
    hf_names = {ours: hf for hf, ours in key_map.items()}
    return _map_decoder_state(model, state, lambda k, v: [(key_map[k], v)] if k in key_map else None,
                              lambda name: hf_names.get(name, "?"), "llama", source)


_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
                     "silu": "silu", "swish": "silu", "tanh": "tanh", "sigmoid": "sigmoid", "relu6": "relu6"}


def _gpt2_model(config: dict, path: Path, dtype):
    """lamina's GPT for a GPT-2 config.json: learned positions, LayerNorm with biases, tanh-GELU MLP, in eval mode."""
    from lamina.models.gpt import GPT, GPTConfig

    act = config.get("activation_function", "gelu_new")
    checks = (("activation_function", act in _GPT2_ACTIVATIONS, ", ".join(_GPT2_ACTIVATIONS)),
              ("n_inner", config.get("n_inner") in (None, 4 * config.get("n_embd", 0)), "null or 4 * n_embd"),
              ("scale_attn_weights", config.get("scale_attn_weights", True) is True, "true"),
              ("scale_attn_by_inverse_layer_idx", not config.get("scale_attn_by_inverse_layer_idx"), "false"),
              ("add_cross_attention", not config.get("add_cross_attention"), "false"))
    for key, ok, accepted in checks:
        if not ok:
            raise CheckpointError(f"hub: {path}/config.json: {key}={config.get(key, act)!r} is not supported by "
                                  f"lamina's gpt; accepted: {accepted}")
    try:
        cfg = GPTConfig(vocab_size=config["vocab_size"],
                        block_size=config.get("n_positions") or config["max_position_embeddings"],
                        n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
                        dropout=config.get("resid_pdrop", 0.1), bias=True,
                        tie_weights=bool(config.get("tie_word_embeddings", True)),
                        activation=_GPT2_ACTIVATIONS[act], norm_eps=float(config.get("layer_norm_epsilon", 1e-5)))
    except KeyError as e:
        raise CheckpointError(f"hub: {path}/config.json: missing {e.args[0]!r}, which a GPT-2 config needs") from None
    model = GPT(cfg)
    return _finish(model, "gpt", dtype)


def _gpt2_convert(key: str, value: torch.Tensor):
    """GPT-2 name (with or without "transformer.") -> lamina GPT pairs; Conv1D weights (in, out) transposed,
    c_attn split into q, k, v (rows of the transposed weight, in that order)."""
    name = key.removeprefix("transformer.")
    if name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight"):
        return [(name, value)]
    parts = name.split(".")
    if len(parts) < 4 or parts[0] != "h" or not parts[1].isdigit():
        return None
    block, rest = f"blocks.{parts[1]}", ".".join(parts[2:])
    conv = value.t() if value.dim() == 2 and rest.endswith(".weight") else value  # Conv1D: (in, out) -> (out, in)
    if rest in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
        return [(f"{block}.{rest}", value)]
    if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
        kind = rest.rsplit(".", 1)[1]
        if conv.shape[0] % 3:
            return [(f"{block}.attn.q_proj.{kind}", conv)]  # the shape check reports it
        return [(f"{block}.attn.{p}_proj.{kind}", t) for p, t in zip("qkv", conv.chunk(3, dim=0))]
    simple = {"attn.c_proj": "attn.out_proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.out_proj"}
    module, _, kind = rest.rpartition(".")
    if module in simple and kind in ("weight", "bias"):
        return [(f"{block}.{simple[module]}.{kind}", conv)]
    return None


def _gpt2_name(name: str) -> str:
    """The GPT2LMHeadModel name a lamina GPT tensor is loaded from (for error messages)."""
    if not name.startswith("blocks."):
        return name if name == "lm_head.weight" else f"transformer.{name}"
    _, i, rest = name.split(".", 2)
    for ours, hf in (("attn.q_proj", "attn.c_attn"), ("attn.k_proj", "attn.c_attn"), ("attn.v_proj", "attn.c_attn"),
                     ("attn.out_proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.out_proj", "mlp.c_proj")):
        if rest.startswith(ours + "."):
            rest = hf + rest[len(ours):]
    return f"transformer.h.{i}.{rest}"


def map_gpt2_state(model, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy an HF GPT-2 state dict (GPT2LMHeadModel or GPT2Model) into lamina's GPT, every shape checked."""
    return _map_decoder_state(model, state, _gpt2_convert, _gpt2_name, "gpt", source)


# ----- T5, ViT, ResNet: one name map each (the model file's), checked both ways -----------------------------------
def _config_error(path: Path, family: str, key: str, value, accepted: str) -> CheckpointError:
    return CheckpointError(f"hub: {path}/config.json: {key}={value!r} is not supported by lamina's {family}; "
                           f"accepted: {accepted}")


def _int(config: dict, key: str, path: Path, family: str, default=None) -> int:
    value = config.get(key, default)
    if value is None:
        raise CheckpointError(f"hub: {path}/config.json: missing {key!r}, which a {family} config needs")
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CheckpointError(f"hub: {path}/config.json: {key} must be a non-negative integer, got {value!r:.60}")
    return value


def _num_labels(config: dict, path: Path) -> int:
    labels = config.get("id2label")
    if labels is None:
        return _int(config, "num_labels", path, "classifier", 2)  # HF's PretrainedConfig default
    if not isinstance(labels, dict):
        raise CheckpointError(f"hub: {path}/config.json: id2label must be an object, got {type(labels).__name__}")
    return len(labels)


def _t5_model(config: dict, path: Path, dtype):
    """lamina's T5 for a T5ForConditionalGeneration config.json (scores unscaled, as HF computes them)."""
    from lamina.models.t5 import FFN_KINDS, T5, T5Config

    ffn = config.get("feed_forward_proj", "relu")
    if ffn not in FFN_KINDS:
        raise _config_error(path, "t5", "feed_forward_proj", ffn, ", ".join(FFN_KINDS))
    d, heads = _int(config, "d_model", path, "t5"), _int(config, "num_heads", path, "t5")
    if heads and config.get("d_kv", d // heads) * heads != d:
        raise _config_error(path, "t5", "d_kv", config.get("d_kv"), f"d_model / num_heads = {d // heads}")
    pad = config.get("pad_token_id")
    pad = 0 if pad is None else pad
    start = config.get("decoder_start_token_id")
    eos = config.get("eos_token_id")
    n_enc = _int(config, "num_layers", path, "t5")
    cfg = T5Config(vocab_size=_int(config, "vocab_size", path, "t5"), d_model=d, n_head=heads,
                   d_ff=_int(config, "d_ff", path, "t5"), n_enc_layer=n_enc,
                   n_dec_layer=_int(config, "num_decoder_layers", path, "t5", n_enc),
                   rel_buckets=_int(config, "relative_attention_num_buckets", path, "t5", 32),
                   rel_max_distance=_int(config, "relative_attention_max_distance", path, "t5", 128),
                   dropout=float(config.get("dropout_rate", 0.1)), ffn=ffn,
                   tie_weights=config.get("tie_word_embeddings", True) is not False,
                   norm_eps=float(config.get("layer_norm_epsilon", 1e-6)),
                   block_size=_int(config, "n_positions", path, "t5", 512), pad_id=pad,
                   bos_id=pad if start is None else start, eos_id=1 if eos is None else eos)
    return _finish(T5(cfg), "t5", dtype)


def _vit_model(config: dict, path: Path, dtype):
    """lamina's ViT (cls pooling, a head) for a ViTForImageClassification config.json."""
    from lamina.models.vit import VisionTransformer, ViTConfig

    for key, ok, accepted in (("hidden_act", config.get("hidden_act", "gelu") == "gelu", "gelu"),
                              ("layer_norm_eps", config.get("layer_norm_eps", 1e-12) == 1e-6,  # HF's default 1e-12
                               "1e-6 (lamina's ViT, timm's)"),
                              ("image_size", isinstance(config.get("image_size", 224), int), "an integer (square)"),
                              ("patch_size", isinstance(config.get("patch_size", 16), int), "an integer (square)")):
        if not ok:
            raise _config_error(path, "vit", key, config.get(key), accepted)
    D = _int(config, "hidden_size", path, "vit")
    hidden = _int(config, "intermediate_size", path, "vit")
    if D == 0 or int(D * (hidden / D)) != hidden:  # lamina builds int(D * mlp_ratio) hidden units
        raise _config_error(path, "vit", "intermediate_size", hidden, "int(hidden_size x a ratio)")
    cfg = ViTConfig(img_size=_int(config, "image_size", path, "vit", 224),
                    patch_size=_int(config, "patch_size", path, "vit", 16),
                    in_chans=_int(config, "num_channels", path, "vit", 3), num_classes=_num_labels(config, path),
                    embed_dim=D, depth=_int(config, "num_hidden_layers", path, "vit"),
                    n_head=_int(config, "num_attention_heads", path, "vit"), mlp_ratio=hidden / D, pool="cls",
                    dropout=float(config.get("hidden_dropout_prob", 0.0)),
                    attn_dropout=float(config.get("attention_probs_dropout_prob", 0.0)),
                    bias=config.get("qkv_bias", True) is not False)
    return _finish(VisionTransformer(cfg), "vit", dtype)


def _resnet_model(config: dict, path: Path, dtype):
    """lamina's ResNet (ImageNet stem, projection shortcuts) for a ResNetForImageClassification config.json."""
    from lamina.models.resnet import ResNet, ResNetConfig

    block = config.get("layer_type", "bottleneck")
    for key, ok, accepted in (("layer_type", block in ("basic", "bottleneck"), "basic, bottleneck"),
                              ("hidden_act", config.get("hidden_act", "relu") == "relu", "relu"),
                              ("downsample_in_first_stage", not config.get("downsample_in_first_stage"), "false"),
                              ("downsample_in_bottleneck", not config.get("downsample_in_bottleneck"),
                               "false (stride on the 3x3 conv, v1.5)")):
        if not ok:
            raise _config_error(path, "resnet", key, config.get(key), accepted)
    sizes, depths = config.get("hidden_sizes"), config.get("depths")
    for key, value in (("hidden_sizes", sizes), ("depths", depths)):
        if not (isinstance(value, list) and value and len(value) <= 16
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            raise CheckpointError(f"hub: {path}/config.json: {key} must be a list of up to 16 positive integers, "
                                  f"got {value!r:.60}")
    expansion = 4 if block == "bottleneck" else 1
    widths = [h // expansion for h in sizes]
    stem = _int(config, "embedding_size", path, "resnet", 64)
    if any(h % expansion for h in sizes) or stem != widths[0]:
        raise _config_error(path, "resnet", "embedding_size", stem, f"the first stage's width ({widths[0]}; "
                            "lamina's stem is as wide as its first stage)")
    cfg = ResNetConfig(layers=tuple(depths), widths=tuple(widths), block=block,
                       in_chans=_int(config, "num_channels", path, "resnet", 3), num_classes=_num_labels(config, path),
                       small_input=False, shortcut="B")
    return _finish(ResNet(cfg), "resnet", dtype)


def _map_named_state(model, state: dict[str, torch.Tensor], key_map: dict[str, str], family: str, source: str,
                     zeros=()) -> list[str]:
    """Copy an HF state dict into `model` by `key_map` (HF name -> lamina name), every shape checked, strict both
    ways. `zeros`: HF tensors with no place in this model that must hold zeros to compute the same (ViT's output
    bias when qkv_bias is false); a non-zero one is refused. Returns the keys loaded nowhere."""
    tied = {"lm_head.weight"} if family == "t5" and model.cfg.tie_weights else set()  # it is `shared`
    hf_names = {o: h for h, o in key_map.items()}
    load, unused = {}, []
    for key, value in state.items():
        name = key_map.get(key)
        if key in zeros and value.device.type != "meta" and value.abs().max() > 0:
            raise CheckpointError(f"hub: {source}: {key} is not zero, which lamina's {family} with these options "
                                  "has no place for")
        if key in zeros or key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight") or \
                (key == "lm_head.weight" and tied) or (name is None and key.endswith(_HF_BUFFERS)):
            unused.append(key)  # the shared embedding again (older T5 saves), a tied head, zeros, buffers
        else:
            load[key] = value
    load_state_strict(model, load, f"hub: {source}", rename=lambda k: key_map.get(k), optional=tied,
                      labels=_labels(family), show_missing=lambda k: f"{k} ({hf_names.get(k, '?')})")
    return sorted(unused)


def _vit_zeros(model) -> set[str]:
    return set() if model.cfg.bias else {f"vit.encoder.layer.{i}.attention.output.dense.bias"
                                         for i in range(model.cfg.depth)}


def _layer_count(family: str, config: dict):
    if family == "resnet":
        depths = config.get("depths")
        return sum(depths) if isinstance(depths, list) and all(isinstance(d, int) for d in depths) else None
    if family == "t5":  # both stacks: a huge decoder count alone must not build a huge (meta) model either
        n = [config.get(k) for k in ("num_layers", "num_decoder_layers")]
        return sum(v for v in n if isinstance(v, int))
    return config.get({"bert": "num_hidden_layers", "llama": "num_hidden_layers", "gpt2": "n_layer",
                       "t5": "num_layers", "vit": "num_hidden_layers"}[family])


# ----- the folder ----------------------------------------------------------------------------------------
def _build_and_map(family: str, config: dict, pooling, state: dict, path: Path, dtype, source: str):
    """(model, unused keys): the family's model for config.json with `state` copied in, every name and shape
    checked; a config value of the wrong type or range is one CheckpointError line."""
    try:
        if family == "bert":
            model = _bert_model(config, pooling, state, path, dtype)
            return model, map_bert_state(model, state, source)
        if family == "llama":
            model = _llama_model(config, path, dtype)
            return model, map_llama_state(model, state, source)
        if family == "t5":
            from lamina.models.t5 import hf_t5_key_map

            model = _t5_model(config, path, dtype)
            return model, _map_named_state(model, state, hf_t5_key_map(model.cfg), "t5", source)
        if family == "vit":
            from lamina.models.vit import hf_vit_key_map

            model = _vit_model(config, path, dtype)
            return model, _map_named_state(model, state, hf_vit_key_map(model.cfg), "vit", source, _vit_zeros(model))
        if family == "resnet":
            from lamina.models.resnet import hf_resnet_key_map

            model = _resnet_model(config, path, dtype)
            return model, _map_named_state(model, state, hf_resnet_key_map(model.cfg), "resnet", source)
        model = _gpt2_model(config, path, dtype)
        return model, map_gpt2_state(model, state, source)
    except CheckpointError:
        raise
    except (TypeError, ValueError, ArithmeticError, AttributeError, KeyError) as e:  # ModelError is a ValueError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"hub: {path}/config.json: does not describe a {family} model lamina builds "
                              f"({first})") from None


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
    archs = config.get("architectures") or [None]
    if not isinstance(archs, list) or not isinstance(archs[0], (str, type(None))):
        raise CheckpointError(f"hub: {cfg_path}: architectures must be a list of names, got {archs!r:.80}")
    arch = archs[0]
    family = family or config.get("model_type") or _ARCHITECTURES.get(arch)
    if family not in FAMILIES:
        raise CheckpointError(f"hub: {path}: family {family!r} (config.json model_type) is not supported for HF "
                              f"folders; accepted: {', '.join(FAMILIES)}")
    if family != "bert" and arch is not None and _ARCHITECTURES.get(arch) != family:
        accepted = ", ".join(a for a, f in _ARCHITECTURES.items() if f == family)
        raise CheckpointError(f"hub: {path}/config.json: architecture {arch!r} is not supported for {family}; "
                              f"accepted: {accepted}")
    dtype = options.get("dtype")
    pooling = read_pooling(path) if family == "bert" else None
    # config.json says how big to build, the weights what was trained: build on the meta device first (no
    # memory), map the headers' shapes onto it (every name and shape checked), and only then read and allocate
    shapes, files = read_safetensors_shapes(path)
    source = f"{path}/{files[0] if len(files) == 1 else '*.safetensors'}"
    layers = _layer_count(family, config)
    if isinstance(layers, int) and layers > len(shapes):  # every layer has tensors: never loop over a huge count
        raise CheckpointError(f"hub: {cfg_path}: declares {layers:,} layers but the weights hold {len(shapes)} "
                              "tensors: the metadata does not match the weights")
    if family == "llama":
        from lamina.hub import check_context

        check_context(config.get("max_position_embeddings", 2048), "config.json max_position_embeddings", path)
    with torch.device("meta"):
        meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        model, _ = _build_and_map(family, config, pooling, meta, path, None, source)
    from lamina.hub import check_built_size

    check_built_size(model, sum(math.prod(s) for s in shapes.values()), source)
    del model, meta
    state, files = read_safetensors(path)
    model, unused = _build_and_map(family, config, pooling, state, path, dtype, source)
    tok = path / "tokenizer.json"
    default_arch = _DEFAULT_ARCH[family]
    info = {"format": "hf", "family": family, "config": config, "tokenizer": str(tok) if tok.exists() else None,
            "pooling": pooling or getattr(model.cfg, "pool", None),
            "architecture": arch or default_arch, "files": files, "unused": unused}
    return model, info


__all__ = ["load_hf_folder", "map_bert_state", "map_gpt2_state", "map_llama_state", "read_pooling",
           "read_safetensors", "read_safetensors_shapes"]
