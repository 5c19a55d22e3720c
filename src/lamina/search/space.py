"""Search spaces over any dotted config key, read from YAML and checked before a single trial runs.

    optimizer.lr:           {type: log, low: 1.0e-4, high: 1.0e-2}      # float, log-uniform
    optimizer.weight_decay: {type: uniform, low: 0.0, high: 0.1}        # float, uniform
    trainer.max_epochs:     {type: int, low: 3, high: 8}                # int (step: 2, log: true allowed)
    model.channels:         {type: categorical, choices: [[32, 64], [48, 96]]}

A space is a mapping of key -> spec. Every key must be one a config accepts: fixed sections are validated by
the config schema itself ("did you mean"), `model.*` options by building the model on the meta device (no
memory, no init), `data.*` options against the data set loader's parameters. Each bound of a range and each
categorical choice is checked, so a trial can never be the first to find a bad value. Ranges must be
non-empty and ordered, log ranges positive, categoricals need two or more choices.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamina.config import RunConfig, apply_overrides, read_yaml, to_dict, validate
from lamina.config.schema import MODEL_SOURCE_KEYS
from lamina.errors import ConfigError, LaminaError, did_you_mean

KINDS = ("log", "uniform", "int", "categorical")
MAX_PARAMS = 64  # a space is a user's hand-written list: more keys than this is a mistake, not a search


@dataclass(frozen=True)
class Param:
    key: str  # dotted config key, e.g. "optimizer.lr"
    kind: str  # log | uniform | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False  # int ranges only (log/uniform floats say it in their kind)
    choices: tuple | None = None

    def suggest(self, trial) -> Any:
        """The value an Optuna trial draws for this parameter (the trial records it under `key`)."""
        if self.kind == "categorical":
            # Optuna stores categoricals as None/bool/int/float/str: lists travel as their index
            if all(c is None or isinstance(c, (bool, int, float, str)) for c in self.choices):
                return trial.suggest_categorical(self.key, list(self.choices))
            i = trial.suggest_categorical(self.key, list(range(len(self.choices))))
            return self.choices[i]
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.kind == "log",
                                   step=self.step)

    def value_of(self, stored: Any) -> Any:
        """A stored Optuna value back to the config value (categorical lists travel as indices)."""
        if self.kind == "categorical" and not all(c is None or isinstance(c, (bool, int, float, str))
                                                  for c in self.choices):
            return self.choices[int(stored)]
        return stored

    def bounds(self) -> list:
        """The values that must all be valid config values: both ends of a range, every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


def _num(v, key: str, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"search space: {key}: {what} must be a finite number, got {v!r}")
    return v


def parse_param(key: str, spec: Any) -> Param:
    if not isinstance(spec, dict):
        raise ConfigError(f"search space: {key}: expected a mapping like {{type: log, low: 1e-4, high: 1e-2}} or "
                          f"{{type: categorical, choices: [a, b]}}, got {type(spec).__name__}")
    kind = spec.get("type")
    if kind not in KINDS:
        raise ConfigError(f"search space: {key}: type must be one of {', '.join(KINDS)}, got {kind!r}"
                          f"{did_you_mean(kind, KINDS) if isinstance(kind, str) else ''}")
    allowed = {"categorical": {"type", "choices"}, "int": {"type", "low", "high", "step", "log"}}.get(
        kind, {"type", "low", "high", "step"})
    extra = sorted(set(spec) - allowed)
    if extra:
        raise ConfigError(f"search space: {key}: unknown field {extra[0]!r} for type {kind} "
                          f"(accepted: {', '.join(sorted(allowed))})")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            n = len(choices) if isinstance(choices, list) else "no"
            raise ConfigError(f"search space: {key}: a categorical needs a list of at least 2 choices, got {n} "
                              f"(a single value is not a search: set it in the config)")
        if len({repr(c) for c in choices}) != len(choices):
            raise ConfigError(f"search space: {key}: choices repeat a value: {choices}")
        return Param(key, kind, choices=tuple(_freeze(c) for c in choices))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"search space: {key}: a {kind} range needs low and high")
    low, high = _num(spec["low"], key, "low"), _num(spec["high"], key, "high")
    step = spec.get("step")
    if step is not None and _num(step, key, "step") <= 0:
        raise ConfigError(f"search space: {key}: step must be positive, got {step}")
    if not low < high:
        what = "empty" if low == high else "inverted"
        raise ConfigError(f"search space: {key}: {what} range low={low} high={high}; expected low < high")
    log = bool(spec.get("log", False))
    if kind == "int":
        if any(isinstance(v, float) and not float(v).is_integer() for v in (low, high, step or 1)):
            raise ConfigError(f"search space: {key}: an int range needs integer low/high/step, got "
                              f"low={low} high={high} step={step}")
        low, high = int(low), int(high)
        if step is not None and log:
            raise ConfigError(f"search space: {key}: an int range takes step or log, not both")
    if (kind == "log" or log) and low <= 0:
        raise ConfigError(f"search space: {key}: a log range needs low > 0, got {low}")
    if kind == "log" and step is not None:
        raise ConfigError(f"search space: {key}: a log range takes no step")
    return Param(key, kind, low, high, step, log)


def _freeze(v):
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def _thaw(v):
    return [_thaw(x) for x in v] if isinstance(v, tuple) else v


def overrides_for(values: dict[str, Any]) -> dict:
    """{dotted key: value} -> a nested mapping apply_overrides-compatible dict."""
    out: dict = {}
    for key, v in values.items():
        d = out
        *head, last = key.split(".")
        for h in head:
            d = d.setdefault(h, {})
        d[last] = _thaw(v)
    return out


_INDEX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])+)$")


def split_key(key: str) -> list:
    """'model.stages[1][0]' -> ['model', 'stages', 1, 0]: dotted names, then list indices (one stage's width,
    one block's expansion ratio) for options whose value is a list."""
    parts: list = []
    for piece in key.split("."):
        m = _INDEX.match(piece)
        if m:
            parts.append(m.group(1))
            parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
        elif "[" in piece or "]" in piece or not piece:
            raise ConfigError(f"search space: {key}: expected dotted names with optional [index] suffixes, "
                              f"e.g. model.channels[0]")
        else:
            parts.append(piece)
    return parts


def _model_default(raw: dict, name: str):
    """The resolved default of a model option (e.g. cnn_medium's channels), for indexing into it."""
    import torch

    from lamina.models import create_model

    model = raw.get("model", {})
    opts = {k: v for k, v in model.items() if k not in MODEL_SOURCE_KEYS}
    try:
        with torch.device("meta"):
            resolved = create_model(model.get("name", "small_cnn"), **opts).lamina_spec.get("resolved") or {}
    except LaminaError:
        raise
    except Exception as e:  # noqa: BLE001 - a factory's own check, reported as one line
        raise ConfigError(f"model {model.get('name')} rejects its options ({e})") from None
    if name not in resolved:
        raise ConfigError(f"'{name}' is not an option of model {model.get('name')}"
                          f"{did_you_mean(name, resolved)}")
    return _listify(resolved[name])


def _listify(v):
    return [_listify(x) for x in v] if isinstance(v, (list, tuple)) else v


def apply_values(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """A copy of `cfg` with the dotted keys set; the result is validated like any config."""
    raw = to_dict(cfg)
    for key, v in values.items():
        parts = split_key(key)
        d = raw
        for i, h in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(h, int):
                if not isinstance(d, list) or h >= len(d):
                    raise ConfigError(f"{key}: index {h} is out of range (the value has {len(d)} entries)")
                d = d[h]
                continue
            if isinstance(nxt, int) and h not in d:  # a list option left at its default: start from it
                d[h] = _model_default(raw, h) if d is raw.get("model") else None
            if isinstance(nxt, int):
                if not isinstance(d.get(h), list):
                    raise ConfigError(f"{key}: {h} is not a list option, so it takes no [index]")
                d[h] = _listify(d[h])
            elif not isinstance(d.get(h), dict):
                d[h] = {}
            d = d[h]
        last = parts[-1]
        if isinstance(last, int):
            if not isinstance(d, list) or last >= len(d):
                raise ConfigError(f"{key}: index {last} is out of range (the value has {len(d)} entries)")
        d[last] = _thaw(v)
    return validate(raw)


class SearchSpace:
    def __init__(self, params: list[Param]):
        self.params = params

    def __len__(self) -> int:
        return len(self.params)

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def suggest(self, trial) -> dict[str, Any]:
        return {p.key: p.suggest(trial) for p in self.params}

    def values_of(self, stored: dict[str, Any]) -> dict[str, Any]:
        by_key = {p.key: p for p in self.params}
        return {k: by_key[k].value_of(v) if k in by_key else v for k, v in stored.items()}

    @classmethod
    def from_dict(cls, raw: Any, where: str = "search space") -> "SearchSpace":
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(f"{where}: expected a mapping of dotted config keys to ranges, e.g. "
                              f"'optimizer.lr: {{type: log, low: 1.0e-4, high: 1.0e-2}}'")
        flat = _flatten_keys(raw)
        if len(flat) > MAX_PARAMS:
            raise ConfigError(f"{where}: {len(flat)} parameters; at most {MAX_PARAMS} are accepted")
        return cls([parse_param(k, v) for k, v in flat.items()])

    @classmethod
    def load(cls, path: str | Path) -> "SearchSpace":
        return cls.from_dict(read_yaml(path), where=f"search space {Path(path).name}")

    def check(self, cfg: RunConfig) -> None:
        """Every key names a config value and every bound/choice is a valid value: one line otherwise."""
        fixed = {p.key: p.bounds()[0] for p in self.params}
        for p in self.params:
            for v in p.bounds():
                try:
                    c = apply_values(cfg, {**fixed, p.key: v})
                    _check_free_option(c, p.key)
                except LaminaError as e:
                    msg = str(e).split(": ", 1)[-1]
                    raise ConfigError(f"search space: {p.key} = {_thaw(v)!r}: {msg}") from None


def _flatten_keys(raw: dict, prefix: str = "") -> dict:
    """Accept both `optimizer.lr: {...}` and nested `optimizer: {lr: {...}}`; a spec is a dict with `type`."""
    out = {}
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and "type" not in v and v and all(isinstance(x, dict) for x in v.values()):
            out.update(_flatten_keys(v, key + "."))
        else:
            out[key] = v
    return out


def _check_free_option(cfg: RunConfig, key: str) -> None:
    """`model.*` and `data.*` are free options (validated by the factory/loader at run time): check them now."""
    parts = split_key(key)
    section, name = parts[0], parts[1] if len(parts) > 1 else ""
    if section == "model" and name not in MODEL_SOURCE_KEYS:
        if cfg.model.pretrained:
            return  # the pretrained source decides the architecture; its options are checked when it loads
        import torch

        from lamina.models import create_model

        try:
            with torch.device("meta"):
                create_model(cfg.model.name, **cfg.model.options)
        except (TypeError, ValueError, AssertionError, RuntimeError) as e:
            if isinstance(e, LaminaError):
                raise
            raise ConfigError(f"model {cfg.model.name} rejects it ({e})") from None
    elif section == "data" and name not in type(cfg.data).model_fields:
        from lamina.data import get_dataset_entry

        fn = get_dataset_entry(cfg.data.name).fn
        params = inspect.signature(fn).parameters
        if name not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise ConfigError(f"not an option of data set '{cfg.data.name}'"
                              f"{did_you_mean(name, [n for n in params if n != 'seed'])}")


def load_space(path: str | Path, cfg: RunConfig) -> SearchSpace:
    space = SearchSpace.load(path)
    space.check(cfg)
    return space


__all__ = ["Param", "SearchSpace", "load_space", "parse_param", "apply_values", "overrides_for", "apply_overrides"]
