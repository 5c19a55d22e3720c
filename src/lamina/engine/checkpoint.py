"""Checkpoints: a folder per checkpoint, written atomically.

    <ckpt>/model.safetensors   weights (safe to load anywhere, no pickle; tied weights once, lamina.io.save_state)
    <ckpt>/state.pt            optimizer / scheduler / RNG / loop position, read with weights_only=True
    <ckpt>/meta.json           epoch, step, metrics, model name+options, sha256 of both files

Write protocol (lamina.io.write_folder): everything goes to a fresh temp folder beside the target, files are
fsynced, then the old folder is renamed aside, the temp folder renamed into place and the old one deleted. A crash at any point
leaves either the previous checkpoint or the new one complete; `resolve` falls back to the renamed-aside
copy if the crash hit between the two renames. The sha256 in meta.json catches truncated or edited files.

Sharded checkpoints (FSDP, `trainer.strategy=fsdp`) keep the same folder contract, with the weights and the
optimizer state also as a `torch.distributed.checkpoint` (DCP) folder:

    <ckpt>/model.safetensors   the full (consolidated) weights, gathered from every rank: what readers load
    <ckpt>/shards/             DCP: one .distcp file per rank + .metadata; {"model": ..., "optim": ...}
    <ckpt>/state.pt            the rest of the trainer state (loop position, RNG of every rank, ...)
    <ckpt>/meta.json           "sharded": true, sha256 of every file

Every rank writes its own shards into the temp folder (DCP), rank 0 writes the gathered model.safetensors,
state.pt and meta.json and does the renames, so the atomicity argument above holds unchanged.

Safety: DCP's `.metadata` is a pickle, and the sha256 values sit in the same (possibly foreign) meta.json, so
they authenticate nothing. Readers that want only the weights (`lamina eval/serve/predict/compress`,
`load_model_weights`) read model.safetensors and never open shards/; a sharded checkpoint without it (written
before it existed) is refused with one line. Resuming (`load_sharded_into`, which needs the sharded optimizer
state) reads `.metadata` with an unpickler that admits only torch's own DCP metadata classes (and torch
dtypes/sizes/layouts, pathlib paths), and the non-tensor optimizer values with `torch.load(weights_only=True)`
instead of DCP's default (unrestricted unpickling): a crafted file is refused, never run. DCP stores each tensor
with its global shape, so a checkpoint written by N ranks resumes on M ranks.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from lamina.errors import CheckpointError
from lamina.io import (fsync_file, list_files, load_state, load_state_strict, make_temp_folder,
                       publish_folder, save_state, sha256_file, state_for_saving, state_payload, tied_aliases,
                       write_folder)

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
    """Collective: every rank calls it. Weights + optimizer through DCP, the gathered full weights
    (model.safetensors) and the rest by rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    target = Path(path)
    tmp = None
    if dist_env.is_main:
        tmp = str(make_temp_folder(target))
    tmp = Path(dist_env.broadcast_object(tmp))
    try:
        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "shards"))
        # collective as well: every rank takes part, rank 0 receives the full tensors (on CPU) and writes them
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist_env.is_main:
            save_state(tmp / "model.safetensors", full)
        del full
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


# What a DCP `.metadata` pickle may name: torch's own metadata dataclasses and the few torch/pathlib values they
# hold (checked against torch 2.13's FileSystemWriter output). Anything else is refused before it is built.
_DCP_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _DCP_ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata class")


def read_dcp_metadata(path: str | Path):
    """A DCP `.metadata` file, unpickled with only torch's own metadata classes admitted (see the module
    docstring). CheckpointError (one line) for anything else: a crafted pickle is refused, never run."""
    from torch.distributed.checkpoint.metadata import Metadata

    f = Path(path)
    try:
        md = _DCPMetadataUnpickler(io.BytesIO(f.read_bytes())).load()
    except Exception as e:  # UnpicklingError, EOFError, TypeError from a mangled BUILD, ...
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise CheckpointError(f"{f} is not DCP checkpoint metadata lamina can read safely ({msg}); "
                              "it is refused, not run") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{f} is not DCP checkpoint metadata (a {type(md).__name__}); it is refused")
    return md


def _safe_dcp_reader(shards: Path):
    """A DCP FileSystemReader whose metadata goes through `read_dcp_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:  # per-rank metadata files: not written by lamina
                raise CheckpointError(f"{shards}: per-rank DCP metadata is not supported")
            md = read_dcp_metadata(shards / ".metadata")
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(str(shards))


def _safe_dcp_planner():
    """DCP's default load planner, except that non-tensor values (optimizer hyper-parameters) are read with
    torch.load(weights_only=True) instead of DCP's unrestricted torch.load."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as e:
                raise CheckpointError(f"DCP value {read_item.dest_index.fqn} is not plain data "
                                      f"({e.__class__.__name__}); it is refused, not run") from None
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element  # where DCP's planner takes it

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()


def load_sharded_into(path: str | Path, model: torch.nn.Module, optimizer=None) -> None:
    """Load a sharded checkpoint's weights (and optimizer state) into `model`, sharded or not, at any world size
    (resume). `.metadata` goes through `read_dcp_metadata`, non-tensor values through weights_only loading."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, get_model_state_dict, set_state_dict, \
        set_model_state_dict

    p = resolve(path)
    meta = read_meta(p)
    _check_hashes(p, meta, [n for n in meta["sha256"] if n.startswith("shards/")])
    read_dcp_metadata(p / "shards" / ".metadata")  # a crafted file is refused here, before DCP wraps the error
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        try:
            if optimizer is None:
                msd = get_model_state_dict(model)
                dcp.load({"model": msd}, storage_reader=_safe_dcp_reader(p / "shards"), planner=_safe_dcp_planner())
                set_model_state_dict(model, msd)
            else:
                msd, osd = get_state_dict(model, optimizer)
                dcp.load({"model": msd, "optim": osd}, storage_reader=_safe_dcp_reader(p / "shards"),
                         planner=_safe_dcp_planner())
                set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)
        except CheckpointException as e:  # DCP's wrapper of every rank's failure
            causes = [w[0] if isinstance(w, tuple) else w for w in e.failures.values()]  # (exception, stack)
            inner = next((c for c in causes if isinstance(c, CheckpointError)), None)
            if inner is not None:
                raise CheckpointError(inner.args[0]) from None
            first = causes[0] if causes else e
            msg = str(first).splitlines()[0] if str(first) else first.__class__.__name__
            raise CheckpointError(f"{p} could not be read ({first.__class__.__name__}: {msg[:200]})") from None
        except (RuntimeError, KeyError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
            raise CheckpointError(f"{p} does not match the model: {msg}") from None


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Weights of a checkpoint (plain or sharded) into `model` (plain, DDP-wrapped or FSDP-sharded), always from
    model.safetensors: a sharded checkpoint's DCP shards (pickled metadata) are never opened here."""
    p = resolve(path)
    meta = read_meta(p)
    if meta.get("sharded") and "model.safetensors" not in (meta.get("sha256") or {}):
        raise CheckpointError(f"{p} is a sharded (FSDP) checkpoint without model.safetensors (written by an older "
                              "lamina); its DCP metadata is a pickle and cannot be read safely in one process: "
                              "resume the run with trainer.strategy=fsdp to write a new checkpoint")
    if meta.get("sharded"):  # not read here, but a damaged checkpoint is reported as such (hashing runs no code)
        _check_hashes(p, meta, [n for n in meta["sha256"] if n.startswith("shards/")])
    weights, _, _ = load_checkpoint(p, with_state=False, consolidated=True)
    if any(type(t).__name__ == "DTensor" for t in model.parameters()):  # FSDP model, full weights on disk
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


def load_checkpoint(path: str | Path, with_state: bool = True, consolidated: bool = False
                    ) -> tuple[dict, dict | None, dict]:
    """(weights, state or None, meta), after checking both files against their recorded sha256. For a sharded
    checkpoint `weights` is {} (resume loads them with `load_sharded_into`) unless `consolidated`: then they
    come from its gathered model.safetensors (`load_model_weights` does that)."""
    p = resolve(path)
    meta = read_meta(p)
    if not isinstance(meta.get("sha256"), dict):
        raise CheckpointError(f"{p / 'meta.json'}: no sha256 record of the checkpoint's files; it cannot be trusted")
    read_weights = not meta.get("sharded") or consolidated
    names = (("model.safetensors",) if read_weights else ()) + (("state.pt",) if with_state else ())
    _check_hashes(p, meta, names)
    try:
        weights = load_state(p / "model.safetensors") if read_weights else {}  # tied tensors under every name
    except (SafetensorError, RuntimeError, OSError, EOFError) as e:  # defensive: hash matched but unreadable
        raise CheckpointError(f"{p} could not be read ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    state = _load_trainer_state(p / "state.pt") if with_state else None
    return weights, state, meta


def _load_trainer_state(f: Path) -> dict:
    """state.pt with weights_only=True; anything that needs more (a pickle of arbitrary objects) is not a lamina
    checkpoint: one line, never torch's advice to retry with unrestricted unpickling."""
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{f} is not a lamina checkpoint: it holds pickled Python objects that lamina does "
                              "not load (only tensors and plain values are read)") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # truncated, not a zip archive, ...
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise CheckpointError(f"{f} is not a lamina checkpoint ({e.__class__.__name__}: {msg[:160]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{f} is not a lamina checkpoint (a {type(state).__name__}, expected the trainer state)")
    return state


def load_weights(model: torch.nn.Module, weights: dict, source: str = "checkpoint") -> None:
    """Strict: every tensor present and of the model's shape, checked before anything is copied."""
    load_state_strict(model, weights, source)
