"""A generic micro-batcher: concurrent requests share one batch, run on a worker thread.

A collector task on the event loop takes the first queued request, then keeps taking requests until
the batch holds `max_batch` rows or `max_wait_ms` has passed since the first one (0: the batch takes
what is already queued, and requests that arrive while it runs form the next one). A request may hold
several rows (images, words x choices); one that does not fit the batch opens the next one, and a
request bigger than `max_batch` on its own forms a batch alone (`run_batch` may split it further). Each
batch runs on a thread of its own that ends with it (`own_thread`: a thread kept alive would keep an OpenMP
team that slows the LM engine down), off the event loop; batches run one at a time, and their results go back
to each request's future.

Requests cancelled while they wait are dropped from the batch. A batch that fails fails only its own
requests' futures; the collector carries on. `stop()` stops accepting and by default serves every
request already queued; `stop(drain=False)` fails the waiting ones with `BatcherNotRunning` instead.

Subclasses override `run_batch` (and `request_rows`, `_admit`, `_batch_done` where they need to), or
the base is used directly with a `run_batch` callable.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from service.engine.own_thread import run_in_own_thread

log = logging.getLogger("service.engine.micro_batcher")

ReqT = TypeVar("ReqT")
ResT = TypeVar("ResT")

BatchCallback = Callable[[int, int, float], None]
"""on_batch(rows, requests, seconds), called on the event loop after every successful batch."""


class BatcherNotRunning(RuntimeError):
    """A request was submitted before start() or after stop(), or was still waiting at stop(drain=False)."""


class BatcherFull(RuntimeError):
    """More rows are queued than the batcher accepts; retry later."""


@dataclass(eq=False)
class _Pending(Generic[ReqT, ResT]):
    request: ReqT
    rows: int
    future: asyncio.Future[ResT]


class MicroBatcher(Generic[ReqT, ResT]):
    """Micro-batches `submit()` calls into `run_batch` calls of at most `max_batch` rows.

    `run_batch(requests)` runs on a worker thread (one per batch) and returns one result per request, in order.
    `request_rows(request)` (default: `rows(request)` if given, else 1) is the request's size in rows.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[ReqT]], Sequence[ResT]] | None = None,
        *,
        max_batch: int,
        max_wait_ms: float,
        rows: Callable[[ReqT], int] | None = None,
        on_batch: BatchCallback | None = None,
        name: str = "micro-batcher",
        label: str | None = None,
        thread_name_prefix: str | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        """`name` names the collector task (and by default the worker threads); `label` ("image batcher")
        is used in error messages and logs."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.name = name
        self.label = label or name
        self.batches = 0  # successful run_batch calls
        self.requests_served = 0  # requests in those batches
        self._run_batch_fn = run_batch
        self._rows_fn = rows
        self._thread_name_prefix = thread_name_prefix or f"{name}-worker"
        self._batch_numbers = itertools.count()
        self._log = logger or log
        self._queued_rows = 0  # rows submitted and not yet taken into a batch
        self._queue: asyncio.Queue[_Pending[ReqT, ResT] | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._abandon = False  # stop(drain=False): fail what is waiting instead of serving it

    # ---- hooks ---------------------------------------------------------------------------------

    def run_batch(self, requests: Sequence[ReqT]) -> Sequence[ResT]:
        """Worker thread: one result per request, in order. Raising fails every request of the batch."""
        if self._run_batch_fn is None:
            raise NotImplementedError("pass run_batch= or override run_batch()")
        return self._run_batch_fn(requests)

    def request_rows(self, request: ReqT) -> int:
        """Rows the request occupies in a batch (>= 1)."""
        return 1 if self._rows_fn is None else self._rows_fn(request)

    def _admit(self, request: ReqT, rows: int) -> None:
        """Called by submit() once the batcher is known to be running; raise to refuse the request."""

    def _batch_done(self, requests: Sequence[ReqT], results: Sequence[ResT]) -> None:
        """Event loop, after a successful batch and on_batch, before the futures get their results."""

    # ---- lifecycle -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._accepting and self._task is not None and not self._task.done()

    @property
    def queued_rows(self) -> int:
        """Rows submitted and not yet taken into a batch (cancelled requests included until dropped)."""
        return self._queued_rows

    async def start(self) -> None:
        """Start the collector task on the running event loop."""
        if self._task is not None:
            raise RuntimeError(f"{self.label} already started")
        self._queue = asyncio.Queue()
        self._accepting = True
        self._abandon = False
        self._task = asyncio.get_running_loop().create_task(self._collect_loop(), name=self.name)

    async def stop(self, *, drain: bool = True) -> None:
        """Stop accepting and release the worker once the collector has ended. With `drain` (the default)
        every request already queued is served first; without it, the requests still waiting fail with
        BatcherNotRunning (a batch already running still finishes)."""
        if self._task is None or self._queue is None:
            return
        self._accepting = False
        if not drain:
            self._abandon = True
            while not self._queue.empty():
                got = self._queue.get_nowait()
                if got is not None:
                    self._fail_waiting([got])
        self._queue.put_nowait(None)
        await self._task
        self._task = None

    # ---- requests ------------------------------------------------------------------------------

    def _not_running(self) -> BatcherNotRunning:
        return BatcherNotRunning(f"{self.label} is not running")

    async def submit(self, request: ReqT) -> ResT:
        """The request's result, once the batch it joined has run."""
        rows = self.request_rows(request)
        if rows < 1:
            raise ValueError(f"a request must occupy at least one row, got {rows}")
        if not self.running or self._queue is None:
            raise self._not_running()
        self._admit(request, rows)
        fut: asyncio.Future[ResT] = asyncio.get_running_loop().create_future()
        self._queued_rows += rows
        self._queue.put_nowait(_Pending(request, rows, fut))
        return await fut

    # ---- collector -----------------------------------------------------------------------------

    def _fail_waiting(self, items: Sequence[_Pending[ReqT, ResT]], *, queued: bool = True) -> None:
        """Fail the futures of requests that will not run; `queued`: their rows still count as queued."""
        for it in items:
            if queued:
                self._queued_rows -= it.rows
            if not it.future.done():
                it.future.set_exception(self._not_running())

    async def _collect_loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        carry: _Pending[ReqT, ResT] | None = None  # a request that did not fit the previous batch
        batch: list[_Pending[ReqT, ResT]] = []  # being collected: its rows still count as queued
        taken: list[_Pending[ReqT, ResT]] = []  # being run
        try:
            stopping = False  # the stop sentinel was seen: serve what is queued, then end
            while True:
                batch = []
                if carry is not None:
                    first, carry = carry, None
                else:
                    if stopping and queue.empty():
                        return
                    got = await queue.get()
                    if got is None:
                        stopping = True
                        continue
                    first = got
                if first.future.done():  # cancelled by its caller while queued
                    self._queued_rows -= first.rows
                    continue
                batch, total = [first], first.rows
                deadline = loop.time() + self.max_wait_s
                while total < self.max_batch:
                    try:
                        nxt = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        remaining = deadline - loop.time()
                        if remaining <= 0 or stopping:
                            break
                        try:
                            nxt = await asyncio.wait_for(queue.get(), remaining)
                        except TimeoutError:
                            break
                    if nxt is None:
                        stopping = True
                        continue
                    if nxt.future.done():
                        self._queued_rows -= nxt.rows
                        continue
                    if total + nxt.rows > self.max_batch:
                        carry = nxt
                        break
                    batch.append(nxt)
                    total += nxt.rows
                if self._abandon:  # stop(drain=False) came while this batch was being collected
                    self._fail_waiting(batch)
                    continue
                self._queued_rows -= total
                taken, batch = batch, []
                await self._run(taken)
                taken = []
        finally:  # normally nothing is left; if the collector died, no caller must wait forever
            self._fail_waiting(taken, queued=False)
            leftover = batch + ([carry] if carry is not None else [])
            while not queue.empty():
                got = queue.get_nowait()
                if got is not None:
                    leftover.append(got)
            self._fail_waiting(leftover)

    async def _run(self, batch: list[_Pending[ReqT, ResT]]) -> None:
        live = [it for it in batch if not it.future.done()]  # a caller that went away is not run
        if not live:
            return
        requests = [it.request for it in live]
        t0 = time.perf_counter()
        try:
            name = f"{self._thread_name_prefix}-{next(self._batch_numbers)}"
            results = await run_in_own_thread(self.run_batch, requests, name=name)
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} requests")
        except Exception as e:  # the batch failed: every request in it sees the error
            self._log.exception("%s: a batch of %d requests failed", self.label, len(live))
            for it in live:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        seconds = time.perf_counter() - t0
        self.batches += 1
        try:  # a failing observer must neither lose the results nor stop the collector
            if self.on_batch is not None:
                self.on_batch(sum(it.rows for it in live), len(live), seconds)
        except Exception:
            self._log.exception("%s: on_batch failed", self.label)
        self.requests_served += len(live)
        try:
            self._batch_done(requests, results)
        except Exception:
            self._log.exception("%s: a batch callback failed", self.label)
        for it, res in zip(live, results):
            if not it.future.done():
                it.future.set_result(res)
