"""GAN micro-batcher: concurrent image requests share one generator forward pass.

A collector task on the event loop takes the first queued request, then keeps taking requests
until the batch holds `max_batch` images or `max_wait_ms` has passed since the first one; the
forward runs on a single worker thread, and the output is split back per request.

Every forward is padded to exactly `max_batch` rows (when `pad_to_max_batch`): the kernels then
see one fixed shape, so a request's images are bit-identical whatever it was batched with (on
the CPU, convolutions at different batch sizes can differ in the last bit of float32).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from model_core.gan import Generator

log = logging.getLogger("service.engine.images")


class BatcherNotRunning(RuntimeError):
    """generate() was called before start() or after stop()."""


@dataclass(frozen=True)
class ImageRequest:
    """`latents` (n, z_dim) and `labels` (n,) int64; row i of each makes image i."""

    latents: Tensor
    labels: Tensor

    @property
    def n(self) -> int:
        return int(self.latents.shape[0])


@dataclass
class _Item:
    request: ImageRequest
    future: asyncio.Future[Tensor]


class ImageBatcher:
    """Micro-batches `generate()` calls into forward passes of at most `max_batch` images."""

    def __init__(
        self,
        generator: Generator,
        max_batch: int = 32,
        max_wait_ms: float = 10.0,
        *,
        pad_to_max_batch: bool = True,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.generator = generator.eval()
        self.config = generator.config
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.pad_to_max_batch = pad_to_max_batch
        self.on_batch = on_batch  # called (images, requests, seconds) after every forward pass
        param = next(generator.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.forward_passes = 0
        self.images_generated = 0
        self.requests_served = 0
        self._queue: asyncio.Queue[_Item | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._accepting = False

    # ---- lifecycle -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._accepting and self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the collector task on the running event loop and the forward worker thread."""
        if self._task is not None:
            raise RuntimeError("image batcher already started")
        self._queue = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gan-forward")
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(self._collect_loop(), name="gan-batcher")

    async def stop(self) -> None:
        """Stop accepting, finish every request already queued, then release the worker."""
        if self._task is None or self._queue is None:
            return
        self._accepting = False
        self._queue.put_nowait(None)
        await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._task = self._executor = None

    # ---- requests ------------------------------------------------------------------------------

    def _validate(self, req: ImageRequest) -> None:
        z, y, cfg = req.latents, req.labels, self.config
        if z.ndim != 2 or z.shape[1] != cfg.z_dim or z.shape[0] < 1:
            raise ValueError(f"latents must be (n >= 1, {cfg.z_dim}), got {tuple(z.shape)}")
        if y.shape != (z.shape[0],) or y.dtype != torch.long:
            raise ValueError(f"labels must be int64 of shape ({z.shape[0]},), got {y.dtype} {tuple(y.shape)}")
        if int(y.min()) < 0 or int(y.max()) >= cfg.num_classes:
            raise ValueError(f"labels must lie in [0, {cfg.num_classes})")

    async def generate(self, request: ImageRequest) -> Tensor:
        """Images (n, C, S, S) float32 in [-1, 1] on the CPU, in the request's row order."""
        self._validate(request)
        if not self.running or self._queue is None:
            raise BatcherNotRunning("image batcher is not running")
        fut: asyncio.Future[Tensor] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(request, fut))
        return await fut

    # ---- collector -----------------------------------------------------------------------------

    async def _collect_loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        carry: _Item | None = None  # a request that did not fit the previous batch
        stopping = False  # the stop sentinel was seen: serve what is queued, then end
        while True:
            if carry is not None:
                first, carry = carry, None
            else:
                if stopping and self._queue.empty():
                    return
                got = await self._queue.get()
                if got is None:
                    stopping = True
                    continue
                first = got
            if first.future.done():  # cancelled by its caller while queued
                continue
            batch, total = [first], first.request.n
            deadline = loop.time() + self.max_wait_s
            while total < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or stopping:
                        break
                    try:
                        nxt = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                if nxt is None:
                    stopping = True
                    continue
                if nxt.future.done():
                    continue
                if total + nxt.request.n > self.max_batch:
                    carry = nxt
                    break
                batch.append(nxt)
                total += nxt.request.n
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Item]) -> None:
        live = [it for it in batch if not it.future.done()]
        if not live:
            return
        z = torch.cat([it.request.latents for it in live])  # (N, z_dim)
        y = torch.cat([it.request.labels for it in live])  # (N,)
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            images = await loop.run_in_executor(self._executor, self._forward, z, y)
        except Exception as e:  # the model failed: every request in the batch sees it
            log.exception("GAN forward failed")
            for it in live:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        if self.on_batch is not None:
            self.on_batch(int(z.shape[0]), len(live), time.perf_counter() - t0)
        self.requests_served += len(live)
        start = 0
        for it in live:
            n = it.request.n
            if not it.future.done():
                it.future.set_result(images[start : start + n])
            start += n

    @torch.inference_mode()
    def _forward(self, z: Tensor, y: Tensor) -> Tensor:
        """Runs on the worker thread: chunks of max_batch, each padded to max_batch rows."""
        outs = []
        for s in range(0, z.shape[0], self.max_batch):
            zc, yc = z[s : s + self.max_batch], y[s : s + self.max_batch]  # (b, z_dim), (b,)
            b = zc.shape[0]
            if self.pad_to_max_batch and b < self.max_batch:
                zc = torch.cat([zc, zc.new_zeros(self.max_batch - b, zc.shape[1])])  # (max_batch, z_dim)
                yc = torch.cat([yc, yc.new_zeros(self.max_batch - b)])  # (max_batch,)
            out = self.generator(zc.to(self.device, self.dtype), yc.to(self.device))  # (B, C, S, S)
            outs.append(out[:b].float().cpu())
            self.forward_passes += 1
        self.images_generated += int(z.shape[0])
        return torch.cat(outs)  # (N, C, S, S)
