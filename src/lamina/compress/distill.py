"""Knowledge distillation: the objective lives in lamina.runs.objectives.distill (config section `distill`,
`lamina distill TEACHER_RUN`); re-exported here for code that imported it from compress."""

from lamina.runs.objectives.distill import DistillTask, distillation_loss, load_teacher  # noqa: F401
