"""Precision and device policy, applied from outside the model (torchtitan style).

fp32: no context. bf16: autocast on CPU or GPU (bf16 has fp32's range, so no loss scaling).
fp16: CUDA only, autocast + GradScaler (fp16's narrow range underflows small gradients without it).
"""

from __future__ import annotations

import contextlib

import torch

from lamina.errors import ConfigError


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device: 'cuda' requested but no CUDA GPU is available; use auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("trainer.device: 'mps' requested but MPS is not available; use auto or cpu")
    return torch.device(name)


class Precision:
    def __init__(self, precision: str, device: torch.device, autocast: bool = True):
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError(f"trainer.precision: fp16 needs a CUDA device (got {device.type}); use bf16 or fp32")
        self.precision, self.device = precision, device
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self._dtype = dtype if autocast else None  # autocast=False: FSDP's MixedPrecisionPolicy casts instead
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def autocast(self):
        if self._dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
