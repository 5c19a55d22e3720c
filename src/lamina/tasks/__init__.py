"""Tasks: what a problem is (loss, metrics, decoding). `build_task(name, **kw)`."""

from lamina.errors import ConfigError, unknown_name
from lamina.tasks.base import Task, model_inputs
from lamina.tasks.classification import ClassificationTask
from lamina.tasks.language_modeling import LanguageModelingTask
from lamina.tasks.regression import RegressionTask

TASKS = {"classification": ClassificationTask, "regression": RegressionTask,
         "language_modeling": LanguageModelingTask}


def build_task(name: str, **kwargs):
    if name not in TASKS:
        raise ConfigError(unknown_name("task", name, TASKS))
    return TASKS[name](**kwargs)


__all__ = ["Task", "ClassificationTask", "RegressionTask", "LanguageModelingTask", "build_task", "model_inputs", "TASKS"]
