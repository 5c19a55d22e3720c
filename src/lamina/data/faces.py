"""Faces from a plain folder: one sub-folder per person, images of any size and mode (PGM, PNG, JPEG, BMP).

That is how users hold faces, and how the ORL database ships (datasets/orl_faces: s1..s40, 10 images each).
Every image is converted to gray (or RGB) and resized to `size`; the declared size of each file is read before
it is decoded, and Pillow's decompression-bomb limit applies.

Two protocols, stated in the bundle's meta:

* identification (closed set): of each person's images, `train_per_person` train (a seeded random choice, or
  the first ones in file order with `selection: first`), `val_per_person` more validate, the rest test. Test
  labels are the training identities. ORL's usual protocol is 5 train / 5 test.
* verification (open set): `holdout_identities` people (a seeded choice) are never seen in training; all their
  images form the test split, whose labels are numbered after the training identities (K, K+1, ...) so they
  never collide with a class the model knows. The other people train, `val_per_person` of their images
  validate.

x: float32 (N, C, H, W) in [0, 1]; y: int64 identity. meta carries image_size, grayscale and channels, so
`lamina predict` and `lamina faces` treat new photos exactly as training ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lamina.data.base import DataBundle, TensorData
from lamina.data.builtin import datasets_root
from lamina.data.files import IMAGE_SUFFIXES, _hw, _require, registered
from lamina.errors import ConfigError, DataError

PathLike = str | Path
MAX_IMAGES = 200_000  # one folder; ~2 GB as 56x46 float32
# Modes Pillow converts to 8-bit gray or RGB without losing the picture; 16-bit and float images are refused.
_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_MIN_SIDE = 8


def person_folders(root: PathLike) -> list[tuple[str, list[Path]]]:
    """[(person, sorted image files)] of a folder of sub-folders; one-line DataErrors for what is not one."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: face folder not found; expected one sub-folder of images per person")
    people = []
    for d in sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                    key=lambda d: (len(d.name), d.name)):  # s2 before s10
        files = sorted((f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES),
                       key=lambda f: (len(f.name), f.name))
        if files:
            people.append((d.name, files))
    if not people:
        raise DataError(f"{root}: no person folders with images ({', '.join(IMAGE_SUFFIXES)}) inside")
    if sum(len(f) for _, f in people) > MAX_IMAGES:
        raise DataError(f"{root}: more than {MAX_IMAGES:,} images; split the folder")
    return people


def read_faces(files: Sequence[Path], size: tuple[int, int], grayscale: bool) -> torch.Tensor:
    """(N, C, H, W) float32 in [0, 1]: each file checked (readable, 8-bit mode, at least 8 px a side), converted
    and resized with antialiasing."""
    Image = _require("PIL.Image", "images", "Pillow")
    h, w = size
    out = np.empty((len(files), h, w, 1 if grayscale else 3), np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                if im.mode not in _MODES:
                    raise DataError(f"{f}: image mode {im.mode} (16-bit or float); face images must be 8-bit gray "
                                    "or colour (PGM, PNG, JPEG, BMP)")
                if min(im.size) < _MIN_SIDE:
                    raise DataError(f"{f}: image is {im.size[0]}x{im.size[1]} pixels; faces need at least "
                                    f"{_MIN_SIDE} pixels a side")
                im = im.convert("L" if grayscale else "RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR, reducing_gap=2.0)
                out[i] = np.asarray(im, np.uint8).reshape(h, w, -1)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{f}: cannot read image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def _is_gray(files: Sequence[Path]) -> bool:
    Image = _require("PIL.Image", "images", "Pillow")
    for f in files:
        try:
            with Image.open(f) as im:
                if im.mode not in ("1", "L", "LA"):
                    return False
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{f}: cannot read image ({type(e).__name__}: {e})") from None
    return True


def _count(name: str, v, lo: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ConfigError(f"data.{name}: expected an integer >= {lo}, got {v!r}")
    return v


@registered("faces", "faces in one sub-folder per person (PGM/PNG/JPEG, any size); identification or verification "
            "protocol; default: the ORL database (40 people x 10)", "face", "datasets/orl_faces, or path=")
def faces(*, path: PathLike | None = None, size: int | Sequence[int] = (56, 46), grayscale: bool | None = None,
          protocol: str = "identification", train_per_person: int = 5, val_per_person: int = 0,
          holdout_identities: int = 10, selection: str = "random", seed: int = 0) -> DataBundle:
    root = Path(path).expanduser() if path is not None else datasets_root() / "orl_faces"
    if protocol not in ("identification", "verification"):
        raise ConfigError(f"data.protocol: expected identification or verification, got {protocol!r}")
    if selection not in ("random", "first"):
        raise ConfigError(f"data.selection: expected random or first, got {selection!r}")
    hw = _hw(size)
    people = person_folders(root)
    val_k = _count("val_per_person", val_per_person, 0)
    g = np.random.default_rng(seed)
    split: dict[str, list[tuple[Path, int]]] = {"train": [], "val": [], "test": []}
    if protocol == "identification":
        k = _count("train_per_person", train_per_person, 1)
        for pid, (name, files) in enumerate(people):
            if len(files) < k + val_k + 1:
                raise DataError(f"{root / name}: {len(files)} image(s); the identification protocol needs "
                                f"train_per_person + val_per_person + 1 = {k + val_k + 1} per person (lower "
                                "data.train_per_person, or remove the folder)")
            order = np.arange(len(files)) if selection == "first" else g.permutation(len(files))
            for j, i in enumerate(order):
                part = "train" if j < k else "val" if j < k + val_k else "test"
                split[part].append((files[i], pid))
        train_people, test_people = [n for n, _ in people], [n for n, _ in people]
    else:
        hold = _count("holdout_identities", holdout_identities, 2)
        if hold > len(people) - 2:
            raise DataError(f"{root}: {len(people)} people; holding out {hold} leaves fewer than 2 to train on "
                            "(lower data.holdout_identities)")
        held = set(g.permutation(len(people))[:hold].tolist())
        train_idx = [i for i in range(len(people)) if i not in held]
        test_idx = sorted(held)
        for new, i in enumerate(train_idx):
            name, files = people[i]
            if len(files) < val_k + 1:
                raise DataError(f"{root / name}: {len(files)} image(s); need val_per_person + 1 = {val_k + 1}")
            order = g.permutation(len(files))
            for j, f in enumerate(order):
                split["val" if j < val_k else "train"].append((files[f], new))
        for new, i in enumerate(test_idx):
            for f in people[i][1]:
                split["test"].append((f, len(train_idx) + new))
        train_people, test_people = [people[i][0] for i in train_idx], [people[i][0] for i in test_idx]
    every = [f for part in split.values() for f, _ in part]
    gray = _is_gray(every) if grayscale is None else bool(grayscale)

    def tensors(part):
        if not split[part]:
            return None
        files, ys = zip(*split[part])
        return TensorData(x=read_faces(files, hw, gray), y=torch.tensor(ys, dtype=torch.int64))

    meta = {"loader": "faces", "path": str(root), "image_size": list(hw), "grayscale": gray,
            "channels": 1 if gray else 3, "pixel_max": 255.0, "classes": train_people, "protocol": protocol,
            "test_identities": test_people, "selection": selection,
            "files": {p: [str(f.relative_to(root)) for f, _ in split[p]] for p in split}}
    return DataBundle("faces", tensors("train"), tensors("val"), tensors("test"), "face", (1 if gray else 3, *hw),
                      len(train_people), train_people, meta)


class IdentitySampler:
    """P identities x K images a batch (batch-hard triplets need positives in every batch): each epoch draws
    ceil(N / (P K)) batches; identities with fewer than K images give all they have. A sampler for
    lamina.data.loader.InMemoryLoader, which gathers, transforms and keeps the generator state."""

    def __init__(self, y: torch.Tensor, identities: int, per_identity: int):
        ids = torch.unique(y)
        if len(ids) < 2:
            raise ConfigError("triplet loss: the training split has one identity; it needs at least 2")
        self.n, self.P, self.K = len(y), min(int(identities), len(ids)), int(per_identity)
        self.by_id = [(y == i).nonzero().flatten() for i in ids.tolist()]

    def __len__(self) -> int:
        return max(1, math.ceil(self.n / (self.P * self.K)))

    def __call__(self, g: torch.Generator):
        for _ in range(len(self)):
            pick = torch.randperm(len(self.by_id), generator=g)[:self.P]
            yield torch.cat([self.by_id[p][torch.randperm(len(self.by_id[p]), generator=g)[:self.K]]
                             for p in pick.tolist()])


def identity_batches(data: TensorData, identities: int, per_identity: int, seed: int = 0, device=None,
                     transform=None):
    """A loader over `data` whose batches hold `identities` people x `per_identity` images each (a streamed split:
    each batch's files decoded as it is drawn, the same batches)."""
    from lamina.data.loader import InMemoryLoader
    from lamina.data.sample import SampledLoader, is_streamed

    if is_streamed(data):
        return SampledLoader(data, IdentitySampler(data.y, identities, per_identity), seed, device, transform)

    return InMemoryLoader(data, identities * per_identity, seed=seed, device=device, transform=transform,
                          sampler=IdentitySampler(data.y, identities, per_identity))


__all__ = ["IdentitySampler", "MAX_IMAGES", "faces", "identity_batches", "person_folders", "read_faces"]
