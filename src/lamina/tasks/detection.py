"""Object detection with an anchor-free centre-point model (CenterNet, Zhou et al. 2019).

Batch: x (B, C, H, W); boxes (B, K, 4) (x1, y1, x2, y2) pixels, zero-padded; labels (B, K), -1 on padding.
Model output: (B, num_classes + 4, H/s, W/s): per-class centre heatmap logits, box size / s, centre offset.

* Targets (`encode`): each box puts a Gaussian peak of 1 at its centre cell on its class channel (sigma grows with
  the box: sqrt(w h) / s / 6, at least 0.8 cells); size and offset are regressed at that cell only.
* Loss: the paper's penalty-reduced focal loss on the heatmap (alpha 2, beta 4, normalised by the number of
  objects) + 0.1 x L1 on sizes + L1 on offsets.
* Decoding (`decode`): sigmoid, 3x3 max-pool peaks, the top `max_detections` peaks as boxes, then class-wise
  non-maximum suppression (lamina.nn.boxes.nms).
* Metric: COCO mAP@[.5:.95] and mAP@.5 by pycocotools' COCOeval (not hand-written), as val/map and val/map_50.
"""

from __future__ import annotations

import contextlib
import io

import torch
import torch.nn.functional as F

from lamina.errors import ConfigError, MissingDependencyError
from lamina.nn.boxes import batched_nms, box_iou, nms
from lamina.tasks.base import BaseTask, check_options, refuse_label_smoothing


class COCOMeanAP:
    """mAP@[.5:.95] and mAP@.5 of decoded detections, computed by pycocotools' COCOeval at `compute()`. Holds the
    split's boxes on the CPU (a few numbers per image)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.images: list[tuple[list, list]] = []

    def to(self, device):
        return self

    def update(self, preds: list[dict], targets: list[dict]) -> None:
        for p, t in zip(preds, targets):
            self.images.append(({k: v.detach().cpu() for k, v in p.items()}, {k: v.cpu() for k, v in t.items()}))

    def compute(self) -> dict[str, torch.Tensor]:
        try:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
        except ImportError:
            raise MissingDependencyError("pycocotools is not installed; detection mAP needs it: pip install "
                                         "\"lamina[detection]\"") from None
        gt = {"images": [], "annotations": [], "categories": [{"id": c} for c in range(self.num_classes)]}
        dets = []
        for i, (p, t) in enumerate(self.images):
            gt["images"].append({"id": i})
            for b, c in zip(t["boxes"].tolist(), t["labels"].tolist()):
                w, h = b[2] - b[0], b[3] - b[1]
                gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": int(c),
                                          "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0})
            for b, s, c in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
                dets.append({"image_id": i, "category_id": int(c), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                             "score": float(s)})
        if not gt["annotations"]:
            return {"map": torch.tensor(0.0), "map_50": torch.tensor(0.0)}
        with contextlib.redirect_stdout(io.StringIO()):  # COCO's progress prints
            coco = COCO()
            coco.dataset = gt
            coco.createIndex()
            if not dets:
                return {"map": torch.tensor(0.0), "map_50": torch.tensor(0.0)}
            ev = COCOeval(coco, coco.loadRes(dets), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return {"map": torch.tensor(max(float(ev.stats[0]), 0.0)), "map_50": torch.tensor(max(float(ev.stats[1]), 0.0))}


class DetectionTask(BaseTask):
    name = "detection"
    default_monitor = ("val/map", "max")
    OPTIONS = ("label_smoothing", "max_detections", "nms_iou", "size_weight")

    def __init__(self, num_classes: int, stride: int = 4, max_detections: int = 20, nms_iou: float = 0.5,
                 size_weight: float = 0.1):
        self.num_classes, self.stride = int(num_classes), int(stride)
        self.max_detections, self.nms_iou, self.size_weight = int(max_detections), float(nms_iou), float(size_weight)

    @classmethod
    def from_facts(cls, facts, options: dict) -> "DetectionTask":
        check_options("option of task detection", options, cls.OPTIONS)
        refuse_label_smoothing(options, "detection heatmaps have no label smoothing")
        md, iou = options.get("max_detections", 20), options.get("nms_iou", 0.5)
        if not isinstance(md, int) or not 1 <= md <= 1000:
            raise ConfigError(f"task.max_detections: expected an integer in 1 .. 1000, got {md!r}")
        if not 0.0 < float(iou) <= 1.0:
            raise ConfigError(f"task.nms_iou: expected an IoU threshold in (0, 1], got {iou!r}")
        return cls(int(facts.num_classes), 4, md, float(iou), float(options.get("size_weight", 0.1)))

    @classmethod
    def model_options(cls, facts, entry=None) -> dict:
        return {"in_chans": int(facts.input_shape[0]), "num_classes": int(facts.num_classes)}

    @classmethod
    def check_model(cls, model, facts) -> None:
        if getattr(model, "output_kind", None) != "detection":
            raise ConfigError(f"model.name: {getattr(model, 'model_name', type(model).__name__)} is not a detector; "
                              "use centernet_small")

    # ----- targets and loss ------------------------------------------------------------------------------
    def encode(self, boxes: torch.Tensor, labels: torch.Tensor, h: int, w: int):
        """(heatmap (B, C, h, w), centre cells (B, K, 2) long, size (B, K, 2), offset (B, K, 2), valid (B, K))."""
        s = self.stride
        valid = labels >= 0
        ctr = (boxes[..., :2] + boxes[..., 2:]) / 2 / s  # (B, K, 2) in cells (x, y)
        cell = ctr.floor().long()
        cell[..., 0].clamp_(0, w - 1)
        cell[..., 1].clamp_(0, h - 1)
        size = (boxes[..., 2:] - boxes[..., :2]) / s
        offset = ctr - cell.to(ctr.dtype)
        sigma = (size.prod(-1).clamp(min=0).sqrt() / 6).clamp(min=0.8)  # (B, K)
        ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype)[:, None]
        xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype)[None, :]
        B, K = labels.shape
        heat = torch.zeros(B, self.num_classes, h, w, device=boxes.device, dtype=boxes.dtype)
        for k in range(K):
            cx, cy = cell[:, k, 0].to(boxes.dtype), cell[:, k, 1].to(boxes.dtype)
            g = torch.exp(-((xs[None] - cx[:, None, None]) ** 2 + (ys[None] - cy[:, None, None]) ** 2)
                          / (2 * sigma[:, k, None, None] ** 2))  # (B, h, w), exactly 1 at the centre cell
            g = g * valid[:, k, None, None]
            idx = labels[:, k].clamp(min=0)
            cur = heat[torch.arange(B), idx]
            heat[torch.arange(B), idx] = torch.maximum(cur, g)
        return heat, cell, size, offset, valid

    def forward(self, model, batch):
        return model(batch["x"])

    def loss(self, outputs, batch) -> torch.Tensor:
        C = self.num_classes
        out = outputs.float()
        h, w = out.shape[-2:]
        heat, cell, size, offset, valid = self.encode(batch["boxes"].float(), batch["labels"], h, w)
        p = out[:, :C].sigmoid().clamp(1e-4, 1 - 1e-4)
        pos = heat.eq(1.0).float()
        focal = -(pos * (1 - p) ** 2 * p.log() + (1 - pos) * (1 - heat) ** 4 * p ** 2 * (1 - p).log()).sum()
        n = valid.sum().clamp(min=1)
        B = out.shape[0]
        bi = torch.arange(B, device=out.device)[:, None].expand_as(valid)
        reg = out[:, C:].permute(0, 2, 3, 1)[bi, cell[..., 1], cell[..., 0]]  # (B, K, 4) at the centre cells
        v = valid[..., None].float()
        l_size = ((reg[..., :2] - size).abs() * v).sum() / n
        l_off = ((reg[..., 2:] - offset).abs() * v).sum() / n
        return focal / n + self.size_weight * l_size + l_off

    def train_stats(self, outputs, batch):
        return {}

    def summarize_train(self, sums: dict, n: int) -> dict:
        return {}

    # ----- decoding and metrics --------------------------------------------------------------------------
    def decode(self, outputs: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per image: {"boxes" (n, 4) pixels, "scores" (n,), "labels" (n,)} after peak picking and class-wise NMS."""
        C, s = self.num_classes, self.stride
        out = outputs.float()
        B, _, h, w = out.shape
        heat = out[:, :C].sigmoid()
        peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat)
        k = min(self.max_detections, C * h * w)
        scores, idx = peaks.reshape(B, -1).topk(k)  # (B, k)
        cls, rem = idx // (h * w), idx % (h * w)
        ys, xs = rem // w, rem % w
        reg = out[:, C:].permute(0, 2, 3, 1).reshape(B, h * w, 4)
        r = torch.gather(reg, 1, rem[..., None].expand(-1, -1, 4))  # (B, k, 4)
        cx, cy = (xs + r[..., 2]) * s, (ys + r[..., 3]) * s
        bw, bh = r[..., 0].clamp(min=0) * s, r[..., 1].clamp(min=0) * s
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
        result = []
        for i in range(B):
            keep = batched_nms(boxes[i], scores[i], cls[i], self.nms_iou)
            result.append({"boxes": boxes[i, keep], "scores": scores[i, keep], "labels": cls[i, keep]})
        return result

    def targets(self, batch) -> list[dict[str, torch.Tensor]]:
        return [{"boxes": b[lab >= 0], "labels": lab[lab >= 0]} for b, lab in zip(batch["boxes"], batch["labels"])]

    def make_metrics(self):
        return COCOMeanAP(self.num_classes)

    def update_metrics(self, metrics, outputs, batch):
        metrics.update(self.decode(outputs), self.targets(batch))

    def predict(self, outputs):
        """Fixed-size per-image detections (padded with score 0, label -1) so batches concatenate."""
        dets = self.decode(outputs)
        k = self.max_detections
        boxes = torch.zeros(len(dets), k, 4, device=outputs.device)
        scores = torch.zeros(len(dets), k, device=outputs.device)
        labels = torch.full((len(dets), k), -1, dtype=torch.long, device=outputs.device)
        for i, d in enumerate(dets):
            n = len(d["scores"])
            boxes[i, :n], scores[i, :n], labels[i, :n] = d["boxes"], d["scores"], d["labels"]
        return {"boxes": boxes, "scores": scores, "labels": labels}


__all__ = ["COCOMeanAP", "DetectionTask", "batched_nms", "box_iou", "nms"]
