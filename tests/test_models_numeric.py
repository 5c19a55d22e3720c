"""Hand-computed and parity numbers for the first model families, activations and init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.errors import ModelError
from lamina.models import create_model
from lamina.models.resnet import PadShortcut
from lamina.nn import ACTIVATIONS, get_activation, init_weights


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- parameter counts -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, expected",
    [  # torchvision.models.resnet{18,34,50}(num_classes=1000) report exactly these numbers
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
    ],
)
def test_imagenet_resnet_param_counts_match_torchvision(name, expected):
    assert n_params(create_model(name, num_classes=1000, in_chans=3)) == expected


def test_cifar_resnet_param_counts_match_the_paper():
    # resnet20, option-A (parameter-free) shortcuts, 10 classes, 3 input channels:
    #   stem  conv 3->16 (432) + BN (32)                                   =     464
    #   stage1 3 blocks x 2 x (conv 16->16 2,304 + BN 32)                 =  14,016
    #   stage2 (4,608 + 64) + (9,216 + 64) + 2 blocks x 2 x (9,216 + 64)  =  51,072
    #   stage3 (18,432 + 128) + (36,864 + 128) + 2 x 2 x (36,864 + 128)   = 203,520
    #   fc 64 x 10 + 10                                                    =     650
    # total 269,722 = the paper's "0.27M" (He et al. 2015, Table 6); 0.46M and 0.85M for 32 and 56 layers.
    assert n_params(create_model("resnet20")) == 269_722
    assert n_params(create_model("resnet32")) == 464_154
    assert n_params(create_model("resnet56")) == 853_018
    # option B adds the two 1x1 projection convs + BNs: 16*32 + 64 + 32*64 + 128
    assert n_params(create_model("resnet20", shortcut="B")) == 269_722 + 512 + 64 + 2048 + 128


def test_lenet5_classic_param_count_and_sizes():
    # conv1 6*(1*25+1)=156, conv2 16*(6*25+1)=2,416, fc 400*120+120=48,120, 120*84+84=10,164, 84*10+10=850
    model = create_model("lenet5", num_classes=10, in_chans=1)
    assert n_params(model) == 61_706
    model.eval()
    for side in (8, 28, 32):
        assert model(torch.randn(2, 1, side, side)).shape == (2, 10)
        assert model.forward_features(torch.randn(2, 1, side, side)).shape == (2, 16, 5, 5)


def test_lenet5_pads_small_inputs_to_28():
    torch.manual_seed(0)
    model = create_model("lenet5").eval()
    x = torch.randn(2, 1, 8, 8)
    padded = F.pad(x, (10, 10, 10, 10))  # centred in a 28x28 frame
    torch.testing.assert_close(model(x), model(padded))


# --- MLP, hand-computed ----------------------------------------------------------------------------------

def test_mlp_hand_computed_output():
    model = create_model("mlp", in_features=2, depth=1, width=2, num_classes=1, activation="relu", dropout=0.0)
    block = model.blocks[0]
    with torch.no_grad():
        block.fc.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 0.5]]))
        block.fc.bias.copy_(torch.tensor([0.0, -1.0]))
        model.head.weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.head.bias.copy_(torch.tensor([0.5]))
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    # row 1: h = [1-2, 2+1-1] = [-1, 2] -> relu [0, 2] -> 0 - 4 + 0.5 = -3.5
    # row 2: h = [3+1, 6-0.5-1] = [4, 4.5] -> relu same -> 4 - 9 + 0.5 = -4.5
    torch.testing.assert_close(model(x), torch.tensor([[-3.5], [-4.5]]))
    torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                               torch.tensor([[0.0, 2.0], [4.0, 4.5]]))


def test_mlp_residual_hand_computed_output():
    # residual, norm none, identity activation: h0 = P x; h1 = h0 + W h0 + b; out = head(h1)
    model = create_model("mlp", in_features=1, depth=1, width=2, num_classes=1, residual=True,
                         activation="identity", dropout=0.0)
    with torch.no_grad():
        model.proj.weight.copy_(torch.tensor([[1.0], [2.0]]))
        model.proj.bias.zero_()
        model.blocks[0].fc.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        model.blocks[0].fc.bias.copy_(torch.tensor([1.0, 0.0]))
        model.head.weight.copy_(torch.tensor([[1.0, 1.0]]))
        model.head.bias.zero_()
    # x = 3: h0 = [3, 6]; W h0 + b = [7, 3]; h1 = [10, 9]; out = 19
    torch.testing.assert_close(model(torch.tensor([[3.0]])), torch.tensor([[19.0]]))


def test_mlp_categorical_embeddings_are_concatenated():
    torch.manual_seed(0)
    model = create_model("mlp", in_features=3, depth=1, width=4, num_classes=2, dropout=0.0,
                         cat_cardinalities=(5, 2), cat_embed_dim=3).eval()
    assert model.blocks[0].fc.in_features == 3 + 2 * 3
    x, x_cat = torch.randn(4, 3), torch.tensor([[0, 1], [4, 0], [2, 1], [3, 0]])
    manual = torch.cat([x, model.embeds[0](x_cat[:, 0]), model.embeds[1](x_cat[:, 1])], dim=1)
    expected = model.head(model.blocks(manual))
    torch.testing.assert_close(model(x, x_cat), expected)
    with pytest.raises(Exception, match=r"expects x_cat of shape \(B, 2\)"):
        model(x)


def test_mlp_flattens_images():
    torch.manual_seed(0)
    model = create_model("mlp", in_features=64, dropout=0.0).eval()
    img = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(model(img), model(img.flatten(1)))


# --- ResNet details --------------------------------------------------------------------------------------

def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    y = PadShortcut(2, 6, stride=2)(x)  # 2 -> 6 channels: 2 zero channels each side
    assert y.shape == (1, 6, 2, 2)
    torch.testing.assert_close(y[:, 2:4], x[:, :, ::2, ::2])
    assert y[:, :2].abs().sum() == 0 and y[:, 4:].abs().sum() == 0


def test_zero_init_residual_makes_blocks_start_as_identity_branches():
    model = create_model("resnet20")
    assert all(blk.bn2.weight.abs().sum() == 0 for stage in model.stages for blk in stage)
    model = create_model("resnet50", zero_init_residual=False)
    assert all(blk.bn3.weight.abs().sum() > 0 for stage in model.stages for blk in stage)
    # with zero-init, an identity block maps x to relu(x): check the second block of resnet20's first stage
    model = create_model("resnet20").eval()
    blk = model.stages[0][1]
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(blk(x), torch.relu(x))


def test_small_input_stem_keeps_resolution():
    x = torch.randn(2, 1, 32, 32)
    assert create_model("resnet18", in_chans=1).forward_features(x).shape == (2, 512, 1, 1)
    assert create_model("resnet18", in_chans=1, small_input=True).forward_features(x).shape == (2, 512, 4, 4)


# --- init ------------------------------------------------------------------------------------------------

def test_he_init_std_for_linear_and_conv():
    torch.manual_seed(0)
    lin = init_weights(nn.Linear(1000, 1000), "relu")
    assert abs(lin.weight.std().item() / math.sqrt(2 / 1000) - 1) < 0.05  # fan_in = 1000
    assert lin.bias.abs().sum() == 0
    conv = init_weights(nn.Conv2d(64, 128, 3), "relu")
    assert abs(conv.weight.std().item() / math.sqrt(2 / (128 * 9)) - 1) < 0.05  # fan_out = 128 * 3 * 3
    gelu = init_weights(nn.Linear(1000, 1000), "gelu")
    assert abs(gelu.weight.std().item() / math.sqrt(2 / 1000) - 1) < 0.05


def test_xavier_init_std_for_tanh_and_sigmoid():
    torch.manual_seed(0)
    lin = init_weights(nn.Linear(1000, 500), "tanh")
    expected = (5 / 3) * math.sqrt(2 / (1000 + 500))  # gain * sqrt(2 / (fan_in + fan_out))
    assert abs(lin.weight.std().item() / expected - 1) < 0.05
    lin = init_weights(nn.Linear(1000, 500), "sigmoid")
    assert abs(lin.weight.std().item() / math.sqrt(2 / 1500) - 1) < 0.05


def test_init_norm_layers_and_unknown_name():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.fill_(3.0), bn.bias.fill_(2.0)
    init_weights(nn.Sequential(bn), "relu")
    assert torch.equal(bn.weight, torch.ones(4)) and torch.equal(bn.bias, torch.zeros(4))
    with pytest.raises(ModelError, match="unknown nonlinearity for init 'rleu'"):
        init_weights(nn.Linear(2, 2), "rleu")


# --- activations -----------------------------------------------------------------------------------------

REFERENCE = {
    "relu": F.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    # tanh approximation, written out: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "relu6": lambda x: x.clamp(0, 6),
    "silu": F.silu,
    "elu": F.elu,
    "identity": lambda x: x,
}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_names_map_to_torch_functions(name):
    x = torch.linspace(-3, 3, 13)
    torch.testing.assert_close(get_activation(name)(x), REFERENCE[name](x))


def test_activation_values_and_errors():
    assert set(ACTIVATIONS) == set(REFERENCE)
    assert get_activation("relu") is not get_activation("relu")  # fresh module each call
    torch.testing.assert_close(get_activation("leaky_relu")(torch.tensor([-2.0])), torch.tensor([-0.02]))
    with pytest.raises(ModelError, match=r"unknown activation 'gleu' \(did you mean 'gelu'\?\); valid: elu, gelu, gelu_tanh"):
        get_activation("gleu")
