"""Compress a trained run: quantize / prune (with fine-tuning), measure, and save next to the run.

Every entry point loads the run's model and data (same name, options and seed -> the same splits as in
training), builds the compressed variant, and measures it against the fp32 model in the same process:
serialized size, batch-1 and batch-32 CPU latency (median of timed repeats after warm-up) and the test metric
(accuracy for classifiers, loss and perplexity for language models). Results land in
`RUN/compressed/<variant>/` as `model.pt` (the whole module: pickled, or TorchScript for FX-quantized graphs,
which do not pickle; quantized modules carry packed weights a state dict alone cannot rebuild) and `compress.json`, both written atomically.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lamina.errors import ConfigError
from lamina.io import atomic_file, atomic_write_text
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
                   max_batches: int | None = None) -> dict:
    """Test metrics of any callable model (quantized modules included) with the run's task, on CPU."""
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
    res = {k: float(v) for k, v in metrics.compute().items()}
    res["loss"] = loss_sum / max(n, 1)
    if ctx.task_name == _LM:
        res["ppl"] = math.exp(res["loss"])
    return res


def example_batch(ctx: RunContext, n: int, split: str = "test") -> torch.Tensor:
    """The first `n` real inputs of a split, as the model sees them (after the run's eval transform)."""
    from lamina.data.transforms import eval_transforms

    data = getattr(ctx.bundle, split) or ctx.bundle.train
    if ctx.task_name == _LM:
        block = ctx.bundle.meta["block_size"]
        ids = data.tensors["ids"][: n * block + 1]
        return ids[: n * block].reshape(n, block)
    x = data.x[:n].float()
    t = eval_transforms(ctx.cfg.data.augment)
    return t({"x": x})["x"] if t is not None else x


def calibration_batches(ctx: RunContext, samples: int = 512, batch: int = 128) -> list[torch.Tensor]:
    """Real training inputs for static quantization's observers (eval transform applied, no augmentation)."""
    x = example_batch(ctx, samples, split="train")
    return [x[i:i + batch] for i in range(0, len(x), batch)]


@torch.inference_mode()
def latency_ms(fn, x, repeats: int = 30, warmup: int = 5) -> float:
    """Median wall time of `fn(x)` in milliseconds (median: robust to a stray scheduler hiccup)."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def model_bytes(model: torch.nn.Module) -> int:
    from lamina.compress.quantize import serialized_bytes

    return serialized_bytes(model)


def measure(name: str, model: torch.nn.Module, ctx: RunContext, repeats: int = 30,
            max_batches: int | None = None, nbytes: int | None = None) -> dict:
    """Size (`nbytes`, default: the serialized state dict), batch-1/32 latency and test metrics of one variant."""
    x32 = example_batch(ctx, 32)
    return {"variant": name, "bytes": nbytes if nbytes is not None else model_bytes(model),
            "params": sum(p.numel() for p in model.parameters()), "split": test_split(ctx),
            "latency_b1_ms": latency_ms(model, x32[:1], repeats), "latency_b32_ms": latency_ms(model, x32, max(5, repeats // 3)),
            **{f"test_{k}": v for k, v in evaluate_model(model, ctx, max_batches=max_batches).items()}}


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
             callbacks=(), progress=None) -> torch.nn.Module:
    """Train `model` on the run's training data with the run's task and optimizer (lr scaled by default to a
    tenth: recovery, not training from scratch), cosine-decayed over `epochs` (fractions allowed)."""
    from lamina.config.schema import ScheduleConfig
    from lamina.engine.optim import build_optimizer, build_scheduler
    from lamina.engine.trainer import Trainer
    train, val = loaders(ctx)
    steps = finetune_steps(train, epochs)
    tcfg = ctx.cfg.trainer.model_copy(update={"max_epochs": max(1, math.ceil(epochs)), "max_steps": steps,
                                              "compile": False, "progress": False, "device": "cpu",
                                              "channels_last": False, "strategy": "none"})
    ocfg = ctx.cfg.optimizer.model_copy(update={"lr": lr if lr is not None else ctx.cfg.optimizer.lr / 10})
    optimizer = build_optimizer(model, ocfg)
    scheduler = build_scheduler(optimizer, ScheduleConfig(name="cosine"), steps, len(train), ocfg.lr)
    trainer = Trainer(tcfg, callbacks=[*callbacks, *([progress] if progress else [])])
    trainer.fit(model, ctx.task, train, val, optimizer, scheduler)
    return model.eval()


# ----- saving ------------------------------------------------------------------------------------
def load_variant(path: str | Path) -> torch.nn.Module:
    """A saved compressed model (`RUN/compressed/<variant>` or its model.pt), ready for inference."""
    p = Path(path)
    p = p / "model.pt" if p.is_dir() else p
    meta = json.loads((p.parent / "compress.json").read_text()) if (p.parent / "compress.json").is_file() else {}
    if str(meta.get("format", "")).startswith("torchscript"):
        return torch.jit.load(str(p))
    from lamina.compress.quantize import _quiet

    with _quiet():
        return torch.load(p, weights_only=False)  # our own file, written by save_variant


def save_variant(ctx: RunContext, tag: str, model: torch.nn.Module, result: dict) -> Path:
    from lamina.compress.quantize import _quiet

    out = ctx.root / "compressed" / tag
    out.mkdir(parents=True, exist_ok=True)
    with _quiet(), atomic_file(out / "model.pt") as tmp:
        try:  # plain, pruned and torchao modules pickle whole
            torch.save(model, tmp)
            result["format"] = "torch.save (torch.load(path, weights_only=False))"
        except Exception:  # FX-quantized GraphModules do not pickle: TorchScript carries their int8 kernels
            with torch.inference_mode():
                torch.jit.save(torch.jit.trace(model, example_batch(ctx, 2)), str(tmp))
            result["format"] = "torchscript (torch.jit.load(path))"
    atomic_write_text(out / "compress.json", json.dumps(result, indent=2, default=str))
    return out


# ----- entry points (CLI verbs) ------------------------------------------------------------------
def quantize_run(path: str | Path, method: str = "dynamic", calib: int = 512, epochs: float = 1.0,
                 group_size: int = 32, which: str = "best", repeats: int = 30, progress=None) -> dict:
    """fp32 vs a quantized variant of a trained run; saves the variant. `qat` fine-tunes `epochs` first."""
    from lamina.compress import quantize as q

    if method not in q.METHODS:
        raise ConfigError(f"quantize: unknown method '{method}'; accepted: {', '.join(q.METHODS)}")
    ctx = open_context(path, which)
    if method in ("static", "qat") and ctx.task_name == _LM:
        raise ConfigError(f"quantize: --method {method} (int8 activations, FX) is for conv nets and MLPs; for a "
                          "language model use dynamic, weight-int8 or weight-int4")
    torch.manual_seed(ctx.cfg.seed)
    if method == "qat":
        prepared = q.prepare_qat(ctx.model, example_batch(ctx, 2, "train"))
        finetune(ctx, prepared, epochs, progress=progress)
        qmodel = q.convert_qat(prepared)
    elif method == "static":
        qmodel = q.static_int8(ctx.model, calibration_batches(ctx, calib))
    else:
        qmodel = q.quantize(ctx.model, method, group_size=group_size)
    rows = with_ratios([measure("fp32", ctx.model, ctx, repeats), measure(method, qmodel, ctx, repeats)])
    result = {"run": str(ctx.root), "method": method, "rows": rows}
    result["saved"] = str(save_variant(ctx, f"quant-{method}", qmodel, result))
    return result


def prune_run(path: str | Path, method: str = "channels", amount: float = 0.5, epochs: float = 1.0,
              which: str = "best", repeats: int = 30, progress=None) -> dict:
    """fp32 vs pruned (channels: structured, smaller dense model; magnitude: global unstructured with the cubic
    sparsity schedule during fine-tuning), both fine-tuned for `epochs` on the run's training data."""
    from lamina.compress.prune import GradualPruning, channel_prune, sparsity

    ctx = open_context(path, which)
    torch.manual_seed(ctx.cfg.seed)
    if method == "channels":
        pruned = channel_prune(ctx.model, example_batch(ctx, 2, "train"), amount)
        before = measure("pruned (no fine-tune)", pruned, ctx, repeats=3)
        if epochs > 0:
            finetune(ctx, pruned, epochs, progress=progress)
    elif method == "magnitude":
        import copy

        pruned = copy.deepcopy(ctx.model)
        steps = finetune_steps(loaders(ctx)[0], epochs)
        if epochs <= 0:
            raise ConfigError("prune --method magnitude needs --epochs > 0: the sparsity schedule runs while fine-tuning")
        before = None
        finetune(ctx, pruned, epochs, callbacks=[GradualPruning(pruned, amount, steps)], progress=progress)
    else:
        raise ConfigError(f"prune: unknown method '{method}'; accepted: channels, magnitude")
    rows = [measure("fp32", ctx.model, ctx, repeats)]
    if before is not None:
        rows.append(before)
    rows.append(measure(f"{method} {amount:.0%}", pruned, ctx, repeats))
    rows = with_ratios(rows)
    result = {"run": str(ctx.root), "method": method, "amount": amount, "epochs": epochs,
              "weight_sparsity": sparsity(pruned), "rows": rows}
    result["saved"] = str(save_variant(ctx, f"prune-{method}-{int(round(amount * 100))}", pruned, result))
    return result
