"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015): handwritten characters of many alphabets, 20 drawers each, for
few-shot learning. The project ships the parts the public repository (github.com/brendenlake/omniglot, MIT) keeps
small, under datasets/omniglot/:

- `images_background_small1.zip`, `images_background_small2.zip`: the two "minimal" background sets, five
  alphabets each (Balinese, Early Aramaic, ... / Greek, Japanese (katakana), Latin, Sanskrit, Tagalog);
- `all_runs.zip`: the twenty 20-way one-shot classification runs of the paper, drawn from the evaluation
  alphabets (within-alphabet: 20 characters of one alphabet, one training image each, 20 test images).

Images are 105x105 binary PNGs, black strokes on white; they are read straight from the zips, inverted (stroke = 1)
and resized to `size` pixels (28, the usual few-shot resolution) with antialiasing. Every image's declared size is
checked before it is decoded.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lamina.data.base import TensorData
from lamina.data.builtin import datasets_root
from lamina.errors import DataError

_MAX_SIDE = 512  # Omniglot images are 105 px; anything much larger is not one of them


def omniglot_root() -> Path:
    """$LAMINA_DATASETS/omniglot if set, else datasets/omniglot in the source checkout."""
    return datasets_root() / "omniglot"


def _decode(raw: bytes, size: int, name: str) -> np.ndarray:
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(raw))
        if max(im.size) > _MAX_SIDE:
            raise DataError(f"{name}: {im.size[0]}x{im.size[1]} image; Omniglot images are 105x105")
        im = im.convert("L").resize((size, size), Image.LANCZOS)
    except (OSError, ValueError) as e:
        raise DataError(f"{name}: not a readable PNG ({e})") from None
    return 1.0 - np.asarray(im, dtype=np.float32) / 255.0  # strokes 1, paper 0


def _zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise DataError(f"{path}: Omniglot file not found; it ships in the source checkout under datasets/omniglot "
                        "(or set LAMINA_DATASETS to the folder that holds omniglot/)")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise DataError(f"{path}: not a zip file") from None


@dataclass
class CharacterSet:
    """Images of characters: x (N, 1, size, size) float32 in [0, 1], y (N,) class ids; names[c] = 'alphabet/char'."""

    data: TensorData
    names: list[str]
    alphabets: list[str]  # alphabet of each class, for within-alphabet episodes


def load_background(which: str = "small1", size: int = 28, root: Path | None = None) -> CharacterSet:
    """One minimal background set ("small1" or "small2"): every character a class, its 20 drawings the samples."""
    if which not in ("small1", "small2"):
        raise DataError(f"omniglot: background set must be small1 or small2, got {which!r}")
    z = _zip((root or omniglot_root()) / f"images_background_{which}.zip")
    pat = re.compile(rf"^images_background_{which}/([^/]+)/(character\d+)/[^/]+\.png$")
    groups: dict[str, list[str]] = {}
    for n in sorted(z.namelist()):
        m = pat.match(n)
        if m:
            groups.setdefault(f"{m.group(1)}/{m.group(2)}", []).append(n)
    if not groups:
        raise DataError(f"{z.filename}: no Omniglot character images inside")
    xs, ys, names = [], [], []
    for c, (name, files) in enumerate(sorted(groups.items())):
        names.append(name)
        for f in files:
            xs.append(_decode(z.read(f), size, f))
            ys.append(c)
    x = torch.from_numpy(np.stack(xs)).unsqueeze(1)
    return CharacterSet(TensorData(x=x, y=torch.tensor(ys)), names, [n.split("/")[0] for n in names])


@dataclass
class OneShotRun:
    """One of Lake et al.'s 20-way one-shot runs: `support` (20, 1, s, s), one image per class in class order;
    `query` (20, 1, s, s) and `answer` (20,), the support class each query belongs to."""

    name: str
    support: torch.Tensor
    query: torch.Tensor
    answer: torch.Tensor


def load_one_shot_runs(size: int = 28, root: Path | None = None) -> list[OneShotRun]:
    z = _zip((root or omniglot_root()) / "all_runs.zip")
    runs = []
    for r in range(1, 21):
        name = f"run{r:02d}"
        try:
            pairs = [line.split() for line in z.read(f"{name}/class_labels.txt").decode().splitlines() if line.strip()]
        except KeyError:
            raise DataError(f"{z.filename}: {name}/class_labels.txt missing") from None
        support_files = sorted({train for _, train in pairs})
        index = {f: i for i, f in enumerate(support_files)}
        support = np.stack([_decode(z.read(f), size, f) for f in support_files])
        query = np.stack([_decode(z.read(test), size, test) for test, _ in pairs])
        runs.append(OneShotRun(name, torch.from_numpy(support).unsqueeze(1), torch.from_numpy(query).unsqueeze(1),
                               torch.tensor([index[train] for _, train in pairs])))
    return runs


__all__ = ["CharacterSet", "OneShotRun", "load_background", "load_one_shot_runs", "omniglot_root"]
