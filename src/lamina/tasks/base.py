"""Task contract: a task turns a batch into model inputs, a loss and metrics, and outputs into answers.

The Trainer only talks to tasks. Training-time metrics are cheap tensor sums accumulated without a host
sync per step; evaluation metrics use torchmetrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
import torch.nn as nn

from lamina.data.facts import DataFacts
from lamina.errors import ConfigError, unknown_name


def check_options(what: str, options: Mapping, allowed: Sequence[str]) -> None:
    """A task's `from_facts` options: the first key not in `allowed` is a ConfigError
    `task.<key>: unknown <what> '<key>' ...; valid: ...` (what: e.g. "option of task masked_lm")."""
    bad = [k for k in options if k not in allowed]
    if bad:
        raise ConfigError(f"task.{bad[0]}: {unknown_name(what, bad[0], allowed)}")


def refuse_label_smoothing(options: Mapping, why: str) -> None:
    """Tasks whose loss has no label smoothing: `task.label_smoothing` (which every config passes) must be 0."""
    if options.get("label_smoothing"):
        raise ConfigError(f"task.label_smoothing: {why}; set it to 0, got {options['label_smoothing']}")


def model_inputs(batch: dict) -> tuple[tuple, dict]:
    """Positional input is batch["x"]; categorical codes travel as x_cat (see models/mlp.py)."""
    kwargs = {"x_cat": batch["x_cat"]} if "x_cat" in batch else {}
    return (batch["x"],), kwargs


class Task(Protocol):
    """What the Trainer calls per batch (forward .. predict) and what the runs layer calls to build a run from
    data (check_data .. generate). Every registered task implements all of it; `BaseTask` gives the defaults,
    so the runs layer never branches on a task's name."""

    name: str
    default_monitor: tuple[str, str]  # (metric, "min"|"max")
    trains_new_head: bool  # LoRA fine-tuning trains the task's fresh head in full (not an LM's vocab projection)
    supports_context_parallel: bool  # ring attention may split its training sequences

    # ----- per batch (engine) -----
    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor: ...
    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor: ...
    def train_stats(self, outputs: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]: ...
    def summarize_train(self, sums: dict, n: int) -> dict: ...
    def make_metrics(self): ...
    def update_metrics(self, metrics, outputs: torch.Tensor, batch: dict) -> None: ...
    def predict(self, outputs: torch.Tensor) -> dict[str, torch.Tensor]: ...

    # ----- building a run (runs) -----
    @classmethod
    def check_data(cls, bundle) -> None: ...
    @classmethod
    def num_outputs(cls, bundle) -> int: ...
    @classmethod
    def from_facts(cls, facts: DataFacts, options: dict) -> "Task": ...
    @classmethod
    def model_options(cls, facts: DataFacts, entry=None) -> dict: ...
    @classmethod
    def check_model(cls, model: nn.Module, facts: DataFacts) -> None: ...
    def train_loader(self, bundle, data_cfg, seed: int, device): ...
    def eval_loader(self, data, bundle, data_cfg, device): ...
    def tokens_per_sample(self, facts: DataFacts) -> int | None: ...
    def test_extras(self, model, bundle, split: str, device, run_dir=None, progress=None) -> dict: ...
    def restore(self, run_dir) -> None: ...
    def test_outputs(self, trainer, model, loader, data) -> dict: ...
    def generate(self, model, facts: DataFacts, prompt: str, device, *, tokenizer=None, on_text=None,
                 progress=None, **sampling) -> str: ...


class BaseTask:
    """Defaults of the run-building half of `Task`: data sets of the task's own kind, in-memory batches,
    nothing extra at test time. Subclasses override what differs (a task's choices live in its own file)."""

    name = "task"
    default_monitor = ("val/loss", "min")
    trains_new_head = True
    supports_context_parallel = False

    @classmethod
    def check_data(cls, bundle) -> None:
        if bundle.task != cls.name:
            raise ConfigError(f"task.name: {cls.name} does not fit data set '{bundle.name}' (task {bundle.task})")

    @classmethod
    def num_outputs(cls, bundle) -> int:
        return int(bundle.meta.get("num_outputs") or bundle.num_classes or 0)

    @classmethod
    def from_facts(cls, facts: DataFacts, options: dict):
        raise NotImplementedError(f"task {cls.name} does not say how to build itself from data facts")

    @classmethod
    def model_options(cls, facts: DataFacts, entry=None) -> dict:
        return {}

    @classmethod
    def check_model(cls, model: nn.Module, facts: DataFacts) -> None:
        return None

    def train_loader(self, bundle, data_cfg, seed: int, device):
        from lamina.data import make_loader
        from lamina.data.transforms import build_transforms

        augment = build_transforms(data_cfg.augment) if data_cfg.augment else None
        return make_loader(bundle.train, data_cfg.batch_size, shuffle=True, seed=seed, device=device,
                           transform=augment, trim=bundle.meta.get("pad_trim"), bucket=bundle.meta.get("bucket"))

    def eval_loader(self, data, bundle, data_cfg, device):
        from lamina.data import make_loader
        from lamina.data.transforms import eval_transforms

        return make_loader(data, data_cfg.eval_batch_size, device=device, trim=bundle.meta.get("pad_trim"),
                           transform=eval_transforms(data_cfg.augment))  # e.g. normalize: same scale as training

    def tokens_per_sample(self, facts: DataFacts) -> int | None:
        return None

    def test_extras(self, model, bundle, split: str, device, run_dir=None, progress=None) -> dict:
        """Metrics that need decoding (BLEU of beam-searched outputs); run once at test time on one process.
        `progress(done, total)` (optional) counts what is decoded (sentences, utterances, windows)."""
        return {}

    def restore(self, run_dir) -> None:
        """State the task chose after training and saved in the run folder (a binary task's threshold); none here."""
        return None

    def test_outputs(self, trainer, model, loader, data) -> dict:
        """Artifacts of the test split for the run's outputs (e.g. a confusion matrix)."""
        return {}

    def generate(self, model, facts: DataFacts, prompt: str, device, *, tokenizer=None, on_text=None,
                 progress=None, **sampling) -> str:
        raise ConfigError(f"generate needs a language-model or seq2seq run; this run is {self.name}")


# ----- dense inputs (images, vectors): shared by classification and regression -------------------------------
def check_dense_data(name: str, bundle) -> None:
    """Classification and regression read samples x (images or feature vectors), not token streams."""
    if bundle.task not in ("classification", "regression") or "ids" in bundle.train.tensors:
        raise ConfigError(f"task.name: {name} does not fit data set '{bundle.name}' (task {bundle.task})")


def dense_model_options(facts: DataFacts, entry) -> dict:
    """What the data implies for an image or vector model: input channels or features, outputs."""
    shape = tuple(facts.input_shape)
    if entry.input_kind == "tokens":
        raise ConfigError(f"model.name: {entry.name} is a token model; data set '{facts.name}' is {facts.task} data; "
                          "use a token-stream data set such as tiny_shakespeare or text")
    opts: dict = {}
    if entry.input_kind == "vector":
        opts["in_features"] = math.prod(shape)
        if facts.meta.get("cat_cardinalities"):
            opts["cat_cardinalities"] = tuple(facts.meta["cat_cardinalities"])
    elif entry.input_kind == "volume":
        if len(shape) != 4:
            raise ConfigError(f"model.name: {entry.name} is a volume model (input (B, C, D, H, W)) but data set "
                              f"'{facts.name}' gives per-sample shape {shape}; use an image or vector model")
        opts["in_chans"] = shape[0]
    else:
        if len(shape) != 3:
            raise ConfigError(f"model.name: {entry.name} is an image model (input (B, C, H, W)) but data set "
                              f"'{facts.name}' gives per-sample shape {shape}; use a vector model such as mlp")
        opts["in_chans"] = shape[0]
    opts["num_classes"] = facts.num_outputs
    return opts


class DenseTask(BaseTask):
    """Run-building defaults of tasks over samples x (images or feature vectors): classification, regression."""

    @classmethod
    def check_data(cls, bundle) -> None:
        check_dense_data(cls.name, bundle)

    @classmethod
    def model_options(cls, facts: DataFacts, entry) -> dict:
        return dense_model_options(facts, entry)

    @classmethod
    def check_model(cls, model: nn.Module, facts: DataFacts) -> None:
        from lamina.models.contract import check_input_shape

        check_input_shape(model, tuple(facts.input_shape))
