"""Micro-batcher for the encoder-decoder (grapheme-to-phoneme) model.

A collector task on the event loop (`service.engine.micro_batcher.MicroBatcher`) takes the first queued
request, then keeps taking requests until the batch holds `max_batch` decoder rows or `max_wait_ms` has
passed since the first (by default 0: the batch takes what is queued, and requests that arrive while it
runs form the next one); a request of more than `max_batch` rows runs alone. The batch runs on
one worker thread: all greedy and sampled rows together (one encoder pass, then one decoder step per
phone for the rows still running, each row's self-attention K/V cached and its cross-attention K/V
computed once), and beam-search requests grouped by width (one encoder pass per group). Phones are
reported as they are decoded (`on_event`, called on the event loop), so responses can stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from model_core.g2p import G2P, Hypothesis
from model_core.sampling import SamplingParams, make_generator
from service.engine.micro_batcher import BatcherFull, BatcherNotRunning, MicroBatcher

__all__ = ["BatcherFull", "BatcherNotRunning", "EventSink", "PhoneEvent", "Seq2SeqBatcher", "Seq2SeqRequest"]

log = logging.getLogger("service.engine.seq2seq")


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


def _on_loop(loop: asyncio.AbstractEventLoop, sink: EventSink) -> EventSink:
    """A sink callable from the worker thread that calls `sink` on `loop`."""

    def emit(ev: PhoneEvent) -> None:
        loop.call_soon_threadsafe(sink, ev)

    return emit


@dataclass(frozen=True, eq=False)
class _Job:
    request: Seq2SeqRequest
    emit: EventSink | None  # thread-safe: hands the event to the caller's on_event on the event loop
    arrived: float


class Seq2SeqBatcher(MicroBatcher[_Job, list[Hypothesis]]):
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
        super().__init__(
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            on_batch=on_batch,  # (rows, requests, seconds) after every batch
            name="seq2seq-batcher",
            label="the seq2seq batcher",
            thread_name_prefix="seq2seq-decode",
            logger=log,
        )
        self.g2p = g2p
        self.max_queued_rows = max_queued_rows
        self.on_finish = on_finish  # (request, choices, seconds since arrival) per finished request
        self.words_served = 0

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
        emit = None if on_event is None else _on_loop(asyncio.get_running_loop(), on_event)
        return await self.submit(_Job(request, emit, time.perf_counter()))

    def request_rows(self, request: _Job) -> int:
        return request.request.rows

    def _admit(self, request: _Job, rows: int) -> None:
        queued = self.queued_rows
        if queued + rows > self.max_queued_rows and queued > 0:
            raise BatcherFull(f"{queued} decoder rows are queued; the server accepts {self.max_queued_rows}")

    def _batch_done(self, requests: Sequence[_Job], results: Sequence[list[Hypothesis]]) -> None:
        now = time.perf_counter()
        for job, res in zip(requests, results):
            self.words_served += len(job.request.words)
            if self.on_finish is not None:
                self.on_finish(job.request, res, now - job.arrived)

    # ---- worker thread -------------------------------------------------------------------------

    @torch.inference_mode()
    def run_batch(self, requests: Sequence[_Job]) -> list[list[Hypothesis]]:
        """One decode call for the greedy/sampled rows, one beam search per beam width."""
        items = requests

        def emit(item: _Job, ev: PhoneEvent) -> None:
            if item.emit is not None:
                item.emit(ev)

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
