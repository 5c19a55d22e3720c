"""Compress a trained run: quantize / prune (with fine-tuning), measure, and save next to the run.

Every entry point loads the run's model and data (same name, options and seed -> the same splits as in
training), builds the compressed variant, and measures it against the fp32 model in the same process:
serialized size, batch-1 and batch-32 CPU latency (median of timed repeats after warm-up) and the test metric
(accuracy for classifiers, loss and perplexity for language models). Results land in `RUN/compressed/<variant>/`,
written atomically as one folder:

    model.safetensors   the float state the variant is rebuilt from (no pickle): the run's weights for
                        dynamic / static / weight-only quantization, the fine-tuned fake-quant model for qat,
                        the pruned and fine-tuned weights for pruning
    recipe.json         how to rebuild it: kind (quantize/prune), method, options, the run and checkpoint
    compress.json       the measurements

Quantized modules carry packed int8 weights that neither safetensors nor a state dict can hold portably, and a
pickled or TorchScript module runs code when loaded, so `load_variant` rebuilds instead: the run's model from its
checkpoint (`open_run`), the saved state loaded strictly, then the same deterministic transform (the same
calibration batches for static int8, the same magnitude ranking for channel pruning). Pickled `model.pt` files
of older versions are refused with one line, never loaded.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lamina.errors import CheckpointError, ConfigError
from lamina.io import load_state, load_state_strict, save_state, sha256_file, write_folder
from lamina.runs import Run, open_run

_LM = "language_modeling"


@dataclass
class RunContext:
    """A trained run (lamina.runs.Run) with its data loaded: what every compression method starts from."""

    run: Run
    bundle: object
    _loaders: tuple | None = None

    cfg = property(lambda self: self.run.cfg)
    model = property(lambda self: self.run.model)
    task = property(lambda self: self.run.task)
    facts = property(lambda self: self.run.facts)
    ckpt = property(lambda self: self.run.checkpoint)
    root = property(lambda self: self.run.folder.path)  # the run folder
    task_name = property(lambda self: self.run.facts.task)


def open_context(path: str | Path, which: str = "best") -> RunContext:
    run = open_run(path, which)
    run.model.eval()
    return RunContext(run, run.data())


# ----- measuring ---------------------------------------------------------------------------------
def eval_loader(ctx: RunContext, split: str = "test"):
    data = getattr(ctx.bundle, split, None)
    if data is None:
        raise ConfigError(f"run data has no {split} split")
    return ctx.run.eval_loader(data, torch.device("cpu"))


def test_split(ctx: RunContext) -> str:
    """The split compressed models are scored on: test, or val for data sets without one (Tiny Shakespeare)."""
    return "test" if ctx.bundle.test is not None else "val"


@torch.inference_mode()
def evaluate_model(model: torch.nn.Module, ctx: RunContext, split: str | None = None,
                   max_batches: int | None = None, on_batch: Callable[[], None] | None = None) -> dict:
    """Test metrics of any callable model (quantized modules included) with the run's task, on CPU;
    `on_batch()` after each batch."""
    split = split or test_split(ctx)
    model.eval()
    task = ctx.task
    metrics = task.make_metrics()
    loss_sum, n = 0.0, 0
    for i, batch in enumerate(eval_loader(ctx, split)):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: (v.contiguous() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                 for k, v in batch.items()}
        out = task.forward(model, batch)
        bs = len(batch["y"])
        loss_sum += float(task.loss(out, batch)) * bs
        n += bs
        task.update_metrics(metrics, out, batch)
        if on_batch is not None:
            on_batch()
    res = {k: float(v) for k, v in metrics.compute().items()}
    res["loss"] = loss_sum / max(n, 1)
    if ctx.task_name == _LM:
        res["ppl"] = math.exp(res["loss"])
    return res


def example_batch(ctx: RunContext, n: int, split: str = "test") -> torch.Tensor:
    """The first `n` real inputs of a split, as the model sees them (after the run's eval transform); a streamed
    split reads just those n (files decoded, table rows read), never the whole split."""
    from lamina.data.sample import first_samples
    from lamina.data.transforms import eval_transforms

    data = getattr(ctx.bundle, split) or ctx.bundle.train
    if ctx.task_name == _LM:
        block = ctx.bundle.meta["block_size"]
        ids = data.tensors["ids"][: n * block + 1]
        return ids[: n * block].reshape(n, block)
    x = first_samples(data, n)["x"].float()
    t = eval_transforms(ctx.cfg.data.augment)
    return t({"x": x})["x"] if t is not None else x


def calibration_batches(ctx: RunContext, samples: int = 512, batch: int = 128) -> list[torch.Tensor]:
    """Real training inputs for static quantization's observers (eval transform applied, no augmentation)."""
    x = example_batch(ctx, samples, split="train")
    return [x[i:i + batch] for i in range(0, len(x), batch)]


@torch.inference_mode()
def latency_ms(fn, x, repeats: int = 30, warmup: int = 5, on_call: Callable[[], None] | None = None) -> float:
    """Median wall time of `fn(x)` in milliseconds (median: robust to a stray scheduler hiccup); `on_call()`
    after every call, warm-up included, outside the timed window."""
    tick = on_call or (lambda: None)
    for _ in range(warmup):
        fn(x)
        tick()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
        tick()
    return statistics.median(times) * 1e3


def model_bytes(model: torch.nn.Module) -> int:
    from lamina.compress.quantize import serialized_bytes

    return serialized_bytes(model)


_WARMUP = 5  # untimed calls before each latency


def _b32_repeats(repeats: int) -> int:
    return max(5, repeats // 3)  # a batch of 32 costs more per call and varies less


def measure(name: str, model: torch.nn.Module, ctx: RunContext, repeats: int = 30,
            max_batches: int | None = None, nbytes: int | None = None,
            on_step: Callable[[], None] | None = None) -> dict:
    """Size (`nbytes`, default: the serialized state dict), batch-1/32 latency and test metrics of one variant;
    `on_step()` after each of its `measure_steps` units of work."""
    x32 = example_batch(ctx, 32)
    b1 = latency_ms(model, x32[:1], repeats, _WARMUP, on_step)
    b32 = latency_ms(model, x32, _b32_repeats(repeats), _WARMUP, on_step)
    metrics = evaluate_model(model, ctx, max_batches=max_batches, on_batch=on_step)
    return {"variant": name, "bytes": nbytes if nbytes is not None else model_bytes(model),
            "params": sum(p.numel() for p in model.parameters()), "split": test_split(ctx),
            "latency_b1_ms": b1, "latency_b32_ms": b32, **{f"test_{k}": v for k, v in metrics.items()}}


def measure_steps(ctx: RunContext, repeats: int = 30, max_batches: int | None = None) -> int:
    """The units of work `measure` reports: every forward of its two latencies (warm-up included), then every
    test batch."""
    batches = len(eval_loader(ctx, test_split(ctx)))
    batches = batches if max_batches is None else min(batches, max_batches)
    return 2 * _WARMUP + repeats + _b32_repeats(repeats) + batches


def measure_all(variants: list[tuple[str, torch.nn.Module, int]], ctx: RunContext,
                progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """`measure` each (name, model, repeats), in order; `progress(done, total)` counts the units of work of all
    of them as one phase (see measure_steps)."""
    if progress is None:
        return [measure(name, m, ctx, r) for name, m, r in variants]
    total, done = sum(measure_steps(ctx, r) for _, _, r in variants), 0
    progress(0, total)

    def step() -> None:
        nonlocal done
        done += 1
        progress(min(done, total), total)

    rows = [measure(name, m, ctx, r, on_step=step) for name, m, r in variants]
    if done < total:  # a loader yielded fewer batches than it counted: the measuring is over all the same
        progress(total, total)
    return rows


def with_ratios(rows: list[dict], base: str = "fp32") -> list[dict]:
    """Add size/latency ratios and the metric change against the `base` row."""
    ref = next(r for r in rows if r["variant"] == base)
    for r in rows:
        r["size_x"] = ref["bytes"] / r["bytes"] if r.get("bytes") else None
        r["speedup_b1"] = ref["latency_b1_ms"] / r["latency_b1_ms"]
        r["speedup_b32"] = ref["latency_b32_ms"] / r["latency_b32_ms"]
        if "test_acc" in ref and "test_acc" in r:
            r["acc_delta_points"] = 100.0 * (r["test_acc"] - ref["test_acc"])
        if "test_loss" in r:
            r["loss_delta"] = r["test_loss"] - ref["test_loss"]
    return rows


# ----- fine-tuning -------------------------------------------------------------------------------
def loaders(ctx: RunContext):
    """(train, val) loaders of the run, on CPU, built once per RunContext."""
    if ctx._loaders is None:
        cpu, b = torch.device("cpu"), ctx.bundle
        val = ctx.task.eval_loader(b.val, b, ctx.cfg.data, cpu) if b.val is not None else None
        ctx._loaders = (ctx.task.train_loader(b, ctx.cfg.data, ctx.cfg.seed, cpu), val)
    return ctx._loaders


def finetune_steps(train, epochs: float) -> int:
    return max(1, int(round(epochs * len(train))))


def finetune(ctx: RunContext, model: torch.nn.Module, epochs: float = 1.0, lr: float | None = None,
             callbacks=()) -> torch.nn.Module:
    """Train `model` on the run's training data with the run's task and optimizer (lr scaled by default to a
    tenth: recovery, not training from scratch), cosine-decayed over `epochs` (fractions allowed)."""
    from lamina.config.schema import PerfConfig, ScheduleConfig
    from lamina.engine.optim import build_optimizer, build_scheduler
    from lamina.engine.trainer import Trainer
    train, val = loaders(ctx)
    steps = finetune_steps(train, epochs)
    tcfg = ctx.cfg.trainer.model_copy(update={"max_epochs": max(1, math.ceil(epochs)), "max_steps": steps,
                                              "compile": False, "progress": False, "device": "cpu",
                                              "channels_last": False, "strategy": "none",
                                              "perf": PerfConfig()})  # plain fp32: fake-quant has no bf16 kernels
    ocfg = ctx.cfg.optimizer.model_copy(update={"lr": lr if lr is not None else ctx.cfg.optimizer.lr / 10})
    optimizer = build_optimizer(model, ocfg)
    scheduler = build_scheduler(optimizer, ScheduleConfig(name="cosine"), steps, len(train), ocfg.lr)
    trainer = Trainer(tcfg, callbacks=list(callbacks))
    trainer.fit(model, ctx.task, train, val, optimizer, scheduler)
    return model.eval()


# ----- saving ------------------------------------------------------------------------------------
RECIPE_FORMAT = "lamina-compressed-1"
_REBUILDS = {"quantize": ("dynamic", "static", "weight-int8", "weight-int4", "qat"), "prune": ("channels", "magnitude")}


def _variant_folder(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not (p / "recipe.json").is_file():
        if (p / "model.pt").is_file():
            raise CheckpointError(f"{p / 'model.pt'} is a pickled compressed model (older lamina); it is not loaded, "
                                  "because unpickling can run code: re-create the variant with `lamina quantize` or "
                                  "`lamina prune` on its run")
        raise CheckpointError(f"{path} is not a compressed variant (expected RUN/compressed/<variant>/ with "
                              "recipe.json and model.safetensors)")
    return p


def read_recipe(path: str | Path) -> dict:
    """recipe.json of a saved variant, checked: kind, method and options of known types."""
    p = _variant_folder(path)
    f = p / "recipe.json"
    try:
        r = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{f} is not readable JSON ({e.__class__.__name__})") from None
    if not isinstance(r, dict) or r.get("format") != RECIPE_FORMAT:
        raise CheckpointError(f"{f}: not a {RECIPE_FORMAT} recipe")
    kind, method, options = r.get("kind"), r.get("method"), r.get("options", {})
    if kind not in _REBUILDS or method not in _REBUILDS[kind]:
        raise CheckpointError(f"{f}: unknown kind/method {kind!r}/{method!r}; accepted: "
                              + "; ".join(f"{k}: {', '.join(m)}" for k, m in _REBUILDS.items()))
    if not isinstance(options, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in options.values()):
        raise CheckpointError(f"{f}: options must be a mapping of numbers, got {options!r:.80}")
    if r.get("which", "best") not in ("best", "last"):
        raise CheckpointError(f"{f}: which must be best or last, got {r.get('which')!r:.40}")
    return r


def load_variant(path: str | Path, run: str | Path | None = None) -> torch.nn.Module:
    """A saved compressed model (`RUN/compressed/<variant>` or a file in it), rebuilt and ready for inference.

    Nothing is unpickled: the run's model is built from its checkpoint (`run`, default: the run folder the
    variant sits in, else the one recorded in recipe.json), the variant's model.safetensors loaded strictly,
    and the recipe's transform re-applied (see the module docstring)."""
    from lamina.compress import quantize as q
    from lamina.compress.prune import channel_prune

    p = _variant_folder(path)
    recipe = read_recipe(p)
    if run is None:
        run = p.parent.parent if (p.parent.parent / "checkpoints").is_dir() else recipe.get("run")
    if not run:
        raise CheckpointError(f"{p}: the run it was made from is unknown; pass run=RUN")
    state_file = p / "model.safetensors"
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing; the variant is incomplete")
    if recipe.get("sha256") and sha256_file(state_file) != recipe["sha256"]:
        raise CheckpointError(f"{state_file} is corrupt (sha256 does not match recipe.json)")
    state = load_state(state_file)
    ctx = open_context(run, recipe.get("which", "best"))
    kind, method, opt = recipe["kind"], recipe["method"], recipe.get("options", {})
    torch.manual_seed(ctx.cfg.seed)
    src = f"{state_file}"
    if kind == "prune":
        model = (channel_prune(ctx.model, example_batch(ctx, 2, "train"), float(opt.get("amount", 0.5)))
                 if method == "channels" else ctx.model)
        load_state_strict(model, state, src)
        return model.eval()
    if method == "qat":
        prepared = q.prepare_qat(ctx.model, example_batch(ctx, 2, "train"))
        try:
            prepared.load_state_dict(state, strict=True)  # observers resize their buffers as they load
        except RuntimeError as e:
            raise CheckpointError(f"{src} does not match the run's QAT model: {str(e).splitlines()[-1].strip()}") from None
        return q.convert_qat(prepared)
    load_state_strict(ctx.model, state, src)
    if method == "static":
        return q.static_int8(ctx.model, calibration_batches(ctx, int(opt.get("calib", 512))))
    return q.quantize(ctx.model, method, group_size=int(opt.get("group_size", 32)))


def save_variant(ctx: RunContext, tag: str, source: torch.nn.Module, result: dict, kind: str, method: str,
                 options: dict) -> Path:
    """RUN/compressed/<tag>/: `source`'s state (what `load_variant` rebuilds from, see the module docstring),
    recipe.json and compress.json, as one atomically written folder."""
    from lamina.compress.quantize import _inner

    out = ctx.root / "compressed" / tag
    result["format"] = "model.safetensors + recipe.json (lamina.compress.run.load_variant rebuilds the model)"

    def write(tmp: Path) -> None:
        save_state(tmp / "model.safetensors", _inner(source))
        recipe = {"format": RECIPE_FORMAT, "kind": kind, "method": method, "options": options,
                  "run": str(ctx.root), "which": ctx.ckpt.name if ctx.ckpt.name in ("best", "last") else "best",
                  "sha256": sha256_file(tmp / "model.safetensors")}
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2))
        (tmp / "compress.json").write_text(json.dumps(result, indent=2, default=str))

    return write_folder(out, write)


# ----- entry points (CLI verbs) ------------------------------------------------------------------
def quantize_run(path: str | Path, method: str = "dynamic", calib: int = 512, epochs: float = 1.0,
                 group_size: int = 32, which: str = "best", repeats: int = 30, callbacks=(),
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """fp32 vs a quantized variant of a trained run; saves the variant. `qat` fine-tunes `epochs` first, its
    Trainer with `callbacks` (a progress display, e.g.). `progress(done, total)` counts the measuring of both
    models (measure_all), after any fine-tuning."""
    from lamina.compress import quantize as q

    if method not in q.METHODS:
        raise ConfigError(f"quantize: unknown method '{method}'; accepted: {', '.join(q.METHODS)}")
    ctx = open_context(path, which)
    if method in ("static", "qat") and ctx.task_name == _LM:
        raise ConfigError(f"quantize: --method {method} (int8 activations, FX) is for conv nets and MLPs; for a "
                          "language model use dynamic, weight-int8 or weight-int4")
    torch.manual_seed(ctx.cfg.seed)
    source = ctx.model  # what the variant is rebuilt from (load_variant): the run's weights, or the QAT model
    if method == "qat":
        source = prepared = q.prepare_qat(ctx.model, example_batch(ctx, 2, "train"))
        finetune(ctx, prepared, epochs, callbacks=callbacks)
        qmodel = q.convert_qat(prepared)
    elif method == "static":
        qmodel = q.static_int8(ctx.model, calibration_batches(ctx, calib))
    else:
        qmodel = q.quantize(ctx.model, method, group_size=group_size)
    rows = with_ratios(measure_all([("fp32", ctx.model, repeats), (method, qmodel, repeats)], ctx, progress))
    result = {"run": str(ctx.root), "method": method, "rows": rows}
    options = {"calib": calib} if method == "static" else {"group_size": group_size} if method == "weight-int4" else {}
    result["saved"] = str(save_variant(ctx, f"quant-{method}", source, result, "quantize", method, options))
    return result


def prune_run(path: str | Path, method: str = "channels", amount: float = 0.5, epochs: float = 1.0,
              which: str = "best", repeats: int = 30, callbacks=(),
              progress: Callable[[int, int], None] | None = None) -> dict:
    """fp32 vs pruned (channels: structured, smaller dense model; magnitude: global unstructured with the cubic
    sparsity schedule during fine-tuning), both fine-tuned for `epochs` on the run's training data, the Trainer
    with `callbacks`. `progress(done, total)` counts the measuring of every row (measure_all), after fine-tuning."""
    import copy

    from lamina.compress.prune import GradualPruning, channel_prune, sparsity

    ctx = open_context(path, which)
    torch.manual_seed(ctx.cfg.seed)
    if method == "channels":
        pruned = channel_prune(ctx.model, example_batch(ctx, 2, "train"), amount)
        before = copy.deepcopy(pruned)  # measured with the rest after fine-tuning: one measuring phase, one bar
        if epochs > 0:
            finetune(ctx, pruned, epochs, callbacks=callbacks)
    elif method == "magnitude":
        pruned = copy.deepcopy(ctx.model)
        steps = finetune_steps(loaders(ctx)[0], epochs)
        if epochs <= 0:
            raise ConfigError("prune --method magnitude needs --epochs > 0: the sparsity schedule runs while fine-tuning")
        before = None
        finetune(ctx, pruned, epochs, callbacks=[GradualPruning(pruned, amount, steps), *callbacks])
    else:
        raise ConfigError(f"prune: unknown method '{method}'; accepted: channels, magnitude")
    variants = [("fp32", ctx.model, repeats), *([("pruned (no fine-tune)", before, 3)] if before is not None else []),
                (f"{method} {amount:.0%}", pruned, repeats)]
    rows = with_ratios(measure_all(variants, ctx, progress))
    result = {"run": str(ctx.root), "method": method, "amount": amount, "epochs": epochs,
              "weight_sparsity": sparsity(pruned), "rows": rows}
    result["saved"] = str(save_variant(ctx, f"prune-{method}-{int(round(amount * 100))}", pruned, result, "prune",
                                       method, {"amount": amount}))
    return result
