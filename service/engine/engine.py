"""The LLM engine: a step loop on its own thread, in front of the scheduler and the model runner.

`generate()` returns an async iterator of `TokenEvent`s for one request; `abort()` frees the
request's KV blocks before the next step; `check_health()` says whether the loop is alive.

Two sides:
- the step thread (`_run`) reads as schedule -> run -> update and works in token ids only: it ends a request
  at EOS / a stop token id, at max_tokens, when its grammar is complete, on a timeout or an error, and sends
  each token to the request's asyncio queue;
- the request's own coroutine (`_generate`, on the event loop) turns tokens into text: incremental
  detokenizing, stop strings (a stop string ends the request: the engine is told to drop it), usage and the
  observer's timings. None of that text work holds a step of the batch.
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
from typing import Protocol

import torch

from model_core.grammar import CompiledGrammar, is_work_limit
from model_core.lm import CausalLM
from model_core.sampling import SamplingParams, TokenScore, make_generator
from model_core.stopping import OutputStream
from model_core.tokenizer import Tokenizer
from service.engine.admission import Admission, AdmissionControl
from service.engine.errors import (
    EngineDeadError,
    EngineError,
    ErrorKind,
    grammar_limit_error,
    internal_error,
    invalid_request,
)
from service.engine.model_input import ChunkInput, ModelInput, SamplingState
from service.engine.runner import ModelRunner, SampleResult
from service.engine.scheduler import FinishReason, ScheduledChunk, Scheduler, SchedulerOutput
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


class EngineObserver(Protocol):
    """Receives per-request timings (metrics), called from the request's coroutine."""

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
    error: EngineError | None = None  # with finish_reason "error"
    # on the request's first event, when params.prompt_logprobs is set: per prompt position i, how the model
    # scored prompt token i given the tokens before it (index 0 is None: nothing precedes it)
    prompt_logprobs: list[TokenScore | None] | None = None
    time: float = 0.0  # monotonic time the step thread made it
    queue_time: float | None = None  # on the first token: seconds from arrival to the first schedule


def error_event(error: EngineError) -> TokenEvent:
    return TokenEvent(None, "", "error", error=error)


@dataclass
class RequestState:
    """What the step thread keeps of a request besides its scheduler `Sequence`."""

    seq: Seq
    sampling: SamplingState
    stop_ids: frozenset[int]  # EOS (unless ignore_eos) and params.stop_token_ids: "stop" at once
    queue: asyncio.Queue[TokenEvent]
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # monotonic time after which the request is ended with a timeout
    queue_deadline: float | None = None  # monotonic time by which it must have been scheduled
    num_emitted: int = 0  # tokens sent to the queue


@dataclass
class EngineStats:
    steps: int = 0
    decode_rows: int = 0
    decode_steps: int = 0
    max_decode_batch: int = 0

    @property
    def mean_decode_batch(self) -> float:
        return self.decode_rows / self.decode_steps if self.decode_steps else 0.0


def build_engine(
    model: CausalLM,
    tokenizer: Tokenizer,
    config: EngineConfig,
    observer: EngineObserver | None = None,
) -> LLMEngine:
    """The engine over a loaded model: its runner (paged KV cache of config.num_blocks blocks), not started."""
    runner = ModelRunner(model, config.num_blocks, config.block_size, tuple(tokenizer.eos_token_ids))
    return LLMEngine(runner, tokenizer, config, observer)


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
        self._requests: dict[str, RequestState] = {}  # every request not yet ended, by id
        self._inbox: collections.deque[RequestState] = collections.deque()
        self._aborts: collections.deque[str] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # The scheduler is changed by the step thread only; the lock keeps readers on other threads (gauges,
        # reset_prefix_cache) from seeing it halfway through a schedule, an update or a finish.
        self._lock = threading.Lock()
        # New requests and the loop's final `_fail_all` take this lock: nothing is added after the loop ended.
        self._inbox_lock = threading.Lock()
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
        params.prompt_logprobs to get the scores).
        Raises EngineError (kind INVALID_REQUEST) for a request the engine cannot take (empty prompt, no room
        in the context, a grammar for another vocabulary), EngineDeadError when the loop is down."""
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

    def _check(self, prompt: list[int], params: SamplingParams, grammar: CompiledGrammar | None) -> int:
        """What only the engine can check of a request (the rest was checked by SamplingParams and the API);
        returns how many tokens it may generate."""
        limit = self.config.max_model_len
        if not prompt:
            raise invalid_request("the prompt is empty", "prompt")
        if params.max_tokens == 0:  # scoring: the prompt may fill the context
            if len(prompt) > limit:
                raise invalid_request(f"prompt has {len(prompt)} tokens; the context length is {limit}", "prompt")
            return 0
        if len(prompt) >= limit:
            raise invalid_request(
                f"prompt has {len(prompt)} tokens, which leaves no room for a completion in the context "
                f"length of {limit}",
                "prompt",
            )
        vocab = self.runner.model.cfg.vocab_size
        if grammar is not None and grammar.vocab_size != vocab:
            raise invalid_request(f"grammar compiled for {grammar.vocab_size} logits; the model has {vocab}")
        return min(params.max_tokens, limit - len(prompt))

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
        max_new = self._check(prompt, params, grammar)
        arrival = time.monotonic()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        stop_ids = frozenset(params.stop_token_ids) | frozenset(() if params.ignore_eos else self.eos_token_ids)
        sampling = SamplingState(
            params=params,
            generator=make_generator(params.seed, self.runner.device),
            matcher=grammar.matcher() if grammar is not None else None,
            prompt_scores=[None] * len(prompt) if params.prompt_logprobs is not None else None,
        )
        seq = Seq(
            request_id=rid,
            prompt_ids=prompt,
            max_tokens=max_new,
            arrival_time=arrival,
            lookup_prefix=params.prompt_logprobs is None,  # scoring computes every prompt position
        )
        state = RequestState(seq, sampling, stop_ids, queue, asyncio.get_running_loop())
        limits = [t for t in (timeout_s, self.config.request_timeout_s) if t is not None]
        if limits:
            state.deadline = arrival + min(limits)
        if self.config.queue_timeout_s is not None:
            state.queue_deadline = arrival + self.config.queue_timeout_s
        with self._inbox_lock:  # a request added after the loop exited would never get an event
            if self._closed:
                raise EngineDeadError("engine loop is not running")
            if rid in self._requests:
                raise invalid_request(f"duplicate request id {rid!r}")
            self._requests[rid] = state
            self._inbox.append(state)
        self._wake.set()
        text = OutputStream(max_new, params.stop, stop_ids, self.tokenizer.incremental_decoder())
        timer = _Timer(self.observer, arrival, len(prompt))
        finished = False
        try:
            while True:
                ev = await queue.get()
                engine_done = ev.finish_reason is not None
                if ev.token_id is not None:
                    timer.token(ev)
                    try:
                        _add_text(text, ev)
                    except Exception as e:  # a failure in one request's detokenizing ends that request only
                        log.exception("request %s failed while detokenizing", rid)
                        ev = error_event(internal_error(f"detokenization failed: {e}"))
                finished = ev.finish_reason is not None
                if finished:
                    timer.finish(ev.finish_reason or "")
                    if not engine_done:  # a stop string ended it: the step thread still has it
                        self.abort(rid)
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)
                timer.finish("abort")

    def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)
        self._wake.set()

    # ---- the step thread -------------------------------------------------------------------
    def _emit(self, st: RequestState, ev: TokenEvent) -> None:
        seq = st.seq
        ev.prompt_tokens = len(seq.prompt_ids)
        ev.completion_tokens = len(seq.output_ids)
        ev.cached_tokens = seq.num_cached_tokens
        st.loop.call_soon_threadsafe(st.queue.put_nowait, ev)

    def _drain_inputs(self) -> None:
        while self._inbox:
            st = self._inbox.popleft()
            try:
                self.scheduler.add(st.seq)
            except ValueError as e:  # `_check` let through what the scheduler refuses: a bug, one request's
                log.exception("request %s refused by the scheduler", st.seq.request_id)
                self._requests.pop(st.seq.request_id, None)
                self._emit(st, error_event(internal_error(f"the scheduler refused the request: {e}")))
        while self._aborts:
            rid = self._aborts.popleft()
            with self._lock:
                self.scheduler.abort(rid)
            self._requests.pop(rid, None)

    def _model_input(self, out: SchedulerOutput) -> ModelInput:
        def chunk(c: ScheduledChunk) -> ChunkInput:
            seq = c.seq
            return ChunkInput(
                request_id=seq.request_id,
                token_ids=c.token_ids,
                start=c.start,
                block_table=seq.block_table,
                prompt_ids=seq.prompt_ids,
                output_ids=seq.output_ids,
                sample=c.sample and seq.max_tokens > 0,  # a prompt-only request is scored, never sampled
                sampling=self._requests[seq.request_id].sampling,
            )

        return ModelInput([chunk(c) for c in out.decodes], [chunk(c) for c in out.prefills])

    def step(self) -> int:
        """One engine step (schedule -> run -> update); returns the number of sequences that got a token."""
        self._expire()
        with self._lock:
            out = self.scheduler.schedule()
        if not out.decodes and not out.prefills:
            return 0
        try:
            results = self.runner.execute(self._model_input(out))
        except Exception as e:  # a failed forward ends the requests in it, not the loop
            log.exception("model step failed")
            for c in [*out.decodes, *out.prefills]:
                self._fail(c.seq.request_id, internal_error(f"model step failed: {e}"))
            return 0
        self.stats.steps += 1
        if out.decodes:
            self.stats.decode_steps += 1
            self.stats.decode_rows += len(out.decodes)
            self.stats.max_decode_batch = max(self.stats.max_decode_batch, len(out.decodes))
        failed = {rid: r.error for rid, r in results.items() if r.error is not None}
        with self._lock:
            advanced = self.scheduler.update(out, {rid: r.token_id for rid, r in results.items() if r.error is None})
        for rid, err in failed.items():
            self._fail(rid, err)
        now = time.monotonic()
        for seq in advanced:
            st = self._requests[seq.request_id]
            if seq.max_tokens == 0:
                self._deliver_scored(st, now)
            else:
                self._deliver(st, results[seq.request_id], now)
        return len(advanced)

    def _deliver_scored(self, st: RequestState, now: float) -> None:
        """A prompt-only request (max_tokens 0) whose prefill is done: it ends now, with no token."""
        self._finish(st, FinishReason.LENGTH)
        self._emit(st, TokenEvent(None, "", "length", prompt_logprobs=st.sampling.prompt_scores, time=now))

    def _deliver(self, st: RequestState, res: SampleResult, now: float) -> None:
        seq, matcher = st.seq, st.sampling.matcher
        if matcher is not None:
            error = matcher.error  # set while computing the mask: a work limit of the grammar engine
            if error is None and not matcher.accept(res.token_id):
                error = matcher.error or "the grammar refused the token"
                if not is_work_limit(error):  # refused a token its mask allowed: not expected
                    log.error("request %s: grammar rejected token %d: %s", seq.request_id, res.token_id, error)
                    self._fail(seq.request_id, internal_error(f"constrained decoding failed: {error}"))
                    return
            if error is not None:
                self._fail(seq.request_id, grammar_limit_error(error))
                return
        first = st.num_emitted == 0
        st.num_emitted += 1
        finish: str | None = None
        if res.token_id in st.stop_ids or (matcher is not None and matcher.is_terminated):
            finish = FinishReason.STOP  # EOS / a stop id, or the grammar is complete (only EOS could follow)
        elif len(seq.output_ids) >= seq.max_tokens:
            finish = FinishReason.LENGTH
        if finish is not None:
            self._finish(st, FinishReason(finish))
        ev = TokenEvent(res.token_id, "", finish, res.logprob, res.top_logprobs, time=now)
        if first:
            ev.prompt_logprobs = st.sampling.prompt_scores
            ev.queue_time = (seq.first_scheduled_time or now) - seq.arrival_time
        self._emit(st, ev)

    def _fail(self, request_id: str, error: EngineError) -> None:
        """End one request with an error event and free its blocks."""
        st = self._requests.get(request_id)
        if st is not None:
            self._finish(st, FinishReason.ERROR)
            self._emit(st, error_event(error))

    def _expire(self) -> None:
        """Requests past their deadline (total, or waiting in the queue) end with a timeout error."""
        now = time.monotonic()
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            st = self._requests[seq.request_id]
            arrival = seq.arrival_time
            if st.deadline is not None and now > st.deadline:
                self._fail(
                    seq.request_id,
                    EngineError(f"request timed out after {st.deadline - arrival:.1f}s", ErrorKind.TIMEOUT),
                )
            elif st.queue_deadline is not None and seq.first_scheduled_time is None and now > st.queue_deadline:
                self._fail(
                    seq.request_id,
                    EngineError(
                        f"request waited in the queue longer than {st.queue_deadline - arrival:.1f}s",
                        ErrorKind.QUEUE_TIMEOUT,
                    ),
                )

    def _finish(self, st: RequestState, reason: FinishReason) -> None:
        with self._lock:
            self.scheduler.finish(st.seq.request_id, reason)
        self._requests.pop(st.seq.request_id, None)

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
            states = list(self._requests.values())
            self._inbox.clear()
            self._requests.clear()
        for st in states:
            try:
                self._emit(st, error_event(EngineDeadError(message)))
            except Exception:  # e.g. the request's event loop is closed already: nobody is waiting
                log.warning("could not notify request %s", st.seq.request_id)


def _add_text(text: OutputStream, ev: TokenEvent) -> None:
    """Detokenize the event's token and apply the stop strings: sets ev.text, and ev.finish_reason "stop" when a
    stop string ends the request here; completion_tokens counts the tokens the client gets."""
    assert ev.token_id is not None
    piece, finish = text.step(ev.token_id)
    if ev.finish_reason is not None and finish != "stop":  # the step thread ended it (e.g. grammar complete)
        if finish is None:
            piece += text.finish_text()  # held-back bytes / stop-string prefix
        finish = ev.finish_reason
    ev.text, ev.finish_reason = piece, finish
    ev.completion_tokens = text.num_tokens


class _Timer:
    """A request's timings for the observer, from the times the step thread stamped on its tokens."""

    def __init__(self, observer: EngineObserver | None, arrival: float, prompt_tokens: int) -> None:
        self.observer, self.arrival, self.prompt_tokens = observer, arrival, prompt_tokens
        self.last: float | None = None
        self.done = False

    def token(self, ev: TokenEvent) -> None:
        obs = self.observer
        if obs is not None:
            if self.last is None:
                obs.on_first_token(ev.queue_time or 0.0, ev.time - self.arrival, self.prompt_tokens)
            else:
                obs.on_token(ev.time - self.last)
        self.last = ev.time

    def finish(self, reason: str) -> None:
        if self.observer is not None and not self.done:
            self.observer.on_finish(reason, time.monotonic() - self.arrival)
        self.done = True
