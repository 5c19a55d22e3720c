"""Config -> the parts of a run: data, task, model, optimizer. No files are written here.

Every task-specific choice is a method of the task (lamina.tasks.base.Task): which data it fits, how many
outputs it has, what the data implies for the model's options, which loaders it needs. This module only
composes them, so it has no branches on task names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lamina.config import RunConfig
from lamina.data import DataBundle, load_dataset
from lamina.data.facts import DataFacts
from lamina.data.splits import train_subset
from lamina.engine.optim import build_optimizer
from lamina.errors import ConfigError, DataError, unknown_name
from lamina.models import create_model, get_entry
from lamina.tasks import TASKS


# ----- data ------------------------------------------------------------------------------------------------
def pretrained_tokenizer(cfg: RunConfig) -> Path | None:
    """Text runs from a pretrained encoder cut their text with the encoder's own tokenizer.json."""
    if not cfg.model.pretrained:
        return None
    from lamina.hub import pretrained_tokenizer as find

    return find(cfg.model.pretrained)


def load_data(cfg: RunConfig, tokenizer: Path | None = None) -> DataBundle:
    """The run's data set; `tokenizer`: a saved tokenizer.json to reuse instead of training one. The same name,
    options and seed give the same splits, which is how every tool finds a run's test split again."""
    opts = dict(cfg.data.options)
    if tokenizer is not None and Path(tokenizer).is_file() and _takes_tokenizer(cfg.data.name):
        opts["tokenizer"] = str(tokenizer)
    elif opts.get("tokenizer") and not Path(str(opts["tokenizer"])).expanduser().exists():
        from lamina.hub import pretrained_tokenizer as find  # data.tokenizer=<pretrained source>: its tokenizer

        found = find(str(opts["tokenizer"]))
        if found is not None:
            opts["tokenizer"] = str(found)
    try:
        bundle = load_dataset(cfg.data.name, seed=cfg.seed, **opts)
    except TypeError as e:  # unknown loader option
        bad = str(e).split("'")[1] if "'" in str(e) else str(e)
        raise ConfigError(f"data.{bad}: not an option of data set '{cfg.data.name}'") from None
    if cfg.data.train_fraction < 1.0:
        bundle.train = train_subset(bundle.train, cfg.data.train_fraction, cfg.seed, bundle.task)
    return bundle


def _takes_tokenizer(name: str) -> bool:
    """Whether a data set's loader takes `tokenizer=`: a character-level one (text, tiny_shakespeare) builds its
    vocabulary from the text, so a pretrained HF folder's tokenizer.json (lamina's char LMs export one) is not
    passed to it; the model's vocabulary is checked against the data's instead."""
    import inspect

    from lamina.data import get_dataset_entry
    from lamina.errors import LaminaError

    try:
        params = inspect.signature(get_dataset_entry(name).fn).parameters
    except (LaminaError, TypeError, ValueError):  # an unknown name: load_dataset says so
        return True
    return "tokenizer" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def check_finite_data(bundle: DataBundle) -> None:
    for split in ("train", "val", "test"):
        data = getattr(bundle, split)
        if data is None:
            continue
        for k, v in data.tensors.items():
            # (a memory-mapped token stream is a numpy array of integer ids: nothing to check, nothing loaded)
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
                raise DataError(f"{split} split of '{bundle.name}' has NaN or Inf values in '{k}'")


# ----- task ------------------------------------------------------------------------------------------------
def task_class(cfg: RunConfig, bundle: DataBundle):
    """The registered task the run trains, checked against the data (task.name=auto: the data set's own)."""
    name = bundle.task if cfg.task.name == "auto" else cfg.task.name
    if name not in TASKS:
        raise ConfigError(f"task.name: {unknown_name('task', name, TASKS)}"
                          if cfg.task.name != "auto" else f"data set '{bundle.name}' has task {name}, which no "
                          f"registered task handles; supported: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    cls.check_data(bundle)
    return cls


def data_facts(bundle: DataBundle, task_cls) -> DataFacts:
    """What a trained model needs to know about its data, saved with every run and checkpoint."""
    return DataFacts.from_bundle(bundle, task_cls.name, task_cls.num_outputs(bundle))


def make_task(cfg: RunConfig, facts: DataFacts):
    return TASKS[facts.task].from_facts(facts, {"label_smoothing": cfg.task.label_smoothing, **cfg.task.options})


# ----- model -----------------------------------------------------------------------------------------------
def build_run_model(cfg: RunConfig, facts: DataFacts, options: dict | None = None) -> torch.nn.Module:
    """The run's model: registered name + what the data implies (the task says) + the config's options.
    `options`: the resolved options a checkpoint recorded; they rebuild exactly the model that was trained,
    whatever today's defaults are."""
    if cfg.model.adapter and not cfg.model.pretrained:
        raise ConfigError("model.adapter: a PEFT adapter goes onto the base it was trained on; set model.pretrained "
                          "to that base (a run folder or HF-layout folder)")
    if cfg.model.adapter and cfg.finetune.mode != "lora":
        raise ConfigError(f"model.adapter: a run goes on from a LoRA adapter by training it as LoRA; set "
                          f"finetune.mode=lora (got {cfg.finetune.mode})")
    if cfg.model.pretrained:  # pretrained weights, fitted to this data (channels, size, scale, new head)
        from lamina import hub
        from lamina.hub.adapt import adapt_pretrained

        run_source = is_run_folder(cfg.model.pretrained)
        model, info = load_run_encoder(cfg.model.pretrained, facts) if run_source else hub.load(cfg.model.pretrained)
        model = adapt_pretrained(model, info, facts, cfg.finetune.input_size)
        if cfg.model.adapter:  # after the base weights (and a new head), so the adapter's values are what trains on
            from lamina.hub.peft_adapter import load_peft_adapter

            load_peft_adapter(model, cfg.model.adapter)
        return model
    entry = get_entry(cfg.model.name)
    task_cls = TASKS[facts.task]
    opts = options if options is not None else {**task_cls.model_options(facts, entry), **cfg.model.options}
    model = create_model(cfg.model.name, **opts)
    task_cls.check_model(model, facts)
    shape = tuple(facts.input_shape)
    if cfg.finetune.input_size and entry.input_kind == "image" and len(shape) == 3:
        # the same input resize a pretrained run gets: comparisons at equal resolution
        from lamina.hub.adapt import add_input_preprocessing

        add_input_preprocessing(model, None, cfg.finetune.input_size, shape[0])
    return model


def is_run_folder(source) -> bool:
    """A `lamina train` / `lamina pretrain` run folder (or one of its checkpoints) rather than hub weights."""
    p = Path(source)
    return p.is_dir() and ((p / "checkpoints").is_dir() or ((p / "meta.json").is_file() and
                                                          (p / "model.safetensors").is_file()))


def load_run_encoder(source, facts: DataFacts) -> tuple[torch.nn.Module, dict]:
    """(model, info) of a run folder used as `model.pretrained`: the run's model with its trained weights (a
    self-supervised encoder, a supervised classifier, a masked LM). A masked LM fine-tuned for sequence
    classification keeps its embeddings and blocks under a new pooler and head (models.bert.classifier_from_mlm).
    Its tokenizer.json (pretrained_tokenizer) cuts the new data, so the vocabularies agree."""
    from lamina.runs.open import open_run  # same layer; open_run itself builds models through this module

    run = open_run(source)
    model = run.model
    from lamina.models.bert import BertMaskedLM, classifier_from_mlm
    from lamina.tasks.sequence_classification import SequenceClassificationTask

    if isinstance(model, BertMaskedLM) and issubclass(TASKS[facts.task], SequenceClassificationTask):
        model = classifier_from_mlm(model, int(facts.num_classes or facts.num_outputs))
    return model, {"family": run.cfg.model.name, "format": "lamina-run", "source": str(run.checkpoint),
                   "vocab": run.facts.meta.get("vocab")}  # a character LM's vocabulary, for a run that continues it


def resolved_options(model: torch.nn.Module) -> dict | None:
    """Every option of the model's config (defaults included) as JSON values, or None when it has none."""
    spec = getattr(model, "lamina_spec", None) or {}
    opts = spec.get("resolved")
    if opts is None:
        return None
    try:
        return json.loads(json.dumps(opts))
    except (TypeError, ValueError):
        return None


def as_options(saved: dict) -> dict:
    """JSON lists back to the tuples model configs take."""
    def tup(v):
        return tuple(tup(x) for x in v) if isinstance(v, list) else v

    return {k: tup(v) for k, v in saved.items()}


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----- optimization ----------------------------------------------------------------------------------------
def lora_head(model: torch.nn.Module, task) -> list[str]:
    """Parameters trained in full next to LoRA adapters: a task's new head (none for a language model, whose
    output layer is the pretrained vocabulary projection)."""
    if not task.trains_new_head:
        return []
    from lamina.engine.transfer import head_parameter_names

    return head_parameter_names(model)


def finetune_setup(cfg: RunConfig, model: torch.nn.Module, task):
    """(optimizer, callbacks) for cfg.finetune: what trains (full / linear probe / LoRA / gradual unfreezing,
    frozen patterns) and at which rate (layer-wise lr decay). Plain training is mode full, nothing else set."""
    from lamina.engine import transfer

    ft = cfg.finetune
    callbacks = []
    if ft.freeze:
        transfer.freeze(model, ft.freeze)
    if ft.mode == "linear_probe":
        transfer.linear_probe(model)
    elif ft.mode == "lora":
        from lamina.nn.lora import apply_lora

        head = lora_head(model, task)
        if not cfg.model.adapter:  # model.adapter: build_run_model already put that adapter's LoRA modules in
            apply_lora(model, ft.lora_targets, rank=ft.lora_rank, alpha=ft.lora_alpha)
        params = dict(model.named_parameters(remove_duplicate=False))
        for n in head:  # a classifier's new head is trained in full
            params[n].requires_grad_(True)
    elif ft.mode == "gradual":
        callbacks.append(transfer.GradualUnfreezing(ft.unfreeze_every))
    groups = None
    if ft.lr_decay:
        groups = transfer.param_groups_layerwise_lr_decay(model, cfg.optimizer.lr, ft.lr_decay,
                                                          cfg.optimizer.weight_decay,
                                                          include_frozen=ft.mode == "gradual")
        for g in groups:
            g.pop("names", None)
    return build_optimizer(model, cfg.optimizer, groups=groups), callbacks

