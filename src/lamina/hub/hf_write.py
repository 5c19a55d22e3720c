"""Weights out: lamina's gpt / llama / bert / t5 / vit / resnet models as Hugging Face-layout folders, and LoRA
adapters as PEFT folders.

    spec = hf_spec(model)                          # family, architecture, config.json dict, HF-named tensors
    write_hf_folder(model, "out/", files={...})    # config.json + model.safetensors (+ tokenizer, card files)
    adapter = peft_adapter(model)                  # a LoRA-wrapped model's adapters under PEFT's names
    write_peft_folder(model, "out/", files={...})  # adapter_config.json + adapter_model.safetensors

What maps onto what (transformers' classes; everything else is one ModelError line naming the family or option):
* gpt -> GPT2LMHeadModel: q/k/v are fused into c_attn, the Conv1D weights stored (in, out); a GPT without biases
  (bias=false) gets zero biases, which computes exactly the same; activations HF's GPT-2 config can name.
* llama -> LlamaForCausalLM: one to one (HF's q/k rows are in the rotate-half RoPE layout lamina uses).
* bert: BertMaskedLM -> BertForMaskedLM, BertClassifier with pool=cls -> BertForSequenceClassification (pool=mean
  and no head -> BertModel plus sentence-transformers' 1_Pooling), BertSpanQA (2 outputs) -> BertForQuestionAnswering.
* t5 -> T5ForConditionalGeneration: one to one; tie_word_embeddings says whether the decoder output is scaled by
  d_model^-0.5 (lamina's tied T5 does, as v1.0); scaled_attention's 1/sqrt(d_kv) is folded into the q weights.
* vit with pool=cls and a head -> ViTForImageClassification (HF classifies [CLS]; mean pooling is refused);
  bias=false -> qkv_bias=false plus a zero output-projection bias, which HF always has.
* resnet with the ImageNet stem (7x7/2 + max-pool) and projection shortcuts -> ResNetForImageClassification;
  small_input (3x3 stem, no pool: the CIFAR nets) and shortcut A are refused, HF's ResNet has neither.

Names come from the readers' maps inverted (lamina.models.bert.hf_bert_key_map, lamina.models.llama.
hf_llama_key_map, lamina.hub.hf's GPT-2 names, hf_t5_key_map, hf_vit_key_map, hf_resnet_key_map in the model
files), so reading and writing cannot drift apart: a folder written here
loads back through load_hf_folder into the same model. Nothing here needs transformers or peft.

PEFT: each LoRALinear (lamina.nn.lora) becomes `base_model.model.<HF module>.lora_A.weight` / `.lora_B.weight`.
GPT-2's fused c_attn gets one adapter of rank k*r for the k of q, k, v that carry one: A stacks their A's, B is
block-diagonal in their rows, alpha is k*alpha, so (alpha'/r') B'A' is exactly the separate updates side by side.
PEFT adapters are read back (lamina's or peft's own) by lamina.hub.peft_adapter.load_peft_adapter.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from lamina.errors import MissingDependencyError, ModelError
from lamina.io import write_folder

SUPPORTED = ("gpt (GPT2LMHeadModel), llama (LlamaForCausalLM), bert (BertForMaskedLM, BertForSequenceClassification "
             "with pool=cls, BertForQuestionAnswering, BertModel with pool=mean and no head), t5 "
             "(T5ForConditionalGeneration), vit with pool=cls (ViTForImageClassification), resnet with the ImageNet stem "
             "and shortcut B (ResNetForImageClassification)")
# lamina activation -> the name GPT2Config.activation_function gives it (transformers.activations.ACT2FN)
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu",
                    "tanh": "tanh", "sigmoid": "sigmoid", "relu6": "relu6"}
_QKV = ("q_proj", "k_proj", "v_proj")
# GPT2Config / LlamaConfig default to GPT-2's / Llama's own special ids (50256; 1 and 2), which would be ordinary
# tokens of a lamina vocabulary (Llama's eos 2 a character that stops generation): none unless the tokenizer has them
_NO_SPECIALS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


@dataclass
class HFSpec:
    family: str  # "gpt2", "llama", "bert" (config.json model_type)
    architecture: str  # e.g. "GPT2LMHeadModel"
    config: dict  # config.json
    state: dict[str, torch.Tensor]  # HF name -> tensor (contiguous, CPU, no shared storage)
    modules: dict[str, tuple[str, int | None]] = field(default_factory=dict)  # lamina Linear -> (HF module, q/k/v slot)
    pooling: str | None = None  # sentence-transformers pooling for a BertModel export
    causal: bool = False
    inputs: str = "tokens"  # what the HF model's forward takes: "tokens", "seq2seq" (ids + decoder ids), "images"


def _unsupported(what: str) -> ModelError:
    return ModelError(f"hf export: {what} has no Hugging Face equivalent; supported: {SUPPORTED}")


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as if no LoRA were applied (LoRALinear keeps the base weight under the base's name)."""
    from lamina.nn.lora import LORA_KEYS, lora_modules

    merged = [n for n, m in lora_modules(model).items() if m.merged]
    if merged:
        raise ModelError(f"hf export: LoRA adapters of {merged[0]} are merged into its weight; unmerge them "
                         "(lamina.nn.lora.unmerge_lora) or remove them (remove_lora) before exporting")
    return {k: v.detach() for k, v in model.state_dict().items() if k.rpartition(".")[2] not in LORA_KEYS}


def _own(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()  # safetensors refuses shared storage (tied weights)


def _family(model: nn.Module) -> str:
    from lamina.models.bert import BertClassifier, BertMaskedLM, BertSpanQA
    from lamina.models.gpt import GPT
    from lamina.models.llama import Llama
    from lamina.models.resnet import ResNet
    from lamina.models.t5 import T5
    from lamina.models.vit import VisionTransformer

    for cls, fam in ((GPT, "gpt"), (Llama, "llama"), ((BertMaskedLM, BertClassifier, BertSpanQA), "bert"),
                     (T5, "t5"), (VisionTransformer, "vit"), (ResNet, "resnet")):
        if isinstance(model, cls):
            return fam
    name = getattr(model, "model_name", None) or type(model).__name__
    raise _unsupported(f"model {name}")


def _check_head(model: nn.Module, fam: str) -> None:
    if model.num_classes != model.vocab_size or not _is_linear(model, "lm_head"):
        raise _unsupported(f"a {fam} whose head was replaced (reset_classifier, {model.num_classes} outputs "
                           f"instead of the vocabulary's {model.vocab_size})")


# ----- GPT -> GPT2LMHeadModel -------------------------------------------------------------------------------
def _gpt2_spec(model) -> HFSpec:
    from lamina.hub.hf import _gpt2_name

    cfg = model.cfg
    _check_head(model, "gpt")
    if cfg.activation not in GPT2_ACTIVATIONS:
        raise _unsupported(f"gpt activation={cfg.activation!r} (GPT-2's config names {', '.join(GPT2_ACTIVATIONS)})")
    ours = _plain_state(model)
    tied = model.lm_head.weight is model.wte.weight
    state: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}", f"transformer.h.{i}"
        for kind in ("weight", "bias"):
            qkv = [ours.get(f"{b}.attn.{p}.{kind}") for p in _QKV]
            if all(t is not None for t in qkv):
                fused = torch.cat(qkv, dim=0)  # (3C, C) or (3C,): rows q, k, v as the reader splits them
                state[f"{h}.attn.c_attn.{kind}"] = fused.t() if kind == "weight" else fused
        for ours_mod, hf_mod in (("attn.out_proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                                 ("mlp.out_proj", "mlp.c_proj")):
            state[f"{h}.{hf_mod}.weight"] = ours[f"{b}.{ours_mod}.weight"].t()  # Conv1D: (in, out)
            if f"{b}.{ours_mod}.bias" in ours:
                state[f"{h}.{hf_mod}.bias"] = ours[f"{b}.{ours_mod}.bias"]
    for name, value in ours.items():  # LayerNorms, embeddings, the head: same layout, names by the reader's map
        if name.startswith("blocks.") and (".attn." in name or ".mlp." in name):
            continue
        if name == "lm_head.weight" and tied:
            continue
        state[_gpt2_name(name)] = value
    C = cfg.n_embd
    # bias=false: HF's GPT-2 always has biases; zeros compute the same thing exactly (LayerNorm without a bias
    # is LayerNorm with a zero bias)
    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}"
        for name, size in (("ln_1.bias", C), ("ln_2.bias", C), ("attn.c_attn.bias", 3 * C),
                           ("attn.c_proj.bias", C), ("mlp.c_fc.bias", 4 * C), ("mlp.c_proj.bias", C)):
            state.setdefault(f"{h}.{name}", torch.zeros(size, dtype=model.wte.weight.dtype))
    state.setdefault("transformer.ln_f.bias", torch.zeros(C, dtype=model.wte.weight.dtype))
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": C, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": 4 * C, "activation_function": GPT2_ACTIVATIONS[cfg.activation],
        "layer_norm_epsilon": float(cfg.norm_eps), "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout, "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "add_cross_attention": False,
        "tie_word_embeddings": tied, "use_cache": True, **_NO_SPECIALS,
    }
    modules = {}  # where a LoRA adapter on each lamina Linear sits in GPT-2 (q/k/v: a slot of c_attn)
    for i in range(cfg.n_layer):
        for part in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc", "mlp.out_proj"):
            n, leaf = f"blocks.{i}.{part}", part.rsplit(".", 1)[1]
            modules[n] = (_gpt2_name(f"{n}.weight").removesuffix(".weight"), _QKV.index(leaf) if leaf in _QKV else None)
    if not tied:
        modules["lm_head"] = ("lm_head", None)
    return HFSpec("gpt2", "GPT2LMHeadModel", config, {k: _own(v) for k, v in state.items()}, modules, causal=True)


# ----- Llama -> LlamaForCausalLM ----------------------------------------------------------------------------
def _llama_spec(model) -> HFSpec:
    from lamina.models.llama import hf_llama_key_map

    cfg = model.cfg
    _check_head(model, "llama")
    tied = model.lm_head.weight is model.wte.weight
    to_hf = {ours: hf for hf, ours in hf_llama_key_map(cfg.n_layer).items()}
    ours = _plain_state(model)
    state = {to_hf[k]: v for k, v in ours.items() if not (k == "lm_head.weight" and tied)}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": float(cfg.norm_eps),
        "rope_theta": float(cfg.rope_base),  # transformers 4.x reads this, 5.x rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_base)},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": cfg.dropout, "initializer_range": 0.02,
        "tie_word_embeddings": tied, "use_cache": True, "pretraining_tp": 1, **_NO_SPECIALS,
    }
    modules = {k.removesuffix(".weight"): (v.removesuffix(".weight"), None) for k, v in to_hf.items()
               if k.startswith("blocks.") and ".ln_" not in k}
    if not tied:
        modules["lm_head"] = ("lm_head", None)
    return HFSpec("llama", "LlamaForCausalLM", config, {k: _own(v) for k, v in state.items()}, modules, causal=True)


# ----- BERT -> Bert* -----------------------------------------------------------------------------------------
def _bert_spec(model) -> HFSpec:
    from lamina.models.bert import BertClassifier, BertMaskedLM, BertSpanQA, hf_bert_key_map

    cfg = model.cfg
    ours = _plain_state(model)
    pooling = None
    if isinstance(model, BertMaskedLM):
        _check_head(model, "bert masked LM")
        arch, tied = "BertForMaskedLM", model.lm_head.weight is model.wte.weight
    elif isinstance(model, BertSpanQA):
        if model.num_classes != 2:
            raise _unsupported(f"a bert span head with {model.num_classes} outputs (BertForQuestionAnswering has 2)")
        arch, tied = "BertForQuestionAnswering", False
    elif isinstance(model, BertClassifier) and cfg.pool == "cls":
        if model.num_classes == 0:
            raise _unsupported("bert pool=cls without a head (export it with its head, or pool=mean for embeddings)")
        arch, tied = "BertForSequenceClassification", False
    elif isinstance(model, BertClassifier) and model.num_classes == 0:
        arch, tied, pooling = "BertModel", False, "mean"
    else:
        raise _unsupported("bert pool=mean with a classification head (HF's BertForSequenceClassification pools "
                           "[CLS] through its pooler)")
    to_hf: dict[str, str] = {}
    for hf, name in hf_bert_key_map(cfg.n_layer).items():
        if hf == "cls.predictions.decoder.bias":
            continue  # the MLM bias's other HF name; written below under both
        prefixed = hf if hf.startswith(("cls.", "classifier.", "qa_outputs.")) or arch == "BertModel" else f"bert.{hf}"
        to_hf.setdefault(name, prefixed)
    state = {}
    for k, v in ours.items():
        if k == "lm_head.weight" and tied:
            continue
        if k not in to_hf:
            raise _unsupported(f"bert tensor {k}")
        state[to_hf[k]] = v
    if arch == "BertModel":  # HF's BertModel always builds a [CLS] pooler, which mean pooling does not use:
        dt = model.wte.weight.dtype  # zeros make its pooler_output a plain 0 rather than random numbers
        state["pooler.dense.weight"] = torch.zeros(cfg.n_embd, cfg.n_embd, dtype=dt)
        state["pooler.dense.bias"] = torch.zeros(cfg.n_embd, dtype=dt)
    if "cls.predictions.bias" in state:
        state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]  # transformers 4.x saved both
    config = {
        "architectures": [arch], "model_type": "bert", "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "intermediate_size": cfg.ffn_hidden,
        "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.block_size, "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": 0.02, "layer_norm_eps": float(cfg.layer_norm_eps), "pad_token_id": cfg.pad_id,
        "position_embedding_type": "absolute", "tie_word_embeddings": tied, "use_cache": False,
        "classifier_dropout": None,
    }
    if arch == "BertForSequenceClassification":  # the class count is id2label's length (HF's and lamina's reader)
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.num_classes)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(model.num_classes)}
    modules = {k.removesuffix(".weight"): (v.removesuffix(".weight"), None) for k, v in to_hf.items()
               if k.endswith(".weight") and _is_linear(model, k.removesuffix(".weight"))}
    return HFSpec("bert", arch, config, {k: _own(v) for k, v in state.items()}, modules, pooling=pooling)


# ----- T5 -> T5ForConditionalGeneration, ViT -> ViTForImageClassification, ResNet -> ResNetForImageClassification --
def _mapped_state(model: nn.Module, key_map: dict[str, str], what: str, skip=()) -> dict[str, torch.Tensor]:
    """The model's tensors under HF names by the reader's map (HF -> lamina) inverted; a tensor the map has no
    name for is one ModelError line (the model is not the layout HF builds)."""
    to_hf = {ours: hf for hf, ours in key_map.items()}
    state = {}
    for k, v in _plain_state(model).items():
        if k in skip:
            continue
        if k not in to_hf:
            raise _unsupported(f"{what} tensor {k}")
        state[to_hf[k]] = v
    return state


def _labels_config(n: int) -> dict:
    """id2label / label2id for n classes (the export names them from the run's classes when it knows them)."""
    return {"id2label": {str(i): f"LABEL_{i}" for i in range(n)}, "label2id": {f"LABEL_{i}": i for i in range(n)}}


def _t5_spec(model) -> HFSpec:
    from lamina.models.t5 import hf_t5_key_map

    cfg = model.cfg
    _check_head(model, "t5")
    tied = model.lm_head.weight is model.shared.weight
    if tied != cfg.tie_weights:  # lamina scales the decoder output exactly when tie_weights and the head is shared
        raise _unsupported("a t5 whose lm_head was re-tied or untied after it was built")
    state = _mapped_state(model, hf_t5_key_map(cfg), "t5", skip={"lm_head.weight"} if tied else ())
    if cfg.scaled_attention:  # HF's T5 never scales q.k: fold lamina's 1/sqrt(d_kv) into q (same scores, exactly
        hs = cfg.d_model // cfg.n_head  # in real arithmetic; float rounding of one multiply per weight)
        state = {k: v * hs ** -0.5 if k.endswith((".SelfAttention.q.weight", ".EncDecAttention.q.weight")) else v
                 for k, v in state.items()}
    config = {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model, "d_kv": cfg.d_model // cfg.n_head, "d_ff": cfg.d_ff, "num_layers": cfg.n_enc_layer,
        "num_decoder_layers": cfg.n_dec_layer, "num_heads": cfg.n_head,
        "relative_attention_num_buckets": cfg.rel_buckets, "relative_attention_max_distance": cfg.rel_max_distance,
        "dropout_rate": cfg.dropout, "layer_norm_epsilon": float(cfg.norm_eps), "initializer_factor": 1.0,
        "feed_forward_proj": cfg.ffn,  # lamina's gated-gelu is GELU-tanh, which HF's "gated-gelu" means (gelu_new)
        # T5 v1.0 (tied) scales the decoder output by d_model^-0.5 before the head, v1.1 (untied) does not: HF
        # reads this flag for that (5.x keeps the two tensors apart when the file holds both)
        "tie_word_embeddings": tied, "is_encoder_decoder": True, "use_cache": True,
        "decoder_start_token_id": cfg.bos_id, "pad_token_id": cfg.pad_id, "eos_token_id": cfg.eos_id,
        "n_positions": cfg.block_size,  # lamina's longest target; T5 itself has no position limit
    }
    return HFSpec("t5", "T5ForConditionalGeneration", config, {k: _own(v) for k, v in state.items()},
                  inputs="seq2seq")


def _vit_spec(model) -> HFSpec:
    from lamina.models.vit import hf_vit_key_map

    cfg = model.cfg
    if cfg.pool != "cls":
        raise _unsupported(f"vit pool={cfg.pool!r} (ViTForImageClassification classifies the [CLS] token; train "
                           "with model.pool=cls)")
    if model.num_classes == 0 or not _is_linear(model, "head"):
        raise _unsupported("a vit without a classification head (ViTForImageClassification has one)")
    hidden = int(cfg.embed_dim * cfg.mlp_ratio)
    state = _mapped_state(model, hf_vit_key_map(cfg), "vit")
    if not cfg.bias:  # HF's ViT always has the output-projection bias (qkv_bias covers q, k, v only): zeros
        for i in range(cfg.depth):
            state[f"vit.encoder.layer.{i}.attention.output.dense.bias"] = torch.zeros(cfg.embed_dim,
                                                                                      dtype=model.head.weight.dtype)
    config = {
        "architectures": ["ViTForImageClassification"], "model_type": "vit", "image_size": cfg.img_size,
        "patch_size": cfg.patch_size, "num_channels": cfg.in_chans, "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.n_head, "intermediate_size": hidden,
        "hidden_act": "gelu",  # lamina's FeedForward "gelu" is nn.GELU(), the exact erf form HF's "gelu" names
        "layer_norm_eps": 1e-6, "qkv_bias": cfg.bias, "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attn_dropout, "initializer_range": 0.02, "encoder_stride": cfg.patch_size,
        **_labels_config(model.num_classes),
    }
    return HFSpec("vit", "ViTForImageClassification", config, {k: _own(v) for k, v in state.items()},
                  inputs="images")


def _resnet_spec(model) -> HFSpec:
    from lamina.models.resnet import BLOCKS, hf_resnet_key_map

    cfg = model.cfg
    if cfg.small_input:
        raise _unsupported("resnet small_input=True (HF's ResNet always starts with the 7x7/2 conv and a 3x3/2 "
                           "max-pool; train with model.small_input=false)")
    if cfg.shortcut != "B":
        raise _unsupported(f"resnet shortcut={cfg.shortcut!r} (HF's ResNet has projection shortcuts only, B)")
    if model.num_classes == 0 or not _is_linear(model, "fc") or len(model.stages) != len(cfg.layers):
        raise _unsupported("a resnet without its classification head or with stages removed")
    state = _mapped_state(model, hf_resnet_key_map(cfg), "resnet")
    expansion = BLOCKS[cfg.block].expansion
    config = {
        "architectures": ["ResNetForImageClassification"], "model_type": "resnet", "num_channels": cfg.in_chans,
        "embedding_size": cfg.widths[0], "hidden_sizes": [w * expansion for w in cfg.widths],
        "depths": list(cfg.layers), "layer_type": cfg.block, "hidden_act": "relu",
        "downsample_in_first_stage": False,  # stage 1 keeps the stem's resolution, as lamina's
        "downsample_in_bottleneck": False,  # the stride sits on the 3x3 conv (ResNet v1.5), as lamina's
        "out_features": [f"stage{len(cfg.layers)}"], "out_indices": [len(cfg.layers)],
        "stage_names": ["stem", *[f"stage{i + 1}" for i in range(len(cfg.layers))]],
        **_labels_config(model.num_classes),
    }
    return HFSpec("resnet", "ResNetForImageClassification", config, {k: _own(v) for k, v in state.items()},
                  inputs="images")


def _is_linear(model: nn.Module, name: str) -> bool:
    """A Linear (plain, or wrapped by LoRA) at `name`: what a LoRA adapter can sit on."""
    from lamina.nn.lora import LoRALinear

    try:
        return isinstance(model.get_submodule(name), (nn.Linear, LoRALinear))
    except AttributeError:
        return False


def hf_spec(model: nn.Module) -> HFSpec:
    """What `model` is as a Hugging Face model: family, architecture, config.json and HF-named tensors; a model
    HF cannot represent exactly is one ModelError line naming the family or option and the supported ones."""
    fam = _family(model)
    return {"gpt": _gpt2_spec, "llama": _llama_spec, "bert": _bert_spec, "t5": _t5_spec, "vit": _vit_spec,
            "resnet": _resnet_spec}[fam](model)


def _save_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"format": "pt"})


def write_hf_folder(model: nn.Module, out: str | Path, files: dict[str, str] | None = None,
                    spec: HFSpec | None = None) -> HFSpec:
    """Write `model` as an HF-layout folder at `out`, atomically (a temp folder renamed into place): config.json,
    model.safetensors, and `files` (name -> text: tokenizer files, README.md, generation_config.json, ...)."""
    spec = spec or hf_spec(model)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(spec.config, indent=2) + "\n")
        _save_tensors(tmp / "model.safetensors", spec.state)
        if spec.pooling:  # sentence-transformers reads the pooling here (and so does lamina's reader)
            (tmp / "1_Pooling").mkdir()
            (tmp / "1_Pooling" / "config.json").write_text(json.dumps(
                {"word_embedding_dimension": spec.config["hidden_size"], "pooling_mode_cls_token": False,
                 "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                 "pooling_mode_mean_sqrt_len_tokens": False}, indent=2) + "\n")
            (tmp / "modules.json").write_text(json.dumps(
                [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                 {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}],
                indent=2) + "\n")
        for name, text in (files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)

    write_folder(out, write)
    return spec


# ----- tokenizers -----------------------------------------------------------------------------------------
def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise MissingDependencyError('tokenizers is not installed; the tokenizer files of an HF export need '
                                     'pip install "lamina[hf]"') from None
    return tokenizers


def _char_tokenizer_json(vocab: dict[str, int], unk: str | None) -> str:
    """A `tokenizers` tokenizer.json that cuts text into single characters and looks each up in `vocab`
    (WordLevel): the ids lamina's character vocabularies give. No normalizer, nothing added around the text."""
    _tokenizers()
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk or "<unk>"))  # an unk absent from vocab: unknown chars fail
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every code point, \n too
    tok.decoder = decoders.Fuse()  # join the characters back without spaces
    return tok.to_str()


def hf_tokenizer_files(run_tokenizer: str | None, char_vocab: list[str] | None, *, block_size: int,
                       bert: bool = False, seq2seq: bool = False) -> dict[str, str]:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json for `PreTrainedTokenizerFast` /
    `AutoTokenizer` from a run's tokenizer: `run_tokenizer` is the text of its tokenizer.json (lamina's char
    layout, a trained BPE or a pretrained tokenizer), `char_vocab` the vocabulary of a character LM (data.json,
    id = position). `bert`: lamina's BERT inputs are <s> text </s> (or [CLS] text [SEP]); the exported tokenizer
    adds them as lamina's data pipeline does; `seq2seq`: lamina's T5 sources end in </s> (lamina.data.parallel), and
    the exported tokenizer appends it as T5's own does. Empty when the run has neither."""
    specials: dict[str, str] = {}
    if char_vocab is not None:
        text = _char_tokenizer_json({c: i for i, c in enumerate(char_vocab)}, None)
    elif run_tokenizer is None:
        return {}
    else:
        data = json.loads(run_tokenizer)
        if data.get("lamina_tokenizer") == "char":
            names = list(data["specials"])
            vocab = {s: i for i, s in enumerate(names)}
            vocab.update({c: i + len(names) for i, c in enumerate(data["chars"])})
            text = _char_tokenizer_json(vocab, "<unk>")
        else:
            text = run_tokenizer
        Tokenizer = _tokenizers().Tokenizer

        tok = Tokenizer.from_str(text)
        for role, cands in (("pad_token", ("<pad>", "[PAD]")), ("unk_token", ("<unk>", "[UNK]")),
                            ("bos_token", ("<s>", "[CLS]")), ("eos_token", ("</s>", "[SEP]")),
                            ("mask_token", ("<mask>", "[MASK]"))):
            found = next((c for c in cands if tok.token_to_id(c) is not None), None)
            if found:
                specials[role] = found
        if bert and "bos_token" in specials and "eos_token" in specials and data.get("post_processor") is None:
            from tokenizers.processors import TemplateProcessing

            b, e = specials["bos_token"], specials["eos_token"]
            tok.post_processor = TemplateProcessing(single=f"{b} $A {e}", pair=f"{b} $A {e} $B {e}",
                                                    special_tokens=[(b, tok.token_to_id(b)), (e, tok.token_to_id(e))])
            text = tok.to_str()
        if seq2seq and "eos_token" in specials and data.get("post_processor") is None:
            from tokenizers.processors import TemplateProcessing

            e = specials["eos_token"]
            tok.post_processor = TemplateProcessing(single=f"$A {e}", pair=f"$A {e} $B {e}",
                                                    special_tokens=[(e, tok.token_to_id(e))])
            text = tok.to_str()
        if bert and "bos_token" in specials:  # BERT's names for them, as BertTokenizer has
            specials["cls_token"], specials["sep_token"] = specials["bos_token"], specials["eos_token"]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(block_size),
              "clean_up_tokenization_spaces": False, **specials}
    return {"tokenizer.json": text, "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(specials, indent=2) + "\n"}


# ----- PEFT LoRA adapters -----------------------------------------------------------------------------------
@dataclass
class PeftAdapter:
    config: dict  # adapter_config.json
    state: dict[str, torch.Tensor]  # PEFT names -> tensors


def _target_names(targeted: set[str], linears: set[str]) -> list[str]:
    """The shortest dotted suffixes that pick exactly `targeted` among `linears` by PEFT's rule (a module matches
    a target when its name equals it or ends with "." + it)."""
    chosen: set[str] = set()
    for name in sorted(targeted):
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            hits = {m for m in linears if m == suffix or m.endswith("." + suffix)}
            if hits <= targeted:
                chosen.add(suffix)
                break
    return sorted(chosen)


_TASK_TYPES = {"GPT2LMHeadModel": "CAUSAL_LM", "LlamaForCausalLM": "CAUSAL_LM",
               "BertForSequenceClassification": "SEQ_CLS", "BertForQuestionAnswering": "QUESTION_ANS",
               "BertModel": "FEATURE_EXTRACTION", "BertForMaskedLM": None}


def peft_adapter(model: nn.Module, spec: HFSpec | None = None, trained: list[str] = (),
                 base_model: str | None = None) -> PeftAdapter:
    """The LoRA adapters of a lamina model (lamina.nn.lora) as a PEFT LoRA adapter of the HF model hf_spec
    describes. `trained`: lamina parameter names trained in full beside the adapters (a new classifier head);
    their HF modules go to modules_to_save. ModelError when the model has no adapters or HF has no place for one."""
    from lamina.nn.lora import lora_modules

    spec = spec or hf_spec(model)
    mods = lora_modules(model)
    if not mods:
        raise ModelError("peft export: the model has no LoRA adapters (train with finetune.mode=lora)")
    groups: dict[str, list[tuple[int | None, object]]] = {}
    for n, m in mods.items():
        if n not in spec.modules:
            raise _unsupported(f"a LoRA adapter on {n}")
        hf_mod, slot = spec.modules[n]
        groups.setdefault(hf_mod, []).append((slot, m))
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    dropouts = set()
    for hf_mod, parts in groups.items():
        for _, m in parts:
            dropouts.add(float(getattr(m.dropout, "p", 0.0)))
        if parts[0][0] is None:
            (_, m), = parts
            A, B, r, alpha = m.lora_A, m.lora_B, m.rank, m.alpha
        else:  # GPT-2's fused q/k/v: one adapter of the summed rank, B block-diagonal over the rows it writes
            parts.sort(key=lambda p: p[0])
            if len({m.scaling for _, m in parts}) != 1:
                raise _unsupported(f"LoRA adapters of different alpha / rank on the q, k, v of {hf_mod}")
            out = parts[0][1].out_features
            r = sum(m.rank for _, m in parts)
            A = torch.cat([m.lora_A.detach() for _, m in parts], dim=0)  # (r', C)
            B = torch.zeros(3 * out, r, dtype=A.dtype)
            col = 0
            for slot, m in parts:
                B[slot * out:(slot + 1) * out, col:col + m.rank] = m.lora_B.detach()
                col += m.rank
            alpha = parts[0][1].scaling * r  # alpha' / r' = alpha / r
        state[f"base_model.model.{hf_mod}.lora_A.weight"] = _own(A)
        state[f"base_model.model.{hf_mod}.lora_B.weight"] = _own(B)
        ranks[hf_mod] = (int(r), float(alpha))
    if len(dropouts) > 1:
        raise _unsupported("LoRA adapters with different dropouts")
    (r0, a0), _ = Counter(ranks.values()).most_common(1)[0]
    rank_pattern = {k: r for k, (r, a) in ranks.items() if r != r0}
    alpha_pattern = {k: a for k, (r, a) in ranks.items() if a != a0}
    to_hf = _lamina_to_hf_names(spec)
    saved: set[str] = set()
    for n in trained:  # the new head trained in full: whole modules in PEFT's modules_to_save
        hf = to_hf.get(n)
        if hf is None:
            raise _unsupported(f"a fully trained tensor {n} beside the adapters")
        mod = hf.rsplit(".", 1)[0]
        saved.add(mod)
        state[f"base_model.model.{hf}"] = _own(spec.state[hf])
    linears = {k.removesuffix(".weight") for k, v in spec.state.items() if k.endswith(".weight") and v.dim() == 2}
    config = {
        "peft_type": "LORA", "task_type": _TASK_TYPES[spec.architecture], "base_model_name_or_path": base_model,
        "r": r0, "lora_alpha": a0, "lora_dropout": dropouts.pop() if dropouts else 0.0,
        "target_modules": _target_names(set(groups), linears), "bias": "none",
        "fan_in_fan_out": spec.family == "gpt2",  # GPT-2's Conv1D stores (in, out); PEFT merges transposed
        "modules_to_save": sorted(saved) or None, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    return PeftAdapter(config, state)


def _lamina_to_hf_names(spec: HFSpec) -> dict[str, str]:
    """lamina tensor name -> HF tensor name for the modules spec.modules knows (weight and bias)."""
    out = {}
    for ours, (hf, slot) in spec.modules.items():
        if slot is None:
            for kind in ("weight", "bias"):
                if f"{hf}.{kind}" in spec.state:
                    out[f"{ours}.{kind}"] = f"{hf}.{kind}"
    return out


def write_peft_folder(model: nn.Module, out: str | Path, files: dict[str, str] | None = None,
                      trained: list[str] = (), base_model: str | None = None) -> PeftAdapter:
    """adapter_config.json + adapter_model.safetensors (+ `files`) at `out`, atomically."""
    adapter = peft_adapter(model, trained=trained, base_model=base_model)
    write_folder(out, lambda tmp: write_peft_files(tmp, adapter, files))
    return adapter


def write_peft_files(folder: Path, adapter: PeftAdapter, files: dict[str, str] | None = None) -> None:
    """adapter_config.json, adapter_model.safetensors and `files` into an existing (temporary) folder."""
    (folder / "adapter_config.json").write_text(json.dumps(adapter.config, indent=2) + "\n")
    _save_tensors(folder / "adapter_model.safetensors", adapter.state)
    for name, text in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


__all__ = ["GPT2_ACTIVATIONS", "HFSpec", "PeftAdapter", "SUPPORTED", "hf_spec", "hf_tokenizer_files",
           "peft_adapter", "write_hf_folder", "write_peft_files", "write_peft_folder"]
