"""The generic micro-batcher, driven by fake run_batch callables: batching by rows, the max-wait flush,
failures confined to their batch, stop (draining or not), cancellation, lifecycle."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from service.engine.micro_batcher import BatcherFull, BatcherNotRunning, MicroBatcher

T = TypeVar("T")
GUARD_S = 30.0  # generous: a broken batcher fails the test instead of hanging it


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(coro, GUARD_S)

    return asyncio.run(guarded())


@dataclass(frozen=True)
class Req:
    name: str
    rows: int = 1


class Recorder:
    """A fake run_batch: records each batch (request names) and the thread it ran on; answers name.upper().
    With `gate`, every call first waits for the gate (set from the test); `started` is set on each call."""

    def __init__(self, gate: threading.Event | None = None, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.threads: list[str] = []
        self.gate = gate
        self.fail_on = fail_on
        self.started = threading.Event()

    def __call__(self, requests: Sequence[Req]) -> list[str]:
        self.batches.append([r.name for r in requests])
        self.threads.append(threading.current_thread().name)
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(GUARD_S)
        if self.fail_on is not None and any(r.name == self.fail_on for r in requests):
            raise RuntimeError(f"boom on {self.fail_on}")
        return [r.name.upper() for r in requests]


def make(fn: Recorder, max_batch: int, max_wait_ms: float, **kw: Any) -> MicroBatcher[Req, str]:
    return MicroBatcher(fn, max_batch=max_batch, max_wait_ms=max_wait_ms, rows=lambda r: r.rows, **kw)


async def wait_started(rec: Recorder) -> None:
    assert await asyncio.to_thread(rec.started.wait, GUARD_S)


# ------------------------------------------------------------------------------------------ batching
def test_batches_fill_up_to_max_rows_in_order_off_the_loop() -> None:
    rec = Recorder()
    sizes: list[tuple[int, int]] = []
    rows = [1, 2, 1, 3, 1, 2, 2]  # 4 | 3 + 1 | 2 + 2: every batch full, none waits out max_wait
    reqs = [Req(f"r{i}", n) for i, n in enumerate(rows)]

    async def main() -> list[str]:
        b = make(rec, 4, 60_000, on_batch=lambda r, n, s: sizes.append((r, n)), name="fake", thread_name_prefix="fk")
        await b.start()
        try:
            out = await asyncio.gather(*(b.submit(r) for r in reqs))
            assert b.queued_rows == 0 and b.batches == 3 and b.requests_served == len(reqs)
            return list(out)
        finally:
            await b.stop()

    assert run(main()) == [r.name.upper() for r in reqs]
    assert rec.batches == [["r0", "r1", "r2"], ["r3", "r4"], ["r5", "r6"]]
    assert sizes == [(4, 3), (4, 2), (4, 2)]  # (rows, requests)
    assert all(t.startswith("fk") for t in rec.threads)


def test_a_request_that_does_not_fit_opens_the_next_batch_and_a_big_one_runs_alone() -> None:
    rec = Recorder()
    reqs = [Req("a"), Req("big", 6), Req("b"), Req("c")]

    async def main() -> list[str]:
        b = make(rec, 4, 0)
        await b.start()
        try:
            return list(await asyncio.gather(*(b.submit(r) for r in reqs)))
        finally:
            await b.stop()

    assert run(main()) == ["A", "BIG", "B", "C"]
    assert rec.batches == [["a"], ["big"], ["b", "c"]]


def test_partial_batch_flushes_after_max_wait() -> None:
    rec = Recorder()

    async def main() -> float:
        b = make(rec, 100, 100)
        await b.start()
        try:
            t0 = time.monotonic()
            assert await b.submit(Req("x")) == "X"
            return time.monotonic() - t0
        finally:
            await b.stop()

    elapsed = run(main())
    assert rec.batches == [["x"]]
    assert 0.05 <= elapsed < GUARD_S  # waited for company (about 0.1 s), then ran alone


def test_requests_arriving_within_max_wait_share_a_batch() -> None:
    rec = Recorder()

    async def main() -> list[str]:
        b = make(rec, 2, 10_000)
        await b.start()
        try:
            first = asyncio.create_task(b.submit(Req("a")))
            await asyncio.sleep(0.02)  # the collector holds "a" and waits for more
            second = await b.submit(Req("b"))  # fills the batch: it runs at once
            return [await first, second]
        finally:
            await b.stop()

    assert run(main()) == ["A", "B"]
    assert rec.batches == [["a", "b"]]


# ------------------------------------------------------------------------------------------ failures
def test_failing_batch_fails_only_its_requests_and_the_loop_continues() -> None:
    rec = Recorder(fail_on="bad")
    sizes: list[int] = []

    async def main() -> tuple[list[object], str, MicroBatcher[Req, str]]:
        b = make(rec, 2, 10_000, on_batch=lambda r, n, s: sizes.append(n))
        await b.start()
        try:
            res = await asyncio.gather(*(b.submit(Req(n)) for n in ("a", "bad", "c", "d")), return_exceptions=True)
            after = await b.submit(Req("e", 2))
            assert b.running
            return list(res), after, b
        finally:
            await b.stop()

    res, after, b = run(main())
    assert [type(r) for r in res[:2]] == [RuntimeError, RuntimeError] and str(res[0]) == "boom on bad"
    assert res[2:] == ["C", "D"] and after == "E"
    assert rec.batches == [["a", "bad"], ["c", "d"], ["e"]]
    assert sizes == [2, 1]  # on_batch and the counters see successful batches only
    assert b.batches == 2 and b.requests_served == 3


def test_wrong_number_of_results_fails_the_batch() -> None:
    async def main() -> None:
        b: MicroBatcher[int, int] = MicroBatcher(lambda reqs: [0], max_batch=2, max_wait_ms=50)
        await b.start()
        try:
            res = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
            assert all(isinstance(r, RuntimeError) and "2 requests" in str(r) for r in res)
            assert await b.submit(3) == 0  # a batch of one
        finally:
            await b.stop()

    run(main())


def test_failing_on_batch_callback_does_not_lose_results() -> None:
    def on_batch(rows: int, requests: int, seconds: float) -> None:
        raise ValueError("observer bug")

    async def main() -> None:
        b = make(Recorder(), 1, 0, on_batch=on_batch)
        await b.start()
        try:
            assert await b.submit(Req("a")) == "A"
            assert await b.submit(Req("b")) == "B"
            assert b.running
        finally:
            await b.stop()

    run(main())


# ------------------------------------------------------------------------------------------ stop
def test_stop_drains_queued_requests_without_waiting_then_refuses() -> None:
    rec = Recorder()

    async def main() -> list[str]:
        b = make(rec, 2, 60_000)
        await b.start()
        tasks = [asyncio.create_task(b.submit(Req(f"r{i}"))) for i in range(5)]
        await asyncio.sleep(0)
        await b.stop()  # serves all five, and does not wait out max_wait for the last one
        assert not b.running and b.queued_rows == 0
        with pytest.raises(BatcherNotRunning, match="is not running"):
            await b.submit(Req("late"))
        return [t.result() for t in tasks]

    assert run(main()) == ["R0", "R1", "R2", "R3", "R4"]
    assert rec.batches == [["r0", "r1"], ["r2", "r3"], ["r4"]]


def test_stop_without_drain_fails_waiting_requests_and_lets_the_running_batch_finish() -> None:
    gate = threading.Event()
    rec = Recorder(gate)

    async def main() -> list[object]:
        b = make(rec, 1, 0)
        await b.start()
        tasks = [asyncio.create_task(b.submit(Req(n))) for n in ("a", "b", "c")]
        await wait_started(rec)  # "a" is running, "b" and "c" wait in the queue
        stopping = asyncio.create_task(b.stop(drain=False))
        await asyncio.sleep(0)
        assert not b.running
        gate.set()
        await stopping
        assert b.queued_rows == 0
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    res = run(main())
    assert res[0] == "A"
    assert all(isinstance(r, BatcherNotRunning) for r in res[1:])
    assert rec.batches == [["a"]]


def test_stop_without_drain_fails_a_batch_still_being_collected() -> None:
    rec = Recorder()

    async def main() -> None:
        b = make(rec, 10, 60_000)
        await b.start()
        task = asyncio.create_task(b.submit(Req("a")))
        await asyncio.sleep(0.01)  # the collector holds "a", waiting for company
        await b.stop(drain=False)
        with pytest.raises(BatcherNotRunning):
            await task

    run(main())
    assert rec.batches == []


# ------------------------------------------------------------------------------------------ cancellation
def test_cancelled_waiting_request_is_dropped() -> None:
    rec = Recorder()

    async def main() -> tuple[str, bool, int]:
        b = make(rec, 4, 100)
        await b.start()
        try:
            t1 = asyncio.create_task(b.submit(Req("a", 2)))
            t2 = asyncio.create_task(b.submit(Req("b", 2)))
            await asyncio.sleep(0)  # both queued, the collector waits for more
            t1.cancel()
            out = await t2
            return out, t1.cancelled(), b.queued_rows
        finally:
            await b.stop()

    out, cancelled, queued = run(main())
    assert out == "B" and cancelled and queued == 0
    assert rec.batches == [["b"]]


def test_cancelled_request_frees_its_rows_for_the_batch() -> None:
    gate = threading.Event()
    rec = Recorder(gate)

    async def main() -> list[str]:
        b = make(rec, 2, 10_000)
        await b.start()
        try:
            first = asyncio.create_task(b.submit(Req("first", 2)))
            await wait_started(rec)  # the worker is busy: the next ones queue up
            gone = asyncio.create_task(b.submit(Req("gone", 2)))
            rest = [asyncio.create_task(b.submit(Req(n))) for n in ("x", "y")]
            await asyncio.sleep(0)
            assert b.queued_rows == 4
            gone.cancel()
            gate.set()
            return [await first, *(await asyncio.gather(*rest))]
        finally:
            await b.stop()

    assert run(main()) == ["FIRST", "X", "Y"]
    assert rec.batches == [["first"], ["x", "y"]]


def test_request_cancelled_while_its_batch_runs_does_not_break_the_batch() -> None:
    gate = threading.Event()
    rec = Recorder(gate)

    async def main() -> tuple[str, str]:
        b = make(rec, 2, 50)
        await b.start()
        try:
            t1 = asyncio.create_task(b.submit(Req("a")))
            t2 = asyncio.create_task(b.submit(Req("b")))  # queued with "a": the two fill one batch
            await wait_started(rec)
            t1.cancel()
            gate.set()
            return await t2, await b.submit(Req("c"))
        finally:
            await b.stop()

    assert run(main()) == ("B", "C")
    assert rec.batches == [["a", "b"], ["c"]]


# ------------------------------------------------------------------------------------------ lifecycle
def test_lifecycle_admission_and_arguments() -> None:
    class Limited(MicroBatcher[Req, str]):
        def request_rows(self, request: Req) -> int:
            return request.rows

        def _admit(self, request: Req, rows: int) -> None:
            if self.queued_rows + rows > 3:
                raise BatcherFull("full")

        def run_batch(self, requests: Sequence[Req]) -> list[str]:
            return [r.name for r in requests]

    async def main() -> None:
        b = Limited(max_batch=8, max_wait_ms=10_000, label="the test batcher")
        assert not b.running
        with pytest.raises(BatcherNotRunning, match="the test batcher is not running"):
            await b.submit(Req("early"))
        await b.start()
        with pytest.raises(RuntimeError, match="already started"):
            await b.start()
        assert b.running
        held = asyncio.create_task(b.submit(Req("a", 3)))
        await asyncio.sleep(0)
        with pytest.raises(BatcherFull):
            await b.submit(Req("b"))
        with pytest.raises(ValueError, match="at least one row"):
            await b.submit(Req("empty", 0))
        await b.stop()
        assert await held == "a"
        await b.stop()  # idempotent
        await b.start()  # and restartable
        again = asyncio.create_task(b.submit(Req("c", 3)))
        await asyncio.sleep(0)
        await b.stop()
        assert await again == "c"

    run(main())
    for bad in ({"max_batch": 0, "max_wait_ms": 0.0}, {"max_batch": 1, "max_wait_ms": -1.0}):
        with pytest.raises(ValueError):
            MicroBatcher(Recorder(), **bad)


def test_without_run_batch_the_batch_fails_with_not_implemented() -> None:
    async def main() -> None:
        b: MicroBatcher[int, int] = MicroBatcher(max_batch=1, max_wait_ms=0)
        await b.start()
        try:
            with pytest.raises(NotImplementedError):
                await b.submit(1)
        finally:
            await b.stop()

    run(main())


def test_each_batch_runs_on_a_thread_that_ends_with_it_one_batch_at_a_time() -> None:
    """A worker thread kept alive would keep the OpenMP team of its torch work, which throttles the LM engine's
    (service.engine.own_thread): every batch gets a fresh thread, gone once the batch is, and batches never
    overlap."""
    seen: list[threading.Thread] = []
    running = threading.Lock()
    overlaps = 0

    def run_batch(requests: Sequence[Req]) -> list[str]:
        nonlocal overlaps
        if not running.acquire(blocking=False):
            overlaps += 1
            running.acquire()
        try:
            seen.append(threading.current_thread())
            time.sleep(0.01)
            return [r.name for r in requests]
        finally:
            running.release()

    async def main() -> list[str]:
        b = MicroBatcher(run_batch, max_batch=2, max_wait_ms=0, name="probe")
        await b.start()
        out = await asyncio.gather(*(b.submit(Req(f"r{i}")) for i in range(9)))
        await b.stop()
        return list(out)

    assert run(main()) == [f"r{i}" for i in range(9)]
    assert len(seen) >= 5 and len({id(t) for t in seen}) == len(seen)  # 9 requests, 2 per batch: a thread each
    assert all(t is not threading.main_thread() and t.name.startswith("probe") for t in seen)
    for t in seen:
        t.join(GUARD_S)
        assert not t.is_alive()
    assert overlaps == 0
