"""Explanations: hand-computed IG / occlusion / Grad-CAM / rollout cases, parity with plain autograd, IG completeness,
the model-randomization sanity check on a trained digits CNN, token attributions, and explain_run on real runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import needs_shared, scramble
from lamina.errors import ConfigError, DataError, InputShapeError, ModelError
from lamina.models import create_model
from lamina.trust.explain import (
    METHODS,
    attention_rollout,
    attribute,
    completeness_delta,
    explain_run,
    randomization_check,
    randomize_weights,
    render_tokens_html,
    rollout_matrix,
    token_attributions,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # conftest's fixture restores the count after each test


# ----- a trained CNN (digits, ~2 s) ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_cnn():
    from lamina.data import load_dataset

    torch.manual_seed(0)
    b = load_dataset("digits", seed=0)
    x, y = b.train.x, b.train.y
    model = create_model("small_cnn", num_classes=10, in_chans=1, channels=(16, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(b.test.x).argmax(1) == b.test.y).float().mean().item()
    assert acc > 0.9, acc  # a trained model: the randomization test compares against something learned
    return model, b.test.x[:8], b.test.y[:8]


# ----- Integrated Gradients --------------------------------------------------------------------------------------
def test_ig_linear_model_is_exact():
    # f(x) = W x + b: the gradient is constant, so IG = (x - x0) * W[t] exactly, for any baseline and step count
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    x, x0 = torch.randn(4, 6), torch.randn(4, 6)
    t = torch.tensor([0, 2, 1, 2])
    for baseline, ref in ((None, x * lin.weight[t]), (x0, (x - x0) * lin.weight[t])):
        a = attribute(lin, x, t, "integrated_gradients", baseline=baseline, n_steps=8)
        torch.testing.assert_close(a, ref.detach(), atol=1e-5, rtol=1e-5)
        assert completeness_delta(lin, x, a, t, baseline).abs().max() < 1e-5


def test_ig_completeness_trained_cnn(trained_cnn):
    model, x, _ = trained_cnn
    a = attribute(model, x, None, "integrated_gradients", n_steps=128)
    assert a.shape == x.shape
    with torch.no_grad():
        t = model(x).argmax(1)
        diff = (model(x) - model(torch.zeros_like(x))).gather(1, t[:, None])[:, 0]
    total = a.reshape(len(x), -1).sum(1)
    # completeness (Sundararajan et al. 2017, prop. 1): sum of attributions = f_t(x) - f_t(0), here within 1%
    assert ((total - diff).abs() <= 1e-2 * diff.abs()).all(), (total, diff)
    torch.testing.assert_close(completeness_delta(model, x, a, t), total - diff, atol=1e-5, rtol=0)


# ----- saliency, SmoothGrad --------------------------------------------------------------------------------------
def test_saliency_equals_autograd(trained_cnn):
    model, x, _ = trained_cnn
    t = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xr).gather(1, t[:, None]).sum(), xr)
    torch.testing.assert_close(attribute(model, x, t, "saliency", abs=False), grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attribute(model, x, t, "saliency"), grad.abs(), atol=1e-6, rtol=1e-5)


def test_smoothgrad_zero_noise_is_saliency_and_seeded(trained_cnn):
    model, x, _ = trained_cnn
    sg0 = attribute(model, x, 2, "smoothgrad", noise=0.0, n_samples=3)
    torch.testing.assert_close(sg0, attribute(model, x, 2, "saliency"), atol=1e-6, rtol=1e-5)
    state = torch.get_rng_state()
    a, b = (attribute(model, x, 2, "smoothgrad", n_samples=8) for _ in range(2))
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())  # seeded, global RNG left alone
    assert not torch.allclose(a, sg0)


# ----- Grad-CAM --------------------------------------------------------------------------------------------------
class TwoBlobs(nn.Module):
    """Conv 2 -> 2 channels, 2x2 stride 2 average per channel (a 4x4 map), class c = mean of channel c."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 2, stride=2, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 0.25
            self.conv.weight[1, 1] = 0.25

    def forward(self, x):
        return self.conv(x).mean((2, 3))  # (B, 2)


def test_gradcam_highlights_the_driving_region():
    x = torch.zeros(1, 2, 8, 8)
    x[0, 0, :4, :4] = 1.0  # channel 0 (drives class 0) is lit top-left
    x[0, 1, 4:, 4:] = 1.0  # channel 1 (drives class 1) bottom-right
    model = TwoBlobs()
    for cls, (rows, cols) in ((0, (slice(0, 4), slice(0, 4))), (1, (slice(4, 8), slice(4, 8)))):
        cam = attribute(model, x, cls, "gradcam")
        assert cam.shape == x.shape and (cam >= 0).all()
        m = cam[0, 0]
        assert torch.equal(cam[0, 0], cam[0, 1])  # one map, repeated over the channels
        assert m[rows, cols].sum() > 0.85 * m.sum()
        r, c = divmod(int(m.argmax()), 8)
        assert rows.start <= r < rows.stop and cols.start <= c < cols.stop
    # grad-cam by hand at the conv output: alpha_k = mean(d y_0 / d A_k) = (1/16, 0) -> ReLU(A_0 / 16)
    A = model.conv(x)[0, 0].detach()
    ref = F.interpolate((A / 16).relu()[None, None], size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(attribute(model, x, 0, "gradcam")[0, 0], ref)


def test_gradcam_picks_last_conv_and_layer_by_name(trained_cnn):
    model, x, _ = trained_cnn
    default = attribute(model, x, None, "gradcam")
    torch.testing.assert_close(default, attribute(model, x, None, "gradcam", layer="stages.1.0.0"))
    first = attribute(model, x, None, "gradcam", layer="stages.0.0.0")
    assert first.shape == default.shape and not torch.allclose(first, default)
    with pytest.raises(ConfigError, match="unknown layer 'stages.9'.*valid: stages.0.0.0, stages.1.0.0"):
        attribute(model, x, None, "gradcam", layer="stages.9")
    with pytest.raises(ModelError, match="gradcam needs a model with an nn.Conv2d layer"):
        attribute(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), x, 0, "gradcam")


# ----- occlusion -------------------------------------------------------------------------------------------------
class PatchSum(nn.Module):
    """logit 0 = sum of the 2x2 patch at rows 2:4, cols 4:6; logit 1 = 0."""

    def forward(self, x):
        s = x[:, :, 2:4, 4:6].sum((1, 2, 3))
        return torch.stack([s, torch.zeros_like(s)], 1)


def test_occlusion_hand_computed():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8) + 0.5
    patch = (slice(None), slice(None), slice(2, 4), slice(4, 6))
    # 1x1 windows: occluding a pixel of the patch drops the logit by that pixel; elsewhere nothing
    ref = torch.zeros_like(x)
    ref[patch] = x[patch]
    torch.testing.assert_close(attribute(PatchSum(), x, 0, "occlusion", window=1, stride=1), ref)
    # 2x2 windows, stride 2: one window covers the patch exactly; its pixels get the whole patch sum
    ref = torch.zeros_like(x)
    ref[patch] = x[patch].sum((1, 2, 3))[:, None, None, None].expand(-1, 1, 2, 2)
    torch.testing.assert_close(attribute(PatchSum(), x, 0, "occlusion", window=2, stride=2), ref)


# ----- model-randomization sanity check (Adebayo et al. 2018) --------------------------------------------------
def test_randomization_check_trained_cnn(trained_cnn):
    model, x, _ = trained_cnn
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("saliency", "integrated_gradients", "gradcam"):
        r = randomization_check(model, x, None, method)
        assert r["params_randomized"] == 1.0
        assert abs(r["spearman"]) < 0.5, (method, r)  # a sane method: attributions change with the weights
        # a randomized net's Grad-CAM can be all zero (ReLU of a negative sum): no ranking, left out of the mean
        assert r["n_undefined"] <= (2 if method == "gradcam" else 0), (method, r)
        assert len(r["per_example"]) == len(x)
        json.dumps(r)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched


def test_randomization_really_reinitializes():
    # For a linear model saliency (abs=False) is the weight row itself: without re-initialization the rank
    # correlation would be exactly 1.
    torch.manual_seed(1)
    lin = nn.Linear(64, 3)
    x = torch.rand(4, 64)
    assert randomization_check(lin, x, 1, "saliency", abs=False, mode="full")["spearman"] < 0.5
    same = attribute(lin, x, 1, "saliency", abs=False)
    assert torch.equal(same[0], lin.weight[1].detach())
    rand = randomize_weights(lin, seed=3)
    assert all(not torch.equal(p, q) for p, q in zip(lin.parameters(), rand.parameters()))
    assert all(not torch.allclose(p, q) for p, q in zip(randomize_weights(lin, seed=4).parameters(),
                                                        rand.parameters()))  # the seed matters


def test_randomize_weights_covers_bn_and_raw_parameters(trained_cnn):
    model, x, _ = trained_cnn
    rand = randomize_weights(model)
    for (name, p), q in zip(model.named_parameters(), rand.parameters()):
        assert not torch.allclose(p, q), name
    assert not torch.allclose(model(x), rand(x))
    vit = create_model("vit_tiny", img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=16, depth=1,
                       n_head=2)
    rv = randomize_weights(vit)  # pos_embed and cls_token have no reset_parameters: re-drawn by hand
    assert not torch.equal(rv.pos_embed, vit.pos_embed) and not torch.equal(rv.cls_token, vit.cls_token)


def test_randomization_cascading(trained_cnn):
    model, x, _ = trained_cnn
    r = randomization_check(model, x[:4], None, "saliency", mode="cascading")
    layers = [c["randomized_through"] for c in r["cascade"]]
    assert layers[0] == "head" and layers[-1] == "stages.0.0.0" and len(layers) == 5  # head, BN, conv, BN, conv
    assert r["params_randomized"] == 1.0 and r["spearman"] == r["cascade"][-1]["spearman"]


# ----- attention rollout -----------------------------------------------------------------------------------------
def tiny_vit(**kw):
    cfg = dict(img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=32, depth=2, n_head=4)
    m = create_model("vit_tiny", **{**cfg, **kw})
    scramble(m)
    return m.eval()


def test_rollout_hand_computed():
    # uniform attention over 2 tokens: 0.5 A + 0.5 I = [[.75, .25], [.25, .75]]; two blocks: its square
    maps = [torch.full((1, 3, 2, 2), 0.5)] * 2
    R = rollout_matrix(maps)
    torch.testing.assert_close(R[0], torch.tensor([[0.625, 0.375], [0.375, 0.625]]))
    torch.testing.assert_close(rollout_matrix(maps, residual=False)[0], torch.full((2, 2), 0.5))
    # heads are averaged before the residual: head 0 attends to token 0, head 1 to token 1 -> A = 0.5 everywhere
    heads = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])[None]
    torch.testing.assert_close(rollout_matrix([heads])[0], torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    # max over heads: A = 1 everywhere -> 0.5 A + 0.5 I = [[1, .5], [.5, 1]], rows renormalized
    torch.testing.assert_close(rollout_matrix([heads], head_fusion="max")[0], torch.tensor([[2, 1], [1, 2]]) / 3)
    with pytest.raises(ConfigError, match="head_fusion"):
        rollout_matrix(maps, head_fusion="median")


def test_rollout_matches_explicit_softmax_qk_on_vit():
    model = tiny_vit()
    x = torch.randn(2, 1, 8, 8)
    h_in = []
    hooks = [blk.ln_1.register_forward_hook(lambda m, i, o: h_in.append(o.detach())) for blk in model.blocks]
    with torch.no_grad():
        plain = model(x)
        logits, maps = model(x, return_attention=True)
    for hk in hooks:
        hk.remove()
    torch.testing.assert_close(plain, logits, atol=1e-5, rtol=1e-5)  # explicit path = SDPA path
    ref_maps = []
    for blk, h in zip(model.blocks, h_in[:2]):  # the first forward's ln_1 outputs
        a = blk.attn
        B, T, _ = h.shape
        q = a.q_proj(h).view(B, T, a.n_head, -1).transpose(1, 2)
        k = a.k_proj(h).view(B, T, a.n_head, -1).transpose(1, 2)
        ref_maps.append(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1).detach())
    for m, r in zip(maps, ref_maps):
        torch.testing.assert_close(m, r, atol=1e-5, rtol=1e-4)
    # rollout by hand in numpy, float64
    R = np.eye(17)[None].repeat(2, 0)
    for m in ref_maps:
        a = 0.5 * m.double().numpy().mean(1) + 0.5 * np.eye(17)
        R = (a / a.sum(-1, keepdims=True)) @ R
    roll = attention_rollout(model, x)
    assert roll.shape == (2, 4, 4)
    np.testing.assert_allclose(roll.reshape(2, 16).numpy(), R[:, 0, 1:], atol=1e-5)
    full = rollout_matrix(maps)
    torch.testing.assert_close(full.sum(-1), torch.ones(2, 17))  # rows of R sum to 1
    assert roll.sum((1, 2)).max() < 1.0  # the cls column is left out
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain)  # nothing left hooked


def test_rollout_mean_pooling_and_errors():
    model = tiny_vit(pool="mean")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        R = rollout_matrix(model.attention_maps(x))  # (3, 16, 16): no cls token
    roll = attention_rollout(model, x)
    torch.testing.assert_close(roll.reshape(3, 16), R.mean(1))  # the head reads the mean of the patch tokens
    torch.testing.assert_close(roll.sum((1, 2)), torch.ones(3))
    assert attention_rollout(model, x, grid=False).shape == (3, 16)
    with pytest.raises(ModelError, match="attention_rollout needs a model with attention maps"):
        attention_rollout(create_model("small_cnn"), torch.rand(1, 1, 8, 8))


# ----- token attributions ----------------------------------------------------------------------------------------
def test_token_attributions_bert_padding_and_completeness():
    torch.manual_seed(0)
    model = create_model("bert_mini", vocab_size=40, block_size=16, num_classes=3, n_layer=2, n_head=2, n_embd=32,
                         ffn_hidden=64, dropout=0.1)
    scramble(model)
    with torch.no_grad():
        model.wte.weight[0].zero_()  # pad row stays the zero vector
    ids = torch.randint(1, 40, (3, 10))
    lengths = torch.tensor([10, 7, 4])
    mask = torch.arange(10)[None] < lengths[:, None]
    ids = ids.masked_fill(~mask, 0)
    scores, delta = token_attributions(model, ids, mask, target=1, n_steps=128, return_delta=True)
    assert scores.shape == (3, 10) and torch.isfinite(scores).all()
    assert (scores[~mask] == 0).all() and (scores[mask] != 0).all()
    model.eval()
    with torch.no_grad():
        f1 = model(ids, attention_mask=mask)[:, 1]
        f0 = model(torch.zeros_like(ids), attention_mask=mask)[:, 1]
    torch.testing.assert_close(scores.sum(1) - (f1 - f0), delta)
    assert ((scores.sum(1) - (f1 - f0)).abs() <= 1e-2 * (f1 - f0).abs() + 1e-4).all(), (scores.sum(1), f1 - f0)
    kept = token_attributions(model, ids, mask, target=1, n_steps=16, keep_ids=(int(ids[0, 0]),))
    assert (kept[ids == ids[0, 0]] == 0).all() and (kept[0, 1:] != 0).all()  # e.g. <s> kept in the baseline
    assert model.training is False  # was put in eval above; token_attributions restores whatever it found
    model.train()
    token_attributions(model, ids, mask, target=1, n_steps=4)
    assert model.training


def test_token_attributions_lstm_lengths_and_html():
    model = create_model("lstm_classifier", vocab_size=30, num_classes=2)
    ids = torch.randint(1, 30, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]).bool()
    s = token_attributions(model, ids.masked_fill(~mask, 0), mask, n_steps=16)
    assert s.shape == (2, 6) and (s[1, 3:] == 0).all()
    page = render_tokens_html(["<s>", "a&b", "</s>"], [0.5, -1.0, 0.0])
    assert "a&amp;b" in page and "rgba(40,90,220,1.00)" in page and "&lt;s&gt;" in page


# ----- errors ----------------------------------------------------------------------------------------------------
def test_errors_are_one_line(trained_cnn):
    model, x, _ = trained_cnn
    with pytest.raises(ConfigError, match="unknown explain method 'gradcan'.*did you mean 'gradcam'.*valid: "
                                          "gradcam, integrated_gradients, occlusion, saliency, smoothgrad"):
        attribute(model, x, 0, "gradcan")
    with pytest.raises(ConfigError, match="integrated_gradients: unknown option 'steps'; valid: baseline"):
        attribute(model, x, 0, "integrated_gradients", steps=3)
    with pytest.raises(InputShapeError, match="x: expected a float tensor"):
        attribute(model, x.long(), 0, "saliency")
    with pytest.raises(DataError, match=r"target: class ids must be in \[0, 9\]"):
        attribute(model, x, 10, "saliency")
    with pytest.raises(InputShapeError, match="target: expected one class id or 8"):
        attribute(model, x, [1, 2], "saliency")
    assert set(METHODS) == {"saliency", "integrated_gradients", "smoothgrad", "gradcam", "occlusion"}


# ----- explain_run on trained runs ----------------------------------------------------------------------------
def _train(tmp_path, *overrides):
    from lamina.config import load_config
    from lamina.runs import train

    cfg = load_config(None, ["logging.tensorboard=false", "logging.plots=false", "trainer.progress=false",
                             "trainer.max_epochs=1", "trainer.threads=1", f"logging.root={tmp_path}", *overrides])
    return train(cfg).run_dir


def test_explain_run_digits(tmp_path, digits_run):
    from conftest import copy_run
    from lamina.data.transforms import eval_transforms
    from lamina.runs import open_run
    from lamina.trust.explain import PixelSpaceModel

    # the shared digits run (conftest: small_cnn behind a normalize augment), copied: explain_run writes into it
    run = copy_run(digits_run, tmp_path / "digits")
    out = explain_run(run, "integrated_gradients", n=8)
    assert (run / "explain" / "integrated_gradients.png").stat().st_size > 5000
    z = np.load(run / "explain" / "integrated_gradients.npz")
    assert z["attributions"].shape == z["x"].shape == (8, 1, 8, 8)
    assert float(z["x"].min()) >= 0.0 and float(z["x"].max()) <= 1.0  # pixel space, not normalized
    assert len(out["examples"]) == 8 and all(e["target"] == e["pred"] for e in out["examples"])
    assert [e["label"] for e in out["examples"]] == z["label"].tolist()
    # attributions are in pixel space: the model behind them is normalize -> CNN, and completeness holds for it,
    # sum attr = f(x) - f(black image)
    opened = open_run(run)
    cfg, model = opened.cfg, opened.model
    pm = PixelSpaceModel(model.eval(), eval_transforms(cfg.data.augment))
    x, t = torch.from_numpy(z["x"]), torch.from_numpy(z["target"]).long()
    with torch.no_grad():
        assert torch.equal(pm(x).argmax(1), t)
        diff = (pm(x) - pm(torch.zeros_like(x))).gather(1, t[:, None])[:, 0].numpy()
    np.testing.assert_allclose(z["attributions"].reshape(8, -1).sum(1) - z["completeness_delta"], diff, atol=1e-4)
    assert out["ig_completeness"]["mean_rel_delta"] < 1e-2 and np.abs(z["completeness_delta"]).max() < 0.05
    assert json.loads((run / "explain" / "integrated_gradients.json").read_text())["n"] == 8
    g = explain_run(run, "gradcam", n=3, out=tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / "gradcam.png").is_file() and g["n"] == 3
    with pytest.raises(ConfigError, match="unknown explain method 'lime'"):
        explain_run(run, "lime")
    with pytest.raises(DataError, match="no nope split"):
        explain_run(run, "saliency", split="nope")


def test_explain_run_vit_rollout(tmp_path):
    run = _train(tmp_path, "model.name=vit_tiny", "model.img_size=8", "model.patch_size=2", "model.embed_dim=16",
                 "model.depth=1", "model.n_head=2")
    out = explain_run(run, "attention_rollout", n=4)
    z = np.load(out["npz"])
    assert z["rollout"].shape == (4, 4, 4) and z["attributions"].shape == (4, 1, 8, 8)
    assert (z["rollout"] > 0).all()


@needs_shared("tinyshakespeare")
def test_explain_run_text(tmp_path):
    run = _train(tmp_path, "data.name=shakespeare_speakers", "data.top_k=3", "data.tokenizer_kind=char",
                 "data.max_len=48", "data.batch_size=32", "model.name=bert_mini", "model.n_layer=1",
                 "model.n_embd=32", "model.n_head=2", "model.ffn_hidden=64")
    out = explain_run(run, n=3)
    z = np.load(out["npz"])
    T = int(z["lengths"].max())
    assert z["attributions"].shape == (3, T)
    for row, L in zip(z["attributions"], z["lengths"]):
        assert (row[L:] == 0).all()
    assert out["ig_completeness"]["max_abs_delta"] < 1e-2
    assert "<span" in (run / "explain" / "integrated_gradients.html").read_text()
    assert (run / "explain" / "integrated_gradients.png").is_file()
    with pytest.raises(ConfigError, match="for text"):
        explain_run(run, "gradcam")


def test_explain_run_tabular(tmp_path):
    run = _train(tmp_path, "data.name=wine", "model.name=mlp")
    out = explain_run(run, "integrated_gradients", n=4)
    z = np.load(out["npz"])
    assert z["attributions"].shape == (4, 13) and out["ig_completeness"]["mean_rel_delta"] < 1e-2
    assert (run / "explain" / "integrated_gradients.png").is_file()
    with pytest.raises(ConfigError, match="for feature-vector runs"):
        explain_run(run, "gradcam")
