"""GPT: parameter counts against GPT-2, weight tying, init, and a tiny model that overfits a string."""

from __future__ import annotations

import math

import pytest
import torch

from lamina.errors import ModelError
from lamina.models import create_model
from lamina.models.gpt import GPT, GPTConfig

from conftest import REPEATED_CHARS, greedy_text, overfit_repeated_text


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied tensors count once


def test_gpt2_small_param_count_matches_hf():
    # HF GPT2LMHeadModel("gpt2") reports 124,439,808 parameters (nanoGPT prints 123.65M: the same minus wpe).
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    assert n_params(model) == 124_439_808
    assert n_params(model) - model.wpe.weight.numel() == 123_653_376


def test_registered_sizes():
    assert n_params(create_model("gpt")) == 809_856  # 4 x 198,272 per block + wte 8,320 + wpe 8,192 + ln_f 256
    mini = create_model("gpt_mini")
    assert (mini.cfg.n_layer, mini.cfg.n_head, mini.cfg.n_embd, mini.block_size) == (6, 6, 192, 128)
    assert create_model("gpt", n_layer=2, vocab_size=100).cfg.vocab_size == 100


def test_tied_and_untied_heads():
    tied = create_model("gpt", vocab_size=50)
    assert tied.lm_head.weight is tied.wte.weight
    untied = create_model("gpt", vocab_size=50, tie_weights=False)
    assert n_params(untied) - n_params(tied) == 50 * 128
    tied.reset_classifier(10)  # a new head no longer shares wte
    assert tied.lm_head.weight is not tied.wte.weight and tied.wte.weight.shape == (50, 128)


def test_init_follows_gpt2():
    torch.manual_seed(0)
    model = create_model("gpt", n_layer=8, n_embd=256, n_head=4)
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 1e-3
    resid = 0.02 / math.sqrt(2 * 8)
    assert abs(model.blocks[0].attn.out_proj.weight.std().item() - resid) < 5e-4
    assert abs(model.blocks[0].mlp.out_proj.weight.std().item() - resid) < 5e-4
    assert model.blocks[0].attn.q_proj.bias.abs().sum() == 0


def test_bad_config_is_model_error():
    with pytest.raises(ModelError, match=r"gpt: n_embd \(100\) must be divisible by n_head \(3\)"):
        create_model("gpt", n_embd=100, n_head=3)
    with pytest.raises(ModelError, match="gpt: block_size must be a positive integer, got 0"):
        create_model("gpt", block_size=0)


def test_tiny_gpt_overfits_a_repeated_string():
    torch.manual_seed(0)
    model = create_model("gpt", vocab_size=len(REPEATED_CHARS), block_size=32, n_layer=2, n_head=2, n_embd=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    assert overfit_repeated_text(model, opt, steps=200, window=32) < 0.1
    assert greedy_text(model, "hello ", 14) == "hello lamina! hello "
