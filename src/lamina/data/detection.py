"""Object detection data: fashion_scenes, real object images pasted on real backgrounds, with their boxes.

No openly licensed detection set small enough to ship was found offline, so this is a documented composite (never
random shapes): each 64x64 scene is a random crop of one of scikit-image's bundled photographs (brick, grass and
gravel textures from CC0Textures / DeviantArt under CC0, the CC0 coffee photograph, SpaceX's public-domain rocket
launch; converted to gray) with 1-3 Fashion-MNIST garments (MIT) pasted at 16-32 px, each blended by its own
intensity as alpha. A garment's box is the tight box of its visible pixels (alpha > 0.2), its label its class.
Garments do not overlap (a hidden garment would be an unfair label). Train and val scenes use Fashion-MNIST's training images, test
scenes its test images, so no garment instance is shared between training and test.

Tensors: x (N, 1, S, S) float in [0, 1]; boxes (N, K, 4) (x1, y1, x2, y2) in pixels, zero-padded; labels (N, K)
int64, -1 on padding; K = the most objects per scene.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lamina.data.base import DataBundle, TensorData
from lamina.data.builtin import FASHION_MNIST_CLASSES, fashion_mnist
from lamina.data.files import registered
from lamina.errors import DataError
from lamina.nn.boxes import box_iou

BACKGROUNDS = ("brick", "grass", "gravel", "coffee", "rocket")


def _backgrounds() -> list[np.ndarray]:
    import skimage.data
    from skimage.color import rgb2gray

    out = []
    for name in BACKGROUNDS:
        img = getattr(skimage.data, name)()
        img = rgb2gray(img) if img.ndim == 3 else img / 255.0
        out.append(np.asarray(img, np.float32) * 0.8)  # a little darker than the garments, as a scene's floor
    return out


def _scenes(n: int, items: torch.Tensor, labels: torch.Tensor, bgs: list[np.ndarray], size: int, objects, scale,
            rng: np.random.Generator) -> dict[str, torch.Tensor]:
    k_max = int(objects[1])
    x = torch.zeros(n, 1, size, size)
    boxes = torch.zeros(n, k_max, 4)
    labs = torch.full((n, k_max), -1, dtype=torch.int64)
    for i in range(n):
        bg = bgs[rng.integers(len(bgs))]
        oy, ox = rng.integers(0, bg.shape[0] - size), rng.integers(0, bg.shape[1] - size)
        scene = torch.from_numpy(bg[oy:oy + size, ox:ox + size].copy())
        placed: list[torch.Tensor] = []
        for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
            for _try in range(20):
                j = int(rng.integers(len(items)))
                s = int(rng.integers(scale[0], scale[1] + 1))
                item = F.interpolate(items[j][None, None], size=(s, s), mode="bilinear", align_corners=False)[0, 0]
                alpha = (item * 2.5).clamp(0, 1)  # garments are bright on black: brightness is their mask
                ys, xs = torch.nonzero(alpha > 0.2, as_tuple=True)
                if len(ys) == 0:
                    continue
                py, px = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
                box = torch.tensor([px + xs.min(), py + ys.min(), px + xs.max() + 1, py + ys.max() + 1],
                                   dtype=torch.float32)
                if placed and box_iou(box[None], torch.stack(placed)).max() > 0:  # no garment hides another
                    continue
                region = scene[py:py + s, px:px + s]
                scene[py:py + s, px:px + s] = region * (1 - alpha) + item * alpha
                boxes[i, len(placed)] = box
                labs[i, len(placed)] = labels[j]
                placed.append(box)
                break
        x[i, 0] = scene
    return {"x": x, "boxes": boxes, "labels": labs}


@registered("fashion_scenes", "object detection: 1-3 Fashion-MNIST garments pasted on real photographs "
            "(scikit-image's CC0 / public-domain images), with boxes", "detection",
            "/usr/share/datasets/fashion-mnist + scikit-image")
def fashion_scenes(*, size: int = 64, min_objects: int = 1, max_objects: int = 3, min_scale: int = 16,
                   max_scale: int = 32, train_size: int = 4000, val_size: int = 500, test_size: int = 1000,
                   root: str | None = None, seed: int = 0) -> DataBundle:
    if not 32 <= int(size) <= 256:
        raise DataError(f"fashion_scenes: size must be in 32 .. 256 pixels, got {size}")
    if not 1 <= int(min_objects) <= int(max_objects) <= 10:
        raise DataError(f"fashion_scenes: expected 1 <= min_objects <= max_objects <= 10, got {min_objects}, "
                        f"{max_objects}")
    if not 8 <= int(min_scale) <= int(max_scale) <= int(size):
        raise DataError(f"fashion_scenes: expected 8 <= min_scale <= max_scale <= size, got {min_scale}, {max_scale}")
    for name, n in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
        if not 1 <= int(n) <= 100_000:
            raise DataError(f"fashion_scenes: {name} must be in 1 .. 100000, got {n}")
    fm = fashion_mnist(**({"root": root} if root else {}), seed=seed)
    bgs = _backgrounds()
    rng = np.random.default_rng(seed + 4242)
    objects, scale = (int(min_objects), int(max_objects)), (int(min_scale), int(max_scale))
    src_train = (fm.train.tensors["x"][:, 0].float() / (255.0 if fm.train.tensors["x"].dtype == torch.uint8 else 1.0),
                 fm.train.tensors["y"])
    src_test = (fm.test.tensors["x"][:, 0].float() / (255.0 if fm.test.tensors["x"].dtype == torch.uint8 else 1.0),
                fm.test.tensors["y"])
    parts = {s: TensorData(**_scenes(int(n), *src, bgs, int(size), objects, scale, rng))
             for s, n, src in (("train", train_size, src_train), ("val", val_size, src_train),
                               ("test", test_size, src_test))}
    meta = {"loader": "fashion_scenes", "classes": list(FASHION_MNIST_CLASSES), "size": int(size),
            "max_objects": objects[1], "backgrounds": list(BACKGROUNDS)}
    return DataBundle("fashion_scenes", parts["train"], parts["val"], parts["test"], "detection",
                      (1, int(size), int(size)), len(FASHION_MNIST_CLASSES), list(FASHION_MNIST_CLASSES), meta)


__all__ = ["BACKGROUNDS", "fashion_scenes"]
