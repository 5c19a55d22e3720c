"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a small student learns from a trained teacher.

The student's training loss is

    alpha * T^2 * KL(softmax(t / T) || softmax(s / T))  +  (1 - alpha) * task.loss(s, y)

with t, s the teacher's and student's logits. The temperature T softens both distributions so the student sees
how the teacher ranks the wrong classes ("dark knowledge"); the T^2 factor keeps the soft term's gradients on
the same scale as the hard term's whatever T is. Token-level outputs (language models: (B, T, V)) are distilled
per position.

`DistillTask` (config section `distill`, a training objective: lamina/runs/objectives) composes over any task whose outputs are logits (classification, sequence classification,
language modeling) instead of a distillation flag inside the Trainer: the Trainer keeps calling
`task.forward` / `task.loss`, and the wrapper adds the teacher. Validation (no grad) reports the task's own
loss, so a distilled run's val/loss compares with a plain run's. The teacher runs frozen in eval mode under
`torch.no_grad`, on the same (augmented) batch the student sees.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lamina.errors import ConfigError

_DISTILLABLE = ("classification", "sequence_classification", "language_modeling")


def _logits(outputs) -> torch.Tensor:
    return outputs.logits if hasattr(outputs, "logits") else outputs


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over samples (and positions)."""
    v = student.shape[-1]
    s = F.log_softmax(student.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher.float().reshape(-1, v) / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


class DistillTask:
    """The wrapped task with a teacher's soft targets mixed into its training loss; all else is the task's."""

    def __init__(self, task, teacher: torch.nn.Module, temperature: float = 4.0, alpha: float = 0.9):
        if getattr(task, "name", None) not in _DISTILLABLE:
            raise ConfigError(f"distill: distillation needs a task with logits ({', '.join(_DISTILLABLE)}); "
                              f"this run's task is {getattr(task, 'name', type(task).__name__)}")
        self.task, self.teacher = task, teacher.eval().requires_grad_(False)
        self.temperature, self.alpha = float(temperature), float(alpha)
        self._teacher_logits = None

    @classmethod
    def from_config(cls, task, ctx) -> "DistillTask":
        d = ctx.cfg.distill
        return cls(task, load_teacher(d.teacher, ctx.facts, ctx.cfg.data.name), d.temperature, d.alpha)

    def __getattr__(self, name):  # everything but forward/loss: the wrapped task's
        return getattr(self.__dict__["task"], name)

    def forward(self, model, batch):
        out = self.task.forward(model, batch)
        if torch.is_grad_enabled() and model is not self.teacher:  # training step: the teacher's view of the batch
            if next(self.teacher.parameters()).device != batch["x"].device:
                self.teacher.to(batch["x"].device)
            with torch.no_grad():
                self._teacher_logits = _logits(self.task.forward(self.teacher, batch)).detach()
        return out

    def loss(self, outputs, batch) -> torch.Tensor:
        hard = self.task.loss(outputs, batch)
        t, self._teacher_logits = self._teacher_logits, None
        if t is None or not torch.is_grad_enabled():  # validation / evaluation: the task's own loss
            return hard
        s = _logits(outputs)
        if s.shape != t.shape:
            raise ConfigError(f"distill: student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} "
                              "differ; teacher and student must share the data set and output classes")
        soft = distillation_loss(s, t, self.temperature)
        return self.alpha * soft + (1.0 - self.alpha) * hard


def load_teacher(path: str | Path, facts, data_name: str) -> torch.nn.Module:
    """The teacher run's model (best checkpoint), checked against the student's data facts."""
    from lamina.runs.open import open_run

    teacher = open_run(path)
    if teacher.cfg.data.name != data_name:
        raise ConfigError(f"distill.teacher: {path} was trained on '{teacher.cfg.data.name}', the student on "
                          f"'{data_name}'; a teacher must be trained on the student's data set")
    for key in ("task", "num_outputs", "input_shape"):
        have, want = getattr(teacher.facts, key), getattr(facts, key)
        if key == "input_shape":
            have, want = tuple(have), tuple(want)
        if have != want:
            raise ConfigError(f"distill.teacher: {path} has {key}={have}, the student's data has {key}={want}")
    return teacher.model
