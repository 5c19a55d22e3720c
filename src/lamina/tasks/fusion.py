"""Multimodal fusion classification: one label per sample from any subset of image, text and audio inputs.

A batch holds the data set's modalities under their names, each sequence with its lengths:

    image (B, C, H, W);  text (B, L) + text_len (B,);  audio (B, T, n_mels) + audio_len (B,);  y (B,)

(`<m>_mask` (B, L) bool works instead of `<m>_len`). The model (lamina.models.multimodal.FusionClassifier) is
called as `model(image=..., text=..., text_mask=..., audio=..., audio_mask=...)` with the modalities present.
Loss: cross-entropy (optional label smoothing); metrics: accuracy and macro-F1 with every modality, and, with
`subset_metrics` (default), the accuracy from each proper non-empty subset of them — `acc_audio`,
`acc_image_text`, ... — so one evaluation says what each modality and pair contributes. Those extra forward
passes run only in evaluation (2^M - 2 of them: 6 for three modalities).

Why not ClassificationTask: that one feeds batch["x"] positionally; here inputs are named and optional, and the
per-subset metrics need the model, which only `forward` sees; so outputs carry the subset logits along
(`FusionOutput`, whose len() is the batch size, what the Trainer's evaluate counts).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchmetrics

from lamina.errors import ConfigError, DataError
from lamina.tasks.base import BaseTask, check_options
from lamina.tasks.contrastive import text_mask

MODALITIES = ("image", "text", "audio")


@dataclass
class FusionOutput:
    logits: torch.Tensor  # (B, K) with every modality of the batch
    subsets: dict[str, torch.Tensor] = field(default_factory=dict)  # "audio_image" -> (B, K); evaluation only

    def __len__(self) -> int:
        return len(self.logits)


def subset_name(mods) -> str:
    return "_".join(mods)


def proper_subsets(mods: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Non-empty proper subsets, smallest first, in the modalities' order."""
    return [s for r in range(1, len(mods)) for s in itertools.combinations(mods, r)]


class FusionTask(BaseTask):
    name = "fusion"
    default_monitor = ("val/acc", "max")
    OPTIONS = ("label_smoothing", "subset_metrics")

    def __init__(self, num_classes: int, modalities=MODALITIES, label_smoothing: float = 0.0,
                 subset_metrics: bool = True):
        self.num_classes = int(num_classes)
        if self.num_classes < 2:
            raise DataError(f"fusion needs at least 2 classes, got {num_classes}")
        mods = tuple(m for m in MODALITIES if m in set(modalities))
        bad = [m for m in modalities if m not in MODALITIES]
        if bad or not mods:
            raise DataError(f"fusion: modalities must be a non-empty subset of {', '.join(MODALITIES)}, got "
                            f"{list(modalities)}")
        self.modalities = mods
        self.label_smoothing = float(label_smoothing)
        self.subset_metrics = bool(subset_metrics)
        self.subsets = proper_subsets(mods) if self.subset_metrics else []

    # ----- runner protocol -------------------------------------------------------------------------
    @classmethod
    def from_facts(cls, facts, options: dict) -> "FusionTask":
        check_options("option of task fusion", options, cls.OPTIONS)
        meta = facts.meta
        n = facts.num_classes or facts.num_outputs
        return cls(int(n or 0), tuple(meta.get("modalities", MODALITIES)), **options)

    @classmethod
    def model_options(cls, facts, entry=None) -> dict:
        meta = facts.meta
        mods = tuple(meta["modalities"])
        shapes = meta.get("input_shapes", {})
        opts = {"num_classes": int(facts.num_classes or facts.num_outputs), "modalities": mods}
        if "image" in mods:
            opts["in_chans"] = int(shapes["image"][0])
        if "text" in mods:
            opts.update(vocab_size=int(meta["vocab_size"]), max_len=max(int(meta["max_len"]), 1))
        if "audio" in mods:
            opts["n_mels"] = int(meta["n_mels"])
        return opts

    @classmethod
    def check_model(cls, model, facts) -> None:
        name = getattr(model, "model_name", type(model).__name__)
        have = getattr(model, "modalities", None)
        if have is None or getattr(model, "output_kind", None) != "sequence":
            raise ConfigError(f"model.name: {name} is not a multimodal classifier; fusion needs fusion_classifier")
        missing = [m for m in facts.meta["modalities"] if m not in have]
        if missing:
            raise ConfigError(f"model.modalities: {name} has no {missing[0]} encoder but data set '{facts.name}' "
                              f"gives {missing[0]}; add it to model.modalities or drop it with data.modalities")

    # ----- task protocol ---------------------------------------------------------------------------
    def inputs(self, batch: dict, mods=None) -> dict:
        """Keyword inputs of the model for the modalities `mods` (default: all of the task's)."""
        kw = {}
        for m in mods or self.modalities:
            if m not in batch:
                raise DataError(f"fusion: the batch has no '{m}' tensor; it holds {', '.join(sorted(batch))}")
            kw[m] = batch[m]
            if m != "image":
                mask = text_mask(batch, m)
                if mask is not None:
                    kw[f"{m}_mask"] = mask
        return kw

    def forward(self, model, batch) -> FusionOutput:
        logits = model(**self.inputs(batch))  # (B, K)
        subsets = {}
        if self.subsets and not model.training:
            subsets = {subset_name(s): model(**self.inputs(batch, s)) for s in self.subsets}
        return FusionOutput(logits, subsets)

    def loss(self, outputs: FusionOutput, batch) -> torch.Tensor:
        return F.cross_entropy(outputs.logits.float(), batch["y"], label_smoothing=self.label_smoothing)

    def train_stats(self, outputs: FusionOutput, batch) -> dict:
        return {"correct": (outputs.logits.detach().argmax(-1) == batch["y"]).sum()}

    def summarize_train(self, sums: dict, n: int) -> dict:
        return {"acc": float(sums["correct"]) / max(n, 1)}

    def make_metrics(self):
        kw = {"task": "multiclass", "num_classes": self.num_classes}
        metrics = {"acc": torchmetrics.Accuracy(**kw), "f1_macro": torchmetrics.F1Score(average="macro", **kw)}
        metrics.update({f"acc_{subset_name(s)}": torchmetrics.Accuracy(**kw) for s in self.subsets})
        return torchmetrics.MetricCollection(metrics, compute_groups=False)  # updated one by one

    def update_metrics(self, metrics, outputs: FusionOutput, batch) -> None:
        y = batch["y"]
        metrics["acc"].update(outputs.logits.float(), y)
        metrics["f1_macro"].update(outputs.logits.float(), y)
        for name, logits in outputs.subsets.items():
            metrics[f"acc_{name}"].update(logits.float(), y)

    def predict(self, outputs: FusionOutput) -> dict:
        probs = outputs.logits.float().softmax(-1)
        conf, label = probs.max(-1)
        return {"label": label, "confidence": conf, "probs": probs}


__all__ = ["FusionTask", "FusionOutput", "proper_subsets"]
