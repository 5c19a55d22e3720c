"""Quantization: int8 (and int4) versions of trained models, and quantization-aware training.

Which flow each method uses on torch 2.13 (CPU), and why:

* `dynamic_int8` -- torch.ao `quantize_dynamic` on nn.Linear / nn.LSTM / nn.GRU: int8 weights, activations
  quantized on the fly per batch. It is the one flow with real int8 CPU kernels (fbgemm/x86) for Linear *and*
  recurrent layers in eager mode; torchao's dynamic configs cover Linear only and run a reference (dequantize)
  path on CPU without torch.compile.
* `static_int8` -- torch.ao FX graph mode (`prepare_fx` -> calibrate on real data -> `convert_fx`) with the x86
  qconfig: conv-BN-ReLU fused, per-channel int8 weights, activation ranges from calibration batches, real
  int8 conv kernels in eager mode. torch.ao.quantization is deprecated upstream in favour of torchao's PT2E
  flow, but PT2E's converted graph only becomes fast after torch.compile/inductor; in eager mode it
  computes in fp32 through quantize/dequantize pairs, so FX is what shrinks *and* speeds up a CNN here.
* `weight_only` -- torchao `quantize_` with `Int8WeightOnlyConfig` (per-channel int8) or
  `IntxWeightOnlyConfig(int4, PerGroup(group_size))` for transformer LMs, whose cost is reading weights.
  On CPU torchao keeps int4 values unpacked in int8 storage (its packed int4 formats need CUDA or
  torchao's C++ low-bit kernels, not in the PyPI wheel), so int4 shows its accuracy cost but not a smaller
  file than int8.
* `prepare_qat` / `convert_qat` -- torch.ao FX QAT (`prepare_qat_fx`): fake-quantize weights and activations
  while fine-tuning, then convert to the same int8 kernels as static quantization.

`torch.ao` deprecation warnings are silenced inside these functions: the flows are supported on this torch
version and the warning would repeat on every call.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Iterable

import torch
import torch.nn as nn

from lamina.errors import ConfigError, MissingDependencyError, ModelError

METHODS = ("dynamic", "static", "weight-int8", "weight-int4", "qat")
_ENGINE = "x86"  # fbgemm + onednn kernels on x86 CPUs; qnnpack would be the choice on ARM


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*TypedStorage.*")
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        yield


def _engine() -> None:
    engines = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = _ENGINE if _ENGINE in engines else ("qnnpack" if "qnnpack" in engines
                                                                           else engines[-1])


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper -> the module


def dynamic_int8(model: nn.Module, layers: Iterable[type] = (nn.Linear, nn.LSTM, nn.GRU)) -> nn.Module:
    """A copy of `model` with int8 weights and dynamically quantized activations in Linear/LSTM/GRU layers."""
    _engine()
    with _quiet():
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(_inner(model)).eval().cpu(), set(layers),
                                                   dtype=torch.qint8)
    if not any("quantized" in type(m).__module__ for m in q.modules()):
        raise ModelError(f"dynamic int8: {type(model).__name__} has no Linear/LSTM/GRU layer to quantize")
    return q


def static_int8(model: nn.Module, calibration: Iterable[torch.Tensor], example: torch.Tensor | None = None,
                per_channel: bool = True) -> nn.Module:
    """Post-training static int8 (FX graph mode): calibrate activation ranges on real batches, then convert.

    `calibration`: input batches as the model sees them (after the run's eval transform); a few hundred samples
    settle the min/max and histogram observers.
    """
    from torch.ao.quantization import QConfigMapping, get_default_qconfig, get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    _engine()
    batches = iter(calibration)
    first = next(batches, None) if example is None else example
    if first is None:
        raise ConfigError("static int8: no calibration batches; pass real input batches (e.g. 512 training samples)")
    m = copy.deepcopy(_inner(model)).eval().cpu()
    with _quiet():
        qmap = get_default_qconfig_mapping(_ENGINE) if per_channel else QConfigMapping().set_global(
            get_default_qconfig(_ENGINE))
        try:
            prepared = prepare_fx(m, qmap, (first[:1].float(),))
        except Exception as e:  # symbolic tracing fails on data-dependent control flow
            raise ModelError(f"static int8: {type(model).__name__} cannot be traced by torch.fx "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); use dynamic int8 instead") from None
        with torch.inference_mode():
            if example is None:
                prepared(first.float())
            for xb in batches:
                prepared(xb.float())
        return convert_fx(prepared)


def weight_only(model: nn.Module, bits: int = 8, group_size: int = 32) -> nn.Module:
    """A copy with int8 (per output channel) or int4 (per group of `group_size` inputs) Linear weights (torchao)."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup
    except ImportError:
        raise MissingDependencyError('weight-only quantization needs torchao: pip install "lamina[compress]"') from None
    if bits not in (4, 8):
        raise ConfigError(f"weight-only quantization: bits must be 4 or 8, got {bits}")
    q = copy.deepcopy(_inner(model)).eval().cpu()
    _untie_linear_weights(q)
    cfg = Int8WeightOnlyConfig() if bits == 8 else IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                         granularity=PerGroup(group_size))
    if bits == 4:
        bad = [n for n, mod in q.named_modules() if isinstance(mod, nn.Linear) and mod.in_features % group_size]
        if bad:
            raise ConfigError(f"int4 weight-only: group_size {group_size} does not divide the input width of "
                              f"{bad[0]} ({len(bad)} layer(s)); choose a divisor, e.g. 16 or 32")
    with _quiet():
        quantize_(q, cfg)
    return q


def _untie_linear_weights(model: nn.Module) -> None:
    """Give a Linear that shares its weight with an Embedding (GPT's tied lm_head) its own copy: torchao
    replaces the Linear's weight with a quantized tensor, which must not turn the embedding table into one."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and id(mod.weight) in emb:
            mod.weight = nn.Parameter(mod.weight.detach().clone(), requires_grad=False)


def prepare_qat(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """An FX-traced copy with fake quantization (int8 weights per channel, int8 activations), ready to fine-tune."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    _engine()
    m = copy.deepcopy(_inner(model)).train().cpu()
    with _quiet():
        try:
            return prepare_qat_fx(m, get_default_qat_qconfig_mapping(_ENGINE), (example[:1].float(),))
        except Exception as e:
            raise ModelError(f"QAT: {type(model).__name__} cannot be traced by torch.fx "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def convert_qat(prepared: nn.Module) -> nn.Module:
    """The fine-tuned fake-quant model as a real int8 model (same kernels as `static_int8`)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet():
        return convert_fx(copy.deepcopy(prepared).eval().cpu())


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of `torch.save(model.state_dict())`: what the weights cost on disk (packed int8 params included)."""
    buf = io.BytesIO()
    with _quiet():
        torch.save(model.state_dict(), buf)
    return buf.tell()


def quantize(model: nn.Module, method: str, calibration: Iterable[torch.Tensor] | None = None,
             group_size: int = 32) -> nn.Module:
    """One entry point for the post-training methods (`qat` needs training: see compress.run.quantize_run)."""
    if method == "dynamic":
        return dynamic_int8(model)
    if method == "static":
        return static_int8(model, calibration if calibration is not None else [])
    if method in ("weight-int8", "weight-int4"):
        return weight_only(model, bits=8 if method == "weight-int8" else 4, group_size=group_size)
    raise ConfigError(f"quantize: unknown method '{method}'; accepted: {', '.join(METHODS)}")
