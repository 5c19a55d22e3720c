"""Tasks: what a problem is (loss, metrics, decoding). `build_task(name, **kw)`."""

from lamina.errors import ConfigError, unknown_name
from lamina.tasks.base import Task, model_inputs
from lamina.tasks.classification import ClassificationTask
from lamina.tasks.language_modeling import LanguageModelingTask
from lamina.tasks.regression import RegressionTask
from lamina.tasks.masked_lm import MaskedLMTask
from lamina.tasks.sequence_classification import SequenceClassificationTask

TASKS = {"classification": ClassificationTask, "regression": RegressionTask,
         "language_modeling": LanguageModelingTask}
TASKS["masked_lm"] = MaskedLMTask
TASKS["sequence_classification"] = SequenceClassificationTask
from lamina.tasks.seq2seq import Seq2SeqTask  # noqa: E402
TASKS["seq2seq"] = Seq2SeqTask
from lamina.tasks.contrastive import ContrastiveTask  # noqa: E402
TASKS["contrastive"] = ContrastiveTask
from lamina.tasks.fusion import FusionTask  # noqa: E402
TASKS["fusion"] = FusionTask
from lamina.tasks.ctc import CTCTask  # noqa: E402
TASKS["ctc"] = CTCTask
from lamina.tasks.detection import DetectionTask  # noqa: E402
TASKS["detection"] = DetectionTask
from lamina.tasks.faces import FaceTask  # noqa: E402
TASKS["face"] = FaceTask
from lamina.tasks.binary import BinaryTask  # noqa: E402
TASKS["binary"] = BinaryTask
from lamina.tasks.recommendation import RecommendationTask  # noqa: E402
TASKS["recommendation"] = RecommendationTask
from lamina.tasks.qa import QuestionAnsweringTask  # noqa: E402
TASKS["question_answering"] = QuestionAnsweringTask


def build_task(name: str, **kwargs):
    if name not in TASKS:
        raise ConfigError(unknown_name("task", name, TASKS))
    return TASKS[name](**kwargs)


__all__ = ["Task", "ClassificationTask", "RegressionTask", "LanguageModelingTask", "build_task", "model_inputs", "TASKS"]
