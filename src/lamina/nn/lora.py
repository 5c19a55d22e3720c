"""LoRA (Hu et al. 2021): a low-rank update learned beside a frozen Linear, swapped in from outside.

    y = x W^T + b + dropout(x) A^T B^T * (alpha / rank)        A (r, in) kaiming-uniform, B (out, r) zeros

B = 0 at the start, so a freshly wrapped model computes exactly what the base model did. Models know nothing
of LoRA: `apply_lora(model, targets)` replaces the matching `nn.Linear`s by `LoRALinear` (torchtune's
component swap, no flags in core layers) and freezes everything else.

`LoRALinear` keeps the base's `weight` / `bias` Parameters as its own `weight` / `bias` (the very same tensors,
as torchtune does), so the base keys of a state dict do not move (`...q_proj.weight`) and the adapters add
`...q_proj.lora_A` / `...q_proj.lora_B`; a base checkpoint loads into a wrapped model unchanged.

merge() folds (alpha / rank) B A into weight for inference at zero cost; `merged` keeps forward from counting
the delta twice, and unmerge() subtracts it back (exact to float rounding). A Linear whose weight is shared
with another module (GPT's lm_head tied to wte) is refused by apply_lora: merging would silently change the
other user of the tensor too.

Why not peft: it targets HF models (PreTrainedModel / config plumbing); this is ~150 lines over plain
nn.Modules with the names lamina uses.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lamina.errors import CheckpointError, ConfigError

LORA_KEYS = ("lora_A", "lora_B")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable rank-`rank` update scaled by alpha / rank; any leading dims."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"lora: expected an nn.Linear to wrap, got {type(base).__name__}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigError(f"lora: rank must be a positive integer, got {rank!r}")
        if not alpha > 0:
            raise ConfigError(f"lora: alpha must be positive, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"lora: dropout must be in [0, 1), got {dropout!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.weight = base.weight  # the base's own Parameters: same keys, same storage, frozen
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))  # (out, r): starts as the base
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as peft / torchtune
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / rank) B A, shape (out, in), in the weight's dtype (computed in float32 at least)."""
        dt = torch.promote_types(self.weight.dtype, torch.float32)
        return (self.lora_B.to(dt) @ self.lora_A.to(dt) * self.scaling).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.merged:
            return y  # the update already lives in weight
        return y + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling  # (..., r) -> (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        """weight += (alpha / rank) B A; forward then skips the adapter branch. A second call is a no-op."""
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """weight -= (alpha / rank) B A, undoing merge(). A no-op when not merged."""
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def to_linear(self, merge: bool = True) -> nn.Linear:
        """A plain nn.Linear holding the (merged, if `merge`) weight; the adapters are dropped."""
        self.merge() if merge else self.unmerge()
        w = self.weight
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = w  # the same Parameter, no copy
        if self.bias is not None:
            lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, merged={self.merged}")


# ----- whole-model helpers ------------------------------------------------------------------------------
def _matches(name: str, targets: Iterable[str]) -> bool:
    """`name` ends with a target (dotted suffix) or matches it as a glob, whole or as a suffix."""
    for t in targets:
        if name == t or name.endswith("." + t) or fnmatch.fnmatchcase(name, t) or fnmatch.fnmatchcase(name, "*." + t):
            return True
    return False


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, targets: str | Iterable[str] = ("q_proj", "v_proj"), rank: int = 8,
               alpha: float = 16, dropout: float = 0.0) -> list[str]:
    """Swap LoRALinear in for every nn.Linear whose qualified name matches a target (a dotted suffix such as
    "q_proj" or "attn.v_proj", or a glob such as "blocks.*.mlp.fc"); freeze every other parameter.
    Returns the swapped names in model order. ConfigError when nothing matches."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ConfigError("lora: targets is empty; give module name suffixes such as ('q_proj', 'v_proj')")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)]
    names = [n for n in linears if _matches(n, targets)]
    if not names:
        already = [n for n in lora_modules(model) if _matches(n, targets)]
        if already:
            raise ConfigError(f"lora: {', '.join(already[:3])} already carry LoRA adapters; "
                              "call remove_lora first to re-apply")
        shown = ", ".join(linears[:6]) + (f", ... ({len(linears)} in all)" if len(linears) > 6 else "")
        raise ConfigError(f"lora: targets {list(targets)} matched no nn.Linear; "
                          f"Linear modules here: {shown or 'none'}")
    users: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None:
                users[id(p)] = users.get(id(p), 0) + 1
    for n in names:
        if users[id(model.get_submodule(n).weight)] > 1:
            raise ConfigError(f"lora: {n}.weight is shared with another module (tied weights); "
                              "merging would change both, so leave it out of targets")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        _set_submodule(model, n, LoRALinear(model.get_submodule(n), rank=rank, alpha=alpha, dropout=dropout))
    return names


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its weight (inference at the base model's cost)."""
    mods = lora_modules(model)
    for m in mods.values():
        m.merge()
    return list(mods)


def unmerge_lora(model: nn.Module) -> list[str]:
    """Undo merge_lora: subtract every adapter's delta from its weight."""
    mods = lora_modules(model)
    for m in mods.values():
        m.unmerge()
    return list(mods)


def remove_lora(model: nn.Module, merge: bool = True) -> list[str]:
    """Replace every LoRALinear by a plain nn.Linear, with the update merged in (`merge=True`) or dropped.
    The weights keep their requires_grad (frozen, after apply_lora)."""
    mods = lora_modules(model)
    for n, m in mods.items():
        _set_submodule(model, n, m.to_linear(merge=merge))
    return list(mods)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only ({"...q_proj.lora_A": (r, in), "...q_proj.lora_B": (out, r)}): a few KB to MB."""
    return {k: v for k, v in model.state_dict().items() if k.rpartition(".")[2] in LORA_KEYS}


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load adapters saved by lora_state_dict into a model wrapped with the same targets and rank; strict:
    every adapter of the model must be given and nothing else. Merged layers are unmerged, loaded, re-merged."""
    own = {k: v for k, v in model.state_dict(keep_vars=True).items() if k.rpartition(".")[2] in LORA_KEYS}
    if not own:
        raise CheckpointError("lora: the model has no LoRA adapters; call apply_lora with the same targets first")
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"lora: adapter names differ: missing {missing[:3]}{' ...' if len(missing) > 3 else ''}"
                              f", unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
    for k, v in state_dict.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"lora: {k}: expected shape {tuple(own[k].shape)}, got {tuple(v.shape)} "
                                  "(different rank?)")
    mods = lora_modules(model)
    was_merged = [n for n, m in mods.items() if m.merged]
    for n in was_merged:
        mods[n].unmerge()
    with torch.no_grad():
        for k, v in state_dict.items():
            own[k].copy_(v)
    for n in was_merged:
        mods[n].merge()


def trainable_fraction(model: nn.Module) -> float:
    """Trainable / all parameters (shared tensors counted once)."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(total, 1)
