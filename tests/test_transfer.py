"""Transfer helpers: layer-wise LR decay (hand-computed lrs), freezing, linear probing, gradual unfreezing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lamina.engine.transfer import (
    GradualUnfreezing,
    freeze,
    head_parameter_names,
    layer_groups,
    linear_probe,
    param_groups_layerwise_lr_decay,
    unfreeze,
)
from lamina.errors import ConfigError
from lamina.models import create_model


def vit(**kw):
    torch.manual_seed(0)
    return create_model("vit_tiny", **({"img_size": 16, "patch_size": 8, "depth": 3, "embed_dim": 16,
                                             "n_head": 2, "num_classes": 5} | kw))


def bert():
    torch.manual_seed(0)
    return create_model("bert_mini", n_layer=2, n_embd=16, n_head=2, num_classes=3, vocab_size=40, block_size=8)


def gpt():
    torch.manual_seed(0)
    return create_model("gpt", vocab_size=40, n_layer=2, n_head=2, n_embd=16, block_size=8)


def effnet():
    torch.manual_seed(0)
    return create_model("efficientnet_lite0", num_classes=4)


def test_llrd_hand_computed_vit():
    model = vit()  # 3 blocks: groups bottom, b0, b1, b2, top
    groups = param_groups_layerwise_lr_decay(model, lr=1e-3, decay=0.5, weight_decay=0.05)
    lr_of = {n: g["lr"] for g in groups for n in g["names"]}
    wd_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert lr_of["head.weight"] == lr_of["head.bias"] == lr_of["norm.weight"] == pytest.approx(1e-3)
    assert lr_of["blocks.2.attn.q_proj.weight"] == pytest.approx(5e-4)
    assert lr_of["blocks.1.mlp.fc.bias"] == pytest.approx(2.5e-4)
    assert lr_of["blocks.0.ln_1.weight"] == pytest.approx(1.25e-4)
    for emb in ("patch_embed.proj.weight", "pos_embed", "cls_token"):
        assert lr_of[emb] == pytest.approx(1e-3 * 0.5 ** 4)  # lowest
    assert wd_of["head.weight"] == 0.05 and wd_of["head.bias"] == 0.0 and wd_of["blocks.0.ln_1.weight"] == 0.0
    # every trainable parameter in exactly one group
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    opt = torch.optim.AdamW(groups)  # the groups go straight into an optimizer
    assert sorted({round(g["lr"], 12) for g in opt.param_groups}) == [6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-3]


def test_llrd_skips_frozen_unless_asked_and_names_models():
    model = bert()
    freeze(model, ["wte", "wpe", "wtt", "ln_emb"])
    groups = param_groups_layerwise_lr_decay(model, lr=1.0, decay=0.8, weight_decay=0.0)
    names = [n for g in groups for n in g["names"]]
    assert "wte.weight" not in names and len(names) == len(set(names))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    lr_of = {n: g["lr"] for g in groups for n in g["names"]}
    assert lr_of["blocks.1.attn.q_proj.weight"] == pytest.approx(0.8)
    assert lr_of["blocks.0.attn.q_proj.weight"] == pytest.approx(0.64)
    assert lr_of["pooler.weight"] == lr_of["head.weight"] == pytest.approx(1.0)
    every = param_groups_layerwise_lr_decay(model, lr=1.0, decay=0.8, include_frozen=True)
    assert {n: g["lr"] for g in every for n in g["names"]}["wte.weight"] == pytest.approx(0.8 ** 3)
    # GPT: tied lm_head is the wte tensor, counted once with the embeddings
    g = param_groups_layerwise_lr_decay(gpt(), lr=1.0, decay=0.5)
    lr_of = {n: grp["lr"] for grp in g for n in grp["names"]}
    assert lr_of["wte.weight"] == pytest.approx(0.125) and lr_of["ln_f.weight"] == 1.0 and "lm_head.weight" not in lr_of


def test_efficientnet_stages_are_the_layer_groups():
    model = effnet()
    groups = layer_groups(model)
    assert len(groups) == 7 + 2  # stem, 7 stages, head
    assert groups[0] == ["conv_stem.weight", "bn1.weight", "bn1.bias"]
    assert all(n.startswith("blocks.6.") for n in groups[7])
    assert groups[-1] == ["conv_head.weight", "bn2.weight", "bn2.bias", "classifier.weight", "classifier.bias"]
    with pytest.raises(ConfigError, match="no 'blocks'"):
        layer_groups(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("make,head", [
    (vit, ["head.weight", "head.bias"]),
    (bert, ["head.weight", "head.bias"]),
    (effnet, ["classifier.weight", "classifier.bias"]),
])
def test_linear_probe_leaves_only_head(make, head):
    model = make()
    assert head_parameter_names(model) == head
    assert linear_probe(model) == head
    assert [n for n, p in model.named_parameters() if p.requires_grad] == head


def test_linear_probe_tied_gpt_head():
    model = gpt()
    assert linear_probe(model) == ["lm_head.weight"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["wte.weight"]  # the same tensor


def test_freeze_unfreeze_patterns():
    model = vit()
    assert all(n.startswith("blocks.0.") for n in freeze(model, "blocks.0"))
    assert not any(p.requires_grad for p in model.blocks[0].parameters())
    assert all(p.requires_grad for p in model.blocks[1].parameters())
    freeze(model, "*")
    assert unfreeze(model, ["blocks.*.attn.q_proj.*", "head"]) == [
        "blocks.0.attn.q_proj.weight", "blocks.0.attn.q_proj.bias", "blocks.1.attn.q_proj.weight",
        "blocks.1.attn.q_proj.bias", "blocks.2.attn.q_proj.weight", "blocks.2.attn.q_proj.bias",
        "head.weight", "head.bias"]
    with pytest.raises(ConfigError, match="'encoder' matches no parameter"):
        freeze(model, "encoder")


def trainable_groups(model):
    return [i for i, g in enumerate(layer_groups(model)) if any(dict(model.named_parameters())[n].requires_grad
                                                                for n in g)]


def run_epochs(cb, trainer, epochs):
    cb.on_fit_start(trainer)
    seen = [trainable_groups(trainer.model)]
    for _ in range(epochs):
        trainer.epoch += 1
        cb.on_epoch_end(trainer, {})
        seen.append(trainable_groups(trainer.model))
    return seen


def test_gradual_unfreezing_order_with_full_optimizer():
    model = vit()  # groups 0 (embed), 1..3 (blocks), 4 (norm + head)
    opt = torch.optim.AdamW(param_groups_layerwise_lr_decay(model, 1e-3, 0.5, 0.0, include_frozen=True))
    trainer = SimpleNamespace(model=model, optimizer=opt, epoch=0)
    cb = GradualUnfreezing(every_n_epochs=2)
    seen = run_epochs(cb, trainer, 9)
    assert seen == [[4], [4], [3, 4], [3, 4], [2, 3, 4], [2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [0, 1, 2, 3, 4],
                    [0, 1, 2, 3, 4]]
    assert len(opt.param_groups) == len(param_groups_layerwise_lr_decay(model, 1e-3, 0.5, 0.0))  # nothing added
    assert [e for e, _ in cb.history] == [2, 4, 6, 8]
    assert all(n.startswith("blocks.2.") for n in cb.history[0][1])
    assert cb.state_dict() == {"unfrozen": 5}


def test_gradual_unfreezing_frozen_params_do_not_move_and_late_params_join_optimizer():
    model = vit()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    cb = GradualUnfreezing(every_n_epochs=1)
    cb.apply(model)  # only the top group trainable; optimizer built over the trainable params alone
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    trainer = SimpleNamespace(model=model, optimizer=opt, epoch=0)
    cb.on_fit_start(trainer)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    trainer.epoch = 1
    cb.on_epoch_end(trainer, {})
    assert len(opt.param_groups) == 2  # blocks.2 added as a new group
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held for p in model.parameters() if p.requires_grad)
    before = model.blocks[2].attn.q_proj.weight.clone()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(model.blocks[2].attn.q_proj.weight, before)
    assert torch.equal(model.blocks[1].attn.q_proj.weight, frozen["blocks.1.attn.q_proj.weight"])
