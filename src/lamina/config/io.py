"""Load / validate / override / dump run configs, turning every validation problem into one line."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lamina.config.schema import MOVED, RunConfig
from lamina.errors import ConfigError, did_you_mean


def _fields_at(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at `loc` (for did-you-mean on unknown keys)."""
    cls = model_cls
    for part in loc:
        f = cls.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(f, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return list(cls.model_fields)
        cls = ann
    return list(cls.model_fields)


def _is_int_field(root: type[BaseModel], loc: tuple) -> bool:
    cls = root
    for part in loc[:-1]:
        ann = cls.model_fields[part].annotation if part in cls.model_fields else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return False
        cls = ann
    f = cls.model_fields.get(loc[-1])
    return f is not None and "int" in str(f.annotation).lower() and "float" not in str(f.annotation).lower()


def _describe(err: dict, root: type[BaseModel]) -> str:
    loc = tuple(p for p in err["loc"])
    path = ".".join(str(p) for p in loc)
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "extra_forbidden":
        parent, key = loc[:-1], str(loc[-1])
        valid = _fields_at(root, parent)
        return f"{path}: unknown key{did_you_mean(key, valid)}; valid keys: {', '.join(valid)}"
    if kind == "missing":
        return f"{path}: required"
    if kind == "literal_error":
        return f"{path}: expected one of {ctx.get('expected')}, got {got!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        if kind == "greater_than" and bound == 0:
            what = "integer" if _is_int_field(root, loc) else "number"
            return f"{path}: expected a positive {what}, got {got!r}"
        what = "an integer" if _is_int_field(root, loc) else "a number"
        return f"{path}: expected {what} {op} {bound}, got {got!r}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"{path}: expected an integer, got {got!r}"
    if kind in ("float_parsing", "float_type"):
        return f"{path}: expected a number, got {got!r}"
    if kind in ("bool_parsing", "bool_type"):
        return f"{path}: expected true or false, got {got!r}"
    if kind == "value_error" and ctx.get("error") is not None:  # a validator's own message, as written
        return f"{path}: {ctx['error']}"
    if kind in ("model_type", "dict_type"):
        return f"{path or 'config'}: expected a mapping of keys to values, got {got!r}"
    return f"{path}: {err['msg'].lower()}, got {got!r}"


class ConfigDeprecationWarning(FutureWarning):
    """A config key that still works but has moved; the CLI prints it as one `deprecated:` line."""


def _move_sections(raw: dict) -> dict:
    """Old keys (trainer.adversarial, trainer.distill) to their sections of today. A run folder written before
    the move stores them with default values: those move silently; a non-default one warns once."""
    out = dict(raw)
    for (parent, key), new in MOVED.items():
        section = out.get(parent)
        if not isinstance(section, dict) or key not in section:
            continue
        section = dict(section)
        value = section.pop(key)
        out[parent] = section
        default = getattr(RunConfig(), new).model_dump(mode="json")
        changed = isinstance(value, dict) and any(value.get(k, default.get(k)) != default.get(k) for k in value)
        if new in out:  # both: the old one may only be a stored default (a run folder's config)
            if changed:
                raise ConfigError(f"{parent}.{key}: moved to {new}; give only {new} (both are set)")
            continue
        out[new] = value
        if changed:
            warnings.warn(f"{parent}.{key} is deprecated; use the top-level section {new} "
                          f"(e.g. {new}.{next(iter(value))}=...)", ConfigDeprecationWarning, stacklevel=3)
    return out


def validate(raw: dict) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping of sections (data, model, trainer, ...), got {type(raw).__name__}")
    raw = _move_sections(raw)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e.errors()[0], RunConfig)) from None


def validate_section(cls: type[BaseModel], data: dict, prefix: str) -> BaseModel:
    """Validate one section (e.g. Trainer(**kwargs) from Python) with the same one-line messages."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = dict(e.errors()[0])
        err["loc"] = (prefix, *err["loc"])
        from lamina.config.schema import RunConfig as _Root

        raise ConfigError(_describe(err, _Root)) from None


MAX_CONFIG_BYTES = 1 << 20  # a run config is a few KB; a bigger file is not a config
MAX_CONFIG_DEPTH = 64  # sections nest a few levels; pyyaml's composer recurses once per level


class _Refused(yaml.YAMLError):
    def __init__(self, what: str, mark):
        super().__init__(what)
        self.problem, self.problem_mark = what, mark


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases (`&a` / `*a` / `<<: *a`) and deep nesting while composing,
    before any object is built: a few hundred bytes of nested aliases otherwise expand to gigabytes."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused("YAML anchors and aliases (&name, *name) are not accepted in a config; "
                           "write the values out", event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise _Refused(f"nested deeper than {MAX_CONFIG_DEPTH} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _load_yaml_text(text: str):
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a dict; one-line ConfigError naming the file for anything that is not a mapping
    of sections (missing, too big, not UTF-8, not YAML, anchors/aliases, empty, a list or a scalar)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({e.strerror or type(e).__name__})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: config file larger than {MAX_CONFIG_BYTES // (1 << 20)} MiB; "
                          "a run config is a YAML mapping of a few KB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a UTF-8 text file (byte {e.start})") from None
    try:
        raw = _load_yaml_text(text)
    except _Refused as e:
        raise ConfigError(f"{p} line {e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a config") from None
    if raw is None:
        raise ConfigError(f"{p}: empty config file; expected a mapping of sections (data, model, trainer, ...), "
                          "e.g. `trainer: {max_epochs: 3}`")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of sections (data, model, trainer, ...), got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` (value parsed as YAML: 3, 1e-3, true, [1,2], null) into a nested dict."""
    out = _deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. trainer.max_epochs=3")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".")]
        if not all(parts):
            raise ConfigError(f"override '{item}': empty key part; expected dotted keys like trainer.max_epochs")
        val = parse_value(value)
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': {'.'.join(parts[:i + 1])} is a value, not a section")
            node = nxt
        node[parts[-1]] = val
    return out


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


def parse_value(text: str) -> Any:
    """YAML scalar/list parsing, plus numbers YAML 1.1 leaves as strings (1e-3)."""
    try:
        val = _load_yaml_text(text) if text.strip() else ""
    except (yaml.YAMLError, RecursionError):
        return text
    if isinstance(val, str) and _NUMBER.fullmatch(val.strip()):
        return float(val)
    return val


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw = read_yaml(path) if path is not None else {}
    return validate(apply_overrides(raw, overrides or []))


def to_dict(cfg: RunConfig) -> dict:
    return cfg.model_dump(mode="json")


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
