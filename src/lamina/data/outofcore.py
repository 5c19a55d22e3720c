"""Data bigger than memory: the in-memory-or-streaming choice, and image folders decoded in DataLoader workers.

A data set whose decoded float32 tensors fit the memory budget stays on the fast path (InMemoryLoader: one
gather per batch). One that does not keeps its images as files: `ImageFiles` holds paths + labels, torch
DataLoader workers decode whole batches to uint8 (4x smaller to ship between processes than float32), and
`StreamingImageLoader` turns them into float32 [0, 1] in the main process and applies the same batched
transforms from the same seeded generator, drawn in the same order as InMemoryLoader (the epoch's permutation,
then one transform call per batch). So both paths give identical batches, augmentation included, and a
resumed run replays the same way.

Why not torch's DataLoader alone: its sampler draws from its own generator and the transforms would run per
sample in the workers; here sampling and augmentation stay batched and seeded exactly as on the in-memory path.

Decoding is the cost of streaming (a 256 x 256 PNG takes ~0.75 ms, as long as the MLP step spends on it), so a
split keeps a decoded-uint8 cache on disk (`DecodeCache`, data.decode_cache=auto): each image is decoded once,
written at its slot of a sparse file by the worker that decoded it, and read back with pread in later epochs.
The file is the run's own (created here, deleted at exit), so nothing in it is a user's bytes; reading it with
pread rather than mmap keeps its pages in the OS cache, not in the process's resident memory.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from lamina.errors import DataError

DEFAULT_BUDGET_FRACTION = 0.25  # of physical RAM: the model, optimizer and the uint8->float32 copy need the rest


def physical_memory_bytes() -> int:
    """The machine's RAM, or the container's memory limit (cgroup v2 memory.max) when that is smaller."""
    try:
        ram = int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a modest 8 GB
        ram = 8 << 30
    try:
        cap = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        return min(ram, int(cap)) if cap.isdigit() else ram
    except OSError:
        return ram


def check_in_memory(value) -> bool | None:
    """data.in_memory: True / False / "auto" (None). Strings from the command line are accepted."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise DataError(f"in_memory: expected auto, true or false, got {value!r}")


def budget_bytes(memory_budget) -> int:
    """data.memory_budget in GB (decimal places allowed); None: a quarter of the machine's RAM."""
    if memory_budget is None:
        return int(physical_memory_bytes() * DEFAULT_BUDGET_FRACTION)
    try:
        gb = float(memory_budget)
    except (TypeError, ValueError):
        gb = float("nan")
    if isinstance(memory_budget, bool) or not math.isfinite(gb) or gb <= 0:
        raise DataError(f"memory_budget: expected a positive number of GB (e.g. 8 or 0.5), got {memory_budget!r}")
    return int(gb * 1e9)


def human_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def choose_in_memory(decoded_bytes: int, in_memory=None, memory_budget=None) -> tuple[bool, str]:
    """(keep in memory?, one line saying which path and why) for a data set of `decoded_bytes` as tensors."""
    forced = check_in_memory(in_memory)
    budget = budget_bytes(memory_budget)
    if forced is not None:
        path = "in memory" if forced else "streaming from files"
        return forced, f"{path} (data.in_memory={str(forced).lower()}); decoded size {human_bytes(decoded_bytes)}"
    source = "data.memory_budget" if memory_budget is not None else \
        f"default budget, {DEFAULT_BUDGET_FRACTION:.0%} of {human_bytes(physical_memory_bytes())} RAM"
    if decoded_bytes <= budget:
        return True, f"in memory: decoded size {human_bytes(decoded_bytes)} <= budget {human_bytes(budget)} ({source})"
    return False, (f"streaming from files: decoded size {human_bytes(decoded_bytes)} > budget "
                   f"{human_bytes(budget)} ({source}); data.in_memory=true forces the in-memory path")


def check_workers(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"num_workers: expected a non-negative integer (0: decode in the training process), "
                        f"got {value!r}")
    return value


def default_workers() -> int:
    """Decoding workers: all cores but the one the training step runs on, at most 8, at least 1."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


# ----------------------------------------------------------------------------------------------- images

def check_decode_cache(value) -> bool | None:
    """data.decode_cache: true / false / "auto" (None: on when the temp folder has room)."""
    try:
        return check_in_memory(value)
    except DataError:
        raise DataError(f"decode_cache: expected auto, true or false, got {value!r}") from None


CACHE_DISK_MARGIN = 2 << 30  # leave this much of the temp folder's disk free


class DecodeCache:
    """Decoded uint8 images of one split in a sparse file under the temp folder (TMPDIR), slot i at i * item_bytes.

    `done` is a shared-memory flag per image, so a slot written by one DataLoader worker is read by any other (and
    by the main process) in later epochs; a slot is flagged only after its bytes are written. Two workers that
    decode the same image at once write the same bytes. Each process opens the file itself (fork or spawn).
    """

    def __init__(self, n: int, item_shape: tuple[int, ...], folder: str | None = None):
        self.n, self.item_shape = int(n), tuple(item_shape)
        self.item_bytes = math.prod(self.item_shape)
        _sweep(folder or tempfile.gettempdir())
        fd, self.path = tempfile.mkstemp(prefix=f"lamina-decoded-{os.getpid()}-", suffix=".u8", dir=folder)
        try:
            os.ftruncate(fd, self.n * self.item_bytes)  # sparse: disk is used only as slots are written
        finally:
            os.close(fd)
        self.done = torch.zeros(self.n, dtype=torch.uint8).share_memory_()
        self._fd: tuple[int, int] | None = None  # (pid, fd): a forked worker must not reuse its parent's fd
        self._owner = os.getpid()
        self._finalizer = weakref.finalize(self, _remove, self.path)  # also at exit; forked workers exit by _exit

    def __getstate__(self):  # spawn: the flags travel as shared memory, the file by name
        state = dict(self.__dict__)
        state["_fd"], state["_finalizer"] = None, None
        return state

    def _handle(self) -> int:
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self.path, os.O_RDWR))
        return self._fd[1]

    def read(self, i: int, out: np.ndarray) -> bool:
        """Fill `out` (item_shape uint8) with image i if it is cached."""
        if not self.done[i]:
            return False
        got = os.preadv(self._handle(), [memoryview(out).cast("B")], i * self.item_bytes)
        return got == self.item_bytes

    def write(self, i: int, img: np.ndarray) -> None:
        buf = np.ascontiguousarray(img, np.uint8)
        try:
            written = os.pwrite(self._handle(), memoryview(buf).cast("B"), i * self.item_bytes)
        except OSError:  # disk filled up since the room check: this image stays uncached, decoded again next time
            return
        if written == self.item_bytes:
            self.done[i] = 1

    def cached(self) -> int:
        return int(self.done.sum())


def _sweep(folder: str) -> None:
    """Remove caches left by lamina processes that were killed (no exit handler ran): ours, by a pid now gone."""
    try:
        for p in Path(folder).glob("lamina-decoded-*-*.u8"):
            pid = p.name.split("-")[2]
            if pid.isdigit() and p.stat().st_uid == os.getuid() and not Path(f"/proc/{pid}").exists() \
                    and Path("/proc/self").exists():
                _remove(str(p))
    except OSError:
        pass


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def cache_room(nbytes: int, folder: str | None = None) -> bool:
    """Whether the temp folder can hold nbytes more and still keep CACHE_DISK_MARGIN free."""
    try:
        return shutil.disk_usage(folder or tempfile.gettempdir()).free >= nbytes + CACHE_DISK_MARGIN
    except OSError:
        return False


def resolve_decode_cache(value, nbytes: int) -> bool:
    """data.decode_cache for a cache of nbytes: auto -> whether the temp folder has room; true without room is an
    error (one line)."""
    value = check_decode_cache(value)
    if value is False:
        return False
    if cache_room(nbytes):
        return True
    if value:
        raise DataError(f"decode_cache=true: the temp folder {tempfile.gettempdir()} lacks {human_bytes(nbytes)} + "
                        f"{human_bytes(CACHE_DISK_MARGIN)} free; set TMPDIR to a larger disk or pass "
                        "data.decode_cache=false")
    return False


class ImageFiles(torch.utils.data.Dataset):
    """An image split kept as files: paths, int64 labels "y", and how to decode (size (H, W), gray or RGB).

    `batch(idx)` decodes a list of indices to {"x": uint8 (B, C, H, W), "y": int64 (B,)}; item i is the float32
    [0, 1] sample a TensorData split of the in-memory path would hold.
    """

    def __init__(self, files, y: torch.Tensor, hw: tuple[int, int], gray: bool, num_workers: int | None = None,
                 decode_cache=None):
        self.files = [str(f) for f in files]
        self.num_workers = num_workers  # decoding processes for its loader; None: default_workers()
        if len(self.files) != len(y):
            raise DataError(f"image split: {len(self.files)} files but {len(y)} labels")
        self.tensors = {"y": y}  # what is small enough to hold: the labels (check_finite_data, subsets read it)
        self.hw, self.gray = tuple(hw), bool(gray)
        self.decode_cache = check_decode_cache(decode_cache)  # True / False / None (auto)
        self.cache: DecodeCache | None = None  # made by use_cache(), before loader workers start

    def use_cache(self) -> DecodeCache | None:
        """Start this split's decoded-uint8 cache (once) unless data.decode_cache=false or, on auto, the temp
        folder lacks room; data.decode_cache=true without room is an error."""
        if self.cache is None and self.decode_cache is not False and len(self):
            shape = (*self.hw, 1 if self.gray else 3)
            if resolve_decode_cache(self.decode_cache, len(self) * math.prod(shape)):
                self.cache = DecodeCache(len(self), shape)
        return self.cache

    def __len__(self) -> int:
        return len(self.files)

    @property
    def y(self) -> torch.Tensor:
        return self.tensors["y"]

    @property
    def x(self):
        raise DataError("this image split is streamed from files (data.in_memory=false or over data.memory_budget);"
                        " this step needs it in memory: pass data.in_memory=true or a smaller data set")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1 if self.gray else 3, *self.hw)

    def decoded_bytes(self) -> int:
        return len(self) * math.prod(self.input_shape) * 4

    def subset(self, idx: torch.Tensor) -> ImageFiles:
        return ImageFiles([self.files[i] for i in idx.tolist()], self.y[idx], self.hw, self.gray, self.num_workers,
                          self.decode_cache)

    def batch(self, idx) -> dict[str, torch.Tensor]:
        from lamina.data.files import _decode_images, _require

        idx = [int(i) for i in idx]
        h, w = self.hw
        arr = np.empty((len(idx), h, w, 1 if self.gray else 3), np.uint8)  # (B, H, W, C)
        cache = self.cache
        todo = [k for k, i in enumerate(idx) if cache is None or not cache.read(i, arr[k])]
        if todo:
            Image = _require("PIL.Image", "images", "Pillow")
            arr[todo] = _decode_images(Image, [self.files[idx[k]] for k in todo], self.hw, self.gray)
            if cache is not None:
                for k in todo:
                    cache.write(idx[k], arr[k])
        return {"x": torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), "y": self.y[torch.tensor(idx)]}

    def __getitems__(self, idx):  # DataLoader workers: a whole batch at once; errors travel as text (one line)
        try:
            return self.batch(idx)
        except DataError as e:
            return {"error": str(e)}

    def __getitem__(self, i):
        b = self.batch([i])
        return {"x": to_float(b["x"])[0], "y": b["y"][0]}


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1], the very op the in-memory path applies at load (files._to_chw)."""
    return x.float().div_(255.0).contiguous()


def _keep(batch):
    return batch


class _EpochBatches:
    """The batch sampler torch's DataLoader reads: this epoch's index batches, set by the loader before each pass."""

    def __init__(self):
        self.batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StreamingImageLoader:
    """Dict batches over ImageFiles, same order, values and resume state as InMemoryLoader over the same images.

    Workers decode (num_workers=None: default_workers()); persistent so an epoch does not pay their start-up;
    `prefetch` batches each queued ahead; pinned host memory only when the target device is CUDA.
    """

    def __init__(self, data: ImageFiles, batch_size: int, shuffle: bool = False, drop_last: bool = False,
                 seed: int = 0, device=None, transform=None, num_workers: int | None = None, prefetch: int = 4):
        self.data, self.batch_size = data, int(batch_size)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.generator = torch.Generator().manual_seed(seed)
        self.transform = transform
        self.device = torch.device(device) if device is not None else None
        self.num_workers = default_workers() if num_workers is None else int(num_workers)
        data.use_cache()  # before the workers fork, so they share its flags
        self._sampler = _EpochBatches()
        pin = self.device is not None and self.device.type == "cuda"
        kw = {"persistent_workers": True, "prefetch_factor": int(prefetch)} if self.num_workers else {}
        # its own generator: a DataLoader draws a base seed per epoch, which must not move the global RNG (dropout)
        self._dl = torch.utils.data.DataLoader(data, batch_sampler=self._sampler, num_workers=self.num_workers,
                                               collate_fn=_keep, pin_memory=pin, generator=torch.Generator(), **kw)

    def to(self, device) -> StreamingImageLoader:
        self.device = torch.device(device)
        return self

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _index_batches(self) -> list:
        n = len(self.data)
        if self.shuffle:  # the same single draw InMemoryLoader makes at the start of an epoch
            order = torch.randperm(n, generator=self.generator)
            return [order[b * self.batch_size:(b + 1) * self.batch_size].tolist() for b in range(len(self))]
        return [list(range(b * self.batch_size, min(n, (b + 1) * self.batch_size))) for b in range(len(self))]

    def __iter__(self):
        self._sampler.batches = self._index_batches()
        if not self._sampler.batches:
            return
        cache = self.data.cache
        if cache is not None and cache.cached() == len(self.data):
            # every image decoded: reading a batch from the cache (~1 ms per 64 images) costs less than waking a
            # worker and shipping it, and leaves both cores to the training step
            source = (self.data.batch(idx) for idx in self._sampler.batches)
        else:
            source = self._dl
        for batch in source:
            if "error" in batch:
                raise DataError(batch["error"])
            x = to_float(batch["x"])
            batch = {"x": x, "y": batch["y"]}
            if self.device is not None and self.device.type != "cpu":
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            if self.transform is not None:
                batch = self.transform(batch, self.generator)
            yield batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def image_decoded_bytes(n: int, hw: tuple[int, int], gray: bool) -> int:
    return int(n) * (1 if gray else 3) * int(hw[0]) * int(hw[1]) * np.dtype(np.float32).itemsize
