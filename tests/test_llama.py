"""Llama: parity with HF LlamaForCausalLM, KV-cache decoding, generation, GQA sizes, overfitting, config errors."""

from __future__ import annotations

import pytest
import torch

from lamina.errors import ModelError
from lamina.models import create_model, generate
from lamina.models.llama import Llama, LlamaConfig, hf_llama_key_map, llama_config_from_hf

from conftest import REPEATED_CHARS, greedy_text, overfit_repeated_text, scramble


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: threads buy nothing and cost seconds on a busy machine (conftest restores the count).
    torch.set_num_threads(1)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied tensors count once




def load_hf_weights(model: Llama, hf_state: dict[str, torch.Tensor]) -> None:
    """Copy HF tensors by the key map, asserting every name and shape (nanoGPT's from_pretrained in spirit)."""
    key_map = hf_llama_key_map(model.cfg.n_layer)
    ours = model.state_dict()
    assert set(hf_state) <= set(key_map), f"unmapped HF keys: {sorted(set(hf_state) - set(key_map))}"
    assert set(key_map.values()) == set(ours), f"lamina keys not covered: {sorted(set(ours) - set(key_map.values()))}"
    with torch.no_grad():
        for hf_name, tensor in hf_state.items():
            target = ours[key_map[hf_name]]
            assert target.shape == tensor.shape, f"{hf_name}: HF {tuple(tensor.shape)} vs {tuple(target.shape)}"
            target.copy_(tensor)


@pytest.mark.parametrize("tied, eps, theta", [(False, 1e-6, 10000.0), (True, 0.1, 500.0)])
def test_logits_match_hf_llama(tied, eps, theta):
    transformers = pytest.importorskip("transformers", reason="parity reference needs transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=48, rms_norm_eps=eps, rope_theta=theta,
        tie_word_embeddings=tied, attn_implementation="eager",  # explicit softmax: a path independent of SDPA
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    scramble(hf)  # random norms too (HF starts them at 1), so a swapped norm cannot go unnoticed
    cfg = llama_config_from_hf(hf_cfg.to_dict())
    assert (cfg.n_kv_head, cfg.ffn_dim, cfg.rope_base, cfg.norm_eps, cfg.tie_weights) == (2, 96, theta, eps, tied)
    model = Llama(cfg).eval()
    load_hf_weights(model, hf.state_dict())
    assert (model.lm_head.weight is model.wte.weight) == tied
    idx = torch.randint(0, 61, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(input_ids=idx).logits
        got = model(idx)
    assert want.abs().max() > 1.0  # logits large enough that 1e-5 is a real bound
    assert (got - want).abs().max().item() <= 1e-5


def test_hf_config_rejects_what_the_family_lacks():
    base = {"vocab_size": 10, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2}
    cfg = llama_config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": None})  # transformers 4.x layout
    assert (cfg.rope_base, cfg.n_kv_head, cfg.norm_eps, cfg.tie_weights) == (5e5, 2, 1e-6, False)
    with pytest.raises(ModelError, match="RoPE scaling 'llama3' is not supported"):
        llama_config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ModelError, match="attention_bias=true is not supported"):
        llama_config_from_hf({**base, "attention_bias": True})
    with pytest.raises(ModelError, match="head_dim 4 != hidden_size / num_attention_heads"):
        llama_config_from_hf({**base, "head_dim": 4})


def test_key_map_names_every_parameter_once():
    model = create_model("llama", n_layer=3, tie_weights=False)
    key_map = hf_llama_key_map(3)
    assert len(key_map) == 3 + 9 * 3 and sorted(key_map.values()) == sorted(model.state_dict())
    assert key_map["model.layers.2.self_attn.o_proj.weight"] == "blocks.2.attn.out_proj.weight"
    assert key_map["model.layers.0.mlp.down_proj.weight"] == "blocks.0.mlp.out_proj.weight"


def test_kv_cache_decoding_equals_full_recompute():
    torch.manual_seed(0)
    model = create_model("llama", vocab_size=40, block_size=32).eval()
    idx = torch.randint(0, 40, (2, 32))
    with torch.no_grad():
        full = model(idx)  # (2, 32, 40)
        cache = model.make_cache(2)
        assert cache[0].k.shape == (2, 2, 32, 32)  # (B, n_kv_head, block_size, head_dim): GQA halves the cache
        # uneven chunks: a prompt, single steps, and a multi-token chunk whose causal mask is offset by the cache
        steps, start = [], 0
        for size in (5, 1, 1, 7, 1, 17):
            steps.append(model(idx[:, start:start + size], cache=cache))
            start += size
    assert start == 32 and cache[0].length == 32
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_is_deterministic_and_cache_independent():
    torch.manual_seed(0)
    model = create_model("llama", vocab_size=30, block_size=24)
    scramble(model)  # at init every position predicts about the same token; scrambled, the output varies
    prompt = torch.randint(0, 30, (2, 4), generator=torch.Generator().manual_seed(1))
    # 30 new tokens run past block_size=24: the cached run falls back to the cropped window at the end
    a = generate(model, prompt, 30, greedy=True)
    b = generate(model, prompt, 30, greedy=True)
    uncached = generate(model, prompt, 30, greedy=True, use_cache=False)
    assert a.shape == (2, 34) and torch.equal(a[:, :4], prompt)
    assert torch.equal(a, b) and torch.equal(a, uncached)
    assert len(set(a[0, 4:].tolist())) > 1  # not a degenerate constant output that any model would agree on


def test_gqa_parameter_count_by_hand():
    # C = 64, 8 heads of 8, 2 kv heads -> k/v project to 16; SwiGLU width int(8/3 * 64) = 170 -> 192 (multiple_of 32)
    # per block: q 64*64 + k 64*16 + v 64*16 + o 64*64 = 10,240; mlp 3 * 64*192 = 36,864; 2 RMSNorms 128 -> 47,232
    # total: 3 blocks 141,696 + wte 100*64 = 6,400 (tied head) + ln_f 64 = 148,160
    cfg = dict(vocab_size=100, n_layer=3, n_head=8, n_embd=64)
    model = create_model("llama", n_kv_head=2, **cfg)
    assert model.cfg.ffn_dim == 192 and model.blocks[0].attn.k_proj.weight.shape == (16, 64)
    assert n_params(model) == 148_160
    mha = create_model("llama", n_kv_head=8, **cfg)  # full multi-head: k and v grow to 64 x 64 each
    assert n_params(mha) - n_params(model) == 3 * 2 * 64 * (64 - 16)
    assert n_params(create_model("llama", n_kv_head=2, tie_weights=False, **cfg)) == 148_160 + 100 * 64


def test_registered_sizes_and_llama_ffn_rule():
    assert n_params(create_model("llama")) == 746_752  # 4 x 184,576 per block + wte 8,320 + ln_f 128
    mini = create_model("llama_mini")
    assert (mini.cfg.n_layer, mini.cfg.n_head, mini.cfg.n_kv_head, mini.cfg.n_embd, mini.block_size) == \
        (6, 6, 2, 192, 128)
    assert n_params(mini) == 2_374_272
    assert LlamaConfig(n_embd=4096, n_head=32, multiple_of=256).ffn_dim == 11008  # Llama 2 7B's width
    assert LlamaConfig(ffn_hidden=100).ffn_dim == 100
    rope = mini.blocks[0].attn.rope
    assert all(blk.attn.rope is rope for blk in mini.blocks) and rope.base == 10000.0
    assert not any("rope" in k for k in mini.state_dict())  # RoPE tables are recomputed, never saved


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = create_model("llama", n_layer=8, n_embd=256, n_head=4, n_kv_head=4)
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 1e-3
    resid = 0.02 / (2 * 8) ** 0.5
    assert abs(model.blocks[0].attn.out_proj.weight.std().item() - resid) < 5e-4
    assert abs(model.blocks[0].mlp.out_proj.weight.std().item() - resid) < 5e-4
    assert torch.equal(model.blocks[0].ln_1.weight, torch.ones(256)) and model.blocks[0].attn.q_proj.bias is None


def test_tiny_llama_overfits_a_repeated_string():
    torch.manual_seed(0)
    model = create_model("llama", vocab_size=len(REPEATED_CHARS), block_size=32, n_layer=2, n_head=2, n_kv_head=1,
                         n_embd=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # high lr, small model: ~1 s on one CPU thread
    assert overfit_repeated_text(model, opt, steps=80, window=24) < 0.1
    assert greedy_text(model, "hello ", 14) == "hello lamina! hello "


@pytest.mark.parametrize("overrides, message", [
    (dict(n_embd=100, n_head=3), r"llama: n_embd \(100\) must be divisible by n_head \(3\)"),
    (dict(n_head=4, n_kv_head=3), r"llama: n_head \(4\) must be a multiple of n_kv_head \(3\)"),
    (dict(n_embd=12, n_head=4, n_kv_head=4), "llama: head size n_embd / n_head = 3 must be even"),
    (dict(block_size=0), "llama: block_size must be a positive integer, got 0"),
    (dict(n_kv_head=True), "llama: n_kv_head must be a positive integer, got True"),
    (dict(ffn_hidden=0), r"llama: ffn_hidden must be a positive integer or None \(Llama's rule\), got 0"),
    (dict(rope_base=0.0), "llama: rope_base must be a positive number, got 0.0"),
    (dict(norm_eps=-1e-5), "llama: norm_eps must be a positive number, got -1e-05"),
    (dict(dropout=1.0), r"llama: dropout must be in \[0, 1\), got 1.0"),
])
def test_bad_config_is_one_line_model_error(overrides, message):
    with pytest.raises(ModelError, match=message) as err:
        create_model("llama", **overrides)
    assert "\n" not in str(err.value)
