"""Losses of metric learning for faces: additive angular / cosine margins and batch-hard triplets.

With unit embeddings e and unit class centres w_c, cos(theta_c) = e . w_c. A softmax over s * cos(theta_c)
already separates identities by angle; a margin on the true class makes the separation one a new face can rely
on (its angle to its own centre must beat the others by m):

    ArcFace (Deng et al. 2019)   true logit  s * cos(theta_y + m)       additive angular margin
    CosFace (Wang et al. 2018)   true logit  s * (cos(theta_y) - m)     additive cosine margin

cos(theta + m) stops falling once theta + m passes pi, which would reward moving further away; past that point
ArcFace's reference implementation continues with cos(theta) - m sin(m), a line that keeps falling: so does
this one.

Triplet (Schroff et al. 2015, FaceNet) with batch-hard mining (Hermans, Beyer & Leibe 2017): for each anchor the
farthest positive and the nearest negative in the batch, loss max(0, d(a, p) - d(a, n) + margin), Euclidean
distances between unit embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def margin_logits(cos: torch.Tensor, y: torch.Tensor, kind: str, scale: float, margin: float) -> torch.Tensor:
    """(B, K) scaled logits with the margin applied to each row's true class; `cos` are cosines in [-1, 1].

    kind: "arcface" (angular margin), "cosface" (cosine margin) or "softmax" (no margin: s * cos)."""
    cos = cos.float().clamp(-1.0, 1.0)
    if kind == "softmax" or margin == 0.0:
        return scale * cos
    true = cos.gather(1, y[:, None])  # (B, 1)
    if kind == "arcface":
        sin = (1.0 - true * true).clamp(min=0.0).sqrt()
        shifted = true * math.cos(margin) - sin * math.sin(margin)  # cos(theta + m)
        # theta + m > pi  <=>  cos(theta) < cos(pi - m): continue with a falling line instead
        shifted = torch.where(true > math.cos(math.pi - margin), shifted, true - margin * math.sin(margin))
    elif kind == "cosface":
        shifted = true - margin
    else:
        raise ValueError(f"margin kind must be arcface, cosface or softmax, got {kind!r}")
    return scale * cos.scatter(1, y[:, None], shifted)


def batch_hard_triplet(emb: torch.Tensor, y: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over anchors that have a positive and a negative in the batch, number of such anchors)."""
    e = emb.float()
    d = torch.cdist(e, e)  # (B, B)
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool, device=y.device)
    pos = same & ~eye
    neg = ~same
    hardest_pos = torch.where(pos, d, torch.zeros_like(d)).amax(1)
    hardest_neg = torch.where(neg, d, torch.full_like(d, float("inf"))).amin(1)
    valid = pos.any(1) & neg.any(1)
    loss = F.relu(hardest_pos - hardest_neg + margin)
    n = valid.sum()
    return (loss * valid).sum() / n.clamp(min=1), n


__all__ = ["batch_hard_triplet", "margin_logits"]
