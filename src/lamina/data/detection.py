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


MAX_ANNOTATION_BYTES = 256 << 20  # one COCO JSON file; larger ones are refused before parsing
MAX_IMAGE_PIXELS = 8192 * 8192  # one image, checked from its header before decoding


def _coco_error(path, what: str) -> DataError:
    return DataError(f"{path}: {what}")


@registered("coco_detection", "object detection from a COCO-format annotation file + image folder (your data), "
            "resized to size x size", "detection", "paths: path= (images), annotations= (COCO JSON)")
def coco_detection(*, path: str, annotations: str, size: int = 64, grayscale: bool = True, val_fraction: float = 0.1,
                   test_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """Images named by the file's `images[].file_name` under `path`, boxes `annotations[].bbox` (x, y, w, h in
    pixels of the original image) scaled to the resized image, classes from `categories` (sorted by id). Every
    annotation is checked before any image is decoded: boxes of zero or negative size, boxes outside their image,
    unknown image or category ids, and a file with no annotations are one-line DataErrors naming the entry."""
    import json
    from pathlib import Path

    root, ann_path = Path(path).expanduser(), Path(annotations).expanduser()
    if not ann_path.is_file():
        raise _coco_error(ann_path, "annotation file not found")
    if ann_path.stat().st_size > MAX_ANNOTATION_BYTES:
        raise _coco_error(ann_path, f"annotation file larger than {MAX_ANNOTATION_BYTES >> 20} MB")
    try:
        coco = json.loads(ann_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _coco_error(ann_path, f"not JSON ({e.__class__.__name__}: {str(e)[:80]})") from None
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "annotations",
                                                                                       "categories")):
        raise _coco_error(ann_path, "expected a COCO object with lists 'images', 'annotations' and 'categories'")
    if not coco["annotations"]:
        raise _coco_error(ann_path, "the file has no annotations; a detector needs boxes to learn from")
    if not 16 <= int(size) <= 1024:
        raise DataError(f"coco_detection: size must be in 16 .. 1024, got {size}")
    cats = sorted(coco["categories"], key=lambda c: c.get("id", 0))
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    images = {im["id"]: im for im in coco["images"]}
    per_image: dict = {i: [] for i in images}
    for a in coco["annotations"]:
        aid = a.get("id", "?")
        if a.get("image_id") not in images:
            raise _coco_error(ann_path, f"annotation {aid} refers to image_id {a.get('image_id')!r}, which is not in "
                              "'images'")
        if a.get("category_id") not in cat_index:
            raise _coco_error(ann_path, f"annotation {aid} has category_id {a.get('category_id')!r}, not in "
                              "'categories'")
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise _coco_error(ann_path, f"annotation {aid}: bbox must be [x, y, width, height], got {bbox!r}")
        x, y, w, h = bbox
        im = images[a["image_id"]]
        W, H = im.get("width"), im.get("height")
        if w <= 0 or h <= 0:
            raise _coco_error(ann_path, f"annotation {aid}: box of width {w} and height {h}; both must be positive")
        if W and H and (x < 0 or y < 0 or x + w > W + 0.5 or y + h > H + 0.5):
            raise _coco_error(ann_path, f"annotation {aid}: box {bbox} lies outside its {W}x{H} image "
                              f"{im.get('file_name')!r}")
        per_image[a["image_id"]].append(a)
    records = []
    for i in images:
        if not per_image[i]:  # images without boxes teach nothing here
            continue
        im = images[i]
        declared = (im["width"], im["height"]) if im.get("width") and im.get("height") else None
        objs = [(a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3],
                 cat_index[a["category_id"]]) for a in per_image[i]]
        records.append((root / str(im.get("file_name", "")), declared, objs))
    names = [str(c.get("name", c["id"])) for c in cats]
    return _detection_bundle("coco_detection", records, names, size, grayscale, val_fraction, test_fraction, seed,
                             "the annotation file's images[].file_name")


def _detection_bundle(name: str, records: list, names: list[str], size: int, grayscale: bool, val_fraction: float,
                      test_fraction: float, seed: int, named_by: str) -> DataBundle:
    """Decode checked records [(image file, declared (W, H) or None, [(x1, y1, x2, y2, class), ...])] into a
    detection bundle: images resized to size x size, boxes scaled with them, labels padded with -1."""
    from PIL import Image

    from lamina.data.splits import split_indices

    k_max = max(len(objs) for _, _, objs in records)
    S = int(size)
    x = torch.zeros(len(records), 1 if grayscale else 3, S, S)
    boxes = torch.zeros(len(records), k_max, 4)
    labels = torch.full((len(records), k_max), -1, dtype=torch.int64)
    for n, (f, declared, objs) in enumerate(records):
        if not f.is_file():
            raise _coco_error(f, f"image file not found (from {named_by})")
        try:
            with Image.open(f) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise _coco_error(f, f"{img.width}x{img.height} image is larger than {MAX_IMAGE_PIXELS:,} pixels")
                W, H = img.size
                if declared is not None and tuple(declared) != (W, H):
                    raise _coco_error(f, f"image is {W}x{H} but the annotations say {declared[0]}x{declared[1]}")
                arr = np.asarray(img.convert("L" if grayscale else "RGB").resize((S, S), Image.BILINEAR), np.float32)
        except OSError as e:
            raise _coco_error(f, f"not a readable image ({str(e)[:80]})") from None
        x[n] = torch.from_numpy(arr / 255.0).reshape(S, S, -1).permute(2, 0, 1)
        for k, (x1, y1, x2, y2, c) in enumerate(objs):
            boxes[n, k] = torch.tensor([x1 * S / W, y1 * S / H, x2 * S / W, y2 * S / H])
            labels[n, k] = c
    tr, va, te = split_indices(len(records), val_fraction, test_fraction, seed)
    parts = [TensorData(x=x[j], boxes=boxes[j], labels=labels[j]) if len(j) else None for j in (tr, va, te)]
    meta = {"loader": name, "classes": names, "size": S, "max_objects": k_max}
    return DataBundle(name, parts[0], parts[1], parts[2], "detection", (x.shape[1], S, S), len(names), names, meta)


MAX_XML_BYTES = 1 << 20  # one Pascal VOC annotation; real ones are a few KB


def _voc_number(obj, tag: str, where: str) -> float:
    node = obj.find(tag)
    try:
        return float(node.text)  # type: ignore[union-attr, arg-type]
    except (AttributeError, TypeError, ValueError):
        raise DataError(f"{where}: <{tag}> missing or not a number") from None


@registered("voc_detection", "object detection from Pascal VOC XML annotations (one file per image) + image folder "
            "(your data), resized to size x size", "detection", "paths: path= (images), annotations= (XML folder)")
def voc_detection(*, path: str, annotations: str, size: int = 64, grayscale: bool = True,
                  classes: list[str] | None = None, skip_difficult: bool = True, val_fraction: float = 0.1,
                  test_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """One XML per image (Annotations/*.xml): <filename>, <size><width><height>, and <object>s with <name> and
    <bndbox> xmin, ymin, xmax, ymax in VOC's 1-based inclusive pixels (read as x1 = xmin - 1, x2 = xmax).
    Classes: `classes` in that order, else every name found, sorted. Objects marked <difficult>1 are left out
    (VOC's evaluation ignores them) unless skip_difficult is false. As for COCO files, everything is checked
    before any image is decoded: an unreadable or oversized XML, a box of non-positive size or outside its
    image, an unknown class name, a folder with no XML or no boxes are one-line DataErrors naming the file.
    Parsed with the standard library's expat, which resolves no external entities and limits entity expansion."""
    import xml.etree.ElementTree as ET
    from pathlib import Path

    root, ann_dir = Path(path).expanduser(), Path(annotations).expanduser()
    if not ann_dir.is_dir():
        raise _coco_error(ann_dir, "annotation folder not found (a folder of Pascal VOC .xml files)")
    files = sorted(ann_dir.glob("*.xml"))
    if not files:
        raise _coco_error(ann_dir, "no .xml annotation files in the folder")
    if not 16 <= int(size) <= 1024:
        raise DataError(f"voc_detection: size must be in 16 .. 1024, got {size}")
    parsed = []
    for f in files:
        if f.stat().st_size > MAX_XML_BYTES:
            raise _coco_error(f, f"annotation file larger than {MAX_XML_BYTES >> 10} KB")
        try:
            doc = ET.fromstring(f.read_bytes())
        except ET.ParseError as e:
            raise _coco_error(f, f"not a readable XML file ({e})") from None
        size_node = doc.find("size")
        W, H = (_voc_number(doc if size_node is None else size_node, t, str(f)) for t in ("width", "height"))
        if W <= 0 or H <= 0:
            raise _coco_error(f, f"image size {W}x{H}; both must be positive")
        objs = []
        for k, obj in enumerate(doc.findall("object")):
            name = (obj.findtext("name") or "").strip()
            if not name:
                raise _coco_error(f, f"object {k} has no <name>")
            if skip_difficult and (obj.findtext("difficult") or "0").strip() == "1":
                continue
            bb = obj.find("bndbox")
            if bb is None:
                raise _coco_error(f, f"object {k} ({name}) has no <bndbox>")
            x1, y1, x2, y2 = (_voc_number(bb, t, f"{f}: object {k}") for t in ("xmin", "ymin", "xmax", "ymax"))
            x1, y1 = x1 - 1, y1 - 1
            if x2 <= x1 or y2 <= y1:
                raise _coco_error(f, f"object {k} ({name}): box ({x1 + 1:g}, {y1 + 1:g}, {x2:g}, {y2:g}) has "
                                  "non-positive width or height")
            if x1 < 0 or y1 < 0 or x2 > W + 0.5 or y2 > H + 0.5:
                raise _coco_error(f, f"object {k} ({name}): box ({x1 + 1:g}, {y1 + 1:g}, {x2:g}, {y2:g}) lies "
                                  f"outside its {W:g}x{H:g} image")
            objs.append((x1, y1, x2, y2, name))
        if objs:
            image = root / (doc.findtext("filename") or f"{f.stem}.jpg").strip()
            parsed.append((image, (int(W), int(H)), objs))
    if not parsed:
        raise _coco_error(ann_dir, "the annotations hold no boxes; a detector needs boxes to learn from")
    found = sorted({o[4] for _, _, objs in parsed for o in objs})
    names = list(classes) if classes else found
    unknown = [n for n in found if n not in names]
    if unknown:
        raise _coco_error(ann_dir, f"class {unknown[0]!r} is not in data.classes ({', '.join(names)})")
    index = {n: i for i, n in enumerate(names)}
    records = [(img, wh, [(*o[:4], index[o[4]]) for o in objs]) for img, wh, objs in parsed]
    return _detection_bundle("voc_detection", records, names, size, grayscale, val_fraction, test_fraction, seed,
                             "the XML's <filename>")


__all__ = ["BACKGROUNDS", "MAX_ANNOTATION_BYTES", "MAX_IMAGE_PIXELS", "coco_detection", "fashion_scenes",
           "voc_detection"]
