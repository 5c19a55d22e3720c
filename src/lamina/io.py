"""Files, written so that a crash never leaves half of one: atomic writes, atomic folders, hashing, and
safetensors model state (tied weights stored once) loaded strictly.

A leaf module: it imports torch, safetensors, the standard library and lamina.errors, nothing else of lamina.

Atomic writes go to a temporary file beside the target (same folder, so `os.replace` is a rename on one file
system), are fsynced, then renamed over the target: a reader sees the old file or the new one, never a mix,
and a writer that raises leaves the old file untouched.

Folders (`write_folder`): everything goes to a fresh temp folder beside the target, files are fsynced, then
the old folder is renamed aside to `.NAME.old`, the temp folder renamed into place and the old one deleted. A
crash at any point leaves either the previous folder or the new one complete; a reader that finds no `NAME`
but a `.NAME.old` (a crash between the two renames) uses that (engine.checkpoint.resolve does).

State files (`save_state` / `load_state`): safetensors refuses tensors that share storage, so a tensor seen
under several names (tied weights: `lm_head.weight is wte.weight`) is stored once, under its first name, and
the other names are recorded in the file's metadata under `lamina.aliases` as JSON {alias: stored name};
`load_state` gives every alias back as the same tensor. Files written before aliases existed (each alias
stored as its own clone, no metadata) load unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch

from lamina.errors import CheckpointError

ALIASES_KEY = "lamina.aliases"


# ----- atomic files ------------------------------------------------------------------------------------------
def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Make the rename itself durable; not every platform can open a directory (Windows), which is fine.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, for writers that look at the extension); when the
    block ends without error the file is fsynced and renamed over `path`, otherwise it is removed and `path`
    is left as it was. Parent folders are created.

        with atomic_file(out / "model.onnx") as tmp:
            onnx.save(proto, str(tmp))
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.stem}.tmp-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file beside it, fsync, rename)."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (temp file beside it, fsync, rename)."""
    return atomic_write_bytes(path, text.encode(encoding))


# ----- atomic folders ----------------------------------------------------------------------------------------
def list_files(root: str | Path) -> list[str]:
    """Every file under `root`, as sorted POSIX-style paths relative to it."""
    root = Path(root)
    return sorted(f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file())


def make_temp_folder(target: str | Path) -> Path:
    """A fresh, empty folder beside `target` (same file system), for `publish_folder`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def old_folder(target: str | Path) -> Path:
    """Where `publish_folder` puts the previous `target` while it swaps the new one in."""
    target = Path(target)
    return target.parent / f".{target.name}.old"


def publish_folder(tmp: str | Path, target: str | Path) -> None:
    """Swap the complete folder `tmp` in as `target`: the old one is renamed aside to `.NAME.old`, `tmp` renamed
    into place, the old one deleted. Between the two renames only `.NAME.old` exists (see the module docstring)."""
    tmp, target = Path(tmp), Path(target)
    old = old_folder(target)
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


_publish = publish_folder  # the name engine.checkpoint used


def write_folder(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Atomically create folder `path`: `write(tmp)` fills a temp folder beside it, every file is fsynced, then
    the temp folder is renamed into place (see the module docstring); on failure nothing replaces `path`."""
    target = Path(path)
    tmp = make_temp_folder(target)
    try:
        write(tmp)
        for n in list_files(tmp):
            fsync_file(tmp / n)
        publish_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ----- hashing -----------------------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----- safetensors state -------------------------------------------------------------------------------------
def _state_dict(module_or_state) -> Mapping[str, torch.Tensor]:
    return module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state


def _view_key(v: torch.Tensor):
    # Two names are aliases when they are the same view of the same memory (tied weights); an empty tensor
    # has no memory to share.
    if not v.numel():
        return None
    return (v.device, v.dtype, v.data_ptr(), tuple(v.shape), v.stride())


def _split_aliases(module_or_state) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(unique tensors, {alias: stored name}): each group of names sharing one view is stored under its first
    name; everything else is copied to a contiguous CPU tensor of its own (safetensors refuses shared memory,
    also between a tensor and a different view of it)."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[object, str] = {}
    for k, v in _state_dict(module_or_state).items():
        key = _view_key(v)
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        out[k] = v.detach().cpu().contiguous().clone()
        if key is not None:
            seen[key] = k
    return out, aliases


def state_for_saving(module_or_state) -> dict[str, torch.Tensor]:
    """The tensors `save_state` stores: detached contiguous CPU copies, each shared tensor once (under its first
    name; its other names are `tied_aliases`)."""
    return _split_aliases(module_or_state)[0]


def tied_aliases(module_or_state) -> dict[str, str]:
    """{alias: stored name} for the names of a state dict that are the same tensor as an earlier name."""
    return _split_aliases(module_or_state)[1]


def state_payload(module_or_state, metadata: Mapping[str, str] | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) to hand to safetensors' save_file yourself (inside a folder that `write_folder`
    makes atomic): `state_for_saving`'s tensors and `metadata` plus the alias record `load_state` reads."""
    tensors, aliases = _split_aliases(module_or_state)
    meta = {"format": "pt", **(metadata or {})}
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    return tensors, meta


def save_state(path: str | Path, module_or_state, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a module's (or state dict's) tensors to a safetensors file, atomically; tied tensors once, with
    their aliases in the metadata (see the module docstring). `metadata` values must be strings."""
    from safetensors.torch import save_file

    tensors, meta = state_payload(module_or_state, metadata)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def read_state_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_state(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The state dict in a safetensors file, every alias recorded by `save_state` given back as the same tensor
    as its stored name (so a tied model loads tied). Files without alias metadata load as they are."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=device) as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    raw = meta.get(ALIASES_KEY)
    if raw is None:
        return state
    try:
        aliases = json.loads(raw)
        if not isinstance(aliases, dict):
            raise ValueError(type(aliases).__name__)
    except ValueError as e:
        raise CheckpointError(f"{path}: metadata {ALIASES_KEY} is not a JSON object of names ({e})") from None
    for alias, stored in aliases.items():
        if stored not in state:
            raise CheckpointError(f"{path}: tied tensor {alias!r} refers to {stored!r}, which the file lacks")
        state.setdefault(alias, state[stored])
    return state



def state_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in a safetensors file, read from its header only (no tensor is loaded), tied
    aliases recorded by `save_state` included. A file whose header cannot be read is one CheckpointError line."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(int(d) for d in f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - SafetensorError (bad header), OSError, ...: not a readable file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a readable safetensors file ({first})") from None
    raw = meta.get(ALIASES_KEY)
    if raw is not None:
        try:
            aliases = json.loads(raw)
            if not isinstance(aliases, dict):
                raise ValueError(type(aliases).__name__)
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{path}: metadata {ALIASES_KEY} is not a JSON object of names ({e})") from None
        for alias, stored in aliases.items():
            if stored in shapes:
                shapes.setdefault(alias, shapes[stored])
    return shapes

# ----- strict loading ----------------------------------------------------------------------------------------
LABELS = {
    "head": "does not match the model",
    "unexpected": "{n} unexpected",       # names in the state with no place in the model
    "missing": "{n} missing",             # model names the state lacks
    "shape": "{n} shape mismatch(es)",
    "shape_entry": "{key} {got} vs {name} {want}",  # {key}: state name, {name}: model name
    "shape_entry_same": "{key} {got} vs {want}",     # the same, when the name was not renamed
}


def _shape(v) -> tuple[int, ...]:
    return tuple(int(d) for d in (v.shape if hasattr(v, "shape") else v))


def _names(names: Iterable[str], limit: int) -> str:
    """'a, b, c (+7 more)': the first few names, sorted, and how many were left out."""
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _tied_in_model(sd: Mapping[str, torch.Tensor]) -> dict[str, set[str]]:
    groups: dict[object, list[str]] = {}
    for k, v in sd.items():
        key = _view_key(v) if isinstance(v, torch.Tensor) and v.device.type != "meta" else None
        if key is not None:
            groups.setdefault(key, []).append(k)
    return {k: set(g) - {k} for g in groups.values() if len(g) > 1 for k in g}


def check_state(expected, state: Mapping[str, object], source: str,
                rename: Mapping[str, str] | Callable[[str], str | None] | None = None, *,
                optional: Iterable[str] = (), labels: Mapping[str, str] | None = None,
                show_missing: Callable[[str], str] | None = None, limit: int = 5) -> dict[str, object]:
    """Check, before anything is copied, that `state` fits `expected` (a module, or a mapping name -> tensor or
    shape): every name present, none left over, every shape equal. Returns `state` renamed to the model's names.

    rename: state name -> model name, as a dict or a function (None: the name has no place in the model).
    optional: model names the state may lack (tensors tied to one that is loaded are optional by themselves).
    show_missing(model name): how a missing name is shown (e.g. with the checkpoint name it would come from).
    labels: overrides of LABELS, the words of the one-line CheckpointError:
        "{source} {head}: {n} unexpected: a, b; {n} missing: c; {n} shape mismatch(es): d (2,) vs (3,)".
    """
    words = {**LABELS, **(labels or {})}
    model_sd = _state_dict(expected)
    tied = _tied_in_model(model_sd)
    if rename is None:
        to_model: Callable[[str], str | None] = lambda k: k  # noqa: E731
    elif callable(rename):
        to_model = rename
    else:
        to_model = rename.get
    renamed: dict[str, object] = {}
    unexpected, bad, present = [], [], set()
    for key, value in state.items():
        name = to_model(key)
        if name is None or name not in model_sd:
            unexpected.append(key)
            continue
        present.add(name)
        got, want = _shape(value), _shape(model_sd[name])
        if got != want:
            tmpl = words["shape_entry_same"] if name == key else words["shape_entry"]
            bad.append(tmpl.format(key=key, name=name, got=got, want=want))
            continue
        renamed[name] = value
    allowed = set(optional)
    missing = [k for k in model_sd if k not in present and k not in allowed and not (tied.get(k, set()) & present)]
    if unexpected or missing or bad:
        parts = []
        if unexpected:
            parts.append(words["unexpected"].format(n=len(unexpected)) + ": " + _names(unexpected, limit))
        if missing:
            shown = [show_missing(k) for k in missing] if show_missing else missing
            parts.append(words["missing"].format(n=len(missing)) + ": " + _names(shown, limit))
        if bad:
            parts.append(words["shape"].format(n=len(bad)) + ": " + _names(bad, limit))
        head = f"{source} {words['head']}".rstrip() if words["head"] else source
        raise CheckpointError(f"{head}: " + "; ".join(parts))
    return renamed


def load_state_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                      rename: Mapping[str, str] | Callable[[str], str | None] | None = None,
                      **check) -> dict[str, torch.Tensor]:
    """Load a (possibly renamed) state dict into `model` strictly: `check_state` first (every tensor's presence
    and shape, CheckpointError naming `source` and the first few missing / unexpected / mismatched names with
    their counts), then copy, so a failed load leaves the model untouched. Values are cast to the model's dtype;
    a tensor tied to a loaded one need not be in `state`. Returns the renamed state that was loaded."""
    renamed = check_state(model, state, source, rename, **check)
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not unexpected, unexpected  # checked above
    if missing:  # only optional or tied names may be absent; a tied one shares the loaded memory already
        left = set(missing) - set(check.get("optional", ()))
        tied = _tied_in_model(model.state_dict())
        left = {k for k in left if not (tied.get(k, set()) & renamed.keys())}
        assert not left, sorted(left)
    return renamed


__all__ = [
    "ALIASES_KEY", "LABELS", "atomic_file", "atomic_write_bytes", "atomic_write_text", "check_state",
    "fsync_file", "list_files", "load_state", "load_state_strict", "make_temp_folder", "old_folder",
    "publish_folder", "read_state_metadata", "save_state", "sha256_file", "state_for_saving", "state_payload", "state_shapes",
    "tied_aliases", "write_folder",
]
