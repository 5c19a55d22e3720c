"""Batched image augmentations: each acts on a whole batch["x"] of shape (B, C, H, W) in a few tensor ops.

Why not torchvision.transforms.v2: those draw one set of parameters per call, so per-sample randomness
means a Python loop over the batch, which on small images costs more than the model. Here every transform
draws B sets of parameters at once from the loader's CPU `torch.Generator` (so a run, and a resumed run,
sees the same augmentations) and moves them to x.device, so the same code runs on CPU and CUDA batches.

Contract (what InMemoryLoader calls): `transform(batch: dict, generator) -> dict`; keys other than "x"
pass through untouched.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lamina.errors import DataError, unknown_name

Batch = dict[str, torch.Tensor]


def _images(batch: Batch, who: str) -> torch.Tensor:
    x = batch.get("x")
    if x is None or x.ndim != 4 or not x.is_floating_point():
        shape = None if x is None else list(x.shape)
        raise DataError(f"{who}: expected batch['x'] as a float (B, C, H, W) tensor, got {shape}")
    return x


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None, device) -> torch.Tensor:
    return (torch.rand(n, generator=g) * (hi - lo) + lo).to(device)


def _pair(v, name: str) -> tuple[float, float]:
    t = (v, v) if isinstance(v, (int, float)) else tuple(v)
    if len(t) != 2:
        raise DataError(f"{name}: expected a number or a pair, got {v!r}")
    return float(t[0]), float(t[1])


class RandomCrop:
    """Zero-pad by `padding`, then crop `size` (default: the input size) at a random offset per sample.

    One advanced-indexing gather builds all B crops: rows (B, h) and cols (B, w) index the padded batch.
    """

    def __init__(self, size: int | Sequence[int] | None = None, padding: int = 0):
        self.size = None if size is None else tuple(int(s) for s in _pair(size, "random_crop.size"))
        self.padding = int(padding)
        if self.padding < 0:
            raise DataError(f"random_crop.padding: expected a non-negative integer, got {padding!r}")

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        x = _images(batch, "random_crop")
        B, C, H, W = x.shape
        h, w = self.size or (H, W)
        p = self.padding
        if h > H + 2 * p or w > W + 2 * p:
            raise DataError(f"random_crop: crop {h}x{w} is larger than the padded image {H + 2 * p}x{W + 2 * p}")
        xp = F.pad(x, (p, p, p, p)) if p else x
        oy = torch.randint(0, H + 2 * p - h + 1, (B,), generator=generator).to(x.device)
        ox = torch.randint(0, W + 2 * p - w + 1, (B,), generator=generator).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, h, 1)
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, w)
        b = torch.arange(B, device=x.device)[:, None, None, None]
        c = torch.arange(C, device=x.device)[None, :, None, None]
        return {**batch, "x": xp[b, c, rows, cols]}  # (B, C, h, w)


class RandomHorizontalFlip:
    """Mirror each sample left-right with probability p (one Bernoulli draw per sample)."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)
        if not 0.0 <= self.p <= 1.0:
            raise DataError(f"hflip.p: expected a probability in [0, 1], got {p!r}")

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        x = _images(batch, "hflip")
        mask = (torch.rand(x.shape[0], generator=generator) < self.p).to(x.device)
        return {**batch, "x": torch.where(mask[:, None, None, None], x.flip(-1), x)}


class RandomBoxFlip:
    """Detection batches: mirror each sample left-right with probability p, its boxes (B, K, 4) (x1, y1, x2, y2)
    with it (x1' = W - x2, x2' = W - x1; padding rows, labels -1, stay zero)."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)
        if not 0.0 <= self.p <= 1.0:
            raise DataError(f"box_hflip.p: expected a probability in [0, 1], got {p!r}")

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        x = _images(batch, "box_hflip")
        boxes, labels = batch.get("boxes"), batch.get("labels")
        if boxes is None or labels is None:
            raise DataError("box_hflip: needs batch['boxes'] and batch['labels'] (a detection data set); use hflip")
        mask = (torch.rand(x.shape[0], generator=generator) < self.p).to(x.device)
        W = x.shape[-1]
        flipped = torch.stack([W - boxes[..., 2], boxes[..., 1], W - boxes[..., 0], boxes[..., 3]], -1)
        flipped = flipped * (labels >= 0)[..., None]
        return {**batch, "x": torch.where(mask[:, None, None, None], x.flip(-1), x),
                "boxes": torch.where(mask[:, None, None], flipped, boxes)}


class RandomAffine:
    """Per-sample rotation (uniform in +-degrees, or in [lo, hi] for a pair; positive = counter-clockwise),
    translation (fraction of width/height) and scale, as one affine_grid + bilinear grid_sample; pixels from
    outside the image are 0.

    theta maps output to input coordinates in normalized [-1, 1] space: in = A (out - t), A = D^-1 R(-a) D / s,
    with D = diag(W/2, H/2) so rotations stay rotations on non-square images.
    """

    def __init__(self, degrees: float | Sequence[float] = 0.0, translate: float | Sequence[float] = 0.0,
                 scale: float | Sequence[float] = 1.0):
        d = degrees
        self.degrees = (-abs(float(d)), abs(float(d))) if isinstance(d, (int, float)) else _pair(d, "affine.degrees")
        self.translate = _pair(translate, "affine.translate")
        self.scale = _pair(scale, "affine.scale")
        if min(self.translate) < 0 or min(self.scale) <= 0:
            raise DataError(f"affine: translate must be >= 0 and scale > 0, got translate={translate!r}, scale={scale!r}")

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        x = _images(batch, "affine")
        B, _, H, W = x.shape
        dev = x.device
        a = _uniform(B, *self.degrees, generator, dev) * (-math.pi / 180)  # y points down: negate for counter-clockwise
        tx = _uniform(B, -self.translate[0], self.translate[0], generator, dev) * 2  # fraction -> normalized units
        ty = _uniform(B, -self.translate[1], self.translate[1], generator, dev) * 2
        s = _uniform(B, self.scale[0], self.scale[1], generator, dev)
        cos, sin = torch.cos(a) / s, torch.sin(a) / s
        a00, a01, a10, a11 = cos, sin * (H / W), -sin * (W / H), cos
        theta = torch.stack([torch.stack([a00, a01, -(a00 * tx + a01 * ty)], 1),
                             torch.stack([a10, a11, -(a10 * tx + a11 * ty)], 1)], 1).to(x.dtype)  # (B, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return {**batch, "x": F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)}


class RandomResizedCrop:
    """Per sample: a box of `scale` x the image area and aspect ratio in `ratio` (log-uniform) at a random position,
    resized to `size` (default: the input size) by one affine_grid + bilinear grid_sample for the whole batch.
    The crop SimCLR, BYOL and MoCo rely on most (Chen et al. 2020, Fig. 5): views share content at varying scale.
    Boxes larger than the image along a side are clipped to it, as torchvision falls back to the full side."""

    def __init__(self, size: int | Sequence[int] | None = None, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3)):
        self.size = None if size is None else tuple(int(s) for s in _pair(size, "resized_crop.size"))
        self.scale, self.ratio = _pair(scale, "resized_crop.scale"), _pair(ratio, "resized_crop.ratio")
        if not 0 < self.scale[0] <= self.scale[1] <= 1 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise DataError(f"resized_crop: expected 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], "
                            f"got scale={scale!r}, ratio={ratio!r}")

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        x = _images(batch, "resized_crop")
        B, C, H, W = x.shape
        dev = x.device
        area = _uniform(B, *self.scale, generator, dev)
        logr = _uniform(B, math.log(self.ratio[0]), math.log(self.ratio[1]), generator, dev)
        w = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)  # box width / image width
        h = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
        cx = _uniform(B, -1.0, 1.0, generator, dev) * (1 - w)  # box centre in [-1, 1] units, box inside the image
        cy = _uniform(B, -1.0, 1.0, generator, dev) * (1 - h)
        zero = torch.zeros_like(w)
        theta = torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1).to(x.dtype)  # (B,2,3)
        oh, ow = self.size or (H, W)
        grid = F.affine_grid(theta, [B, C, oh, ow], align_corners=False)
        return {**batch, "x": F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)}


class ColorJitter:
    """With probability p per sample: brightness (x * b) then contrast (mean + (x - mean) * c), b and c uniform in
    [1 - brightness, 1 + brightness] and [1 - contrast, 1 + contrast], clamped to [0, 1] as torchvision does for
    float images; so it belongs before `normalize`. Gray images have no hue or saturation to jitter."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, p: float = 0.8):
        self.brightness, self.contrast, self.p = float(brightness), float(contrast), float(p)
        if not (0 <= self.brightness <= 1 and 0 <= self.contrast <= 1 and 0 <= self.p <= 1):
            raise DataError(f"color_jitter: expected brightness, contrast and p in [0, 1], got {brightness!r}, "
                            f"{contrast!r}, {p!r}")

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        x = _images(batch, "color_jitter")
        B, dev = x.shape[0], x.device
        on = (torch.rand(B, generator=generator) < self.p).to(dev)[:, None, None, None]
        b = _uniform(B, 1 - self.brightness, 1 + self.brightness, generator, dev)[:, None, None, None].to(x.dtype)
        c = _uniform(B, 1 - self.contrast, 1 + self.contrast, generator, dev)[:, None, None, None].to(x.dtype)
        y = (x * b).clamp(0, 1)
        m = y.mean(dim=(1, 2, 3), keepdim=True)
        y = (m + (y - m) * c).clamp(0, 1)
        return {**batch, "x": torch.where(on, y, x)}


class Normalize:
    """(x - mean) / std per channel; deterministic, so evaluation and prediction apply it too (eval_transforms)."""

    deterministic = True

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if (self.std <= 0).any():
            raise DataError(f"normalize.std: expected positive values, got {std!r}")

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        x = _images(batch, "normalize")
        if len(self.mean) not in (1, x.shape[1]) or len(self.std) not in (1, x.shape[1]):
            raise DataError(f"normalize: mean/std have {len(self.mean)}/{len(self.std)} values for {x.shape[1]} channels")
        m = self.mean.to(x.device, x.dtype)[None, :, None, None]
        s = self.std.to(x.device, x.dtype)[None, :, None, None]
        return {**batch, "x": (x - m) / s}


class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        for t in self.transforms:
            batch = t(batch, generator)
        return batch


TRANSFORMS = {"random_crop": RandomCrop, "hflip": RandomHorizontalFlip, "box_hflip": RandomBoxFlip,
              "affine": RandomAffine,
              "resized_crop": RandomResizedCrop, "color_jitter": ColorJitter, "normalize": Normalize}


def build_transforms(spec: Sequence[dict] | None) -> Compose:
    """From config: [{"name": "random_crop", "padding": 4}, {"name": "hflip"}, ...] -> Compose."""
    out = []
    for i, item in enumerate(spec or []):
        if not isinstance(item, dict) or "name" not in item:
            raise DataError(f"transforms[{i}]: expected a mapping with a 'name' key, got {item!r}")
        kwargs = {k: v for k, v in item.items() if k != "name"}
        name = item["name"]
        if name not in TRANSFORMS:
            raise DataError(f"transforms[{i}]: {unknown_name('transform', name, TRANSFORMS)}")
        params = [k for k in inspect.signature(TRANSFORMS[name]).parameters]
        for k in kwargs:
            if k not in params:
                raise DataError(f"transforms[{i}] ({name}): {unknown_name('option', k, params)}")
        out.append(TRANSFORMS[name](**kwargs))
    return Compose(out)


def eval_transforms(spec: Sequence[dict] | None) -> Compose | None:
    """The deterministic part of a training transform list (normalize): what evaluation and prediction must apply
    so the model sees inputs on the scale it was trained on. Random augmentations are training-only."""
    kept = [t for t in build_transforms(spec).transforms if getattr(t, "deterministic", False)]
    return Compose(kept) if kept else None


def normalize_of(transform) -> tuple[list[float], list[float]] | None:
    """(mean, std) of the last Normalize step in a transform (a Compose or a single step), else None: what
    attacks, explanations and exported models need to work in pixel space."""
    steps = getattr(transform, "transforms", [transform] if transform is not None else [])
    norms = [t for t in steps if isinstance(t, Normalize)]
    return (norms[-1].mean.tolist(), norms[-1].std.tolist()) if norms else None


def normalize_stats(augment: Sequence[dict] | None) -> tuple[list[float], list[float]] | None:
    """(mean, std) of the (last) normalize step in a data.augment list, else None."""
    return normalize_of(build_transforms(augment)) if augment else None
