"""Vision Transformer: parameter parity with timm, attention maps, pooling, position grids, PatchEmbed, DropPath."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.errors import InputShapeError, ModelError
from lamina.models import create_model
from lamina.nn import DropPath, PatchEmbed, drop_path


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(**kw):
    """A 2-block, 32-wide ViT on 8x8 grayscale with 2 px patches (16 tokens): fast, and every path is real."""
    cfg = dict(img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=32, depth=2, n_head=4)
    return create_model("vit_tiny", **{**cfg, **kw})


# --- parameter counts ---------------------------------------------------------------------------------------

def test_vit_tiny_param_count_matches_timm():
    # timm.create_model("vit_tiny_patch16_224").num_params: patch conv 3*16*16*192 + 192 = 147,648; cls 192;
    # pos 197*192 = 37,824; 12 blocks x 444,864 (2 LN 768, q/k/v/out 4*(192*192+192) = 148,224,
    # MLP 192*768+768 + 768*192+192 = 295,872); final LN 384; head 192*1000 + 1000 = 193,000.
    assert n_params(create_model("vit_tiny")) == 5_717_416
    assert n_params(create_model("vit_small")) == 22_050_664  # timm vit_small_patch16_224


def test_mean_pool_has_no_cls_token():
    cls, mean = tiny(pool="cls"), tiny(pool="mean")
    assert n_params(cls) - n_params(mean) == 32 + 32  # the cls token and its position embedding
    assert cls.num_prefix_tokens == 1 and mean.num_prefix_tokens == 0 and mean.cls_token is None


# --- attention maps -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool, tokens", [("cls", 17), ("mean", 16)])
def test_attention_maps_shape_rows_sum_to_one_and_same_logits(pool, tokens):
    torch.manual_seed(0)
    model = tiny(pool=pool).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        logits, maps = model(x, return_attention=True)
        torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)  # explicit path == SDPA path
        assert len(maps) == 2 and len(model.attention_maps(x)) == 2
    for att in maps:
        assert att.shape == (3, 4, tokens, tokens)
        assert (att >= 0).all()
        torch.testing.assert_close(att.sum(-1), torch.ones(3, 4, tokens))


def test_attention_map_is_softmax_of_the_blocks_own_queries_and_keys():
    torch.manual_seed(0)
    model = tiny(depth=1).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        (att,) = model.attention_maps(x)
        # rebuild block 0's input by hand: cls token, patches, position embeddings, then ln_1
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(x)], 1) + model.pos_embed
        h = model.blocks[0].ln_1(tokens)
        a = model.blocks[0].attn
        q = a.q_proj(h).view(2, 17, 4, 8).transpose(1, 2)
        k = a.k_proj(h).view(2, 17, 4, 8).transpose(1, 2)
        ref = torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, dim=-1)
    torch.testing.assert_close(att, ref)


# --- pooling and head contract ------------------------------------------------------------------------------

def test_cls_and_mean_pooling_pick_what_they_say():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    for pool in ("cls", "mean"):
        model = tiny(pool=pool).eval()
        with torch.no_grad():
            feats = model.forward_features(x)  # (B, P + N, D), normed
            pooled = model.forward_head(feats, pre_logits=True)
        want = feats[:, 0] if pool == "cls" else feats.mean(1)
        torch.testing.assert_close(pooled, want)
        assert feats.shape == (2, 16 + model.num_prefix_tokens, 32)


def test_cls_pool_output_depends_on_every_patch():
    # Through attention the cls token sees every patch: changing one patch changes the logits.
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(1, 1, 8, 8)
    y = x.clone()
    y[..., 6:, 6:] += 1.0  # the last patch only
    with torch.no_grad():
        assert not torch.allclose(model(x), model(y))


# --- position embeddings at other sizes ---------------------------------------------------------------------

def test_other_input_sizes_interpolate_the_position_grid():
    torch.manual_seed(0)
    model = tiny().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 12, 16)).shape == (2, 5)  # 6x8 grid from a 4x4 one
        pos = model._pos_embed_for((4, 4))
        assert pos is model.pos_embed  # native size: untouched
        grid = model.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
        up = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
        torch.testing.assert_close(model._pos_embed_for((8, 8))[:, 1:], up.flatten(2).transpose(1, 2))
        torch.testing.assert_close(model._pos_embed_for((8, 8))[:, :1], model.pos_embed[:, :1])  # cls kept


def test_other_input_size_without_interpolation_is_a_clear_error():
    model = tiny(interpolate_pos=False)
    with pytest.raises(InputShapeError, match=r"position embeddings for 8x8 inputs, got 12x12; .*interpolate_pos"):
        model(torch.randn(1, 1, 12, 12))


def test_input_not_a_multiple_of_the_patch_is_a_clear_error():
    model = create_model("vit_fashion")  # 4 px patches
    with pytest.raises(InputShapeError, match=r"image 30x28 is not a positive multiple of the patch size 4x4"):
        model(torch.randn(1, 1, 30, 28))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_invalid_configs_are_model_errors():
    with pytest.raises(ModelError, match="unknown vit pool 'max'"):
        create_model("vit_tiny", pool="max")
    with pytest.raises(ModelError, match="img_size \\(30\\) must be a multiple of patch_size \\(4\\)"):
        create_model("vit_fashion", img_size=30)
    with pytest.raises(ModelError, match="embed_dim \\(100\\) must be divisible by n_head \\(3\\)"):
        create_model("vit_tiny", embed_dim=100)


def test_drop_path_rises_linearly_over_the_blocks():
    model = tiny(depth=3, drop_path=0.2)
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2])


# --- PatchEmbed ---------------------------------------------------------------------------------------------

def test_patch_embed_equals_unfold_then_linear():
    torch.manual_seed(0)
    pe = PatchEmbed(in_chans=3, embed_dim=10, patch_size=4)
    x = torch.randn(2, 3, 8, 12)
    cols = F.unfold(x, kernel_size=4, stride=4).transpose(1, 2)  # (B, N, C*4*4), patches row-major
    ref = cols @ pe.proj.weight.reshape(10, -1).T + pe.proj.bias  # one shared Linear per patch
    out = pe(x)
    assert out.shape == (2, 6, 10)  # 2 x 3 patches
    torch.testing.assert_close(out, ref)
    # token order: patch (row 0, col 1) is the second token
    torch.testing.assert_close(out[:, 1], x[:, :, 0:4, 4:8].reshape(2, -1) @ pe.proj.weight.reshape(10, -1).T
                               + pe.proj.bias)


def test_patch_embed_errors():
    pe = PatchEmbed(1, 8, patch_size=7)
    with pytest.raises(InputShapeError, match=r"image 27x28 is not a positive multiple of the patch size 7x7"):
        pe(torch.randn(1, 1, 27, 28))
    with pytest.raises(InputShapeError, match=r"expects images \(B, 1, H, W\), got \(1, 3, 28, 28\)"):
        pe(torch.randn(1, 3, 28, 28))
    assert pe.grid_size(28, 14) == (4, 2)


# --- DropPath -----------------------------------------------------------------------------------------------

def test_drop_path_is_identity_in_eval_and_drops_whole_samples_in_training():
    x = torch.randn(4000, 3, 5) + 2.0
    layer = DropPath(0.25)
    assert layer.eval()(x) is x
    torch.manual_seed(0)
    y = layer.train()(x)
    kept = (y != 0).flatten(1).all(1)
    dropped = (y == 0).flatten(1).all(1)
    assert bool((kept | dropped).all())  # one draw per sample: all of a sample or none of it
    torch.testing.assert_close(y[kept], x[kept] / 0.75)  # survivors rescaled by 1 / (1 - p)
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    assert drop_path(x, 0.0, training=True) is x
    with pytest.raises(ModelError, match="drop_path"):
        DropPath(1.0)
