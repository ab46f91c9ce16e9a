"""Micro-batching: concurrent requests share one generator pass.

Each `submit(key, item)` waits in a queue per key (requests with different keys, say another
model version or keep ratio, cannot share a pass). One worker task forms batches: it takes the
key whose oldest request has waited longest and closes that batch when it holds `max_batch`
requests or its oldest has waited `max_delay_s`, whichever comes first (Triton's dynamic batcher
works the same way). Requests whose deadline has passed, or whose caller has gone, are dropped
when the batch closes, before any compute is spent on them.

The compute function runs in a single worker thread, so the event loop keeps accepting and
answering calls while the generator works, and generator passes never contend with each other
for the same cores.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from paramcast.common.errors import DeadlineExpired, Overloaded, ShuttingDown

ComputeFn = Callable[[Any, list[Any]], Sequence[Any]]  # (key, items) -> one result per item


class BatchObserver:
    """Hooks for metrics; the default does nothing."""

    def batch_started(self, size: int, queue_seconds: list[float]) -> None:
        pass

    def batch_finished(self, size: int, seconds: float) -> None:
        pass

    def dropped_expired(self, n: int) -> None:
        pass

    def queue_depth(self, n: int) -> None:
        pass


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    enqueued: float  # time.monotonic()
    deadline: float | None  # time.monotonic() after which the result is useless


class MicroBatcher:
    def __init__(self, compute: ComputeFn, max_batch: int = 64, max_delay_s: float = 0.002, max_queue: int = 4096,
                 observer: BatchObserver | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
        self.compute = compute
        self.max_batch, self.max_delay_s, self.max_queue = max_batch, max_delay_s, max_queue
        self.observer = observer or BatchObserver()
        self._queues: dict[Hashable, deque[_Pending]] = {}
        self._computing: list[_Pending] = []  # the batch in the worker thread right now
        self._queued = 0
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paramcast-generate")
        self._worker: asyncio.Task | None = None
        self._closed = False
        # Counters for tests and benchmarks.
        self.batches = 0
        self.items = 0
        self.expired = 0

    # -- public ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker on the running event loop."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="paramcast-batcher")

    async def submit(self, key: Hashable, item: Any, deadline: float | None = None) -> Any:
        """Queue one item and wait for its result; `deadline` is a time.monotonic() value.

        Raises DeadlineExpired if the deadline passes before its batch is computed, Overloaded if
        the queue is full, ShuttingDown after close(), and whatever `compute` raised for the batch.
        """
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        if self._queued >= self.max_queue:
            raise Overloaded(f"the generation queue is full ({self.max_queue} requests waiting); retry later")
        self.start()
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            self.expired += 1
            self.observer.dropped_expired(1)
            raise DeadlineExpired("the deadline passed before the request was queued")
        future = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, deque()).append(_Pending(item, future, now, deadline))
        self._queued += 1
        self.observer.queue_depth(self._queued)
        self._wake.set()
        return await future  # cancelled with the call if the client goes away; the worker skips it

    @property
    def queued(self) -> int:
        return self._queued

    async def close(self) -> None:
        """Stop accepting work, fail what is still queued, stop the worker and its thread."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        for p in [*self._computing, *(p for queue in self._queues.values() for p in queue)]:
            if not p.future.done():
                p.future.set_exception(ShuttingDown("the server is shutting down"))
        self._queues.clear()
        self._computing = []
        self._queued = 0
        # Not waiting: a pass still running in the thread finishes on its own and its result is dropped.
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- worker ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queues:
                self._wake.clear()
                await self._wake.wait()
                continue
            key, queue = self._oldest()
            close_at = queue[0].enqueued + self.max_delay_s
            while len(queue) < self.max_batch:  # wait for the batch to fill, at most until close_at
                remaining = close_at - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
            batch = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
            if not queue:
                del self._queues[key]
            self._queued -= len(batch)
            self.observer.queue_depth(self._queued)
            live = self._drop_dead(batch)
            if not live:
                continue
            started = time.monotonic()
            self.observer.batch_started(len(live), [started - p.enqueued for p in live])
            self._computing = live
            try:
                results = await loop.run_in_executor(self._executor, self.compute, key, [p.item for p in live])
                if len(results) != len(live):
                    raise RuntimeError(f"compute returned {len(results)} results for {len(live)} items")
            except Exception as exc:  # the whole batch failed: every waiting caller gets the error
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
            else:
                for p, result in zip(live, results, strict=True):
                    if not p.future.done():
                        p.future.set_result(result)
            self._computing = []
            self.batches += 1
            self.items += len(live)
            self.observer.batch_finished(len(live), time.monotonic() - started)

    def _oldest(self) -> tuple[Hashable, deque[_Pending]]:
        """The key whose head request has waited longest (so no key starves)."""
        return min(self._queues.items(), key=lambda kv: kv[1][0].enqueued)

    def _drop_dead(self, batch: list[_Pending]) -> list[_Pending]:
        now = time.monotonic()
        live, expired = [], 0
        for p in batch:
            if p.future.done():  # cancelled: the caller went away
                continue
            if p.deadline is not None and now >= p.deadline:
                p.future.set_exception(DeadlineExpired("the deadline passed while the request waited for a batch"))
                expired += 1
                continue
            live.append(p)
        if expired:
            self.expired += expired
            self.observer.dropped_expired(expired)
        return live
