"""lamina.hub.timm: timm / torchvision ResNet and ViT weights, parity against timm itself.

Reference: timm (1.0.31) models built with timm.create_model(name, pretrained=False), every tensor randomised
(BN statistics too), saved as a torch state dict or with timm's own save_for_hf (config.json +
model.safetensors), loaded into lamina and compared on random images in fp32 eval mode to 1e-5.

timm imports torchvision at module level (timm/layers/create_norm.py, norm_act.py: FrozenBatchNorm2d; timm.data:
transforms) and PyPI's torchvision does not import beside this CPU torch (its torch-2.13 build links
libc10_cuda.so). `timm_ref` imports timm with a stand-in `torchvision` whose every class raises when called or
instantiated, then removes it again (scripts/timm_weights.py import_timm): timm's ResNet / ViT forward never touches
torchvision, so these are timm's own numbers. timm is installed with `pip install --no-deps timm` (.ci/run): a
plain install would pull that torchvision.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import ROOT

import lamina.hub
from lamina.errors import CheckpointError

TOL = 1e-5  # fp32, eval mode: max abs logit difference
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                                reason="needs timm (pip install --no-deps timm==1.0.31) as the parity reference")


def _script():
    spec = importlib.util.spec_from_file_location("timm_weights", ROOT / "scripts" / "timm_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def timm_ref():
    return _script().import_timm()  # timm with a torchvision stand-in that raises if used; see the script


def randomised(model, seed=0):
    """Every parameter and BN statistic random (timm zero-inits the last BN of each block; this exercises all)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var") or (name.endswith("weight") and t.ndim == 1):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)  # BN/LN scales and variances: positive, near 1
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (0.5 / max(1, t[0].numel()) ** 0.5 if t.ndim > 1 else 0.1))
    return model.eval()


def images(n=2, size=64, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(ours, ref, x):
    with torch.no_grad():
        return (ours(x) - ref(x)).abs().max().item()


def refused(fn, *words):
    with pytest.raises(CheckpointError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


# ----- parity --------------------------------------------------------------------------------------------------
@needs_timm
def test_resnet18_pth_matches_timm_and_takes_a_new_head(timm_ref, tmp_path):
    import copy

    ref = randomised(timm_ref.create_model("resnet18", pretrained=False))
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "resnet18.pth")  # a container dict is unwrapped
    model, info = lamina.hub.load(f"timm:{tmp_path / 'resnet18.pth'}")
    assert info["family"] == "resnet" and info["head"] == "loaded" and info["tensors"] == len(ref.state_dict())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters()) == 11_689_512
    x = images(2, 96)
    d = max_diff(model, ref, x)
    with torch.no_grad():
        scale = ref(x).abs().max().item()
    print(f"\nresnet18 max |logit diff| vs timm: {d:.2e} (max |logit| {scale:.2f})")
    assert d < TOL and scale > 0.1  # real logits, not all zero
    other = copy.deepcopy(ref)
    with torch.no_grad():
        other.layer4[1].bn2.running_mean += 0.5  # one deep tensor off: the comparison must see it
    assert max_diff(model, other, x) > 1e-3

    # transfer: another number of classes gets a fresh head, the features stay timm's
    model, info = lamina.hub.load(f"timm:{tmp_path / 'resnet18.pth'}", num_classes=10)
    assert info["head"] == "re-initialised: 10 classes (the file's head has 1000)" and model.fc.out_features == 10
    with torch.no_grad():
        ours = model.forward_head(model.forward_features(x), pre_logits=True)
        theirs = ref.forward_head(ref.forward_features(x), pre_logits=True)
    assert (ours - theirs).abs().max().item() < TOL


@needs_timm
def test_resnet50_hf_folder_matches_timm_and_reads_its_preprocessing(timm_ref, tmp_path):
    from timm.models import save_for_hf

    ref = randomised(timm_ref.create_model("resnet50", pretrained=False), seed=2)
    save_for_hf(ref, tmp_path / "r50", safe_serialization=True)
    cfg = json.loads((tmp_path / "r50" / "config.json").read_text())
    model, info = lamina.hub.load(f"timm:{tmp_path / 'r50'}")
    assert info["architecture"] == cfg["architecture"] == "resnet50" and info["files"] == ["model.safetensors"]
    assert info["factory"]["block"] == "bottleneck" and info["factory"]["layers"] == (3, 4, 6, 3)
    pc = cfg["pretrained_cfg"]
    assert info["preprocess"]["mean"] == pytest.approx(pc["mean"]) and info["preprocess"]["std"] == pytest.approx(pc["std"])
    assert info["preprocess"]["crop"] == pc["input_size"][-1] and info["preprocess"]["interpolation"] == pc["interpolation"]
    d = max_diff(model, ref, images(2, 64))
    print(f"\nresnet50 max |logit diff| vs timm: {d:.2e}")
    assert d < TOL


@needs_timm
def test_vit_tiny_hf_folder_matches_timm_at_224(timm_ref, tmp_path):
    from timm.models import save_for_hf

    ref = randomised(timm_ref.create_model("vit_tiny_patch16_224", pretrained=False), seed=3)
    save_for_hf(ref, tmp_path / "vit", safe_serialization=True)
    model, info = lamina.hub.load(f"timm:{tmp_path / 'vit'}")
    f = info["factory"]
    assert (f["embed_dim"], f["depth"], f["n_head"], f["patch_size"], f["img_size"], f["pool"]) == (192, 12, 3, 16, 224, "cls")
    assert sum(p.numel() for p in model.parameters()) == 5_717_416
    d = max_diff(model, ref, images(2, 224))
    print(f"\nvit_tiny_patch16_224 max |logit diff| vs timm: {d:.2e}")
    assert d < TOL


@needs_timm
def test_vit_pos_embed_resampled_like_timm_for_another_image_size(timm_ref, tmp_path):
    from timm.models.vision_transformer import checkpoint_filter_fn

    src = randomised(timm_ref.create_model("vit_tiny_patch16_224", pretrained=False, depth=2), seed=4)
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    model, info = lamina.hub.load(f"timm:vit_tiny_patch16_224:{tmp_path / 'vit.pth'}", img_size=160)
    assert info["pos_embed"] == "resampled 14x14 -> 10x10 (bicubic, antialias)" and info["preprocess"]["crop"] == 160
    ref = timm_ref.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=160).eval()
    ref.load_state_dict(checkpoint_filter_fn(src.state_dict(), ref))  # timm's own resampling on load
    d = max_diff(model, ref, images(2, 160))
    print(f"\nvit_tiny at 160 px (pos_embed 14x14 -> 10x10) max |logit diff| vs timm: {d:.2e}")
    assert d < TOL


@needs_timm
def test_vit_without_class_token_mean_pools_like_timm(timm_ref, tmp_path):
    ref = randomised(timm_ref.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64,
                                           class_token=False, global_pool="avg", fc_norm=False), seed=5)
    torch.save(ref.state_dict(), tmp_path / "gap.pth")
    model, info = lamina.hub.load(f"timm:vit_tiny_patch16_224:{tmp_path / 'gap.pth'}")
    assert info["factory"]["pool"] == "mean" and info["factory"]["img_size"] == 64
    assert max_diff(model, ref, images(2, 64)) < TOL


# ----- refusals: one line, naming what is wrong ------------------------------------------------------------------
@needs_timm
def test_missing_and_unexpected_tensors_are_named_with_counts(timm_ref, tmp_path):
    sd = timm_ref.create_model("resnet18", pretrained=False).state_dict()
    sd["layer2.1.conv1.kernel"] = sd.pop("layer2.1.conv1.weight")
    del sd["layer3.0.bn2.running_mean"]
    torch.save(sd, tmp_path / "bad.pth")
    refused(lambda: lamina.hub.load(f"timm:{tmp_path / 'bad.pth'}"), "1 unmatched in file: layer2.1.conv1.kernel",
            "2 missing from file: layer2.1.conv1.weight, layer3.0.bn2.running_mean")


@needs_timm
@pytest.mark.parametrize("kwargs, words", [
    ({"reg_tokens": 4}, "register tokens"),
    ({"init_values": 1e-5}, "layer scale"),
    ({"no_embed_class": True}, "without the class token"),
    ({"global_pool": "avg"}, "fc_norm"),
    ({"qkv_bias": False}, "qkv without bias"),
])
def test_vit_features_lamina_cannot_compute_are_refused(timm_ref, tmp_path, kwargs, words):
    from timm.models.vision_transformer import VisionTransformer

    ref = VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2, num_classes=5, **kwargs)
    torch.save(ref.state_dict(), tmp_path / "v.pth")
    refused(lambda: lamina.hub.load(f"timm:vit_tiny_patch16_224:{tmp_path / 'v.pth'}"), words, "not supported")


@needs_timm
@pytest.mark.parametrize("kwargs, words", [
    ({"stem_type": "deep", "avg_down": True}, "deep stem"),
    ({"cardinality": 4, "base_width": 4}, "grouped or wide bottlenecks"),
])
def test_resnet_variants_lamina_cannot_build_are_refused(timm_ref, tmp_path, kwargs, words):
    from timm.models.resnet import Bottleneck, ResNet

    ref = ResNet(block=Bottleneck, layers=(1, 1, 1, 1), num_classes=5, **kwargs)
    torch.save(ref.state_dict(), tmp_path / "r.pth")
    refused(lambda: lamina.hub.load(f"timm:{tmp_path / 'r.pth'}"), words)


@needs_timm
def test_vit_file_without_a_name_needs_the_head_count(timm_ref, tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    torch.save(VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2).state_dict(),
               tmp_path / "v.pth")
    refused(lambda: lamina.hub.load(f"timm:{tmp_path / 'v.pth'}"), "head count is unknown",
            "timm:vit_small_patch16_224:PATH")


def test_bad_sources_are_one_line(tmp_path):
    refused(lambda: lamina.hub.load(f"timm:{tmp_path / 'nope'}"), "no such file or folder")
    (tmp_path / "x.txt").write_text("hi")
    refused(lambda: lamina.hub.load(f"timm:{tmp_path / 'x.txt'}"), "unknown weights format '.txt'")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    refused(lambda: lamina.hub.load(f"timm:{tmp_path / 'junk.pth'}"), "not a readable torch file")
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pth")
    refused(lambda: lamina.hub.load(f"timm:{tmp_path / 'other.pth'}"), "neither a timm ResNet")
    (tmp_path / "empty").mkdir()
    refused(lambda: lamina.hub.load(f"timm:{tmp_path / 'empty'}"), "no model.safetensors or pytorch_model.bin")


# ----- CLI ---------------------------------------------------------------------------------------------------
def _cli(argv, capsys):
    from lamina.cli.main import main

    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_cli_bad_timm_source_exits_2_with_one_line(tmp_path, capsys):
    rc, err = _cli(["finetune", f"model.pretrained=timm:{tmp_path / 'missing.pth'}", f"logging.root={tmp_path}"], capsys)
    assert rc == 2 and len(err) == 1 and "no such file or folder" in err[0], err


@needs_timm
def test_cli_refused_timm_variant_exits_2_with_one_line(timm_ref, tmp_path, capsys):
    from timm.models.vision_transformer import VisionTransformer

    torch.save(VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2,
                                 reg_tokens=4).state_dict(), tmp_path / "reg.pth")
    rc, err = _cli(["finetune", f"model.pretrained=timm:vit_small_patch16_224:{tmp_path / 'reg.pth'}",
                    f"logging.root={tmp_path}"], capsys)
    assert rc == 2 and len(err) == 1 and "register tokens" in err[0], err


@pytest.mark.slow  # ~15 s: a real (short) fine-tuning run through the CLI
@needs_timm
def test_cli_finetune_timm_resnet18_on_digits(timm_ref, tmp_path, capsys):
    assert _script().main(["resnet18", str(tmp_path / "resnet18.pth")]) == 0  # the README's command
    rc, err = _cli(["finetune", f"model.pretrained=timm:{tmp_path / 'resnet18.pth'}", "data.name=digits",
                    "finetune.input_size=32", "trainer.max_epochs=1", "data.train_fraction=0.1",
                    "logging.tensorboard=false", "logging.plots=false", "trainer.progress=false",
                    f"logging.root={tmp_path / 'runs'}", "name=timm-ft", "--no-progress"], capsys)
    assert rc == 0, err[-5:]
    summary = json.loads((tmp_path / "runs" / "timm-ft" / "summary.json").read_text())
    assert 0.0 <= summary["test"]["test/acc"] <= 1.0


def test_names_describing_a_huge_model_are_refused_before_it_is_built(tmp_path):
    sd = {"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3),
          "layer1.0.conv2.weight": torch.zeros(64, 64, 3, 3)}
    sd.update({f"layer1.{j}.bn1.weight": torch.zeros(1) for j in range(1, 600)})  # 600 blocks named, 600 values held
    torch.save(sd, tmp_path / "huge.pth")
    refused(lambda: lamina.hub.load(f"timm:{tmp_path / 'huge.pth'}"), "the names describe a model of")
