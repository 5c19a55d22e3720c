"""Batched transforms: identities, hand-computed crops/rotations, reproducibility through InMemoryLoader."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lamina.data import InMemoryLoader, TensorData, build_transforms
from lamina.data.transforms import Compose, Normalize, RandomAffine, RandomCrop, RandomHorizontalFlip
from lamina.errors import DataError


def batch(b=6, c=2, h=5, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.rand(b, c, h, w, generator=g), "y": torch.arange(b)}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_flip():
    bt = batch()
    out = RandomHorizontalFlip(p=1.0)(bt, gen())
    assert torch.equal(out["x"], torch.flip(bt["x"], [-1])) and out["y"] is bt["y"]
    assert torch.equal(RandomHorizontalFlip(p=0.0)(bt, gen())["x"], bt["x"])
    mixed = RandomHorizontalFlip(p=0.5)(batch(b=64), gen())["x"]
    src = batch(b=64)["x"]
    flipped = (mixed == src.flip(-1)).flatten(1).all(1)
    assert ((mixed == src).flatten(1).all(1) | flipped).all() and 10 < int(flipped.sum()) < 54


def test_crop_identity_and_offsets():
    bt = batch()
    assert torch.equal(RandomCrop(None, padding=0)(bt, gen())["x"], bt["x"])
    out = RandomCrop(size=(5, 7), padding=2)(bt, gen(1))["x"]
    g = gen(1)  # same draws as the transform: rows first, then cols
    oy, ox = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    padded = F.pad(bt["x"], (2, 2, 2, 2))
    for i in range(6):
        assert torch.equal(out[i], padded[i, :, oy[i] : oy[i] + 5, ox[i] : ox[i] + 7])
    assert RandomCrop(size=3)(bt, gen())["x"].shape == (6, 2, 3, 3)
    with pytest.raises(DataError):
        RandomCrop(size=9)(bt, gen())


def test_affine_identity_and_exact_rotations():
    bt = batch()
    out = RandomAffine(degrees=0, translate=0, scale=1)(bt, gen())["x"]
    torch.testing.assert_close(out, bt["x"], atol=1e-5, rtol=0)
    sq = batch(h=6, w=6)["x"]
    rot = RandomAffine(degrees=(90, 90))({"x": sq}, gen())["x"]
    torch.testing.assert_close(rot, torch.rot90(sq, 1, (-2, -1)), atol=1e-5, rtol=0)  # counter-clockwise
    half = RandomAffine(degrees=(180, 180))(bt, gen())["x"]  # non-square: aspect handled
    torch.testing.assert_close(half, bt["x"].flip(-1, -2), atol=1e-5, rtol=0)
    moved = RandomAffine(degrees=10, translate=0.2, scale=(0.8, 1.2))(bt, gen())["x"]
    assert moved.shape == bt["x"].shape and not torch.allclose(moved, bt["x"])


def test_normalize_and_compose():
    bt = batch(c=2)
    out = Normalize([0.5, 0.25], [2.0, 0.5])(bt, gen())["x"]
    torch.testing.assert_close(out[:, 0], (bt["x"][:, 0] - 0.5) / 2.0)
    torch.testing.assert_close(out[:, 1], (bt["x"][:, 1] - 0.25) / 0.5)
    both = Compose([RandomHorizontalFlip(1.0), Normalize(0.5, 2.0)])(bt, gen())["x"]
    torch.testing.assert_close(both, (bt["x"].flip(-1) - 0.5) / 2.0)


def test_same_seed_same_augmentations():
    t = build_transforms([{"name": "random_crop", "padding": 2}, {"name": "hflip"},
                          {"name": "affine", "degrees": 15, "translate": 0.1, "scale": [0.9, 1.1]}])
    a, b, c = t(batch(), gen(5))["x"], t(batch(), gen(5))["x"], t(batch(), gen(6))["x"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_build_transforms_errors():
    with pytest.raises(DataError) as e:
        build_transforms([{"name": "hflp"}])
    assert "did you mean 'hflip'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="padding"):
        build_transforms([{"name": "random_crop", "paddin": 4}])
    with pytest.raises(DataError):
        build_transforms([{"p": 0.5}])
    assert torch.equal(build_transforms([])(batch(), gen())["x"], batch()["x"])


def test_loader_with_transform_is_reproducible():
    data = TensorData(x=torch.rand(20, 1, 6, 6, generator=gen(0)), y=torch.arange(20))
    spec = [{"name": "random_crop", "padding": 1}, {"name": "hflip"}]

    def epochs(seed):
        loader = InMemoryLoader(data, batch_size=8, shuffle=True, seed=seed, transform=build_transforms(spec))
        return [torch.cat([b["x"] for b in loader]) for _ in range(2)]

    a, b, c = epochs(0), epochs(0), epochs(1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    t = build_transforms([{"name": "random_crop", "padding": 2}, {"name": "hflip"}, {"name": "affine", "degrees": 10}])
    bt = batch()
    cpu = t(bt, gen(3))["x"]
    gpu = t({k: v.cuda() for k, v in bt.items()}, gen(3))["x"]
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)


def test_normalize_in_augment_is_applied_at_evaluation_too(tmp_path):
    """A normalize step in data.augment changes the input scale: evaluation and prediction must see it as well."""
    from lamina import runs
    from lamina.config import load_config
    from lamina.data import load_dataset

    cfg = load_config(None, ["data.augment=[{name: hflip}, {name: normalize, mean: 0.5, std: 0.25}]",
                             "logging.tensorboard=false", "logging.plots=false", "trainer.progress=false",
                             "trainer.max_epochs=2", f"logging.root={tmp_path}"])
    bundle = load_dataset("digits", seed=0)
    from lamina.tasks import ClassificationTask

    loader = ClassificationTask(10).eval_loader(bundle.test, bundle, cfg.data, torch.device("cpu"))
    x = next(iter(loader))["x"]
    torch.testing.assert_close(x, (bundle.test.tensors["x"][:len(x)] - 0.5) / 0.25)  # normalized, never flipped
    res = runs.train(cfg)
    assert runs.evaluate(res.run_dir)["test/acc"] == pytest.approx(res.summary["test"]["test/acc"])
