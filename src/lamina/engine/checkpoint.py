"""Checkpoints: a folder per checkpoint, written atomically.

    <ckpt>/model.safetensors   weights (safe to load anywhere, no pickle; tied weights once, lamina.io.save_state)
    <ckpt>/state.pt            optimizer / scheduler / RNG / loop position, read with weights_only=True
    <ckpt>/meta.json           epoch, step, metrics, model name+options, sha256 of both files

Write protocol (lamina.io.write_folder): everything goes to a fresh temp folder beside the target, files are
fsynced, then the old folder is renamed aside, the temp folder renamed into place and the old one deleted. A crash at any point
leaves either the previous checkpoint or the new one complete; `resolve` falls back to the renamed-aside
copy if the crash hit between the two renames. The sha256 in meta.json catches truncated or edited files.

Sharded checkpoints (FSDP, `trainer.strategy=fsdp`) keep the same folder contract, with the weights and the
optimizer state as a `torch.distributed.checkpoint` (DCP) folder instead of model.safetensors:

    <ckpt>/shards/             DCP: one .distcp file per rank + .metadata; {"model": ..., "optim": ...}
    <ckpt>/state.pt            the rest of the trainer state (loop position, RNG of every rank, ...)
    <ckpt>/meta.json           "sharded": true, sha256 of every file

Every rank writes its own shards into the temp folder (DCP), then rank 0 writes state.pt and meta.json and
does the renames, so the atomicity argument above holds unchanged. DCP stores each tensor with its global
shape, so a checkpoint written by N ranks loads on M ranks, or into a plain unsharded model (`lamina eval`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from lamina.errors import CheckpointError
from lamina.io import (fsync_file, list_files, load_state, load_state_strict, make_temp_folder,
                       publish_folder, sha256_file, state_for_saving, state_payload, tied_aliases, write_folder)

FORMAT = "lamina-checkpoint-1"


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every state-dict name as its own contiguous CPU tensor, tied ones as clones: the layout checkpoints had
    before lamina.io.save_state stored tied tensors once. Kept for callers that hand the dict to safetensors'
    save_file and load it back with a plain load_file; new code uses lamina.io.save_state / load_state."""
    out = state_for_saving(model)
    for alias, stored in tied_aliases(model).items():
        out[alias] = out[stored].clone()
    return {k: out[k] for k in model.state_dict()}


def save_checkpoint(path: str | Path, model: torch.nn.Module, state: dict, meta: dict) -> Path:
    def write(tmp: Path) -> None:
        tensors, metadata = state_payload(model)  # tied tensors once, their other names in the metadata
        save_file(tensors, str(tmp / "model.safetensors"), metadata=metadata)
        torch.save(state, tmp / "state.pt")
        full = {**meta, "format": FORMAT, "sha256": {n: sha256_file(tmp / n) for n in ("model.safetensors", "state.pt")}}
        (tmp / "meta.json").write_text(json.dumps(full, indent=2, default=str))

    return write_folder(path, write)


def save_sharded_checkpoint(path: str | Path, model: torch.nn.Module, optimizer, state: dict, meta: dict,
                            dist_env) -> Path:
    """Collective: every rank calls it. Weights + optimizer through DCP, the rest by rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    target = Path(path)
    tmp = None
    if dist_env.is_main:
        tmp = str(make_temp_folder(target))
    tmp = Path(dist_env.broadcast_object(tmp))
    try:
        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "shards"))
        dist_env.barrier()  # every shard is on disk before rank 0 seals the folder
        if dist_env.is_main:
            torch.save(state, tmp / "state.pt")
            files = list_files(tmp)
            meta = {**meta, "format": FORMAT, "sharded": True, "world_size": dist_env.world_size,
                    "sha256": {n: sha256_file(tmp / n) for n in files}}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
            for n in [*files, "meta.json"]:
                fsync_file(tmp / n)
            publish_folder(tmp, target)
    except BaseException:
        if dist_env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist_env.barrier()
    return target


def _check_hashes(p: Path, meta: dict, names) -> None:
    for n in names:
        f = p / n
        if not f.is_file():
            raise CheckpointError(f"{f} is missing; the checkpoint is incomplete")
        if sha256_file(f) != meta["sha256"].get(n):
            raise CheckpointError(f"{f} is corrupt (sha256 does not match meta.json); use another checkpoint, e.g. checkpoints/best")


def is_sharded(path: str | Path) -> bool:
    return bool(read_meta(path).get("sharded"))


def load_sharded_into(path: str | Path, model: torch.nn.Module, optimizer=None) -> None:
    """Load a sharded checkpoint's weights (and optimizer state) into `model`, sharded or not, at any world size."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, get_model_state_dict, set_state_dict, \
        set_model_state_dict

    p = resolve(path)
    meta = read_meta(p)
    _check_hashes(p, meta, [n for n in meta["sha256"] if n.startswith("shards/")])
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        try:
            if optimizer is None:
                msd = get_model_state_dict(model)
                dcp.load({"model": msd}, checkpoint_id=str(p / "shards"))
                set_model_state_dict(model, msd)
            else:
                msd, osd = get_state_dict(model, optimizer)
                dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(p / "shards"))
                set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)
        except (RuntimeError, KeyError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
            raise CheckpointError(f"{p} does not match the model: {msg}") from None


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Weights of a checkpoint (plain or sharded) into `model` (plain, DDP-wrapped or FSDP-sharded)."""
    if is_sharded(path):
        load_sharded_into(path, model)
        return
    weights, _, _ = load_checkpoint(path, with_state=False)
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):  # FSDP model, full weights on disk
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        return
    load_weights(model, weights, str(path))


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, a run folder (-> checkpoints/last), or a file inside a checkpoint folder."""
    p = Path(path)
    if p.is_file() and p.name in ("model.safetensors", "state.pt", "meta.json"):
        p = p.parent
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints" / "last"
    if not p.exists():
        aside = p.parent / f".{p.name}.old"
        if aside.is_dir():  # crash between the two renames of save_checkpoint
            return aside
        raise CheckpointError(f"checkpoint not found: {path} (expected a run folder or a checkpoint folder "
                              "with model.safetensors, state.pt and meta.json)")
    if not (p / "meta.json").is_file():
        raise CheckpointError(f"{path} is not a lamina checkpoint (no meta.json; expected a run folder or a "
                              "checkpoint folder with model.safetensors, state.pt and meta.json)")
    return p


def read_meta(path: str | Path) -> dict:
    p = resolve(path)
    try:
        meta = json.loads((p / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p / 'meta.json'} is corrupt ({e.__class__.__name__}); the checkpoint cannot be trusted") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{p / 'meta.json'}: not a {FORMAT} checkpoint")
    return meta


def load_checkpoint(path: str | Path, with_state: bool = True) -> tuple[dict, dict | None, dict]:
    """(weights, state or None, meta), after checking both files against their recorded sha256. For a sharded
    checkpoint `weights` is {} (load them with `load_model_weights` / `load_sharded_into`)."""
    p = resolve(path)
    meta = read_meta(p)
    sharded = bool(meta.get("sharded"))
    names = ("model.safetensors", "state.pt") if with_state else ("model.safetensors",)
    if sharded:  # weights live in shards/ (see load_sharded_into); only the trainer state is read here
        names = ("state.pt",) if with_state else ()
    _check_hashes(p, meta, names)
    try:
        weights = {} if sharded else load_state(p / "model.safetensors")  # tied tensors given back under every name
        state = torch.load(p / "state.pt", map_location="cpu", weights_only=True) if with_state else None
    except (SafetensorError, RuntimeError, OSError, EOFError) as e:  # defensive: hash matched but unreadable
        raise CheckpointError(f"{p} could not be read ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    return weights, state, meta


def load_weights(model: torch.nn.Module, weights: dict, source: str = "checkpoint") -> None:
    """Strict: every tensor present and of the model's shape, checked before anything is copied."""
    load_state_strict(model, weights, source)
