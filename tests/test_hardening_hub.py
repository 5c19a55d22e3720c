"""Issue 14, hub: headers (GGUF metadata, config.json, lamina_model.json) must not drive allocation before they are
checked against the weights, and crafted files are one CheckpointError line, never a traceback."""

from __future__ import annotations

import json
import resource
import time

import numpy as np
import pytest
import torch

from lamina.errors import CheckpointError

TINY = {"vocab_size": 32, "block_size": 16, "n_layer": 2, "n_head": 2, "n_kv_head": 1, "n_embd": 16,
        "ffn_hidden": 24}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def refused(fn, *words):
    """fn() raises one CheckpointError line containing `words`, quickly, without raising the peak RSS."""
    before, t0 = _maxrss_mb(), time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        fn()
    took, grew = time.perf_counter() - t0, _maxrss_mb() - before
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    assert took < 2.0, (took, msg)
    assert grew < 200, (grew, msg)
    return msg


# ----- GGUF -------------------------------------------------------------------------------------------------
def write_gguf(path, ctx=16, vocab=None, n_embd=None, n_layer=None, drop_layer=False):
    """A tiny Llama GGUF (fp32 tensors from lamina's own llama, GGUF names); metadata overridable."""
    gguf = pytest.importorskip("gguf")
    from lamina.models.llama import Llama, LlamaConfig, hf_llama_key_map

    cfg = LlamaConfig(**TINY, tie_weights=True)
    sd = Llama(cfg).state_dict()
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layer)
    w = gguf.GGUFWriter(str(path), "llama")
    def put(key, v):
        (w.add_uint64 if v >= 2**32 else w.add_uint32)(f"llama.{key}", v)

    put("context_length", ctx)
    put("embedding_length", TINY["n_embd"] if n_embd is None else n_embd)
    put("block_count", TINY["n_layer"] if n_layer is None else n_layer)
    put("feed_forward_length", TINY["ffn_hidden"])
    put("attention.head_count", TINY["n_head"])
    put("attention.head_count_kv", TINY["n_kv_head"])
    w.add_layer_norm_rms_eps(1e-5)
    put("vocab_size", TINY["vocab_size"] if vocab is None else vocab)
    for hf, ours in hf_llama_key_map(cfg.n_layer).items():
        if ours == "lm_head.weight":
            continue  # tied: llama.cpp omits output.weight
        if drop_layer and ".1." in hf:
            continue
        name = table.get_name(hf, try_suffixes=(".weight", ".bias"))
        w.add_tensor(name, sd[ours].numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_still_loads(tmp_path):
    from lamina.hub import load

    model, info = load(write_gguf(tmp_path / "tiny.gguf"), tokenizer=False)
    assert info["config"]["block_size"] == 16
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape[-1] == TINY["vocab_size"]


def test_gguf_huge_context_length_is_refused_before_building(tmp_path):
    from lamina.hub import load

    p = write_gguf(tmp_path / "ctx.gguf", ctx=2**40)
    refused(lambda: load(p, tokenizer=False), "context_length", "block_size=")
    # within the bound but far beyond what the weights justify: the RoPE tables would dwarf the model
    p = write_gguf(tmp_path / "ctx2.gguf", ctx=1 << 20)
    refused(lambda: load(p, tokenizer=False), "does not match the weights")
    # the caller may build for fewer positions
    model, info = load(p, tokenizer=False, block_size=32)
    assert model.block_size == 32


def test_gguf_declared_sizes_are_checked_against_the_tensors(tmp_path):
    from lamina.hub import load

    p = write_gguf(tmp_path / "vocab.gguf", vocab=2_000_000_000)
    refused(lambda: load(p, tokenizer=False), "shape")
    p = write_gguf(tmp_path / "embd.gguf", n_embd=1 << 24)
    refused(lambda: load(p, tokenizer=False))
    p = write_gguf(tmp_path / "layers.gguf", n_layer=10**12)
    refused(lambda: load(p, tokenizer=False), "block_count")
    p = write_gguf(tmp_path / "fewer.gguf", drop_layer=True)
    refused(lambda: load(p, tokenizer=False), "block_count")


# ----- HF folders -------------------------------------------------------------------------------------------
LLAMA_HF = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 24,
            "max_position_embeddings": 16, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def hf_folder(tmp_path, name="hf", **config):
    from safetensors.torch import save_file

    from lamina.models.llama import Llama, LlamaConfig, hf_llama_key_map

    folder = tmp_path / name
    folder.mkdir()
    sd = Llama(LlamaConfig(**TINY, tie_weights=True)).state_dict()
    tensors = {hf: sd[ours].contiguous() for hf, ours in hf_llama_key_map(TINY["n_layer"]).items()
               if ours != "lm_head.weight"}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**LLAMA_HF, **config}))
    return folder


def test_tiny_hf_folder_still_loads(tmp_path):
    from lamina.hub import load

    model, info = load(hf_folder(tmp_path))
    assert info["family"] == "llama" and model.vocab_size == 32


@pytest.mark.parametrize("key,value,words", [
    ("vocab_size", 2_000_000_000, ("shape",)),
    ("hidden_size", 1 << 24, ()),
    ("intermediate_size", 1 << 30, ("shape",)),
    ("num_hidden_layers", 100_000_000_000, ("layers",)),
    ("num_hidden_layers", 5, ("not in the checkpoint",)),
    ("max_position_embeddings", 2**40, ("max_position_embeddings",)),
    ("max_position_embeddings", 1 << 20, ("does not match the weights",)),
    ("hidden_size", "big", ("config.json",)),
    ("num_attention_heads", 0, ("config.json",)),
    ("architectures", "LlamaForCausalLM", ("architectures",)),
])
def test_hf_config_sizes_are_checked_before_building(tmp_path, key, value, words):
    from lamina.hub import load

    folder = hf_folder(tmp_path, **{key: value})
    refused(lambda: load(folder), *words)


def test_hf_config_json_deep_or_not_a_mapping(tmp_path):
    from lamina.hub import load

    folder = hf_folder(tmp_path)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(lambda: load(folder), "config.json")
    (folder / "config.json").write_text("[1, 2, 3]")
    refused(lambda: load(folder), "config.json", "JSON object")
    (folder / "config.json").write_text('"llama"')
    refused(lambda: load(folder), "JSON object")


def test_hf_bad_safetensors_header(tmp_path):
    from lamina.hub import load

    folder = hf_folder(tmp_path)
    (folder / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    refused(lambda: load(folder), "model.safetensors", "not a readable safetensors file")
    header = b'{"a": {"dtype": "F32", "shape": [1000000000, 1000000000], "data_offsets": [0, 4]}}'
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    refused(lambda: load(folder), "not a readable safetensors file")
    (folder / "model.safetensors").write_bytes(b"not json at all")
    refused(lambda: load(folder), "not a readable safetensors file")


def test_state_shapes_reads_the_header_only(tmp_path):
    from lamina.io import save_state, state_shapes

    lin = torch.nn.Linear(3, 2)
    save_state(tmp_path / "w.safetensors", lin)
    assert state_shapes(tmp_path / "w.safetensors") == {"weight": (2, 3), "bias": (2,)}
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\0\0\0\0\0\0\0{oops")
    refused(lambda: state_shapes(tmp_path / "bad.safetensors"), "bad.safetensors")


# ----- lamina's own pretrained folders ----------------------------------------------------------------------
def test_pretrained_huge_declared_options_are_refused_before_building(tmp_path):
    from lamina.hub import from_pretrained, save_pretrained
    from lamina.models import create_model

    folder = save_pretrained(create_model("llama", **TINY), tmp_path / "p")
    meta = json.loads((folder / "lamina_model.json").read_text())
    meta["resolved"]["vocab_size"] = 2_000_000_000
    (folder / "lamina_model.json").write_text(json.dumps(meta))
    refused(lambda: from_pretrained(folder), "shape")
    meta["resolved"]["vocab_size"] = TINY["vocab_size"]
    meta["resolved"]["block_size"] = 1 << 22
    (folder / "lamina_model.json").write_text(json.dumps(meta))
    refused(lambda: from_pretrained(folder), "does not match the weights")
    (folder / "lamina_model.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(lambda: from_pretrained(folder), "lamina_model.json")
    (folder / "lamina_model.json").write_text("[]")
    refused(lambda: from_pretrained(folder), "JSON object")
