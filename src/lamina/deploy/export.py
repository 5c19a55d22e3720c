"""Export trained models to ONNX or a torch.export program, with a parity check against PyTorch eager.

Flows (and why):

* ONNX: the dynamo-based exporter, `torch.onnx.export(..., dynamo=True, dynamic_shapes=...)`, which traces with
  torch.export and translates ATen ops with onnxscript. It is PyTorch's maintained exporter. A model it cannot
  trace (typically input validation that reads tensor values, `int(ids.max())`, which torch.export refuses to
  branch on) falls back to the TorchScript exporter (`dynamo=False`, `dynamic_axes`), which traces the branch the
  example took (lamina registers the `aten::rms_norm` symbolic it lacks below opset 23). Which exporter built the
  file is recorded in the file's metadata and in export.json. UNSUPPORTED lists models neither exporter handles.
* torch.export: `torch.export.export(model.eval(), args, dynamic_shapes=...)` saved with `torch.export.save`;
  a model with data-dependent input checks falls back to `torch.export.draft_export`, which specializes those
  checks on the example's real values (recorded as exporter "torch.export-draft"); the value-pinning asserts it
  adds are removed when the values feed nothing else, and a program whose batch axis got pinned is refused
  (UNSUPPORTED_PROGRAM lists those models).
* int8: onnxruntime.quantization. Conv nets get static QDQ quantization with per-channel weights, calibrated on
  real training inputs (activations have stable ranges; static QDQ is what ORT's conv kernels fuse). Models with
  attention, recurrent layers or only linear layers get dynamic quantization (int8 weights, activation scales
  computed per batch), which is what ORT recommends for transformers and LSTMs.

Every export runs the artifact and PyTorch eager on the same real batch and reports the max abs difference and
argmax agreement; an fp32 export outside the limits (1e-4, 100%) raises ParityError, and `export_run` moves the
staged artifact into place only after it passed. The batch axis of every input is dynamic (exported with a batch
of 2, checked on the full batch).

Nothing here prints; `lamina export` (cli/deploy.py) formats the result.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lamina.errors import ConfigError, LaminaError, MissingDependencyError, unknown_name
from lamina.io import atomic_file, atomic_write_bytes, atomic_write_text

OPSET = 18
FORMATS = ("onnx", "torch-export")
MAX_ABS_DIFF = 1e-4  # fp32 parity limit: float32 kernels differ in summation order, not more
EXAMPLE_BATCH = 2  # export traces with this batch; 1 would let torch.export specialize the batch axis to 1

# Registered models that cannot be exported, with the reason (also listed in README "### Export").
UNSUPPORTED: dict[str, str] = {
    "lstm_classifier": "variable-length batches go through pack_padded_sequence, whose packed batch sizes depend on "
                       "the lengths' values: torch.export cannot trace it and the TorchScript exporter crashes in it",
}
# Registered models that export to ONNX but not to a torch.export program (--format torch-export), with the reason.
UNSUPPORTED_PROGRAM: dict[str, str] = {
    name: "its input checks read token values (int(text.min())), so torch.export needs draft_export, which then "
          "fixes the batch axis to the traced size; export it to ONNX instead (TorchScript exporter)"
    for name in ("clip_tiny", "clip_small", "fusion_classifier")
}


class ExportError(LaminaError, RuntimeError):
    kind = "export error"


class ParityError(ExportError):
    kind = "parity error"


def _require_onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter's op library)
    except ImportError as e:
        raise MissingDependencyError(f'{e.name} is not installed; ONNX export needs pip install "lamina[deploy]"') \
            from None
    return onnx


def _first_line(e: BaseException) -> str:
    import re

    for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines():
        line = line.strip()
        if line:
            return f"{type(e).__name__}: {line[:240]}"
    return type(e).__name__


@contextlib.contextmanager
def _quiet():
    """Exporters warn and log a lot (tracer warnings, missing torchvision ops); the library prints nothing."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch.fx",
                                               "torch._dynamo", "onnxscript", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


# ----- inputs: one flat, named tuple of tensors ------------------------------------------------------
class _Positional(nn.Module):
    """`model(**dict(zip(names, inputs)))` as a positional-only module: one graph input per named tensor, whatever
    mix of positional and keyword arguments the model's forward takes. Tuple/list outputs stay tuples."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, *inputs):
        out = self.model(**dict(zip(self.names, inputs)))
        return tuple(out) if isinstance(out, (list, tuple)) else out


def named_inputs(model: nn.Module, example_inputs) -> dict[str, torch.Tensor]:
    """A tensor, a tuple of positional tensors or a dict of keyword tensors -> {forward parameter name: tensor}."""
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = (example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)), {}
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise ExportError(f"inputs do not fit {type(model).__name__}.forward: {e}") from None
    out = {}
    for name, value in bound.arguments.items():
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif value is not None:
            raise ExportError(f"input '{name}' is a {type(value).__name__}; export takes tensors only")
    if not out:
        raise ExportError(f"{type(model).__name__}: no tensor inputs to export with")
    return out


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return list(out)
    raise ExportError(f"model output is a {type(out).__name__}; export needs a tensor or a tuple of tensors")


def _output_names(n: int) -> list[str]:
    return ["output"] + [f"output_{i}" for i in range(1, n)]


def _head(inputs: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {k: v[:n] for k, v in inputs.items()}


def _prepare(model: nn.Module, example_inputs):
    model = model.eval()
    inputs = named_inputs(model, example_inputs)
    sizes = {int(v.shape[0]) if v.ndim else 0 for v in inputs.values()}
    if len(sizes) != 1 or min(sizes) < 1:
        raise ExportError(f"inputs must share one batch axis (dim 0); got shapes "
                          f"{ {k: tuple(v.shape) for k, v in inputs.items()} }")
    if sizes.pop() < EXAMPLE_BATCH:
        raise ExportError(f"export needs an example batch of at least {EXAMPLE_BATCH} (a batch of 1 would fix the "
                          "batch axis to 1)")
    example = _head(inputs, EXAMPLE_BATCH)
    wrapper = _Positional(model, list(example)).eval()
    with torch.no_grad():
        n_out = len(_outputs(wrapper(*example.values())))
    batch = torch.export.Dim("batch", min=1)
    dynamic = (tuple({0: batch} for _ in example),)
    return wrapper, example, dynamic, _output_names(n_out)


def _atomic_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# ----- ONNX -----------------------------------------------------------------------------------------
def set_onnx_metadata(model_proto, metadata: dict) -> None:
    """Store `metadata` as JSON under metadata_props["lamina"] (replacing an existing entry)."""
    from lamina.deploy.runtime import METADATA_KEY

    for p in list(model_proto.metadata_props):
        if p.key == METADATA_KEY:
            model_proto.metadata_props.remove(p)
    entry = model_proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, default=str)


def _save_onnx(model_proto, path: Path) -> None:
    onnx = _require_onnx()
    if model_proto.ByteSize() > 1_900_000_000:  # protobuf's 2 GB cap: weights go next to the graph
        with atomic_file(path) as tmp:
            onnx.save_model(model_proto, str(tmp), save_as_external_data=True, location=path.name + ".data")
    else:
        atomic_write_bytes(path, model_proto.SerializeToString())


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """aten::rms_norm for the TorchScript exporter, which has no symbolic for it below opset 23:
    x / sqrt(mean(x^2 over the normalized dims) + eps) * weight."""
    from torch.onnx import symbolic_helper as sh

    dims = sh._get_const(normalized_shape, "is", "normalized_shape")
    eps = None if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
    eps = torch.finfo(torch.float32).eps if eps is None else eps  # nn.RMSNorm's default: the dtype's eps
    axes = g.op("Constant", value_t=torch.tensor(list(range(-len(dims), 0)), dtype=torch.int64))
    ms = g.op("ReduceMean", g.op("Mul", x, x), axes, keepdims_i=1)
    y = g.op("Div", x, g.op("Sqrt", g.op("Add", ms, g.op("Constant", value_t=torch.tensor(eps)))))
    return y if sh._is_none(weight) else g.op("Mul", y, weight)


def export_onnx(model: nn.Module, example_inputs, path: str | Path, metadata: dict | None = None) -> dict:
    """Export to one .onnx file (opset 18, dynamic batch axis): dynamo exporter first, TorchScript on failure.

    `example_inputs`: a tensor, a tuple of positional tensors or a dict of keyword tensors (batch >= 2).
    `metadata` is stored under metadata_props["lamina"] with input/output names and the exporter added.
    Returns {"path", "exporter", "fallback_reason", "input_names", "output_names", "opset"}.
    """
    onnx = _require_onnx()
    path = Path(path)
    wrapper, example, dynamic, out_names = _prepare(model, example_inputs)
    in_names = list(example)
    args = tuple(example.values())
    reason = None
    try:
        with _quiet():
            program = torch.onnx.export(wrapper, args, None, dynamo=True, dynamic_shapes=dynamic,
                                        input_names=in_names, output_names=out_names, opset_version=OPSET,
                                        optimize=True, verbose=False)
        proto, exporter = program.model_proto, "dynamo"
    except Exception as e:  # any tracing/translation failure: record why, try the TorchScript exporter
        reason = _first_line(e)
        buf = io.BytesIO()
        try:
            torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, OPSET)
            with _quiet(), torch.no_grad():
                torch.onnx.export(wrapper, args, buf, dynamo=False, input_names=in_names, output_names=out_names,
                                  dynamic_axes={n: {0: "batch"} for n in in_names + out_names},
                                  opset_version=OPSET, do_constant_folding=True)
        except Exception as e2:
            raise ExportError(f"{_model_name(model)}: ONNX export failed with both exporters (dynamo: {reason}; "
                              f"torchscript: {_first_line(e2)})") from None
        proto, exporter = onnx.load_from_string(buf.getvalue()), "torchscript"
    info = {"input_name": in_names[0], "input_names": in_names, "output_name": out_names[0],
            "output_names": out_names, "exporter": exporter}
    set_onnx_metadata(proto, {**(metadata or {}), **info})
    _save_onnx(proto, path)
    return {"path": str(path), **info, "fallback_reason": reason, "opset": OPSET}


def _model_name(model: nn.Module) -> str:
    return getattr(model, "model_name", type(model).__name__)


# ----- torch.export ---------------------------------------------------------------------------------
def export_program(model: nn.Module, example_inputs, path: str | Path) -> dict:
    """`torch.export.export` with a dynamic batch axis, saved with `torch.export.save` (a .pt2 file).

    Data-dependent input checks (which torch.export refuses) fall back to `torch.export.draft_export`.
    The program's inputs are the model's forward arguments, in order, as positional tensors.
    Returns {"path", "exporter", "fallback_reason", "input_names", "output_names"}.
    """
    path = Path(path)
    wrapper, example, dynamic, out_names = _prepare(model, example_inputs)
    args = tuple(example.values())
    reason = None
    try:
        with _quiet():
            program = torch.export.export(wrapper, args, dynamic_shapes=dynamic)
        exporter = "torch.export"
    except Exception as e:
        reason = _first_line(e)
        try:
            with _quiet():
                program = _without_value_checks(torch.export.draft_export(wrapper, args, dynamic_shapes=dynamic))
        except LaminaError:
            raise
        except Exception as e2:
            raise ExportError(f"{_model_name(model)}: torch.export failed ({reason}; draft_export: "
                              f"{_first_line(e2)})") from None
        exporter = "torch.export-draft"
    fixed = _fixed_batch_inputs(program)
    if fixed:
        raise ExportError(f"{_model_name(model)}: {exporter} fixed the batch axis of {', '.join(fixed)} to "
                          f"{EXAMPLE_BATCH} ({reason or 'specialized while tracing'})")
    with _quiet(), atomic_file(path) as tmp:
        torch.export.save(program, str(tmp))
    return {"path": str(path), "exporter": exporter, "fallback_reason": reason, "input_names": list(example),
            "output_names": out_names}


def _without_value_checks(program):
    """Drop what draft_export specialized on the example's values, when those values only fed input checks.

    A model's `int(ids.max())` validation becomes unbacked symbols u0, u1 that draft_export pins to the example
    (`assert u1 == 24`): a program that rejects every other batch. When the read values feed nothing but such
    asserts, removing the asserts leaves them dead, and the program is the model minus its input validation.
    If a read value still feeds the computation after that, the program is specialized: refuse it.
    """
    import re

    g = program.graph
    for node in list(g.nodes):
        if (node.op == "call_function" and node.target is torch.ops.aten._assert_scalar.default
                and re.search(r"\bu\d+\b", str(node.args[1]))):
            g.erase_node(node)
    g.eliminate_dead_code()
    if any(n.op == "call_function" and n.target in (torch.ops.aten.item.default,
                                                    torch.ops.aten._local_scalar_dense.default) for n in g.nodes):
        raise ExportError("torch.export: the model's computation depends on input values (a tensor read with "
                          ".item()/int()), which a program cannot capture for every input")
    program.graph_module.recompile()
    for sym in [s for s in program.range_constraints if str(s).startswith("u")]:
        del program._range_constraints[sym]
    return program


def _fixed_batch_inputs(program) -> list[str]:
    """User inputs whose batch axis the program pinned to one size (a constant, or a symbol with range [n, n])."""
    fixed = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in program.graph_signature.user_inputs:
            continue
        dim = node.meta["val"].shape[0]
        vr = program.range_constraints.get(dim.node.expr) if isinstance(dim, torch.SymInt) else None
        if vr is None or vr.lower == vr.upper:  # a free axis always has a range; a pinned one has none or [n, n]
            fixed.append(node.name)
    return fixed


def load_program(path: str | Path) -> Callable:
    """A callable over positional tensors (the exported inputs, in order) from a saved .pt2 program."""
    with _quiet():
        return torch.export.load(str(path)).module()


# ----- parity -----------------------------------------------------------------------------------------
def _np(a) -> np.ndarray:
    if isinstance(a, (list, tuple)):
        a = a[0]
    if isinstance(a, torch.Tensor):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def parity(reference_fn: Callable, candidate_fn: Callable, inputs) -> dict:
    """Run both on the same `inputs`; compare their (first) outputs.

    -> {"max_abs_diff", "argmax_agreement" (percent of rows whose last-axis argmax matches), "n"}.
    """
    with torch.no_grad():
        ref = _np(reference_fn(inputs))
        try:
            cand = _np(candidate_fn(inputs))
        except Exception as e:  # e.g. a program specialized to the traced batch size
            raise ParityError(f"the exported model fails on a real batch of {len(ref)}: {_first_line(e)}") from None
    if ref.shape != cand.shape:
        raise ParityError(f"exported output has shape {cand.shape}, PyTorch gives {ref.shape}")
    if not np.isfinite(cand).all():
        raise ParityError("exported output has NaN or Inf values")
    agree = (ref.argmax(-1) == cand.argmax(-1)) if ref.ndim else np.array(True)
    return {"max_abs_diff": float(np.abs(ref - cand).max()) if ref.size else 0.0,
            "argmax_agreement": float(agree.mean() * 100.0), "n": int(ref.shape[0]) if ref.ndim else 1}


def check_parity(result: dict, what: str) -> None:
    """Raise ParityError when an fp32 artifact misses the limits (max abs diff <= 1e-4, argmax agreement 100%)."""
    if not result["max_abs_diff"] <= MAX_ABS_DIFF or result["argmax_agreement"] < 100.0:
        raise ParityError(f"{what}: max abs diff {result['max_abs_diff']:.3g} (limit {MAX_ABS_DIFF:g}), argmax "
                          f"agreement {result['argmax_agreement']:.2f}% (needs 100%) against PyTorch eager")


def eager_fn(model: nn.Module) -> Callable:
    model = model.eval()
    return lambda inputs: _outputs(model(**inputs))[0]


def onnx_fn(path: str | Path, threads: int | None = None) -> Callable:
    from lamina.deploy.runtime import OnnxRunner

    runner = OnnxRunner(path, threads=threads)
    return lambda inputs: runner.run({k: v.cpu().numpy() for k, v in inputs.items()})


def program_fn(path: str | Path) -> Callable:
    module = load_program(path)
    return lambda inputs: _outputs(module(*inputs.values()))[0]


# ----- int8 -------------------------------------------------------------------------------------------
def int8_method(model: nn.Module) -> str:
    """"static" (QDQ, per-channel, calibrated) for conv nets; "dynamic" for attention / recurrent / linear models."""
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    seq = any(isinstance(m, (nn.RNNBase, nn.MultiheadAttention)) or "attention" in type(m).__name__.lower()
              for m in model.modules())
    return "static" if has_conv and not seq else "dynamic"


def quantize_onnx(src: str | Path, dst: str | Path, method: str, calibration=None,
                  metadata: dict | None = None) -> dict:
    """int8 ONNX with onnxruntime.quantization: `quant_pre_process` (shape inference + graph cleanup), then
    `quantize_static` (QDQ, per-channel, fed by `calibration`: an iterable of {input name: array} batches) or
    `quantize_dynamic` (QInt8 weights). Returns {"path", "method", "preprocessed"}."""
    try:
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise MissingDependencyError('onnxruntime is not installed; pip install "lamina[deploy]"') from None
    onnx = _require_onnx()
    src, dst = Path(src), Path(dst)
    pre = dst.with_name(f".pre-{dst.name}")
    tmp = dst.with_name(f".tmp-{dst.name}")
    preprocessed = True
    try:
        with _quiet():
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
    except Exception:  # symbolic shape inference does not know every op: quantize the graph as exported
        preprocessed = False
        pre = src
    try:
        with _quiet():
            if method == "static":
                if calibration is None:
                    raise ExportError("static int8 quantization needs calibration batches")

                class _Reader(CalibrationDataReader):
                    def __init__(self, batches):
                        self._it = iter(batches)

                    def get_next(self):
                        return next(self._it, None)

                # reduce_range (7-bit weights): x86 CPUs without VNNI multiply u8 x s8 pairs into saturating int16
                # sums (vpmaddubsw); full 8-bit per-channel weights overflow there. Measured on this AVX2 machine,
                # Fashion-MNIST CNN on 10,000 test images, 512 calibration images: 91.61% without, 93.09% with (fp32 93.06%); torch's x86
                # qconfig makes the same choice.
                quantize_static(str(pre), str(tmp), _Reader(list(calibration)), quant_format=QuantFormat.QDQ,
                                per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8)
            else:
                quantize_dynamic(str(pre), str(tmp), weight_type=QuantType.QInt8)
    except LaminaError:
        raise
    except Exception as e:
        raise ExportError(f"int8 quantization ({method}) of {src.name} failed: {_first_line(e)}") from None
    finally:
        if pre != src:
            pre.unlink(missing_ok=True)
    proto = onnx.load(str(tmp))
    set_onnx_metadata(proto, {**(metadata or {}), "quantization": method})
    _save_onnx(proto, dst)
    tmp.unlink(missing_ok=True)
    return {"path": str(dst), "method": method, "preprocessed": preprocessed}


# ----- a trained run ----------------------------------------------------------------------------------
def _normalize_stats(augment) -> dict | None:
    from lamina.data.transforms import normalize_stats

    stats = normalize_stats(augment)
    return {"mean": stats[0], "std": stats[1]} if stats else None


def _real_batch(cfg, task, bundle, data, n: int, seed: int | None = None) -> dict:
    """`n` real samples of a split as the model sees them (eval transforms applied); LM: windows of token ids."""
    if task.name == "language_modeling":
        ids, block = data.tensors["ids"], int(bundle.meta["block_size"])
        k = min(n, (len(ids) - 1) // block)
        if k < 1:
            raise ExportError(f"the split has {len(ids)} tokens, fewer than one window of {block}")
        start = 0 if seed is None else int(torch.randint(0, len(ids) - k * block, (1,),
                                                        generator=torch.Generator().manual_seed(seed)))
        return {"x": ids[start:start + k * block].reshape(k, block),
                "y": ids[start + 1:start + k * block + 1].reshape(k, block)}
    idx = torch.arange(min(n, len(data)))
    if seed is not None:
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    loader = task.eval_loader(data.subset(idx), bundle, cfg.data, torch.device("cpu"))
    return next(iter(loader))


def run_inputs(model: nn.Module, task, batch: dict) -> dict[str, torch.Tensor]:
    """The model's own inputs for a data batch, as the task's batch adapter passes them ({forward arg: tensor}):
    captured by a forward pre-hook around `task.forward`; tasks that call encoder methods instead of forward
    (contrastive, masked LM) get batch keys matched to forward's parameter names."""
    seen: list = []
    hook = model.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)) if not seen else None,
                                           with_kwargs=True)
    try:
        with torch.no_grad():
            task.forward(model.eval(), batch)
    except Exception:
        if not seen:
            raise
    finally:
        hook.remove()
    if seen:
        return named_inputs(model, seen[0][0] if not seen[0][1] else dict(
            inspect.signature(model.forward).bind(*seen[0][0], **seen[0][1]).arguments))
    params = list(inspect.signature(model.forward).parameters)
    kw = {k: v for k, v in batch.items() if k in params and isinstance(v, torch.Tensor)}
    if not kw and "x" in batch:
        kw = {params[0]: batch["x"]}
    return named_inputs(model, kw)


def _size_mb(path: str | Path) -> float:
    p = Path(path)
    extra = p.with_name(p.name + ".data")
    return (p.stat().st_size + (extra.stat().st_size if extra.exists() else 0)) / 2**20


def _accuracy(logits, y) -> float | None:
    logits = _np(logits)
    y = y.cpu().numpy() if isinstance(y, torch.Tensor) else None
    if y is None or logits.ndim < 2 or y.shape != logits.shape[:-1] or y.dtype.kind not in "iu":
        return None  # (B, C) vs (B,) labels, or (B, T, V) vs (B, T) next tokens; not regression targets
    return float((logits.argmax(-1) == y).mean() * 100.0)


def _checked(stage: Path, path: Path, run_parity: Callable[[], dict], what: str) -> dict:
    """Move a staged artifact into place if it passes the fp32 parity check; else delete it and raise."""
    try:
        par = run_parity()
        check_parity(par, f"{path.name} ({what})")
    except ParityError:
        stage.unlink(missing_ok=True)
        raise
    os.replace(stage, path)
    return par


def export_run(run_dir: str | Path, fmt: str = "onnx", int8: bool = False, out: str | Path | None = None,
               which: str = "best", batch: int = 64, progress: Callable[[int, int], None] | None = None) -> dict:
    """Export a trained run and check parity on `batch` real test samples; writes the artifact and export.json.
    `progress(done, total)`: stages finished (each artifact's export, then its parity check).

    fmt "onnx": RUN/export/model.onnx (+ model.int8.onnx with int8=True); "torch-export": RUN/export/model.pt2.
    `out`: the artifact path (or folder) instead. export.json next to it holds the result under the format's key.
    Returns {"run", "checkpoint", "format", "batch", "split", "artifacts": [...]} where each artifact has file, size_mb, exporter, max_abs_diff, argmax_agreement (and accuracy where labels).
    """
    from lamina.runs import RunFolder, open_run

    if fmt not in FORMATS:
        raise ConfigError(f"--format: {unknown_name('format', fmt, FORMATS)}")
    if int8 and fmt != "onnx":
        raise ConfigError(f"--int8: quantized export is ONNX only (onnxruntime.quantization); drop --int8 or use "
                          f"--format onnx, got --format {fmt}")
    if int(batch) < EXAMPLE_BATCH:
        raise ConfigError(f"--batch: expected an integer >= {EXAMPLE_BATCH}, got {batch}")
    if which not in ("best", "last"):
        raise ConfigError(f"--which: expected best or last, got {which!r}")
    p = Path(run_dir)
    if not RunFolder.is_run(p):
        raise ConfigError(f"{run_dir}: not a run folder (expected a folder with checkpoints/ from `lamina train`, "
                          "or a checkpoint folder with meta.json)")
    if fmt == "onnx":
        _require_onnx()
        from lamina.deploy.runtime import require_onnxruntime

        require_onnxruntime()
    run = open_run(p, which)
    cfg, model, task, facts, ckpt = run.cfg, run.model, run.task, run.facts, run.checkpoint
    name = cfg.model.pretrained or cfg.model.name
    blocked = {**UNSUPPORTED, **(UNSUPPORTED_PROGRAM if fmt == "torch-export" else {})}
    if cfg.model.name in blocked and not cfg.model.pretrained:
        raise ExportError(f"model {cfg.model.name} cannot be exported to {fmt}: {blocked[cfg.model.name]}")
    model = model.cpu().eval()
    bundle = run.data()
    split = next((s for s in ("test", "val", "train") if getattr(bundle, s) is not None), None)
    data_batch = _real_batch(cfg, task, bundle, getattr(bundle, split), int(batch))
    inputs = run_inputs(model, task, data_batch)
    n = len(next(iter(inputs.values())))
    if n < EXAMPLE_BATCH:
        raise ExportError(f"the {split} split has {n} sample(s); export needs at least {EXAMPLE_BATCH}")

    root = run.folder.path
    default = root / "export" / ("model.onnx" if fmt == "onnx" else "model.pt2")
    path = Path(out) if out else default
    if path.suffix == "" or path.is_dir():
        path = path / default.name
    metadata = {"model": name, "facts": facts.to_dict(), "normalize": _normalize_stats(cfg.data.augment),
                "checkpoint": str(ckpt)}
    ref = eager_fn(model)
    stage = path.with_name(f".candidate-{path.name}")  # replaces `path` only once it passed the parity check
    labels = data_batch.get("y")
    acc_fp32 = _accuracy(ref(inputs), labels) if labels is not None else None
    artifacts = []
    stages = iter(range(1, 5 if int8 else 3))

    def advance() -> None:
        if progress is not None:
            progress(next(stages), 4 if int8 else 2)

    if progress is not None:
        progress(0, 4 if int8 else 2)
    with torch.no_grad():
        if fmt == "onnx":
            info = export_onnx(model, inputs, stage, metadata)
            advance()
            par = _checked(stage, path, lambda: parity(ref, onnx_fn(stage), inputs),
                           f"{info['exporter']} exporter")
            advance()
            artifacts.append({"file": str(path), "size_mb": _size_mb(path), "exporter": info["exporter"], **par,
                              "accuracy": acc_fp32, "fallback_reason": info["fallback_reason"]})
            if int8:
                method = int8_method(model)
                calib = None
                if method == "static":
                    cal = run_inputs(model, task, _real_batch(cfg, task, bundle, bundle.train, 256, seed=cfg.seed))
                    calib = [{k: v[i:i + 32].cpu().numpy() for k, v in cal.items()}
                             for i in range(0, len(next(iter(cal.values()))), 32)]
                qpath = path.with_name(path.stem + ".int8.onnx")
                q = quantize_onnx(path, qpath, method, calib, {**metadata, **{k: info[k] for k in (
                    "input_name", "input_names", "output_name", "output_names", "exporter")}})
                advance()
                cand = onnx_fn(qpath)
                qpar = parity(ref, cand, inputs)
                advance()
                artifacts.append({"file": str(qpath), "size_mb": _size_mb(qpath),
                                  "exporter": f"{info['exporter']}+int8-{method}", **qpar,
                                  "accuracy": _accuracy(cand(inputs), labels) if labels is not None else None,
                                  "quantization": method, "preprocessed": q["preprocessed"]})
        else:
            info = export_program(model, inputs, stage)
            advance()
            par = _checked(stage, path, lambda: parity(ref, program_fn(stage), inputs), info["exporter"])
            advance()
            artifacts.append({"file": str(path), "size_mb": _size_mb(path), "exporter": info["exporter"], **par,
                              "accuracy": acc_fp32, "fallback_reason": info["fallback_reason"]})
    result = {"run": str(root), "checkpoint": str(ckpt), "model": name, "format": fmt, "split": split, "batch": n,
              "input_names": info["input_names"], "output_names": info["output_names"],
              "normalize": metadata["normalize"], "accuracy_fp32_eager": acc_fp32, "artifacts": artifacts}
    report = path.with_name("export.json")  # one entry per format: an ONNX and a torch.export artifact can share it
    try:
        previous = json.loads(report.read_text()) if report.is_file() else {}
    except (OSError, ValueError):
        previous = {}
    previous = {k: v for k, v in previous.items() if k in FORMATS} if isinstance(previous, dict) else {}
    _atomic_json(report, {**previous, fmt: result})
    return result


__all__ = ["export_run", "export_onnx", "export_program", "load_program", "parity", "check_parity", "quantize_onnx",
           "int8_method", "run_inputs", "named_inputs", "set_onnx_metadata", "ExportError", "ParityError",
           "UNSUPPORTED", "UNSUPPORTED_PROGRAM", "FORMATS", "OPSET", "MAX_ABS_DIFF"]
