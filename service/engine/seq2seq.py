"""Micro-batcher for the encoder-decoder (grapheme-to-phoneme) model.

A collector task on the event loop takes the first queued request, then keeps taking requests until
the batch holds `max_batch` decoder rows or `max_wait_ms` has passed since the first (by default 0: the
batch takes what is queued, and requests that arrive while it runs form the next one). The batch runs on
one worker thread: all greedy and sampled rows together (one encoder pass, then one decoder step per
phone for the rows still running, each row's self-attention K/V cached and its cross-attention K/V
computed once), and beam-search requests grouped by width (one encoder pass per group). Phones are
reported as they are decoded (`on_event`, called on the event loop), so responses can stream.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model_core.g2p import G2P, Hypothesis
from model_core.sampling import SamplingParams, make_generator

log = logging.getLogger("service.engine.seq2seq")


class BatcherNotRunning(RuntimeError):
    """transcribe() was called before start() or after stop()."""


class BatcherFull(RuntimeError):
    """More rows are queued than the batcher accepts; retry later."""


@dataclass(frozen=True)
class Seq2SeqRequest:
    """Normalised words, each transcribed `n` times: by beam search when beam_width > 1 (the n best of
    beam_width beams), else by sampling with `params` (temperature 0: greedy). Choice c of word w has
    index w * n + c; a sampled choice with a seed draws from seed + that index."""

    words: tuple[str, ...]
    n: int = 1
    beam_width: int = 1
    params: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=48, temperature=0.0))
    length_penalty: float = 0.0

    @property
    def rows(self) -> int:
        """Decoder rows the request occupies."""
        return len(self.words) * (self.beam_width if self.beam_width > 1 else self.n)


@dataclass(frozen=True)
class PhoneEvent:
    """Choice `index` emitted `phone`, or (phone None) finished with `finish_reason` 'stop' or 'length'."""

    index: int
    phone: str | None = None
    finish_reason: str | None = None


EventSink = Callable[[PhoneEvent], None]


@dataclass
class _Item:
    request: Seq2SeqRequest
    future: asyncio.Future[list[Hypothesis]]
    on_event: EventSink | None
    arrived: float


class Seq2SeqBatcher:
    """Micro-batches `transcribe()` calls into shared encoder and decoder passes."""

    def __init__(
        self,
        g2p: G2P,
        max_batch: int = 64,
        max_wait_ms: float = 0.0,
        max_queued_rows: int = 4096,
        *,
        on_batch: Callable[[int, int, float], None] | None = None,
        on_finish: Callable[[Seq2SeqRequest, list[Hypothesis], float], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.g2p = g2p
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queued_rows = max_queued_rows
        self.on_batch = on_batch  # (rows, requests, seconds) after every batch
        self.on_finish = on_finish  # (request, choices, seconds since arrival) per finished request
        self.batches = 0
        self.words_served = 0
        self.requests_served = 0
        self._queued_rows = 0
        self._queue: asyncio.Queue[_Item | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._accepting = False

    # ---- lifecycle -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._accepting and self._task is not None and not self._task.done()

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("seq2seq batcher already started")
        self._queue = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="seq2seq-decode")
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(self._collect_loop(), name="seq2seq-batcher")

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

    async def transcribe(self, request: Seq2SeqRequest, on_event: EventSink | None = None) -> list[Hypothesis]:
        """The request's choices (len(words) * n, index w * n + c), best first within a word for beams.
        on_event(PhoneEvent) is called on the event loop for every phone and every finished choice."""
        if not request.words:
            raise ValueError("a request needs at least one word")
        if request.n < 1 or request.beam_width < 1 or (request.beam_width > 1 and request.n > request.beam_width):
            raise ValueError(
                f"need n >= 1 and, with beams, n <= beam_width (n={request.n}, beam_width={request.beam_width})"
            )
        if not self.running or self._queue is None:
            raise BatcherNotRunning("the seq2seq batcher is not running")
        if self._queued_rows + request.rows > self.max_queued_rows and self._queued_rows > 0:
            raise BatcherFull(f"{self._queued_rows} decoder rows are queued; the server accepts {self.max_queued_rows}")
        fut: asyncio.Future[list[Hypothesis]] = asyncio.get_running_loop().create_future()
        self._queued_rows += request.rows
        self._queue.put_nowait(_Item(request, fut, on_event, time.perf_counter()))
        return await fut

    # ---- collector -----------------------------------------------------------------------------

    async def _collect_loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        carry: _Item | None = None
        stopping = False
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
            batch, total = [first], first.request.rows
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
                if total + nxt.request.rows > self.max_batch:
                    carry = nxt
                    break
                batch.append(nxt)
                total += nxt.request.rows
            self._queued_rows -= total
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Item]) -> None:
        live = [it for it in batch if not it.future.done()]  # a caller that went away is not decoded
        if not live:
            return
        loop = asyncio.get_running_loop()

        def emit(item: _Item, ev: PhoneEvent) -> None:  # worker thread -> event loop
            if item.on_event is not None:
                loop.call_soon_threadsafe(item.on_event, ev)

        t0 = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self._decode, live, emit)
        except Exception as e:  # the model failed: every request in the batch sees it
            log.exception("seq2seq decoding failed")
            for it in live:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        seconds = time.perf_counter() - t0
        self.batches += 1
        rows = sum(it.request.rows for it in live)
        if self.on_batch is not None:
            self.on_batch(rows, len(live), seconds)
        now = time.perf_counter()
        for it, res in zip(live, results):
            self.requests_served += 1
            self.words_served += len(it.request.words)
            if self.on_finish is not None:
                self.on_finish(it.request, res, now - it.arrived)
            if not it.future.done():
                it.future.set_result(res)

    @torch.inference_mode()
    def _decode(self, items: list[_Item], emit: Callable[[_Item, PhoneEvent], None]) -> list[list[Hypothesis]]:
        """Worker thread: one decode call for the greedy/sampled rows, one beam search per beam width."""
        results: list[list[Hypothesis]] = [[] for _ in items]
        # greedy and sampled rows: row r belongs to (item, choice index)
        owners: list[tuple[int, int]] = []
        words: list[str] = []
        params: list[SamplingParams] = []
        gens: list[torch.Generator | None] = []
        for k, it in enumerate(items):
            rq = it.request
            if rq.beam_width > 1:
                continue
            results[k] = [Hypothesis([]) for _ in range(len(rq.words) * rq.n)]
            for w, word in enumerate(rq.words):
                for c in range(rq.n):
                    idx = w * rq.n + c
                    owners.append((k, idx))
                    words.append(word)
                    params.append(rq.params)
                    gens.append(
                        None
                        if rq.params.greedy
                        else make_generator(None if rq.params.seed is None else rq.params.seed + idx)
                    )
        if words:

            def on_step(rows: list[int], phones: list[str]) -> None:
                for r, ph in zip(rows, phones):
                    k, idx = owners[r]
                    emit(items[k], PhoneEvent(idx, ph))

            for r, hyp in enumerate(self.g2p.decode(words, params, gens, on_step=on_step)):
                k, idx = owners[r]
                results[k][idx] = hyp
                emit(items[k], PhoneEvent(idx, finish_reason="stop" if hyp.finished else "length"))
        groups: dict[tuple[int, float, int], list[int]] = {}
        for k, it in enumerate(items):
            rq = it.request
            if rq.beam_width > 1:
                groups.setdefault((rq.beam_width, rq.length_penalty, rq.params.max_tokens), []).append(k)
        for (width, alpha, max_phones), ks in groups.items():
            all_words = [w for k in ks for w in items[k].request.words]
            nbest = self.g2p.beam_search(all_words, width=width, n=width, length_penalty=alpha, max_phones=max_phones)
            start = 0
            for k in ks:
                rq = items[k].request
                for w in range(len(rq.words)):
                    best = nbest[start + w]
                    for c in range(rq.n):  # (fewer ends than n only if decoding hit max_phones: repeat the last)
                        hyp = best[min(c, len(best) - 1)]
                        results[k].append(hyp)
                        idx = w * rq.n + c
                        for ph in hyp.phones:
                            emit(items[k], PhoneEvent(idx, ph))
                        emit(items[k], PhoneEvent(idx, finish_reason="stop" if hyp.finished else "length"))
                start += len(rq.words)
        return results
