"""Runs: a config becomes data + model + task + Trainer + a run folder; a run folder becomes a `Run` again.

    train(cfg) -> RunResult            prepare / fit / finalize (runs/train.py)
    open_run(path) -> Run              config, model with weights, task, typed data facts, data on demand
    evaluate / predict / generate      verbs on a trained run (runs/open.py)
    RunFolder                          the run folder's layout (runs/folder.py)
    objectives                         ways to train that plug in as task wrappers (runs/objectives/)

Every tool reads a run through `open_run`, never by re-deriving paths.
"""

from lamina.errors import LaminaError
from lamina.runs.build import build_run_model, data_facts, load_data, make_task, task_class
from lamina.runs.folder import RunFolder
from lamina.runs.open import Run, evaluate, generate, open_run, predict
from lamina.runs.outputs import DEFAULT_OUTPUTS, RunEnd
from lamina.runs.train import Prepared, RunResult, finalize, fit, prepare, train

__all__ = ["train", "prepare", "fit", "finalize", "RunResult", "Prepared", "open_run", "Run", "evaluate",
           "predict", "generate", "RunFolder", "RunEnd", "DEFAULT_OUTPUTS", "load_data", "make_task",
           "build_run_model", "data_facts", "task_class", "LaminaError"]
