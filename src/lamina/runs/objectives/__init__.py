"""Training objectives: ways to train other than the task's plain loss, as plug-ins of one kind.

An objective is a task wrapper: `wrap(task, context) -> task`, where the returned task keeps the `Task`
protocol (forward, loss, train_stats, ...) and the Trainer keeps calling it as it calls any task. Each
objective is chosen by a config section of its own (`adversarial:`, `distill:`) and registered here; the
Trainer knows none of them. Adding one (self-supervised, continual, federated, ...) means a file in this
folder, a config section, and an entry in OBJECTIVES; nothing in the engine changes.

Objectives compose in the order of OBJECTIVES (each wraps the previous result). A run may also pass its own
`task_wrapper(task, bundle) -> task` (trust.fairness reweights the loss by group this way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lamina.config import RunConfig
from lamina.data.facts import DataFacts


@dataclass
class ObjectiveContext:
    """What an objective may read when it wraps a run's task."""

    cfg: RunConfig
    bundle: object  # the run's DataBundle
    facts: DataFacts


@dataclass(frozen=True)
class Objective:
    name: str  # also its config section
    active: Callable[[RunConfig], bool]  # does this config ask for it?
    wrap: Callable[[object, ObjectiveContext], object]  # (task, context) -> task


def _adversarial(task, ctx):
    from lamina.runs.objectives.adversarial import AdversarialTask

    return AdversarialTask.from_config(task, ctx)


def _distill(task, ctx):
    from lamina.runs.objectives.distill import DistillTask

    return DistillTask.from_config(task, ctx)


OBJECTIVES: dict[str, Objective] = {
    "adversarial": Objective("adversarial", lambda cfg: cfg.adversarial.method != "none", _adversarial),
    "distill": Objective("distill", lambda cfg: bool(cfg.distill.teacher), _distill),
}


def active_objectives(cfg: RunConfig) -> list[str]:
    return [name for name, o in OBJECTIVES.items() if o.active(cfg)]


def apply_objectives(task, ctx: ObjectiveContext):
    """The run's task wrapped by every objective its config turns on."""
    for name in active_objectives(ctx.cfg):
        task = OBJECTIVES[name].wrap(task, ctx)
    return task


__all__ = ["OBJECTIVES", "Objective", "ObjectiveContext", "active_objectives", "apply_objectives"]
