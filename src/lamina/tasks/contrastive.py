"""Contrastive image-text learning (CLIP): symmetric InfoNCE loss; in-batch retrieval and zero-shot accuracy.

A batch holds image (B, C, H, W), text (B, L) right-padded token ids with text_len (B,) (or a bool text_mask
(B, L)), and optionally y (B,) class ids, which the loss never sees. The model is a dual encoder
(lamina.models.multimodal.DualEncoder): the task calls `encode_image`, `encode_text`, `scale` and
`zero_shot_classifier`.

    logits = s * img @ txt.T  (B, B), img / txt unit rows, s = exp(logit_scale) <= 100
    loss   = (CE(logits, arange(B)) + CE(logits.T, arange(B))) / 2

InfoNCE (van den Oord et al. 2018) in both directions, as CLIP (Radford et al. 2021): image i must pick its own
caption among the batch's B captions, and caption i its own image.

Metrics:
* i2t_top1 / t2i_top1, in-batch retrieval: the best-scoring caption for an image (image for a caption) is a hit
  when it is the paired one or, when the batch has class labels y, one of the same class: captions generated
  from class names cannot tell apart the images of a class, so same-class retrieval is the question they
  answer. The score depends on the batch size (eval_batch_size): more candidates, harder.
* zero_shot_acc: each image is assigned the class whose prompt-ensemble embedding (model.zero_shot_classifier
  over the data set's meta["prompts"]) scores highest; accuracy against y, exact over the split. The class
  matrix is rebuilt from the current weights for every evaluation batch (K x P short prompts cost little next
  to a batch of images), so it is never stale.

`len(outputs)` is the batch size (what the Trainer's evaluate counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchmetrics

from lamina.errors import ConfigError, DataError
from lamina.tasks.base import BaseTask, check_options


def info_nce(logits_per_image: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE of a (B, B) similarity matrix whose diagonal holds the true pairs."""
    if logits_per_image.dim() != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise DataError(f"InfoNCE needs a square (B, B) similarity matrix, got shape {tuple(logits_per_image.shape)}")
    target = torch.arange(len(logits_per_image), device=logits_per_image.device)
    return 0.5 * (F.cross_entropy(logits_per_image, target, label_smoothing=label_smoothing)
                  + F.cross_entropy(logits_per_image.t(), target, label_smoothing=label_smoothing))


def retrieval_hits(logits: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) bool: the best-scoring candidate of each query row is its pair (or, given labels, of its class)."""
    best = logits.argmax(-1)
    if y is None:
        return best == torch.arange(len(logits), device=logits.device)
    return y[best] == y


def text_mask(batch: dict, key: str = "text") -> torch.Tensor | None:
    """(B, L) bool from batch[key + "_mask"] or batch[key + "_len"]; None when neither is there."""
    if f"{key}_mask" in batch:
        return batch[f"{key}_mask"].bool()
    if f"{key}_len" in batch:
        L = batch[key].shape[1]
        return torch.arange(L, device=batch[key].device)[None] < batch[f"{key}_len"][:, None]
    return None


@dataclass
class ContrastiveOutput:
    image_emb: torch.Tensor  # (B, E), unit rows
    text_emb: torch.Tensor  # (B, E), unit rows
    scale: torch.Tensor  # 0-dim, exp(logit_scale)
    zero_shot: torch.Tensor | None = None  # (B, K) logits against the class prompts (evaluation only)

    def __len__(self) -> int:
        return len(self.image_emb)

    @property
    def logits_per_image(self) -> torch.Tensor:
        return self.scale.float() * self.image_emb.float() @ self.text_emb.float().t()  # (B, B)


class ContrastiveTask(BaseTask):
    name = "contrastive"
    default_monitor = ("val/zero_shot_acc", "max")
    OPTIONS = ("label_smoothing", "zero_shot")

    def __init__(self, prompts: dict | None = None, num_classes: int | None = None, label_smoothing: float = 0.0,
                 zero_shot: bool = True):
        """prompts: {"ids": (Q, L), "lens": (Q,), "class": (Q,)} (lists or tensors): every class's prompts."""
        self.label_smoothing = float(label_smoothing)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"task.label_smoothing: expected a number in [0, 1), got {label_smoothing!r}")
        self.prompts = None
        if zero_shot and prompts is not None:
            ids = torch.as_tensor(prompts["ids"], dtype=torch.int64)
            lens = torch.as_tensor(prompts["lens"], dtype=torch.int64)
            cls = torch.as_tensor(prompts["class"], dtype=torch.int64)
            k = int(num_classes) if num_classes else int(cls.max()) + 1
            covered = sorted(set(cls.tolist())) == list(range(k))
            if ids.dim() != 2 or len(ids) != len(lens) or len(ids) != len(cls) or not covered:
                raise DataError(f"zero-shot prompts must be ids (Q, L), lens (Q,) and class (Q,) covering classes "
                                f"0..{k - 1}, got shapes {tuple(ids.shape)}, {tuple(lens.shape)}, {tuple(cls.shape)}")
            mask = torch.arange(ids.shape[1])[None] < lens[:, None]
            # one (ids, mask) pair per class, the form model.zero_shot_classifier takes
            self.prompts = [(ids[cls == c], mask[cls == c]) for c in range(k)]
        self.num_classes = len(self.prompts) if self.prompts is not None else None
        if self.prompts is None:
            self.default_monitor = ("val/loss", "min")
        self._on: dict = {}  # device -> prompts moved there

    # ----- runner protocol -------------------------------------------------------------------------
    @classmethod
    def from_facts(cls, facts, options: dict) -> "ContrastiveTask":
        check_options("option of task contrastive", options, cls.OPTIONS)
        meta = facts.meta
        return cls(meta.get("prompts"), facts.num_classes, **options)

    @classmethod
    def model_options(cls, facts, entry=None) -> dict:
        meta = facts.meta
        shapes = meta.get("input_shapes") or {"image": facts.input_shape}
        return {"vocab_size": int(meta["vocab_size"]), "max_len": int(meta["max_len"]),
                "in_chans": int(shapes["image"][0])}

    @classmethod
    def check_model(cls, model, facts) -> None:
        if not all(hasattr(model, a) for a in ("encode_image", "encode_text", "scale", "zero_shot_classifier")):
            name = getattr(model, "model_name", type(model).__name__)
            raise ConfigError(f"model.name: {name} is not an image-text dual encoder; contrastive training needs "
                              "clip_tiny or clip_small")

    # ----- task protocol ---------------------------------------------------------------------------
    def _prompts_on(self, device) -> list:
        key = str(device)
        if key not in self._on:
            self._on[key] = [(i.to(device), m.to(device)) for i, m in self.prompts]
        return self._on[key]

    def forward(self, model, batch) -> ContrastiveOutput:
        img = model.encode_image(batch["image"])  # (B, E)
        txt = model.encode_text(batch["text"], text_mask(batch))  # (B, E)
        scale = model.scale()
        zs = None
        if not model.training and self.prompts is not None and "y" in batch:
            classes = model.zero_shot_classifier(self._prompts_on(img.device))  # (K, E)
            zs = scale.float() * img.float() @ classes.float().t()  # (B, K)
        return ContrastiveOutput(img, txt, scale, zs)

    def loss(self, outputs: ContrastiveOutput, batch) -> torch.Tensor:
        return info_nce(outputs.logits_per_image, self.label_smoothing)

    def train_stats(self, outputs: ContrastiveOutput, batch) -> dict:
        with torch.no_grad():
            logits, y = outputs.logits_per_image, batch.get("y")
            return {"i2t_hits": retrieval_hits(logits, y).sum(), "t2i_hits": retrieval_hits(logits.t(), y).sum(),
                    "scale": outputs.scale.detach().float() * len(outputs)}

    def summarize_train(self, sums: dict, n: int) -> dict:
        n = max(n, 1)
        return {"i2t_top1": float(sums["i2t_hits"]) / n, "t2i_top1": float(sums["t2i_hits"]) / n,
                "logit_scale": float(sums["scale"]) / n}

    def make_metrics(self):
        metrics = {"i2t_top1": torchmetrics.MeanMetric(), "t2i_top1": torchmetrics.MeanMetric()}
        if self.prompts is not None:
            metrics["zero_shot_acc"] = torchmetrics.Accuracy(task="multiclass", num_classes=self.num_classes)
        return torchmetrics.MetricCollection(metrics, compute_groups=False)  # updated one by one

    def update_metrics(self, metrics, outputs: ContrastiveOutput, batch) -> None:
        logits, y = outputs.logits_per_image, batch.get("y")
        metrics["i2t_top1"].update(retrieval_hits(logits, y).float())
        metrics["t2i_top1"].update(retrieval_hits(logits.t(), y).float())
        if outputs.zero_shot is not None and "zero_shot_acc" in metrics:
            metrics["zero_shot_acc"].update(outputs.zero_shot, y)

    def predict(self, outputs: ContrastiveOutput) -> dict:
        out = {"image_emb": outputs.image_emb.float(), "text_emb": outputs.text_emb.float()}
        if outputs.zero_shot is not None:
            probs = outputs.zero_shot.float().softmax(-1)
            conf, label = probs.max(-1)
            out.update(label=label, confidence=conf, probs=probs)
        return out


__all__ = ["ContrastiveTask", "ContrastiveOutput", "info_nce", "retrieval_hits", "text_mask"]
