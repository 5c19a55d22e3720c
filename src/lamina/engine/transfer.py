"""Fine-tuning helpers: layer-wise LR decay, freezing by name, linear probing, gradual unfreezing.

Library functions over the model contract, no Trainer changes. lamina models keep their repeated blocks in
`model.blocks` (a ModuleList, or EfficientNet's Sequential of stages); everything registered on the model
before `blocks` (token/patch/position embeddings, stem; the model's own Parameters such as cls_token and
pos_embed) is the bottom layer group, everything after (final norm, pooler, head) the top one:

    layer_groups(model) -> [bottom, blocks[0], ..., blocks[L-1], top]      (L + 2 groups of parameter names)

Layer-wise LR decay (ELECTRA / BEiT, timm's `param_groups_layer_decay`): group i of L + 2 gets
lr * decay ** (L + 1 - i): the top (head) the full lr, blocks[L-1] lr * decay, ..., the embeddings
lr * decay ** (L + 1). A head tied to the embedding (GPT's lm_head = wte) is one tensor: it sits with wte.

Gradual unfreezing (ULMFiT): the optimizer should hold every parameter from the start (build it with
`param_groups_layerwise_lr_decay(..., include_frozen=True)` or over `model.parameters()`): a frozen parameter
has no .grad, and torch's optimizers skip parameters without a gradient (no step, no weight decay, no state),
so unfreezing is only flipping requires_grad. As a fallback, GradualUnfreezing adds any newly trainable
parameter the optimizer lacks as a new param group (with the lr of the optimizer's first group); a
LambdaLR-style scheduler built earlier does not schedule such a late group, hence the recommendation.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable

import torch
import torch.nn as nn

from lamina.engine.callbacks import Callback
from lamina.errors import ConfigError, ModelError


# ----- layer groups -----------------------------------------------------------------------------------
def layer_groups(model: nn.Module, blocks_attr: str = "blocks") -> list[list[str]]:
    """[bottom, block 0, ..., block L-1, top] lists of parameter names (shared tensors named once)."""
    blocks = getattr(model, blocks_attr, None)
    if not isinstance(blocks, nn.Module) or len(list(blocks.children())) == 0:
        raise ConfigError(f"transfer: {type(model).__name__} has no '{blocks_attr}' sequence of blocks; "
                          "layer groups need a ModuleList/Sequential of blocks (pass blocks_attr=...)")
    block_names = [n for n, _ in blocks.named_children()]
    children = list(model._modules)  # registration order
    pos = children.index(blocks_attr)
    before = set(children[:pos])
    groups: list[list[str]] = [[] for _ in range(len(block_names) + 2)]
    index = {b: i + 1 for i, b in enumerate(block_names)}
    for name, _ in model.named_parameters():
        head, _, rest = name.partition(".")
        if not rest or head in before:  # the model's own Parameters (cls_token, pos_embed) sit with the embeddings
            groups[0].append(name)
        elif head == blocks_attr:
            groups[index[rest.partition(".")[0]]].append(name)
        else:
            groups[-1].append(name)
    return groups


def param_groups_layerwise_lr_decay(model: nn.Module, lr: float, decay: float, weight_decay: float = 0.0,
                                    include_frozen: bool = False, blocks_attr: str = "blocks") -> list[dict]:
    """Optimizer param groups with lr * decay ** (L + 1 - layer) per layer group (see the module docstring);
    within each layer, matrices get `weight_decay` and vectors (biases, norms) none, as engine.optim does.
    Frozen parameters are left out unless `include_frozen` (for gradual unfreezing). Each group also carries
    "layer_id", "lr_scale" and "names" (optimizers keep extra keys)."""
    if not 0.0 < decay <= 1.0:
        raise ConfigError(f"transfer: decay must be in (0, 1], got {decay}")
    if not lr > 0:
        raise ConfigError(f"transfer: lr must be positive, got {lr}")
    params = dict(model.named_parameters())
    groups = layer_groups(model, blocks_attr)
    top = len(groups) - 1
    out = []
    for layer, names in enumerate(groups):
        scale = decay ** (top - layer)
        for wd, pick in ((weight_decay, lambda p: p.ndim > 1), (0.0, lambda p: p.ndim <= 1)):
            chosen = [n for n in names if pick(params[n]) and (include_frozen or params[n].requires_grad)]
            if chosen:
                out.append({"params": [params[n] for n in chosen], "lr": lr * scale, "weight_decay": wd,
                            "layer_id": layer, "lr_scale": scale, "names": chosen})
    return out


# ----- freezing -------------------------------------------------------------------------------------------
def _match(name: str, pattern: str) -> bool:
    """Glob on the full name, or a module prefix ("blocks.0" matches "blocks.0.attn.q_proj.weight")."""
    return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern.rstrip(".") + ".")


def _set_requires_grad(model: nn.Module, patterns: str | Iterable[str], flag: bool) -> list[str]:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    names = [n for n, _ in model.named_parameters()]
    hit = []
    for pat in patterns:
        found = [n for n in names if _match(n, pat)]
        if not found:
            raise ConfigError(f"transfer: pattern '{pat}' matches no parameter; names look like "
                              f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}")
        hit += [n for n in found if n not in hit]
    params = dict(model.named_parameters())
    for n in hit:
        params[n].requires_grad_(flag)
    return hit


def freeze(model: nn.Module, patterns: str | Iterable[str]) -> list[str]:
    """requires_grad=False for every parameter matching a pattern (glob or module prefix); returns the names."""
    return _set_requires_grad(model, patterns, False)


def unfreeze(model: nn.Module, patterns: str | Iterable[str]) -> list[str]:
    """requires_grad=True for every parameter matching a pattern (glob or module prefix); returns the names."""
    return _set_requires_grad(model, patterns, True)


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the classifier head's parameters, found through the contract rather than by guessing names:
    reset_classifier is called on a shape-only (meta) copy and the parameters it replaces are the head. A head
    tied to another tensor (GPT's lm_head = wte) is reported under its head name."""
    if not hasattr(model, "reset_classifier") or not hasattr(model, "forward_head"):
        raise ModelError(f"transfer: {type(model).__name__} lacks the classifier contract "
                         "(forward_head, reset_classifier)")
    num_classes = getattr(model, "num_classes", None)
    if not num_classes:
        raise ModelError(f"transfer: {type(model).__name__} has no classifier head (num_classes={num_classes})")
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):  # copy shapes, not storage
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    shadow = copy.deepcopy(model, memo)
    old = {id(p) for p in shadow.parameters()}
    try:
        with torch.device("meta"):
            shadow.reset_classifier(num_classes)
    except Exception:  # noqa: BLE001  an init that meta tensors cannot run: build the fresh head for real (only the head)
        shadow.reset_classifier(num_classes)
    new = {n for n, p in shadow.named_parameters(remove_duplicate=False) if id(p) not in old}
    names = [n for n, _ in model.named_parameters(remove_duplicate=False) if n in new]
    if not names:
        raise ModelError(f"transfer: could not find the head of {type(model).__name__}: reset_classifier "
                         "replaced no parameter")
    return names


def linear_probe(model: nn.Module) -> list[str]:
    """Freeze everything but the classifier head; returns the trainable names. A tied head (GPT) stays tied:
    the embedding it shares trains with it."""
    names = head_parameter_names(model)
    for p in model.parameters():
        p.requires_grad_(False)
    params = dict(model.named_parameters(remove_duplicate=False))
    for n in names:
        params[n].requires_grad_(True)
    return names


# ----- gradual unfreezing ----------------------------------------------------------------------------------
class GradualUnfreezing(Callback):
    """ULMFiT's gradual unfreezing: at fit start only the top group (final norm + head) trains; after every
    `every_n_epochs` epochs one more layer group from the top becomes trainable (blocks[L-1], ..., blocks[0],
    then the embeddings). See the module docstring for how the optimizer is kept in step.
    `unfrozen` (saved in checkpoints) counts the trainable groups, so a resumed run picks up where it was."""

    def __init__(self, every_n_epochs: int = 1, blocks_attr: str = "blocks", lr: float | None = None):
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ConfigError(f"transfer: every_n_epochs must be a positive integer, got {every_n_epochs!r}")
        self.every_n_epochs, self.blocks_attr, self.lr = every_n_epochs, blocks_attr, lr
        self.unfrozen = 1
        self.history: list[tuple[int, list[str]]] = []  # (epoch, names made trainable)

    def _model(self, trainer) -> nn.Module:
        return trainer.model

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Make the top `self.unfrozen` groups trainable and the rest frozen; add missing params to optimizer."""
        groups = layer_groups(model, self.blocks_attr)
        params = dict(model.named_parameters())
        n = min(self.unfrozen, len(groups))
        live = {name for g in groups[len(groups) - n:] for name in g}
        for name, p in params.items():
            p.requires_grad_(name in live)
        if optimizer is not None:
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            missing = [params[nm] for nm in params if nm in live and id(params[nm]) not in held]
            if missing:
                lr = self.lr if self.lr is not None else optimizer.param_groups[0]["lr"]
                optimizer.add_param_group({"params": missing, "lr": lr})

    def on_fit_start(self, trainer) -> None:
        self.apply(self._model(trainer), trainer.optimizer)

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        model = self._model(trainer)
        total = len(layer_groups(model, self.blocks_attr))
        if trainer.epoch % self.every_n_epochs == 0 and self.unfrozen < total:
            before = {n for n, p in model.named_parameters() if p.requires_grad}
            self.unfrozen += 1
            self.apply(model, trainer.optimizer)
            now = [n for n, p in model.named_parameters() if p.requires_grad and n not in before]
            self.history.append((trainer.epoch, now))

    def state_dict(self) -> dict:
        return {"unfrozen": self.unfrozen}

    def load_state_dict(self, state: dict) -> None:
        self.unfrozen = int(state.get("unfrozen", 1))
