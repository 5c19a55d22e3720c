"""lamina.hub on Hugging Face-layout decoder folders: a tiny random LlamaForCausalLM / GPT2LMHeadModel saved with
save_pretrained (safetensors) loads into lamina's Llama / GPT with the same fp32 logits; a dropped tensor is a
CheckpointError that names it."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import scramble

import lamina.hub
from lamina.errors import CheckpointError

transformers = pytest.importorskip("transformers", reason="the reference models come from transformers")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny models on a busy machine (conftest restores the count)




def tiny_llama(tied: bool):
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=48, rms_norm_eps=1e-5, rope_theta=500.0,
        tie_word_embeddings=tied, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(tied: bool = True):
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=48, n_embd=64, n_layer=2, n_head=4,
                                  layer_norm_epsilon=1e-5, tie_word_embeddings=tied, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def saved(hf, folder):
    scramble(hf)
    hf.save_pretrained(folder, safe_serialization=True)
    assert list(folder.glob("*.safetensors"))
    return hf


def max_diff(hf, model, vocab: int = 100, T: int = 48) -> float:
    idx = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(input_ids=idx).logits
        got = model(idx)
    assert want.abs().max() > 1.0  # logits large enough that 1e-5 is a real bound
    return (got - want).abs().max().item()


@pytest.mark.parametrize("tied", [False, True])
def test_llama_folder_matches_transformers(tmp_path, tied):
    hf = saved(tiny_llama(tied), tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    model, info = lamina.hub.load(tmp_path)
    assert (info["family"], info["architecture"], info["format"]) == ("llama", "LlamaForCausalLM", "hf")
    assert info["tokenizer"] == str(tmp_path / "tokenizer.json")
    assert (model.lm_head.weight is model.wte.weight) == tied and not model.training
    assert (model.cfg.n_kv_head, model.cfg.ffn_dim, model.cfg.rope_base) == (2, 96, 500.0)
    diff = max_diff(hf, model)
    print(f"\n[hf llama tied={tied}] max |logits diff| = {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_folder_matches_transformers(tmp_path, tied):
    hf = saved(tiny_gpt2(tied), tmp_path)
    model, info = lamina.hub.load(tmp_path)
    assert (info["family"], info["architecture"], info["tokenizer"]) == ("gpt2", "GPT2LMHeadModel", None)
    assert (model.lm_head.weight is model.wte.weight) == tied
    assert model.cfg.activation == "gelu_tanh" and model.cfg.block_size == 48
    diff = max_diff(hf, model)
    print(f"\n[hf gpt2 tied={tied}] max |logits diff| = {diff:.2e}")
    assert diff <= 1e-5


def test_gpt2_folder_without_transformer_prefix(tmp_path):
    """A GPT2Model folder (names without "transformer.") loads too; its tied head scores with wte."""
    hf = saved(tiny_gpt2(), tmp_path)
    from safetensors.torch import load_file, save_file

    f = next(tmp_path.glob("*.safetensors"))
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(f)).items() if k != "lm_head.weight"}
    save_file(state, str(f), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2Model"]}))
    model, info = lamina.hub.load(tmp_path)
    assert info["architecture"] == "GPT2Model"
    assert max_diff(hf, model) <= 1e-5


@pytest.mark.parametrize("family, dropped", [("llama", "model.layers.1.mlp.up_proj.weight"),
                                             ("gpt2", "transformer.h.0.attn.c_attn.weight")])
def test_dropped_tensor_is_named(tmp_path, family, dropped):
    from safetensors.torch import load_file, save_file

    saved(tiny_llama(False) if family == "llama" else tiny_gpt2(), tmp_path)
    f = next(tmp_path.glob("*.safetensors"))
    state = load_file(str(f))
    del state[dropped]
    state["extra.weight"] = torch.zeros(3)
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        lamina.hub.load(tmp_path)
    msg = str(e.value)
    print(f"\n[hf {family}] {msg}")
    assert "1 tensor(s) with no place" in msg and "extra.weight" in msg
    lost = "blocks.1.mlp.up_proj.weight" if family == "llama" else "blocks.0.attn.q_proj.weight"
    assert "model tensor(s) not in the checkpoint" in msg and lost in msg and f"({dropped})" in msg


def test_unsupported_config_is_rejected(tmp_path):
    saved(tiny_gpt2(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "activation_function": "quick_gelu"}))
    with pytest.raises(CheckpointError, match="activation_function='quick_gelu' is not supported"):
        lamina.hub.load(tmp_path)
