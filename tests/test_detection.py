"""Object detection: box IoU by hand, NMS against a brute-force reference, CenterNet target encoding decoded back to
the ground truth (mAP 1.0 by pycocotools), the detector's contract, the fashion_scenes composite, and a short run."""

import pytest
import torch

from lamina.models import create_model
from lamina.nn.boxes import batched_nms, box_iou, nms
from lamina.tasks.detection import COCOMeanAP, DetectionTask

pytest.importorskip("pycocotools", reason="pip install lamina[detection]")


def test_box_iou_by_hand():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 10]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[25 / 175, 1.0, 0.0, 0.5]]))


def reference_nms(boxes, scores, thr):
    """The definition, one box at a time: visit by score; keep a box unless a kept box overlaps it > thr."""
    kept = []
    for i in sorted(range(len(scores)), key=lambda i: -float(scores[i])):
        if all(float(box_iou(boxes[i:i + 1], boxes[j:j + 1])) <= thr for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed", range(5))
def test_nms_matches_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(40, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(40, 2, generator=g) * 20], 1)
    scores = torch.rand(40, generator=g)
    for thr in (0.3, 0.5, 0.7):
        assert nms(boxes, scores, thr).tolist() == reference_nms(boxes, scores, thr)
    classes = torch.randint(0, 3, (40,), generator=g)
    got = set(batched_nms(boxes, scores, classes, 0.5).tolist())
    want = set()
    for c in range(3):
        idx = (classes == c).nonzero().flatten()
        want |= {int(idx[i]) for i in reference_nms(boxes[idx], scores[idx], 0.5)}
    assert got == want


def test_encoded_targets_decode_back_to_the_boxes_with_map_one():
    task = DetectionTask(num_classes=3, max_detections=10)
    boxes = torch.tensor([[[4.0, 6, 20, 30], [30, 30, 60, 50], [0, 0, 0, 0]],
                          [[10.0, 40, 26, 60], [0, 0, 0, 0], [0, 0, 0, 0]]])
    labels = torch.tensor([[0, 2, -1], [1, -1, -1]])
    heat, cell, size, offset, valid = task.encode(boxes, labels, 16, 16)
    assert heat.max() == 1.0 and int(heat.eq(1).sum()) == 3  # one peak per object, on its class channel
    assert heat[0, 0].eq(1).nonzero().tolist() == [[4, 3]]  # centre (12, 18) px -> cell (x 3, y 4)
    # a "model" that outputs the targets exactly: logits of the heatmap, the size and offset at every cell
    reg = torch.zeros(2, 4, 16, 16)
    for b in range(2):
        for k in range(3):
            if valid[b, k]:
                x, y = cell[b, k]
                reg[b, :2, y, x], reg[b, 2:, y, x] = size[b, k], offset[b, k]
    logits = torch.logit(heat.clamp(1e-6, 1 - 1e-6))
    out = torch.cat([logits, reg], 1)
    dets = task.decode(out)
    for d, t in zip(dets, task.targets({"boxes": boxes, "labels": labels})):
        top = d["scores"] > 0.5
        assert sorted(d["labels"][top].tolist()) == sorted(t["labels"].tolist())
        assert box_iou(d["boxes"][top], t["boxes"]).max(1).values.min() > 0.99
    m = COCOMeanAP(3)
    m.update(dets, task.targets({"boxes": boxes, "labels": labels}))
    res = m.compute()
    assert float(res["map"]) == pytest.approx(1.0) and float(res["map_50"]) == pytest.approx(1.0)
    assert task.loss(out, {"boxes": boxes, "labels": labels}) < task.loss(torch.zeros_like(out),
                                                                           {"boxes": boxes, "labels": labels})


def test_detector_contract_and_gradients():
    torch.manual_seed(0)
    m = create_model("centernet_small", num_classes=4, widths=(8, 16, 32), neck=16, head=16)
    x = torch.rand(2, 1, 64, 64)
    out = m(x)
    assert out.shape == (2, 4 + 4, 16, 16) and m.stride == 4
    task = DetectionTask(4)
    loss = task.loss(out, {"boxes": torch.tensor([[[8.0, 8, 30, 40]], [[20, 10, 50, 30]]]),
                           "labels": torch.tensor([[1], [3]])})
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (2, 16)
    m.reset_classifier(2)
    assert m(x).shape == (2, 6, 16, 16)


@pytest.fixture(scope="module")
def scenes():
    from lamina.data.builtin import FASHION_MNIST_ROOT

    if not (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from lamina.data import load_dataset

    return load_dataset("fashion_scenes", train_size=40, val_size=8, test_size=16, seed=1)


def test_fashion_scenes_boxes_are_inside_and_disjoint(scenes):
    for split in (scenes.train, scenes.test):
        b, lab = split.tensors["boxes"], split.tensors["labels"]
        assert ((lab >= -1) & (lab < 10)).all() and (lab[:, 0] >= 0).all()  # at least one garment per scene
        for boxes, labels in zip(b, lab):
            real = boxes[labels >= 0]
            assert (real[:, :2] >= 0).all() and (real[:, 2:] <= 64).all() and (real[:, 2:] > real[:, :2]).all()
            iou = box_iou(real, real) - torch.eye(len(real))
            assert iou.max() <= 0
    x = scenes.train.tensors["x"]
    assert x.shape == (40, 1, 64, 64) and 0 <= x.min() and x.max() <= 1


def test_short_detection_run_reports_coco_map_and_predict_draws_boxes(tmp_path, scenes, capsys):
    from conftest import ROOT

    from lamina import runs
    from lamina.config import load_config

    cfg = load_config(ROOT / "configs" / "fashion_scenes_centernet.yaml",
                      ["data.train_size=64", "data.val_size=16", "data.test_size=16", "trainer.max_epochs=1",
                       "model.widths=[8,16,32]", "model.neck=16", "model.head=16", "trainer.progress=false",
                       "logging.tensorboard=false", "cost.energy=false", f"logging.root={tmp_path}"])
    res = runs.train(cfg)
    assert {"test/map", "test/map_50"} <= set(res.summary["test"]) and 0 <= res.summary["test"]["test/map"] <= 1
    import json

    from PIL import Image

    from lamina.cli.main import main

    png = tmp_path / "scene.png"
    Image.fromarray((scenes.test.tensors["x"][0, 0].numpy() * 255).astype("uint8")).save(png)
    capsys.readouterr()
    assert main(["predict", str(res.run_dir), str(png), "--draw", str(tmp_path / "drawn"), "--min-score", "0",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["detections"] and (tmp_path / "drawn" / "scene.png").is_file()
    d = row["detections"][0]
    assert set(d) == {"class", "label", "score", "box"} and len(d["box"]) == 4


def test_detection_bad_options_are_config_errors():
    from lamina.data.facts import DataFacts
    from lamina.errors import ConfigError

    facts = DataFacts("x", "detection", (1, 64, 64), 10, num_classes=10)
    with pytest.raises(ConfigError, match="nms_iou"):
        DetectionTask.from_facts(facts, {"nms_iou": 1.5})
    with pytest.raises(ConfigError, match="label smoothing"):
        DetectionTask.from_facts(facts, {"label_smoothing": 0.1})


def test_box_flip_moves_boxes_with_the_pixels():
    from lamina.data.transforms import RandomBoxFlip

    x = torch.zeros(2, 1, 16, 16)
    x[0, 0, 2:6, 1:5] = 1.0  # an object at x 1..5, y 2..6
    boxes = torch.tensor([[[1.0, 2, 5, 6], [0, 0, 0, 0]], [[3.0, 3, 9, 9], [0, 0, 0, 0]]])
    labels = torch.tensor([[4, -1], [2, -1]])
    out = RandomBoxFlip(p=1.0)({"x": x, "boxes": boxes, "labels": labels})
    assert out["boxes"][0, 0].tolist() == [11.0, 2.0, 15.0, 6.0] and out["boxes"][0, 1].tolist() == [0, 0, 0, 0]
    ys, xs = torch.nonzero(out["x"][0, 0] > 0, as_tuple=True)
    assert [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] == [11, 2, 15, 6]
    same = RandomBoxFlip(p=0.0)({"x": x, "boxes": boxes, "labels": labels})
    assert torch.equal(same["boxes"], boxes) and torch.equal(same["x"], x)


def _coco_folder(tmp, scenes, n=12):
    import json

    from PIL import Image

    (tmp / "img").mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(10)]}
    for i in range(n):
        big = torch.nn.functional.interpolate(scenes.train.tensors["x"][i:i + 1], size=(128, 128), mode="bilinear")[0, 0]
        Image.fromarray((big.numpy() * 255).astype("uint8")).save(tmp / "img" / f"{i}.png")
        coco["images"].append({"id": i, "file_name": f"{i}.png", "width": 128, "height": 128})
        for b, lab in zip(scenes.train.tensors["boxes"][i], scenes.train.tensors["labels"][i]):
            if lab >= 0:
                x1, y1, x2, y2 = (2 * b).tolist()
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i,
                                            "category_id": int(lab) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1]})
    (tmp / "ann.json").write_text(json.dumps(coco))
    return coco


def test_coco_files_load_with_boxes_scaled_and_bad_entries_are_one_line(tmp_path, scenes, capsys):
    import json

    from lamina.data import load_dataset
    from lamina.errors import DataError

    coco = _coco_folder(tmp_path, scenes)
    b = load_dataset("coco_detection", path=str(tmp_path / "img"), annotations=str(tmp_path / "ann.json"), size=64,
                     val_fraction=0.0, test_fraction=0.0)
    assert b.train.tensors["x"].shape == (12, 1, 64, 64) and b.class_names[0] == "c0"
    got = {tuple(bx.tolist()) for bx, lab in zip(b.train.tensors["boxes"].reshape(-1, 4),
                                                b.train.tensors["labels"].reshape(-1)) if lab >= 0}
    want = {tuple(bx.tolist()) for bx, lab in zip(scenes.train.tensors["boxes"][:12].reshape(-1, 4),
                                                 scenes.train.tensors["labels"][:12].reshape(-1)) if lab >= 0}
    assert got == want  # 128 px annotations scaled back onto the 64 px images
    cases = [("annotations", [], "no annotations"),
             ("bbox", [5, 5, -3, 4], "both must be positive"),
             ("bbox", [100, 100, 40, 40], "outside its 128x128 image"),
             ("category_id", 99, "not in 'categories'"),
             ("image_id", 77, "not in 'images'")]
    for key, value, expect in cases:
        bad = json.loads(json.dumps(coco))
        if key == "annotations":
            bad["annotations"] = value
        else:
            bad["annotations"][0][key] = value
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(DataError, match=expect):
            load_dataset("coco_detection", path=str(tmp_path / "img"), annotations=str(tmp_path / "bad.json"))
        rc = main_cli(["train", "data.name=coco_detection", f"data.path={tmp_path / 'img'}",
                       f"data.annotations={tmp_path / 'bad.json'}", "model.name=centernet_small", "task.name=detection",
                       f"logging.root={tmp_path / 'runs'}", "trainer.progress=false"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and expect in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing written half


def main_cli(args):
    from lamina.cli.main import main

    return main(args)


def _voc_folder(tmp, coco):
    """The same boxes as _coco_folder's, as Pascal VOC XML (1-based inclusive pixels)."""
    (tmp / "xml").mkdir()
    for im in coco["images"]:
        objs = "".join(
            f"<object><name>c{a['category_id'] - 1}</name><difficult>0</difficult><bndbox><xmin>{a['bbox'][0] + 1}"
            f"</xmin><ymin>{a['bbox'][1] + 1}</ymin><xmax>{a['bbox'][0] + a['bbox'][2]}</xmax>"
            f"<ymax>{a['bbox'][1] + a['bbox'][3]}</ymax></bndbox></object>"
            for a in coco["annotations"] if a["image_id"] == im["id"])
        (tmp / "xml" / f"{im['id']}.xml").write_text(
            f"<annotation><filename>{im['file_name']}</filename><size><width>128</width><height>128</height>"
            f"<depth>1</depth></size>{objs}</annotation>")


def test_voc_xml_loads_the_same_boxes_as_coco_and_bad_files_are_one_line(tmp_path, scenes, capsys):
    from lamina.data import load_dataset
    from lamina.errors import DataError

    coco = _coco_folder(tmp_path, scenes)
    _voc_folder(tmp_path, coco)
    kw = dict(size=64, val_fraction=0.0, test_fraction=0.0)
    c = load_dataset("coco_detection", path=str(tmp_path / "img"), annotations=str(tmp_path / "ann.json"), **kw)
    v = load_dataset("voc_detection", path=str(tmp_path / "img"), annotations=str(tmp_path / "xml"),
                     classes=[f"c{i}" for i in range(10)], **kw)
    order = [int(f.stem) for f in sorted((tmp_path / "xml").glob("*.xml"))]  # files sort as 0, 1, 10, 11, 2, ...
    assert torch.allclose(v.train.tensors["boxes"], c.train.tensors["boxes"][order], atol=1e-4)
    assert torch.equal(v.train.tensors["labels"], c.train.tensors["labels"][order])
    assert torch.equal(v.train.tensors["x"], c.train.tensors["x"][order])
    first = (tmp_path / "xml" / "0.xml").read_text()
    box = first.split("<bndbox>")[1].split("</bndbox>")[0]
    cases = [(first.replace(box, "<xmin>50</xmin><ymin>5</ymin><xmax>40</xmax><ymax>9</ymax>"), "non-positive width"),
             (first.replace(box, "<xmin>100</xmin><ymin>5</ymin><xmax>140</xmax><ymax>9</ymax>"), "outside its 128x128"),
             (first.replace("<name>", "<name>zebra", 1), "is not in data.classes"),
             (first.replace("<xmin>", "<xmin>x", 1), "<xmin> missing or not a number"),
             (first[:40], "not a readable XML file")]
    for text, expect in cases:
        (tmp_path / "xml" / "0.xml").write_text(text)
        with pytest.raises(DataError, match=expect):
            load_dataset("voc_detection", path=str(tmp_path / "img"), annotations=str(tmp_path / "xml"),
                         classes=[f"c{i}" for i in range(10)])
        rc = main_cli(["train", "data.name=voc_detection", f"data.path={tmp_path / 'img'}",
                       f"data.annotations={tmp_path / 'xml'}", "data.classes=[c0,c1,c2,c3,c4,c5,c6,c7,c8,c9]",
                       "model.name=centernet_small", "task.name=detection", f"logging.root={tmp_path / 'runs'}",
                       "trainer.progress=false"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and expect in err and len(err.splitlines()) == 1, err
    # difficult objects are left out by default, kept on request
    (tmp_path / "xml" / "0.xml").write_text(first.replace("<difficult>0</difficult>", "<difficult>1</difficult>"))
    n_easy = (load_dataset("voc_detection", path=str(tmp_path / "img"), annotations=str(tmp_path / "xml"), **kw)
              .train.tensors["labels"] >= 0).sum()
    n_all = (load_dataset("voc_detection", path=str(tmp_path / "img"), annotations=str(tmp_path / "xml"),
                          skip_difficult=False, **kw).train.tensors["labels"] >= 0).sum()
    assert n_all - n_easy == first.count("<object>")
    with pytest.raises(DataError, match="no .xml annotation files"):
        load_dataset("voc_detection", path=str(tmp_path / "img"), annotations=str(tmp_path / "img"))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("backbone,options,taps", [("resnet18", {"widths": [8, 16, 32, 64]}, (0, 1)),
                                                   ("resnet18", {"small_input": True, "widths": [8, 16, 32, 64]},
                                                    (2, 3)),
                                                   ("efficientnet_lite0", {"width_mult": 0.25, "depth_mult": 0.25},
                                                    (1, 2)),
                                                   ("cnn_medium", {"channels": [8, 16, 32]}, (1, 2))])
def test_zoo_backbones_under_the_fpn(backbone, options, taps):
    from lamina.errors import ModelError
    from lamina.models import create_model

    m = create_model("centernet_small", in_chans=1, num_classes=3, backbone=backbone, backbone_options=options,
                     neck=16, head=16)
    assert (m.tap4, m.tap8) == taps
    x = torch.randn(2, 1, 64, 64)
    maps = m.backbone.stage_features(x)
    assert maps[m.tap4].shape[-1] == 16 and maps[m.tap8].shape[-1] == 8  # strides 4 and 8
    out = m(x)
    assert out.shape == (2, 7, 16, 16)
    out.sum().backward()
    stages = getattr(m.backbone, "stages", None) or m.backbone.blocks
    assert all(p.grad is not None for p in stages[m.tap8].parameters())  # the stages the neck reads learn
    assert len(stages) == m.tap8 + 1  # deeper stages are dropped, not carried as dead parameters
    assert all(p.grad is not None for p in m.parameters())  # every parameter is reached by the loss
    with pytest.raises(ModelError, match="strides"):
        create_model("centernet_small", backbone="resnet20")
    with pytest.raises(ModelError, match="no stage feature maps"):
        create_model("centernet_small", backbone="vit_tiny")
