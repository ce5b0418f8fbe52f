"""The request side of the engine: each request's own coroutine, on the event loop.

It hands the request to the engine core (service.engine.engine_core), then turns each `EngineOutput` the core
sends into the one `TokenEvent` the API gets: incremental detokenizing, stop strings (a stop string ends the
request: the core is told to drop it), usage and the observer's timings. None of that text work holds a step
of the batch. A TokenEvent is made here once and never changed; nothing here writes an EngineOutput.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from model_core.grammar import CompiledGrammar
from model_core.lora import LoRAAdapter
from model_core.sampling import SamplingParams, TokenScore
from model_core.stopping import OutputStream
from model_core.tokenizer import Tokenizer
from service.engine.engine_core import EngineCore
from service.engine.engine_output import EngineOutput
from service.engine.errors import EngineError, internal_error

log = logging.getLogger(__name__)


class EngineObserver(Protocol):
    """Receives per-request timings (metrics), called from the request's coroutine."""

    def on_first_token(self, queue_time: float, ttft: float, prompt_tokens: int) -> None: ...
    def on_token(self, itl: float) -> None: ...
    def on_finish(self, reason: str, e2e: float) -> None: ...


@dataclass(frozen=True)
class TokenEvent:
    token_id: int | None
    text: str
    finish_reason: str | None = None  # stop | length | abort | error
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens the client got so far (this one included)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    error: EngineError | None = None  # with finish_reason "error"
    # on the request's first event, when params.prompt_logprobs is set: per prompt position i, how the model
    # scored prompt token i given the tokens before it (index 0 is None: nothing precedes it)
    prompt_logprobs: list[TokenScore | None] | None = None
    time: float = 0.0  # monotonic time the engine core made its output
    queue_time: float | None = None  # on the first token: seconds from arrival to the first schedule


def error_event(error: EngineError) -> TokenEvent:
    return TokenEvent(None, "", "error", error=error)


class Mailbox:
    """What the step thread sends the requests' coroutines on one event loop, handed over in batches: the first output
    after a hand-over schedules the next one, so that the loop is woken (a write to its self-pipe, and the step thread's
    GIL taken from it) once for the outputs a step makes together rather than once per output. Each request's
    outputs keep their order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # (not the loop itself: the mailboxes' table must not keep a closed loop alive)
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[EngineOutput], EngineOutput]] = []

    def post(self, queue: asyncio.Queue[EngineOutput], out: EngineOutput) -> None:
        """Called on the step thread."""
        with self._lock:
            self._pending.append((queue, out))
            if len(self._pending) > 1:  # a hand-over is scheduled and has not run yet: it takes this one too
                return
        loop = self._loop()
        if loop is not None:  # (else no coroutine is left to take it)
            loop.call_soon_threadsafe(self._hand_over)

    def _hand_over(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        for queue, out in batch:
            queue.put_nowait(out)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """The loop's mailbox (made on first use; called on the loop's thread)."""
    box = _mailboxes.get(loop)
    if box is None:
        box = _mailboxes[loop] = Mailbox(loop)
    return box


class OutputProcessor:
    """One request's outputs -> its events: the text so far (detokenizer and stop strings) and its timer."""

    def __init__(self, request_id: str, text: OutputStream, timer: RequestTimer) -> None:
        self.request_id, self.text, self.timer = request_id, text, timer

    def process(self, out: EngineOutput) -> TokenEvent:
        """The event for `out`; its finish_reason is the core's, or "stop" where a stop string ends the request
        (the core does not know it ended), or "error" where detokenizing failed (this request only)."""
        finish = out.finish_reason.value if out.finish_reason is not None else None
        if out.token_id is None:  # an error, or a scored prompt's end
            return TokenEvent(
                None,
                "",
                finish,
                prompt_tokens=out.num_prompt_tokens,
                completion_tokens=out.num_output_tokens,
                cached_tokens=out.num_cached_tokens,
                error=out.error,
                prompt_logprobs=out.prompt_logprobs,
                time=out.time,
            )
        self.timer.token(out)
        try:
            piece, finish = self._add_text(out.token_id, finish)
        except Exception as e:  # a failure in one request's detokenizing ends that request only
            log.exception("request %s failed while detokenizing", self.request_id)
            return error_event(internal_error(f"detokenization failed: {e}"))
        return TokenEvent(
            out.token_id,
            piece,
            finish,
            out.logprob,
            list(out.top_logprobs),
            prompt_tokens=out.num_prompt_tokens,
            completion_tokens=self.text.num_tokens,
            cached_tokens=out.num_cached_tokens,
            prompt_logprobs=out.prompt_logprobs,
            time=out.time,
            queue_time=out.queue_time,
        )

    def _add_text(self, token_id: int, engine_finish: str | None) -> tuple[str, str | None]:
        """Detokenize the token and apply the stop strings: (its text, the finish reason: "stop" when a stop string
        ends the request here, else the core's)."""
        piece, finish = self.text.step(token_id)
        if engine_finish is not None and finish != "stop":  # the core ended it (e.g. grammar complete)
            if finish is None:
                piece += self.text.finish_text()  # held-back bytes / stop-string prefix
            finish = engine_finish
        return piece, finish


async def stream_request(
    core: EngineCore,
    abort: Callable[[str], None],
    tokenizer: Tokenizer,
    observer: EngineObserver | None,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    request_id: str | None,
    timeout_s: float | None,
    grammar: CompiledGrammar | None = None,
    arrival: float | None = None,
    lora: LoRAAdapter | None = None,
) -> AsyncGenerator[TokenEvent, None]:
    """One request's events (see LLMEngine.generate). `abort` drops a request from the core (LLMEngine.abort):
    called when a stop string ends the request, or when the iterator is closed before the request ended."""
    core.check_health()
    rid = request_id or uuid.uuid4().hex
    prompt = list(prompt_ids)
    max_new = core.check(prompt, params, grammar)
    arrival = time.monotonic() if arrival is None else arrival  # (earlier: it waited for its model to load)
    text = OutputStream(max_new, params.stop, core.stop_token_ids(params), tokenizer.incremental_decoder())
    timer = RequestTimer(observer, arrival, len(prompt))
    processor = OutputProcessor(rid, text, timer)
    queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
    box = mailbox(asyncio.get_running_loop())

    def sink(out: EngineOutput) -> None:  # called on the step thread
        box.post(queue, out)

    core.add_request(rid, prompt, params, max_new, arrival, sink, timeout_s, grammar, lora)
    finished = False
    try:
        while True:
            out = await queue.get()
            ev = processor.process(out)
            finished = ev.finish_reason is not None
            if finished:
                timer.finish(ev.finish_reason or "")
                if out.finish_reason is None:  # a stop string (or detokenizing) ended it: the core still has it
                    abort(rid)
            yield ev
            if finished:
                return
    finally:
        if not finished:
            abort(rid)
            timer.finish("abort")


class RequestTimer:
    """A request's timings for the observer, from the times the engine core stamped on its outputs."""

    def __init__(self, observer: EngineObserver | None, arrival: float, prompt_tokens: int) -> None:
        self.observer, self.arrival, self.prompt_tokens = observer, arrival, prompt_tokens
        self.last: float | None = None
        self.done = False

    def token(self, out: EngineOutput) -> None:
        obs = self.observer
        if obs is not None:
            if self.last is None:
                obs.on_first_token(out.queue_time or 0.0, out.time - self.arrival, self.prompt_tokens)
            else:
                obs.on_token(out.time - self.last)
        self.last = out.time

    def finish(self, reason: str) -> None:
        if self.observer is not None and not self.done:
            self.observer.on_finish(reason, time.monotonic() - self.arrival)
        self.done = True
