"""Run torch work that is not the LM engine's on a thread of its own, which ends when the work does.

PyTorch's OpenMP runtime on Linux (libgomp) gives every thread that starts a parallel region a team of worker
threads, kept for as long as that thread lives. Once the threads of the live teams outnumber the cores, libgomp
stops spinning at its barriers and sleeps in the kernel instead, and the LM engine's decode step (hundreds of
short parallel regions) becomes several times slower: measured on a 2-core VM, 6 ms per token alone and 23 ms
while one other thread that had run a parallel region was still alive (a model loaded on the event loop, a
batcher's worker thread), whatever OMP_WAIT_POLICY or GOMP_SPINCOUNT say. A thread that exits takes its team
with it, so the GAN's and the G2P model's loading and batches each run on a thread that ends with them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def run_in_own_thread(fn: Callable[..., T], *args: object, name: str) -> T:
    """fn(*args) on a new thread named `name`, awaited; the thread ends when fn returns. Cancelling the await
    does not stop fn (nothing can): its result is then dropped."""
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def target() -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            done.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            done.set_exception(e)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await asyncio.wrap_future(done)
