"""Box operations for detection: IoU and (class-wise) greedy non-maximum suppression on (x1, y1, x2, y2) boxes.

Written here because torchvision.ops does not import beside torch 2.13; tests check nms against a brute-force
reference and box_iou against hand-computed values. Both run on any device.
"""

from __future__ import annotations

import torch


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4) x (M, 4) -> (N, M) IoU of (x1, y1, x2, y2) boxes."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS: indices of kept boxes, highest score first; a box is dropped when its IoU with a kept,
    higher-scoring box exceeds the threshold (torchvision.ops.nms's definition)."""
    order = scores.argsort(descending=True)
    if len(order) == 0:
        return order
    iou = box_iou(boxes[order], boxes[order])  # (N, N) in score order
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    for i in range(len(order)):  # N is small after top-k decoding; the row tests are vectorised
        if keep[i]:
            keep[i + 1:] &= iou[i, i + 1:] <= iou_threshold
    return order[keep]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each class: boxes of different classes are moved apart so they never overlap."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    shift = classes.to(boxes.dtype)[:, None] * (boxes.max() + 1)
    return nms(boxes + shift, scores, iou_threshold)


__all__ = ["batched_nms", "box_iou", "nms"]
