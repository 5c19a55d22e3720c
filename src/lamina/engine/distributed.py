"""Data-parallel, sharded and context-parallel training on PyTorch's own engine (`torch.distributed`).

lamina never moves tensors between processes itself: processes are started by `torchrun` (which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), they talk through a torch process group (gloo on CPU, NCCL on GPU),
gradients are averaged by DDP or reduce-scattered by FSDP2 (`fully_shard`), and sharded checkpoints are written
by `torch.distributed.checkpoint`. This module only decides *who does what*:

* `Distributed.from_config(trainer_cfg)`: joins the process group torchrun prepared (or runs as one process),
  picks the device (cuda:LOCAL_RANK on GPUs) and builds the (data-parallel x context-parallel) layout:
  rank = dp_rank * cp + cp_rank, so the `cp` ranks that split one sequence are neighbours (same node first).
* `wrap(model, optimizer)`: DDP, or FSDP2 with every block of every ModuleList sharded as its own unit (one
  all-gather per transformer block, torchtitan's layout) plus the root; optional bf16 compute with fp32
  gradient reduction (`MixedPrecisionPolicy`). FSDP swaps the parameters for DTensors, so the optimizer's
  parameter lists are re-pointed at the new ones (its state is still empty then).
* `shard(loader)`: `ShardedLoader` cuts every *global* batch of the wrapped loader into `dp` contiguous parts
  and yields this rank's part. `data.batch_size` therefore stays the global batch: the sequence of batches, the
  loader's resume state and the number of optimizer steps do not depend on the number of processes, which is
  what lets a checkpoint written by 2 processes resume on 1 (or 4) and continue the same run. Each rank's loss
  is scaled by (local_n * dp / global_n) before DDP's average, so uneven splits still give exactly the
  gradient of the global batch mean.
* Reductions (`all_reduce_sum`, `all_gather_object`, `broadcast_object`) for metrics, RNG states and run
  folder names; `is_main` gates logging, progress bars and file writes to rank 0.

Multi-node: the same command on every node, e.g.
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank {0,1} --rdzv-backend c10d \
             --rdzv-endpoint HOST:29500 --rdzv-id myrun -m lamina.cli.main train CONFIG trainer.strategy=fsdp
Run folders and checkpoints must be on a file system every node sees (rank 0 writes; all ranks read).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lamina.errors import ConfigError


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def restart_count() -> int:
    """How many times torchrun (--max-restarts) has restarted this worker group; 0 on the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


@dataclass
class Distributed:
    strategy: str = "none"  # none | ddp | fsdp
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cp: int = 1  # context-parallel ranks per sequence
    cp_group: object = None  # process group of this rank's context-parallel peers (None when cp == 1)
    fsdp_mixed_precision: bool = False
    owns_group: bool = False  # we initialized the process group, so we tear it down

    # ----- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, device: torch.device) -> "Distributed":
        """`cfg`: a TrainerConfig (strategy, context_parallel, precision). `device`: the selected device."""
        strategy, cp = cfg.strategy, cfg.context_parallel
        torchrun = launched_by_torchrun()
        world = int(os.environ["WORLD_SIZE"]) if torchrun else 1
        if strategy == "auto":
            strategy = "ddp" if world > 1 else "none"
        if strategy == "none" and world > 1:
            raise ConfigError(f"trainer.strategy: none cannot run under torchrun with {world} processes; "
                              "use ddp or fsdp (or auto)")
        if world % cp:
            raise ConfigError(f"trainer.context_parallel: {cp} does not divide the number of processes ({world}); "
                              f"launch a multiple of {cp} processes with torchrun --nproc-per-node")
        if strategy == "none" and cp == 1:
            return cls(device=device)
        owns = False
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if torchrun:
                if device.type == "cuda":
                    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
                # torchrun's store outlives a restart, and the dead attempt's gloo/NCCL addresses are still in
                # it (pytorch/pytorch#167288: restarted ranks dial the old peers): a key prefix per attempt.
                from torch.distributed.rendezvous import rendezvous

                timeout = datetime.timedelta(minutes=30)
                store, rank, world = next(rendezvous("env://", timeout=timeout))
                store = dist.PrefixStore(f"lamina/attempt_{restart_count()}", store)
                dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
            else:  # one process (e.g. resuming a sharded run alone): a private one-rank group, no network
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            owns = True
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
        cp_group = None
        if cp > 1:  # every rank must take part in creating every group, in the same order
            for d in range(world // cp):
                g = dist.new_group(list(range(d * cp, (d + 1) * cp)))
                if rank // cp == d:
                    cp_group = g
        if strategy == "none":
            strategy = "ddp"  # context parallelism alone still needs the gradients averaged
        return cls(strategy=strategy, rank=rank, world_size=world, local_rank=local_rank, device=device, cp=cp,
                   cp_group=cp_group, fsdp_mixed_precision=(strategy == "fsdp" and cfg.precision == "bf16"),
                   owns_group=owns)

    # ----- facts ----------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        return self.world_size // self.cp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    @property
    def sharded_checkpoints(self) -> bool:
        return self.strategy == "fsdp"

    # ----- model ------------------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, optimizer=None) -> torch.nn.Module:
        """The module to call in training: DDP(model), or `model` itself sharded in place by FSDP2."""
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(model, device_ids=ids)
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            names = {id(p): n for n, p in model.named_parameters()}
            kw = {}
            if self.fsdp_mixed_precision:  # bf16 compute and all-gathers, fp32 master weights and reductions
                kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for m in list(model.modules()):
                if isinstance(m, torch.nn.ModuleList):
                    for block in m:
                        if any(True for _ in block.parameters()):
                            fully_shard(block, **kw)
            fully_shard(model, **kw)
            if optimizer is not None:  # fully_shard replaced every Parameter: point the optimizer at the new ones
                new = dict(model.named_parameters())
                for group in optimizer.param_groups:
                    group["params"] = [new[names[id(p)]] for p in group["params"]]
            return model
        return model

    def no_sync(self, module):
        """Skip DDP's gradient all-reduce on accumulation micro-batches (the last one syncs the sum)."""
        return module.no_sync() if self.strategy == "ddp" and hasattr(module, "no_sync") else contextlib.nullcontext()

    # ----- data -----------------------------------------------------------------------------------
    def shard(self, loader, train: bool = True, ranks: int | None = None, rank: int | None = None):
        """This rank's part of every global batch. Training shards over data-parallel ranks (context-parallel
        peers see the same samples); evaluation may shard over all ranks (`ranks=world_size`)."""
        n, r = (ranks or self.dp_size), (self.dp_rank if rank is None else rank)
        if n == 1 or loader is None or isinstance(loader, ShardedLoader):
            return loader
        return ShardedLoader(loader, r, n, train=train)

    # ----- collectives ------------------------------------------------------------------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj` (picklable; tensors inside travel as lists: torch's object collectives unpickle
        with the weights-only loader, which refuses tensor storages)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, _plain(obj))
        return [_tensors(o) for o in out]

    def broadcast_object(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self, clean: bool = True) -> None:
        """Tear down the group we created. `clean`: every rank got here without an error, so all wait for each
        other first; otherwise a rank that already left would leave the others hanging in the barrier."""
        if self.owns_group and dist.is_initialized():
            if clean and self.world_size > 1:
                # Rank 0 still writes the summary and plots after the others are done; destroying the group
                # while a peer is mid-teardown has aborted gloo workers ("terminate called without an active
                # exception"), so every rank leaves together.
                dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False


def _plain(o):
    if isinstance(o, torch.Tensor):
        return {"__tensor__": o.cpu().tolist(), "dtype": str(o.dtype).removeprefix("torch.")}
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return type(o)(_plain(v) for v in o)
    return o


def _tensors(o):
    if isinstance(o, dict):
        if "__tensor__" in o:
            return torch.tensor(o["__tensor__"], dtype=getattr(torch, o["dtype"]))
        return {k: _tensors(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return type(o)(_tensors(v) for v in o)
    return o


def _batch_len(batch: dict) -> int:
    return len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))


class ShardedLoader:
    """Rank `rank`'s contiguous part of each global batch of `loader` (DistributedSampler's job, per batch).

    Parts follow `torch.tensor_split` (the first n % world parts hold one more sample). A global batch smaller
    than the number of ranks would leave a rank empty: in training it is skipped by every rank (only a data
    set's last batch can be that small); in evaluation an empty rank gets the batch's first sample with
    `ignore_batch` set, so it still joins FSDP's collectives but adds nothing to the metrics.
    """

    def __init__(self, loader, rank: int, world: int, train: bool = True):
        self.loader, self.rank, self.world, self.train = loader, rank, world, train
        self.loss_scale = 1.0  # local_n * world / global_n of the batch just yielded
        self.ignore_batch = False
        bs = getattr(loader, "batch_size", None)
        if bs is not None and bs < world:
            raise ConfigError(f"data.batch_size: {bs} is smaller than the number of data-parallel processes "
                              f"({world}); data.batch_size is the global batch, use at least {world}")

    def _last_dropped(self) -> bool:
        data, bs = getattr(self.loader, "data", None), getattr(self.loader, "batch_size", None)
        if not self.train or data is None or bs is None or getattr(self.loader, "drop_last", False):
            return False
        rest = len(data) % bs
        return 0 < rest < self.world

    def __len__(self) -> int:
        return len(self.loader) - int(self._last_dropped())

    def __iter__(self):
        for batch in self.loader:
            n = _batch_len(batch)
            if n < self.world and self.train:
                continue
            lo = self.rank * (n // self.world) + min(self.rank, n % self.world)
            hi = lo + n // self.world + (1 if self.rank < n % self.world else 0)
            self.ignore_batch = hi == lo
            if self.ignore_batch:
                lo, hi = 0, 1
            self.loss_scale = (hi - lo) * self.world / n
            yield {k: v[lo:hi] if isinstance(v, torch.Tensor) and v.ndim and len(v) == n else v
                   for k, v in batch.items()}

    def __getattr__(self, name):  # batch_size, data, to, state_dict, ... of the wrapped loader (if it has them)
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module under a DDP wrapper and/or torch.compile (FSDP2 shards in place: nothing to unwrap)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model
