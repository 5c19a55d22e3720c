"""LoRA: starts equal to the base, trains only adapters, merge/unmerge parity, adapter save/load, counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import REPEATED_CHARS, REPEATED_TEXT, overfit_repeated_text

from lamina.errors import CheckpointError, ConfigError
from lamina.models import create_model
from lamina.nn import (
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    remove_lora,
    trainable_fraction,
    unmerge_lora,
)


def tiny_gpt(seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = {"vocab_size": len(REPEATED_CHARS), "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}
    return create_model("gpt", **(cfg | kw))


def ids(seed: int = 1, shape=(3, 16)):
    return torch.randint(0, len(REPEATED_CHARS), shape, generator=torch.Generator().manual_seed(seed))


def perturb_adapters(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_linear_hand_computed_and_leading_dims():
    torch.manual_seed(0)
    base = nn.Linear(4, 3)
    lora = LoRALinear(base, rank=2, alpha=4)
    assert lora.weight is base.weight and not lora.weight.requires_grad and lora.lora_A.requires_grad
    assert lora.lora_A.shape == (2, 4) and lora.lora_B.shape == (3, 2) and torch.all(lora.lora_B == 0)
    x = torch.randn(2, 5, 7, 4)  # any leading dims
    assert torch.equal(lora(x), base(x))  # B = 0: exactly the base
    with torch.no_grad():
        lora.lora_A.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        lora.lora_B.copy_(torch.tensor([[1.0, 0], [0, 1.0], [1.0, 1.0]]))
    # delta = (alpha / r) B A = 2 * [[1,0,0,0],[0,1,0,0],[1,1,0,0]]
    want = base(x) + 2 * torch.stack([x[..., 0], x[..., 1], x[..., 0] + x[..., 1]], -1)
    assert torch.allclose(lora(x), want, atol=1e-6)
    lora.merge()
    lora.merge()  # idempotent: not folded twice
    assert lora.merged and torch.allclose(lora(x), want, atol=1e-5)


def test_lora_keeps_dtype_and_device():
    lin = nn.Linear(8, 4).to(torch.float64)
    lora = LoRALinear(lin, rank=2)
    assert lora.lora_A.dtype == lora.lora_B.dtype == torch.float64
    assert lora(torch.randn(3, 8, dtype=torch.float64)).dtype == torch.float64


def test_fresh_wrap_equals_base_and_keys_unchanged():
    model = tiny_gpt()
    x = ids()
    ref = model(x)
    base_keys = set(model.state_dict())
    names = apply_lora(model)
    assert names == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    assert torch.equal(model(x), ref)
    keys = set(model.state_dict())
    assert base_keys <= keys  # base weights keep their names: a base checkpoint still loads
    assert {k.rsplit(".", 1)[1] for k in keys - base_keys} == {"lora_A", "lora_B"}


def test_training_changes_only_adapters():
    model = tiny_gpt()
    apply_lora(model, rank=4, alpha=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    overfit_repeated_text(model, opt, steps=3, window=16)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("lora_A", "lora_B")) for k in changed)
    assert any(k.endswith("lora_B") for k in changed)  # B left zero: the update is live


def test_merge_unmerge_parity():
    model = tiny_gpt()
    apply_lora(model, targets=("q_proj", "v_proj", "mlp.fc"), rank=4, alpha=8)
    perturb_adapters(model)
    x = ids()
    w0 = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(("lora_A", "lora_B"))}
    y = model(x)
    assert merge_lora(model)
    assert (model(x) - y).abs().max().item() <= 1e-5
    assert not torch.equal(model.blocks[0].attn.q_proj.weight, w0["blocks.0.attn.q_proj.weight"])
    unmerge_lora(model)
    for k, v in w0.items():
        assert (model.state_dict()[k] - v).abs().max().item() <= 1e-6, k
    assert (model(x) - y).abs().max().item() <= 1e-5


def test_remove_lora_gives_plain_linears_with_same_outputs():
    model = tiny_gpt()
    apply_lora(model, rank=4)
    perturb_adapters(model)
    x = ids()
    y = model(x)
    assert len(remove_lora(model, merge=True)) == 4
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.blocks[0].attn.q_proj) is nn.Linear
    assert (model(x) - y).abs().max().item() <= 1e-5
    assert not any(k.endswith(("lora_A", "lora_B")) for k in model.state_dict())


def test_remove_lora_without_merge_restores_base():
    model = tiny_gpt()
    x = ids()
    ref = model(x)
    apply_lora(model)
    perturb_adapters(model)
    merge_lora(model)
    remove_lora(model, merge=False)
    assert (model(x) - ref).abs().max().item() <= 1e-5


def test_lora_state_dict_round_trip():
    model = tiny_gpt()
    apply_lora(model, rank=4)
    perturb_adapters(model, seed=3)
    sd = lora_state_dict(model)
    assert len(sd) == 8 and all(k.rsplit(".", 1)[1] in ("lora_A", "lora_B") for k in sd)
    fresh = tiny_gpt()  # same seed: same base weights
    apply_lora(fresh, rank=4)
    x = ids()
    assert not torch.equal(fresh(x), model(x))
    load_lora_state_dict(fresh, sd)
    assert torch.equal(fresh(x), model(x))
    merge_lora(fresh)  # loading into a merged model unmerges, loads, re-merges
    load_lora_state_dict(fresh, sd)
    assert (fresh(x) - model(x)).abs().max().item() <= 1e-5


def test_load_lora_state_dict_is_strict():
    model = tiny_gpt()
    apply_lora(model, rank=4)
    sd = lora_state_dict(model)
    with pytest.raises(CheckpointError, match="missing"):
        load_lora_state_dict(model, {k: v for k, v in sd.items() if "blocks.1" not in k})
    with pytest.raises(CheckpointError, match="unexpected"):
        load_lora_state_dict(model, sd | {"blocks.0.mlp.fc.lora_A": torch.zeros(4, 32)})
    other = tiny_gpt()
    apply_lora(other, rank=2)
    with pytest.raises(CheckpointError, match="rank"):
        load_lora_state_dict(model, lora_state_dict(other))


def test_trainable_fraction_gpt_hand_count():
    model = create_model("gpt", vocab_size=65)  # 4 blocks, n_embd 128
    assert sum(p.numel() for p in model.parameters()) == 809_856
    apply_lora(model, targets=("q_proj", "v_proj"), rank=8, alpha=16)
    per_layer = 8 * 128 + 128 * 8  # A (r, in) + B (out, r)
    adapters = 4 * 2 * per_layer  # 4 blocks x (q, v) = 16,384
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adapters
    assert trainable_fraction(model) == pytest.approx(adapters / (809_856 + adapters))  # 0.01983
    assert trainable_fraction(model) < 0.02


def test_lora_finetune_lowers_loss():
    model = tiny_gpt(seed=0)
    # random frozen base (embeddings and the tied head included): only the q/v adapters can learn
    apply_lora(model, targets=("q_proj", "v_proj"), rank=8, alpha=16)
    data = torch.tensor([REPEATED_CHARS.index(c) for c in REPEATED_TEXT])
    x, y = data[:-1][:256].view(8, 32), data[1:][:256].view(8, 32)

    def loss():
        with torch.no_grad():
            return F.cross_entropy(model(x).reshape(-1, len(REPEATED_CHARS)), y.reshape(-1)).item()

    before = loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.0)
    overfit_repeated_text(model, opt, steps=50, window=16)
    after = loss()
    print(f"lora fine-tune loss {before:.3f} -> {after:.3f}, trainable {trainable_fraction(model):.4f}")
    assert after < before - 0.25  # seed 0: 2.33 -> 1.98


def test_no_matching_target_is_a_clear_error():
    model = tiny_gpt()
    with pytest.raises(ConfigError, match=r"matched no nn.Linear.*blocks\.0\.attn\.q_proj") as e:
        apply_lora(model, targets=("query",))
    assert "\n" not in str(e.value)
    apply_lora(model)
    with pytest.raises(ConfigError, match="already"):
        apply_lora(model)


def test_tied_head_is_refused_and_globs_work():
    model = tiny_gpt()
    with pytest.raises(ConfigError, match="tied"):
        apply_lora(model, targets=("lm_head",))
    assert apply_lora(model, targets=("blocks.1.*_proj",)) == [
        "blocks.1.attn.q_proj", "blocks.1.attn.k_proj", "blocks.1.attn.v_proj", "blocks.1.attn.out_proj",
        "blocks.1.mlp.out_proj"]
