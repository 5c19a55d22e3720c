"""Post-run outputs: what a finished run leaves beside its checkpoints. Each is a callable on the finished
run (`RunEnd`), so a caller can add its own or drop one (`train(..., outputs=[...])`) without touching the
training code. The default list runs in order: the overfitting verdict and LoRA facts go into the summary
before summary.json is written; plots come last.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lamina.config import RunConfig
from lamina.data.facts import DataFacts
from lamina.errors import DataError
from lamina.runs.folder import RunFolder


@dataclass
class RunEnd:
    """A finished run, as the outputs see it."""

    cfg: RunConfig
    folder: RunFolder
    model: torch.nn.Module
    task: object
    facts: DataFacts
    history: list[dict]
    summary: dict  # outputs may add to it until SummaryFile writes it
    test_outputs: dict = field(default_factory=dict)  # the task's test artifacts (e.g. a confusion matrix)
    is_main: bool = True  # rank 0 (or the only process): the one that writes files


def jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def overfitting_verdict(end: RunEnd) -> None:
    """When (if) validation stopped following training: summary["overfitting"] (every rank)."""
    if not end.history or not any("val/loss" in r for r in end.history):
        return
    from lamina.runs.overfitting import overfitting_onset

    try:
        o = overfitting_onset(end.history, min_rise=0.01)  # a rise under 1% of the best val loss is noise
    except DataError:
        return
    end.summary["overfitting"] = {k: o[k] for k in ("overfitting", "onset_epoch", "best_epoch", "final_gap",
                                                    "val_rise") if k in o} | ({"advice": o["advice"]}
                                                                              if o.get("advice") else {})


def chance_check(end: RunEnd) -> None:
    """summary["warnings"]: validation (or test) accuracy at chance while training accuracy is high means the
    evaluation is broken (stale normalization statistics, a label mismatch), not that the model learned nothing."""
    k = end.facts.num_classes
    train_acc = (end.history[-1] if end.history else {}).get("train/acc")  # the last epoch's
    if not k or k < 2 or train_acc is None or train_acc < 0.5:
        return
    last = end.history[-1] if end.history else {}
    for key, value in (("val/acc", last.get("val/acc")), ("test/acc", end.summary["test"].get("test/acc"))):
        if value is not None and value <= 1.5 / k:
            end.summary.setdefault("warnings", []).append(
                f"{key} {value:.3f} is at chance (1/{k} = {1 / k:.3f}) while train/acc is {train_acc:.3f}: the "
                "evaluation does not see what training saw; check data.augment normalization and the labels, or "
                "train longer (BatchNorm statistics trail the weights in very short runs)")
            return


def lora_adapters(end: RunEnd) -> None:
    """LoRA runs: the adapters alone (plus the new head), what such a run needs to ship."""
    if end.cfg.finetune.mode != "lora" or not end.is_main:
        return
    from lamina.io import save_state
    from lamina.nn.lora import lora_state_dict, trainable_fraction
    from lamina.runs.build import lora_head

    own = end.model.state_dict()
    adapters = {**lora_state_dict(end.model), **{n: own[n] for n in lora_head(end.model, end.task) if n in own}}
    save_state(end.folder.adapters, {k: v.detach().contiguous().cpu() for k, v in adapters.items()})
    end.summary["trainable_fraction"] = trainable_fraction(end.model)


def summary_file(end: RunEnd) -> None:
    if end.is_main:
        end.folder.write_text("summary.json", json.dumps(end.summary, indent=2, default=jsonable))


def plots(end: RunEnd) -> None:
    """curves.png (loss and metrics per epoch), confusion.png (when the task produced a confusion matrix)."""
    if not (end.is_main and end.cfg.logging.plots and end.history):
        return
    from lamina.plots import plot_confusion, plot_curves

    plot_curves(end.history, end.folder.curves, title=f"{end.facts.name} / {end.cfg.model.name}")
    cm = end.test_outputs.get("confusion")
    if cm is not None:
        acc = end.summary["test"].get("test/acc")
        plot_confusion(cm.numpy(), end.facts.class_names, end.folder.confusion,
                       title=f"test confusion ({end.facts.name}, acc {acc:.4f})" if acc is not None else "")


DEFAULT_OUTPUTS = (overfitting_verdict, chance_check, lora_adapters, summary_file, plots)
