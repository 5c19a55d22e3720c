"""Dynamic micro-batching for the model server: many small requests -> few large forwards.

Requests are queued; ONE worker (an asyncio task) takes the oldest request, then keeps collecting until it
holds `max_batch` samples or `max_wait_ms` have passed since that oldest request arrived, runs one forward
and hands every request its rows. Why a single worker: a forward already uses every core through torch's
intra-op threads (or ONNX Runtime's), so two forwards at once only fight over the same cores and the cache;
one worker makes the batch the only source of parallelism, keeps arrival order, and bounds memory to one
batch. The forward runs on a dedicated thread so the event loop keeps accepting, validating and rejecting
requests while the model computes; that is also when the next batch fills up, so under load batches form
without waiting at all (the deadline counts from arrival, not from when the worker looks).

`batching=False` keeps the same worker and queue but runs each request alone: the same serialization,
so the two modes differ only in batching (benchmarks/serve_load.py measures both). `forward_threads=N` lets N
forwards overlap on a thread pool instead (a batch is taken when a thread is free); serve_load.py measures
that too: on a CPU whose cores the forward already uses it buys little, so the default is 1.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


class Overloaded(Exception):
    """The queue already holds `max_queue` samples; the caller should answer 503 and the client retry."""


class ModelFailure(Exception):
    """The forward raised; str() is one line naming the exception type and message."""


@dataclass
class _Item:
    x: np.ndarray  # (n, *input_shape)
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Queue + single batching worker around `forward(x: (B, ...)) -> (B, ...)` (a blocking function).

    `on_batch(batch_size, seconds)` is called after each forward (metrics). Start with `await start()` inside
    the server's event loop; `await submit(x)` returns the rows of the forward's output for x.
    """

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], max_batch: int = 32, max_wait_ms: float = 5.0,
                 batching: bool = True, max_queue: int = 4096, on_batch: Callable[[int, float], None] | None = None,
                 forward_threads: int = 1):
        if max_batch < 1:
            raise ValueError(f"max_batch: expected a positive integer, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms: expected a non-negative number, got {max_wait_ms}")
        self.forward = forward
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.batching = bool(batching)
        self.max_queue = int(max_queue)
        self.forward_threads = int(forward_threads)
        if self.forward_threads < 1:
            raise ValueError(f"forward_threads: expected a positive integer, got {forward_threads}")
        self.on_batch = on_batch
        self.depth = 0  # samples waiting (not yet in a running forward)
        self.reserved = 0  # samples admitted but not yet submitted (uploads being read/decoded): count as queued
        self._pending: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()

    # ----- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.forward_threads)
        self._executor = ThreadPoolExecutor(self.forward_threads, thread_name_prefix="lamina-forward")
        self._task = asyncio.create_task(self._worker(), name="lamina-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(ModelFailure("server shutting down"))
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    # ----- requests --------------------------------------------------------------------------
    def reserve(self, n: int) -> None:
        """Hold n places in the queue for a request still being read or decoded (an upload), so that a full
        queue answers Overloaded before the work is done; give them back with `unreserve(n)` just before
        `submit` (no await in between) or when the request fails."""
        if self.depth + self.reserved + n > self.max_queue:
            raise Overloaded(f"server busy: {self.depth + self.reserved} samples queued (limit {self.max_queue}); "
                             f"retry later")
        self.reserved += n

    def unreserve(self, n: int) -> None:
        self.reserved -= n

    async def submit(self, x: np.ndarray) -> np.ndarray:
        if self.depth + self.reserved + len(x) > self.max_queue:
            raise Overloaded(f"server busy: {self.depth + self.reserved} samples queued (limit {self.max_queue}); "
                             f"retry later")
        item = _Item(x, asyncio.get_running_loop().create_future())
        self._pending.append(item)
        self.depth += len(x)
        self._wakeup.set()
        return await item.future

    # ----- the worker ------------------------------------------------------------------------
    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.batching:  # wait for a full batch, at most max_wait after the oldest request arrived
                while self.depth < self.max_batch:
                    remaining = self._pending[0].arrived + self.max_wait - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        break
            await self._slots.acquire()  # while all forward threads are busy, the queue keeps filling
            items = self._take()
            if not items:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run(loop, items))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._slots.release()

    def _take(self) -> list[_Item]:
        """The oldest request, plus (batching) the next ones while they fit in max_batch samples. A request
        larger than max_batch runs alone rather than being split: its rows stay one forward."""
        items, n = [], 0
        while self._pending:
            nxt = self._pending[0]
            if items and (not self.batching or n + len(nxt.x) > self.max_batch):
                break
            self._pending.popleft()
            self.depth -= len(nxt.x)
            if nxt.future.done():  # the client went away while queued
                continue
            items.append(nxt)
            n += len(nxt.x)
        return items

    async def _run(self, loop, items: list[_Item]) -> None:
        x = items[0].x if len(items) == 1 else np.concatenate([it.x for it in items])
        t0 = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._executor, self.forward, x)
            if len(out) != len(x):
                raise RuntimeError(f"forward returned {len(out)} rows for {len(x)} inputs")
        except Exception as e:  # noqa: BLE001 - any model failure is answered, never fatal to the worker
            if len(items) > 1:  # isolate the failing request: neighbours in its batch still get answers
                for it in items:
                    await self._run(loop, [it])
                return
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:500]
            if not items[0].future.done():
                items[0].future.set_exception(ModelFailure(msg))
            return
        if self.on_batch is not None:
            self.on_batch(len(x), time.perf_counter() - t0)
        start = 0
        for it in items:
            if not it.future.done():
                it.future.set_result(out[start:start + len(it.x)])
            start += len(it.x)
