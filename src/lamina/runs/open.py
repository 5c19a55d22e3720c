"""Open a trained run: `open_run(path) -> Run`, the one way every tool and verb reads a run folder or
checkpoint; and the verbs on a run: `evaluate`, `predict`, `generate`.

A Run holds the config, the model with the checkpoint's weights, the task and the typed data facts. Data is
loaded only when asked (`run.data()`), with the run's own tokenizer and seed, so the splits are the ones the
run was trained and tested on. The model is rebuilt from the options its checkpoint recorded (every option,
defaults included); checkpoints written before options were recorded are rebuilt from today's defaults.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from lamina.config import ConfigDeprecationWarning, RunConfig, validate
from lamina.data import DataBundle
from lamina.data.facts import DataFacts
from lamina.engine import Trainer
from lamina.engine.checkpoint import load_model_weights, read_meta
from lamina.engine.precision import select_device
from lamina.errors import CheckpointError, ConfigError, DataError, LaminaError, ModelError
from lamina.runs.build import as_options, build_run_model, load_data, make_task
from lamina.runs.folder import RunFolder

SPLITS = ("train", "val", "test")


@dataclass
class Run:
    cfg: RunConfig
    model: torch.nn.Module
    task: object  # lamina.tasks.Task
    facts: DataFacts
    checkpoint: Path
    folder: RunFolder
    _bundle: DataBundle | None = field(default=None, repr=False)

    @cached_property
    def device(self) -> torch.device:
        """The device the run's config asks for (auto: CUDA, then MPS, then CPU)."""
        return select_device(self.cfg.trainer.device)

    def data(self) -> DataBundle:
        """The run's data set (loaded once): same name, options, seed and tokenizer as in training."""
        if self._bundle is None:
            self._bundle = load_data(self.cfg, self.folder.tokenizer)
        return self._bundle

    def split(self, name: str):
        data = getattr(self.data(), name, None) if name in SPLITS else None
        if data is None:
            have = [s for s in SPLITS if getattr(self.data(), s) is not None]
            raise DataError(f"data set '{self.data().name}' has no {name} split; use one of: {', '.join(have)}")
        return data

    def eval_loader(self, split_or_data, device=None, batch_size: int | None = None):
        """Batches of a split for evaluation, prepared as in training (normalize, padding trim, windows)."""
        data = self.split(split_or_data) if isinstance(split_or_data, str) else split_or_data
        data_cfg = self.cfg.data if batch_size is None else self.cfg.data.model_copy(
            update={"eval_batch_size": batch_size})
        return self.task.eval_loader(data, self.data(), data_cfg, device or self.device)

    def trainer(self, **overrides) -> Trainer:
        """A Trainer for evaluation / prediction with the run's trainer settings (no compilation)."""
        return Trainer(self.cfg.trainer.model_copy(update={"compile": False, **overrides}))


def open_run(path: str | Path, which: str = "best", adapter: str | Path | None = None) -> Run:
    """A run folder (its `which` checkpoint, else `last`) or a checkpoint folder; no data is loaded. `adapter`: a
    PEFT LoRA adapter folder put on the run's model after its weights are loaded (lamina.hub.peft_adapter), to
    evaluate or use a base + adapter (`--adapter`); training from one is `model.adapter` in the config."""
    folder, ckpt = RunFolder.locate(path, which)
    meta = read_meta(ckpt)
    if "config" not in meta:
        raise CheckpointError(f"{ckpt}/meta.json has no config; it was not written by `lamina train`")
    try:
        with warnings.catch_warnings():  # a stored config with moved keys: the run's, not the user's, to update
            warnings.simplefilter("ignore", ConfigDeprecationWarning)
            cfg = validate(meta["config"])
        facts = DataFacts.from_dict(meta.get("data"), f"{ckpt}/meta.json")
        task = make_task(cfg, facts)
        task.restore(folder.path)  # state a task chose after training (e.g. a binary task's threshold)
        options = meta.get("model_options")
        if options is not None and not isinstance(options, dict):
            raise CheckpointError(f"{ckpt}/meta.json: model_options must be a mapping, got {type(options).__name__}")
        options = as_options(options) if options is not None else None
        if not cfg.model.pretrained:
            check_declared_sizes(cfg, facts, options, ckpt)
        model = build_run_model(cfg, facts, options)
        if cfg.finetune.mode == "lora" and not cfg.model.adapter:  # its checkpoint holds the adapters beside the
            # frozen base weights (a run from model.adapter got that adapter's LoRA modules in build_run_model)
            from lamina.nn.lora import apply_lora

            apply_lora(model, cfg.finetune.lora_targets, rank=cfg.finetune.lora_rank, alpha=cfg.finetune.lora_alpha)
    except (ConfigError, ModelError) as e:  # the run's config no longer builds (e.g. a model removed since)
        raise CheckpointError(f"{ckpt} cannot be rebuilt with this version of lamina: {e}") from None
    try:
        load_model_weights(ckpt, model)
    except RuntimeError as e:  # shape mismatch
        last = str(e).splitlines()[-1].strip()
        raise CheckpointError(f"{ckpt} does not fit model {cfg.model.name}: {last}") from None
    if adapter is not None:
        from lamina.hub.peft_adapter import load_peft_adapter

        load_peft_adapter(model, adapter)
    return Run(cfg, model, task, facts, ckpt, folder)


def open_task_run(path: str | Path, task_cls: type, what: str, example: str, which: str = "best") -> Run:
    """open_run for a verb that needs one kind of run (faces, qa, recommend): another task is one ConfigError
    naming `what` (e.g. "a face run (task face)") and a config that trains one."""
    run = open_run(path, which)
    if not isinstance(run.task, task_cls):
        raise ConfigError(f"{run.folder.path}: {what} is needed, e.g. from {example}; this run is {run.facts.task}")
    return run


def check_declared_sizes(cfg: RunConfig, facts: DataFacts, options: dict | None, ckpt: Path) -> None:
    """meta.json says how to build the model; model.safetensors holds what was trained. A meta.json that
    declares a bigger model (huge model.channels, vocab_size, ...) would allocate it before the weights are
    compared: build it on the meta device first (no memory), compare every shape with the file's header
    (read without loading a tensor), and build for real only when they agree."""
    path = ckpt / "model.safetensors"
    if not path.is_file():  # sharded checkpoints of older runs: the loader says what it can read
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    try:
        with torch.device("meta"):
            declared = build_run_model(cfg, facts, options).state_dict()
    except NotImplementedError:  # a model whose construction reads tensor values cannot be built on meta
        return
    for name, t in declared.items():
        if name in saved and tuple(t.shape) != saved[name]:
            raise CheckpointError(f"{ckpt}/meta.json declares a model whose {name} is {tuple(t.shape)}, but "
                                  f"model.safetensors holds {saved[name]}: the metadata does not match the weights")
    size = sum(t.numel() for t in declared.values())
    held = sum(math.prod(s) for s in saved.values())
    if size > 2 * held + 1_000_000:  # tied weights are stored once: the file may hold fewer elements, never many
        raise CheckpointError(f"{ckpt}/meta.json declares a model of {size:,} values but model.safetensors holds "
                              f"{held:,}: the metadata does not match the weights")


# ----- verbs on a trained run ----------------------------------------------------------------------------
def evaluate(path: str | Path, split: str = "test", which: str = "best",
             progress: Callable[[int, int], None] | None = None, adapter: str | Path | None = None) -> dict:
    """Loss and metrics of a run's checkpoint (with a PEFT `adapter` on it, if given) on a split.
    `progress(done, total)`: batches of the evaluation pass, then (a second phase, from 0) the task's decoding
    where it has one (beam search for BLEU / WER)."""
    run = open_run(path, which, adapter)
    data = run.split(split)
    trainer = run.trainer()
    metrics = trainer.evaluate(run.model, run.task, run.eval_loader(data, trainer.device), prefix=split,
                               progress=progress)
    metrics.update(run.task.test_extras(run.model, run.data(), split, trainer.device, progress=progress))
    return {"checkpoint": str(run.checkpoint), "split": split, "n": len(data), **metrics}


def predict(path: str | Path, inputs: list[str], which: str = "best", draw_dir: str | Path | None = None,
            min_score: float = 0.3, adapter: str | Path | None = None) -> list[dict]:
    """Per input: a class (classifiers), values (regression) or boxes above `min_score` (detectors; with
    `draw_dir`, each input is also drawn with its boxes to draw_dir/<name>.png). `adapter`: as open_run."""
    from lamina.data import make_loader
    from lamina.data.base import TensorData
    from lamina.data.inputs import read_inputs
    from lamina.data.transforms import eval_transforms

    run = open_run(path, which, adapter)
    x_parts, names = read_inputs(inputs, run.facts)
    trainer = run.trainer()
    loader = make_loader(TensorData(**x_parts), run.cfg.data.eval_batch_size, device=trainer.device,
                         transform=eval_transforms(run.cfg.data.augment))
    out = trainer.predict(run.model, run.task, loader)
    rows = []
    for i, name in enumerate(names):
        if "boxes" in out:
            names_ = run.facts.class_names or []
            dets = [{"class": names_[int(c)] if int(c) < len(names_) else str(int(c)), "label": int(c),
                     "score": round(float(sc), 4), "box": [round(v, 1) for v in b.tolist()]}
                    for b, sc, c in zip(out["boxes"][i], out["scores"][i], out["labels"][i])
                    if int(c) >= 0 and float(sc) >= min_score]
            rows.append({"input": name, "detections": dets})
            if draw_dir is not None:
                from lamina.plots import plot_detections

                Path(draw_dir).mkdir(parents=True, exist_ok=True)
                rows[-1]["drawn"] = str(plot_detections(x_parts["x"][i], dets, Path(draw_dir) / f"{Path(name).stem}.png",
                                                        title=Path(name).name))
        elif "label" in out:
            label = int(out["label"][i])
            cls = run.facts.class_names[label] if run.facts.class_names else str(label)
            rows.append({"input": name, "label": label, "class": cls, "confidence": float(out["confidence"][i])})
        else:
            rows.append({"input": name, "value": out["value"][i].tolist()})
    return rows


def generate(path: str | Path, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, greedy: bool = False, seed: int = 0,
             stop: str | None = None, on_text=None, which: str = "best", adapter: str | Path | None = None,
             progress: Callable[[int, int], None] | None = None) -> str:
    """Text from a trained run (with a PEFT `adapter` on it, if given): sampled continuation (language models) or
    translation of the prompt's lines (seq2seq); `on_text(str)` receives each new piece (streaming);
    `progress(done, total)` counts translated lines (a language model's streamed text is its own progress)."""
    run = open_run(path, which, adapter)
    return run.task.generate(run.model, run.facts, prompt, run.device, tokenizer=run.folder.tokenizer,
                             on_text=on_text, progress=progress, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, seed=seed, stop=stop)


__all__ = ["Run", "open_run", "open_task_run", "evaluate", "predict", "generate", "LaminaError"]
