"""The speed preset (`trainer.perf`, on by default in runs): what a careful engineer would switch on by hand,
decided per model and machine at setup, with a one-line account of what was applied and why anything was skipped.

* bf16 autocast where the hardware computes bf16 natively (CPU: AVX512-BF16, AMX or ARM bf16, through oneDNN;
  CUDA: Ampere or later). Matrix products run at about twice fp32's rate there (ANCHORS.md: ~190 vs ~420
  GFLOP/s on this CPU) and bf16 keeps fp32's exponent range, so no loss scaling. CUDA without bf16: fp16 with a
  GradScaler. A CPU without native bf16 emulates it, which is slower than fp32: skipped.
* channels_last for models with 2-D convolutions: oneDNN / cuDNN's NHWC kernels (measured on this CPU, 1 thread,
  batch 128: a cnn_medium step takes 290 ms fp32 NCHW, 227 fp32 NHWC, 131 bf16 NHWC).
* fused Adam/AdamW: set by the optimizer (`optimizer.impl: auto`); reported here.
* torch.compile: on CUDA (kernel fusion and fewer launches pay there). On CPU `auto` compiles models without 2-D
  convolutions only in runs of at least CPU_COMPILE_MIN_STEPS steps: measured on the char GPT under tcmalloc, it
  cuts a bf16 step from 22.5 to 21.4 ms (31 to 28.5 while the shared host is busy), and a cold compile costs
  22 s on 2 cores (4 s warm, from inductor's disk cache), so it pays back after ~10,000 steps. Conv nets stay eager (inductor was slower than oneDNN's
  kernels). `compile: always` forces it.
* The allocator (CPU, reported, not decided here): the `lamina` command runs itself on tcmalloc when the machine
  has it (lamina/allocator.py): about 6% a step on the char GPT.

Explicit settings win where they say more than the default: trainer.precision bf16/fp16 stay, trainer.compile /
trainer.channels_last true stay on. The plan is pure data (`PerfPlan`), so tests can check what was decided and
the Trainer applies it in one place.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass, field

import torch

from lamina import allocator
from lamina.config.schema import TrainerConfig


@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str) -> tuple[bool, str]:
    """(does this device compute bf16 natively, the evidence in a few words)."""
    if device_type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, (f"{torch.cuda.get_device_name(0)} has bf16" if ok else "this GPU has no native bf16")
    if device_type == "cpu":
        try:  # oneDNN's own check: AVX512-BF16 / AMX on x86, bf16 on ARM
            ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            ok = False
        flags = _cpu_flags()
        have = [f for f in ("amx_bf16", "avx512_bf16", "bf16") if f in flags]
        return ok, (f"CPU has {have[0].upper()}" if ok and have else "CPU has native bf16" if ok
                    else "CPU has no native bf16 (emulated bf16 is slower than fp32)")
    if device_type == "mps":
        return False, "MPS: bf16 autocast not used"
    return False, f"{device_type}: no bf16 policy"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_conv2d(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def optimizer_impl(optimizer) -> str | None:
    """'fused', 'foreach' or 'for_loop' for torch's Adam/AdamW/SGD; None for other optimizers."""
    if optimizer is None or not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)):
        return None
    d = optimizer.defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") is not False else "for_loop"


@dataclass
class PerfPlan:
    precision: str
    channels_last: bool
    compile: bool
    applied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def note(self) -> str:
        """One line for the run output: 'perf: bf16 autocast (CPU has AVX512_BF16), ...; skipped: ...'."""
        text = "perf: " + (", ".join(self.applied) or "nothing applied")
        return text + (f"; skipped: {', '.join(self.skipped)}" if self.skipped else "")

    def to_dict(self) -> dict:
        return {"precision": self.precision, "channels_last": self.channels_last, "compile": self.compile,
                "applied": list(self.applied), "skipped": list(self.skipped)}


# CPU, no convolutions: compile when the run is at least this long. Measured on the char GPT (4x4x128, batch 12 x
# 64, 2 threads, tcmalloc, medians of 100-step blocks): bf16 eager 22.5 ms/step, compiled 21.4 (31 and 28.5
# while the shared host is busy); a cold compile takes 22 s (a warm one ~4 s), so it pays back after ~10,000
# steps. (An earlier 35 vs 25 ms compared a busy-host block with a quiet one.) Conv nets are left eager:
# inductor was slower than oneDNN there, 149 vs 131 ms per cnn_medium step.
CPU_COMPILE_MIN_STEPS = 10_000


def plan_perf(cfg: TrainerConfig, model: torch.nn.Module, device: torch.device, optimizer=None,
              fsdp: bool = False, planned_steps: int | None = None, context_parallel: int = 1) -> PerfPlan:
    """What the Trainer will use: the config's own settings, upgraded by the preset when `cfg.perf.enabled`."""
    plan = PerfPlan(cfg.precision, cfg.channels_last, cfg.compile)
    perf = cfg.perf
    impl = optimizer_impl(optimizer)
    if not perf.enabled:
        return plan
    # precision
    if cfg.precision != "fp32":
        plan.applied.append(f"{cfg.precision} (set in trainer.precision)")
    elif not perf.bf16:
        plan.skipped.append("bf16 (trainer.perf.bf16=false)")
    elif fsdp and device.type != "cuda":
        plan.skipped.append("bf16 (FSDP mixed precision is for CUDA)")
    else:
        ok, why = native_bf16(device.type)
        if ok:
            plan.precision = "bf16"
            plan.applied.append(f"bf16 autocast ({why})")
        elif device.type == "cuda":
            plan.precision = "fp16"
            plan.applied.append(f"fp16 autocast + loss scaling ({why})")
        else:
            plan.skipped.append(f"bf16 ({why})")
    # memory format
    if has_conv2d(model):
        if cfg.channels_last or perf.channels_last:
            plan.channels_last = True
            plan.applied.append("channels_last (2-D convolutions)")
        else:
            plan.skipped.append("channels_last (trainer.perf.channels_last=false)")
    # optimizer (built by the run; reported)
    if impl == "fused":
        plan.applied.append(f"fused {type(optimizer).__name__}")
    elif impl is not None:
        plan.skipped.append(f"fused optimizer ({impl} {type(optimizer).__name__}: optimizer.impl or an unsupported "
                            f"device/dtype)")
    # compile
    if cfg.compile:
        plan.applied.append("torch.compile (set in trainer.compile)")
    elif perf.compile == "never":
        plan.skipped.append("torch.compile (trainer.perf.compile=never)")
    elif device.type == "cpu" and not _cxx_compiler():
        plan.skipped.append("torch.compile (no C++ compiler for inductor's CPU kernels)")
    elif context_parallel > 1:
        plan.skipped.append("torch.compile (context parallelism: the ring kernel's collectives stay eager)")
    elif perf.compile == "always" or device.type == "cuda":
        plan.compile = True
        plan.applied.append("torch.compile" + (" (trainer.perf.compile=always)" if perf.compile == "always" else ""))
    elif device.type != "cpu":
        plan.skipped.append(f"torch.compile (not tried on {device.type}; trainer.perf.compile=always forces it)")
    elif has_conv2d(model):
        plan.skipped.append("torch.compile (CPU conv net: inductor measured slower than oneDNN's eager kernels; "
                            "trainer.perf.compile=always forces it)")
    elif planned_steps is None or planned_steps < CPU_COMPILE_MIN_STEPS:
        plan.skipped.append(f"torch.compile ({planned_steps or 'an unknown number of'} steps: under "
                            f"{CPU_COMPILE_MIN_STEPS} a ~20 s cold compile does not pay back on CPU; "
                            f"trainer.perf.compile=always forces it)")
    else:
        plan.compile = True
        plan.applied.append(f"torch.compile ({planned_steps} steps: fuses the elementwise ops and bf16 casts "
                            f"between matmuls)")
    if device.type == "cpu":
        _plan_allocator(plan)
    return plan


def _plan_allocator(plan: PerfPlan) -> None:
    lib = allocator.loaded()
    if lib:
        plan.applied.append(lib)
        return
    found = allocator.find()
    how = (f"start Python with LD_PRELOAD={found}" if found else
           f"{allocator.INSTALL_HINT}; the lamina command then preloads it")
    plan.skipped.append(f"tcmalloc (glibc malloc: ~6% slower CPU steps; {how})")


def _cxx_compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))
