"""The LLM engine: a step loop on its own thread, in front of the scheduler and the model runner.

`generate()` returns an async iterator of `TokenEvent`s for one request; `abort()` frees the
request's KV blocks before the next step; `check_health()` says whether the loop is alive.
Each step reads as schedule -> run -> update, then events go to the waiting asyncio queues.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from model_core.grammar import CompiledGrammar, GrammarMatcher
from model_core.sampling import SamplingParams, TokenScore, make_generator
from model_core.stopping import OutputStream
from model_core.tokenizer import Tokenizer
from service.engine.admission import Admission, AdmissionControl
from service.engine.runner import ModelRunner, SampleResult
from service.engine.scheduler import FinishReason, Scheduler
from service.engine.scheduler import Sequence as Seq

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    block_size: int = 16
    num_blocks: int = 2048
    max_model_len: int = 8192
    max_waiting: int = 256
    request_timeout_s: float | None = None  # default total time limit of a request
    queue_timeout_s: float | None = None  # how long a request may wait before its first schedule
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes computed before
    cache_salt: str = ""  # what besides the tokens determines the KV (the model), mixed into block hashes


class EngineDeadError(RuntimeError):
    pass


class EngineObserver(Protocol):
    """Receives per-request timings from the engine thread (metrics)."""

    def on_first_token(self, queue_time: float, ttft: float, prompt_tokens: int) -> None: ...
    def on_token(self, itl: float) -> None: ...
    def on_finish(self, reason: str, e2e: float) -> None: ...


@dataclass
class TokenEvent:
    token_id: int | None
    text: str
    finish_reason: str | None = None  # stop | length | abort | error
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    error: str | None = None
    error_code: str | None = None  # timeout | queue_timeout | internal_error | engine_dead | invalid_request
    # on the request's first event, when params.prompt_logprobs is set: per prompt position i, how the model
    # scored prompt token i given the tokens before it (index 0 is None: nothing precedes it)
    prompt_logprobs: list[TokenScore | None] | None = None


@dataclass
class RequestState:
    params: SamplingParams
    generator: torch.Generator
    stream: OutputStream
    queue: asyncio.Queue[TokenEvent]
    loop: asyncio.AbstractEventLoop
    arrival: float
    first_token_time: float | None = None
    last_token_time: float = 0.0
    deadline: float | None = None  # monotonic time after which the request is ended with a timeout
    queue_deadline: float | None = None  # monotonic time by which it must have been scheduled
    matcher: GrammarMatcher | None = None  # constrained decoding: this request's grammar state
    prompt_logprobs: list[TokenScore | None] | None = None  # filled by the runner during the prefill


@dataclass
class EngineStats:
    steps: int = 0
    decode_rows: int = 0
    decode_steps: int = 0
    max_decode_batch: int = 0

    @property
    def mean_decode_batch(self) -> float:
        return self.decode_rows / self.decode_steps if self.decode_steps else 0.0


class LLMEngine:
    def __init__(
        self, runner: ModelRunner, tokenizer: Tokenizer, config: EngineConfig, observer: EngineObserver | None = None
    ) -> None:
        self.runner = runner
        self.observer = observer
        self.tokenizer = tokenizer
        self.config = config
        self.scheduler = Scheduler(
            num_blocks=config.num_blocks,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
            cache_salt=config.cache_salt,
        )
        self.eos_token_ids = tuple(tokenizer.eos_token_ids)
        self.stats = EngineStats()
        self._inbox: collections.deque[Seq] = collections.deque()
        self._aborts: collections.deque[str] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # guards the scheduler between the loop and readers
        self._inbox_lock = threading.Lock()  # orders new requests against the loop's final _fail_all
        self._closed = False  # set once the loop has exited: nothing new is accepted after that
        self._stop_message = "the engine was stopped"
        self.admission = AdmissionControl(config.max_num_seqs, config.max_waiting)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0, message: str | None = None) -> None:
        """Stop the loop after its current step; requests still in flight end with an error event
        carrying `message`. Returns once the thread has exited (or after `timeout`)."""
        if message is not None:
            self._stop_message = message
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def check_health(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine loop died: {self._error!r}")
        if self._thread is None or not self._thread.is_alive():
            raise EngineDeadError("engine loop is not running")

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def is_alive(self) -> bool:
        return self._error is None and self._thread is not None and self._thread.is_alive()

    # ---- requests --------------------------------------------------------------------------
    def num_pending(self) -> int:
        return len(self._inbox) + self.scheduler.num_waiting

    def admit(self, n: int = 1) -> Admission:
        """Reserve room for n requests (each then passed to `generate`), atomically with the check; raise
        EngineOverloadedError when they would overflow the queue, EngineDeadError when the loop is down."""
        self.check_health()
        return self.admission.admit(n)

    def state(self) -> dict[str, float]:
        return {
            "aigc_num_requests_running": float(self.scheduler.num_running),
            "aigc_num_requests_waiting": float(self.admission.waiting),
            "aigc_kv_cache_usage_ratio": float(self.scheduler.kv_usage),
            "aigc_prefix_cache_queries": float(self.scheduler.prefix_cache_queries),
            "aigc_prefix_cache_hits": float(self.scheduler.prefix_cache_hits),
        }

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix block; returns how many were forgotten. Safe at any time: blocks in
        use stay with their sequences (the scheduler lock only waits out a schedule or an update)."""
        with self._lock:
            return self.scheduler.reset_prefix_cache()

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        timeout_s: float | None = None,
        admission: Admission | None = None,
        grammar: CompiledGrammar | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """Stream events for one request. Closing the iterator early aborts the request.
        timeout_s caps this request's total time (never above the engine's request_timeout_s).
        admission: the ticket from `admit()` this request takes its place from; without one the request
        is counted but not limited (direct use).
        grammar: constrain the output to it (a per-request matcher masks each step's logits); EOS then
        ends the request whenever the grammar allows it (ignore_eos does not apply), and the request
        ends with "stop" as soon as the grammar is complete (even before min_tokens).
        params.max_tokens == 0 scores the prompt only: one event, finish_reason "length", no token (set
        params.prompt_logprobs to get the scores)."""
        if admission is not None:
            admission.take()
        else:
            self.admission.enter()
        try:
            async with contextlib.aclosing(
                self._generate(prompt_ids, params, request_id, timeout_s, grammar)
            ) as events:
                async for ev in events:
                    yield ev
        finally:
            self.admission.leave()

    async def _generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None,
        timeout_s: float | None,
        grammar: CompiledGrammar | None = None,
    ) -> AsyncGenerator[TokenEvent, None]:
        self.check_health()
        rid = request_id or uuid.uuid4().hex
        prompt = list(prompt_ids)
        max_new = min(params.max_tokens, self.config.max_model_len - len(prompt))
        if not prompt:
            raise ValueError("prompt is empty")
        if max_new < 1 and not (params.max_tokens == 0 and len(prompt) <= self.config.max_model_len):
            raise ValueError(f"prompt has {len(prompt)} tokens; the context length is {self.config.max_model_len}")
        if grammar is not None and grammar.vocab_size != self.runner.model.cfg.vocab_size:
            raise ValueError(
                f"grammar compiled for {grammar.vocab_size} logits; the model has {self.runner.model.cfg.vocab_size}"
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        eos = () if params.ignore_eos else self.eos_token_ids
        state = RequestState(
            params=params,
            generator=make_generator(params.seed, self.runner.device),
            stream=OutputStream(
                max_new, params.stop, tuple(params.stop_token_ids) + eos, self.tokenizer.incremental_decoder()
            ),
            queue=queue,
            loop=loop,
            arrival=time.monotonic(),
            matcher=grammar.matcher() if grammar is not None else None,
            prompt_logprobs=[None] * len(prompt) if params.prompt_logprobs is not None else None,
        )
        limits = [t for t in (timeout_s, self.config.request_timeout_s) if t is not None]
        if limits:
            state.deadline = state.arrival + min(limits)
        if self.config.queue_timeout_s is not None:
            state.queue_deadline = state.arrival + self.config.queue_timeout_s
        seq = Seq(
            request_id=rid,
            prompt_ids=prompt,
            max_tokens=max_new,
            arrival_time=state.arrival,
            data=state,
            lookup_prefix=params.prompt_logprobs is None,
        )  # scoring computes every prompt position
        with self._inbox_lock:  # a request added after the loop exited would never get an event
            if self._closed:
                raise EngineDeadError("engine loop is not running")
            self._inbox.append(seq)
        self._wake.set()
        finished = False
        try:
            while True:
                ev = await queue.get()
                if ev.finish_reason is not None:
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)
        self._wake.set()

    # ---- the loop --------------------------------------------------------------------------
    def _emit(self, seq: Seq, ev: TokenEvent) -> None:
        st: RequestState = seq.data
        ev.prompt_tokens = len(seq.prompt_ids)
        ev.completion_tokens = len(seq.output_ids)
        ev.cached_tokens = seq.num_cached_tokens
        st.loop.call_soon_threadsafe(st.queue.put_nowait, ev)

    def _drain_inputs(self) -> None:
        while self._inbox:
            new = self._inbox.popleft()
            try:
                self.scheduler.add(new)
            except ValueError as e:
                self._emit(new, TokenEvent(None, "", "error", error=str(e), error_code="invalid_request"))
        while self._aborts:
            rid = self._aborts.popleft()
            with self._lock:
                seq = self.scheduler.abort(rid)
            if seq is not None and self.observer is not None:
                self.observer.on_finish("abort", time.monotonic() - seq.arrival_time)

    def step(self) -> int:
        """One engine step (schedule -> run -> update); returns the number of sequences that got a token."""
        self._expire()
        with self._lock:
            out = self.scheduler.schedule()
        if not out.decodes and not out.prefills:
            return 0
        try:
            results = self.runner.execute(out)
        except Exception as e:  # a failed forward ends the requests in it, not the loop
            log.exception("model step failed")
            for chunk in [*out.decodes, *out.prefills]:
                self._fail(chunk.seq, f"model step failed: {e}", "internal_error")
            return 0
        self.stats.steps += 1
        if out.decodes:
            self.stats.decode_steps += 1
            self.stats.decode_rows += len(out.decodes)
            self.stats.max_decode_batch = max(self.stats.max_decode_batch, len(out.decodes))
        failed = {rid: (r.error, r.error_code) for rid, r in results.items() if r.error is not None}
        with self._lock:
            advanced = self.scheduler.update(out, {rid: r.token_id for rid, r in results.items() if r.error is None})
        for rid, (err, code) in failed.items():
            seq = self.scheduler.get(rid)
            if seq is not None:
                self._fail(seq, err or "sampling failed", code)
        now = time.monotonic()
        for seq in advanced:
            if seq.max_tokens == 0:
                self._deliver_scored(seq, now)
            else:
                self._deliver(seq, results[seq.request_id], now)
        return len(advanced)

    def _deliver_scored(self, seq: Seq, now: float) -> None:
        """A prompt-only request (max_tokens 0) whose prefill is done: it ends now, with no token."""
        st: RequestState = seq.data
        self._finish(seq, FinishReason.LENGTH)
        if self.observer is not None:
            self.observer.on_finish("length", now - st.arrival)
        self._emit(seq, TokenEvent(None, "", "length", prompt_logprobs=st.prompt_logprobs))

    def _deliver(self, seq: Seq, res: SampleResult, now: float) -> None:
        st: RequestState = seq.data
        obs = self.observer
        first = st.first_token_time is None
        if st.matcher is not None and not st.matcher.accept(res.token_id):  # masked logits: never expected
            log.error("request %s: grammar rejected token %d: %s", seq.request_id, res.token_id, st.matcher.error)
            self._fail(seq, f"constrained decoding failed: {st.matcher.error}", "internal_error")
            return
        if st.first_token_time is None:
            st.first_token_time = now
            if obs is not None:
                sched = seq.first_scheduled_time or now
                obs.on_first_token(sched - st.arrival, now - st.arrival, len(seq.prompt_ids))
        elif obs is not None:
            obs.on_token(now - st.last_token_time)
        st.last_token_time = now
        try:
            text, finish = st.stream.step(res.token_id)
        except Exception as e:  # a failure in one request's detokenizing ends that request only
            log.exception("request %s failed while detokenizing", seq.request_id)
            self._fail(seq, f"detokenization failed: {e}", "internal_error")
            return
        if st.matcher is not None and finish != "stop" and st.matcher.is_terminated:
            # the grammar is complete (only EOS could follow, or EOS was taken with ignore_eos): stop here
            if finish is None:
                rest = st.stream.finish_text()  # held-back bytes / stop-string prefix
                text, st.stream.text = text + rest, st.stream.text + rest
            finish = "stop"
        if finish is not None:
            self._finish(seq, FinishReason(finish))
            if obs is not None:
                obs.on_finish(finish, now - st.arrival)
        self._emit(
            seq,
            TokenEvent(
                res.token_id,
                text,
                finish,
                res.logprob,
                res.top_logprobs,
                prompt_logprobs=st.prompt_logprobs if first else None,
            ),
        )

    def _fail(self, seq: Seq, message: str, code: str) -> None:
        """End one request with an error event and free its blocks."""
        self._finish(seq, FinishReason.ERROR)
        if self.observer is not None:
            self.observer.on_finish("error", time.monotonic() - seq.arrival_time)
        self._emit(seq, TokenEvent(None, "", "error", error=message, error_code=code))

    def _expire(self) -> None:
        """Requests past their deadline (total, or waiting in the queue) end with a timeout error."""
        now = time.monotonic()
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            st: RequestState = seq.data
            if st.deadline is not None and now > st.deadline:
                self._fail(seq, f"request timed out after {st.deadline - st.arrival:.1f}s", "timeout")
            elif (
                st.queue_deadline is not None
                and st.first_token_time is None
                and seq.first_scheduled_time is None
                and now > st.queue_deadline
            ):
                self._fail(
                    seq,
                    f"request waited in the queue longer than {st.queue_deadline - st.arrival:.1f}s",
                    "queue_timeout",
                )

    def _finish(self, seq: Seq, reason: FinishReason) -> None:
        with self._lock:
            self.scheduler.finish(seq.request_id, reason)

    def _run(self) -> None:
        # Subnormal floats (activations of ~1e-39, e.g. SiLU of a very negative input) take a slow path on x86
        # unless the thread flushes them to zero; the mode is per thread and inherited from whichever thread
        # created this one, so set it here. Measured: a 1,570-token prompt prefilled 5-10x slower without it.
        torch.set_flush_denormal(True)
        try:
            while not self._stop.is_set():
                self._drain_inputs()
                if not self.scheduler.has_work:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self.step()
        except BaseException as e:  # the loop died: fail every request, never hang them
            self._error = e
            log.exception("engine loop died")
            self._fail_all(f"engine failure: {e!r}")
        else:  # stopped: requests still in flight end now rather than wait for a loop that is gone
            self._fail_all(self._stop_message)

    def _fail_all(self, message: str) -> None:
        with self._inbox_lock:
            self._closed = True
            seqs: list[Any] = list(self._inbox)
            self._inbox.clear()
        seqs += list(self.scheduler.waiting) + list(self.scheduler.running)
        for seq in seqs:
            try:
                self._emit(seq, TokenEvent(None, "", "error", error=message, error_code="engine_dead"))
            except Exception:  # e.g. the request's event loop is closed already: nobody is waiting
                log.warning("could not notify request %s", seq.request_id)
