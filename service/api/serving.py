"""One response path for completions, chat completions and the Responses API, streamed or not: the request's
choices run on the engine (`run_choices`, merged into one stream of events) and are written out.

An endpoint describes its reply with a `ReplyWriter`: what to send before any token (`opening`), what each
engine event adds (`on_event`: it updates the writer's own record of every choice and returns the stream
chunks for it), what ends the stream (`closing`, or `failure` when a choice fails, then `end_of_stream`) and
the whole response (`response`, built from that record). Each chunk frames itself (`ReplyBody.sse`).
`respond()` runs the request's choices on the engine and either streams the chunks as server-sent events
or collects the events and returns the response: both go through the same writer calls, so a streamed
reply and a whole one cannot disagree. `ChoiceWriter` is the writer of the OpenAI chunk streams
(completions, chat): `data:` chunks, the usage chunk when asked for, `[DONE]`.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, ClassVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from model_core.grammar import CompiledGrammar
from model_core.sampling import SamplingParams
from service.api.chunks import PromptTokensDetails, ReplyBody, UsageInfo
from service.api.errors import APIError, ErrorDetail, from_engine
from service.api.response_objects import InputTokensDetails, OutputTokensDetails, ResponseUsage
from service.api.sse import DONE, sse_response
from service.api.text_model import TextModel
from service.engine.admission import Admission
from service.engine.engine import LLMEngine, TokenEvent, error_event
from service.engine.errors import EngineError, internal_error


async def _wait_for_disconnect(request: Request) -> None:
    """Return once the client has gone. Only for routes whose body is read and whose response is not
    streamed yet (a StreamingResponse listens for the disconnect itself)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass(frozen=True)
class Job:
    """One sequence to generate: a choice of a prompt."""

    ids: list[int]
    params: SamplingParams
    grammar: CompiledGrammar | None = None  # the output must match it (structured outputs, forced tool calls)


async def run_choices(
    engine: LLMEngine,
    jobs: Sequence[Job],
    request_id: str,
    admission: Admission,
    request: Request | None = None,
    timeout_s: float | None = None,
    arrival: float | None = None,
    lora: str | None = None,
) -> AsyncGenerator[tuple[int, TokenEvent], None]:
    """Run every job concurrently; yield (job index, event) as they come.
    Leaving the iterator early (client gone) cancels every job, which aborts it in the engine; close it
    with `contextlib.aclosing` so that this happens at once. Given the `request` of a non-streamed
    response, a client disconnect also aborts every job and raises APIError(499). `arrival`: when the request
    arrived, if before it reached the engine (it waited for its model to load: time.monotonic()); `lora`: the LoRA
    adapter the jobs run with (None: the base model)."""
    queue: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue()

    async def consume(i: int, job: Job) -> None:
        try:
            async for ev in engine.generate(
                job.ids,
                job.params,
                f"{request_id}-{i}",
                timeout_s=timeout_s,
                admission=admission,
                grammar=job.grammar,
                arrival=arrival,
                lora=lora,
            ):
                await queue.put((i, ev))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, e))

    async def watch(req: Request) -> None:
        await _wait_for_disconnect(req)
        await queue.put((-1, None))

    tasks = [asyncio.create_task(consume(i, job)) for i, job in enumerate(jobs)]
    if request is not None:
        tasks.append(asyncio.create_task(watch(request)))
    remaining = len(jobs)
    try:
        while remaining:
            i, ev = await queue.get()
            if ev is None:
                raise APIError("the client closed the connection", status_code=499, code="client_closed_request")
            if isinstance(ev, BaseException):  # the engine refused the job (or failed to take it)
                remaining -= 1
                err = ev if isinstance(ev, EngineError) else internal_error(str(ev) or type(ev).__name__)
                yield i, error_event(err)
                continue
            if ev.finish_reason is not None:
                remaining -= 1
            yield i, ev
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        admission.release()


class Usage:
    """Token counts of a request's jobs: each distinct prompt counts once (n choices of it share its ids), and
    so do its cached tokens, taken from its first choice (later ones may reuse what that one computed)."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        first: dict[int, int] = {}  # id(prompt ids) -> index of the first job with them
        for i, job in enumerate(jobs):
            first.setdefault(id(job.ids), i)
        self._firsts = set(first.values())
        self.prompt_tokens = sum(len(jobs[i].ids) for i in self._firsts)
        self.completion_tokens = 0
        self._cached: dict[int, int] = {}

    def add(self, i: int, ev: TokenEvent) -> None:
        """Count an event of job i."""
        if i in self._firsts:
            self._cached[i] = ev.cached_tokens
        if ev.finish_reason is not None:
            self.completion_tokens += ev.completion_tokens

    @property
    def cached_tokens(self) -> int:
        return sum(self._cached.values())

    def openai(self) -> UsageInfo:
        """The `usage` object of completions and chat completions."""
        return UsageInfo(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens),
        )

    def responses(self) -> ResponseUsage:
        """The `usage` object of the Responses API."""
        return ResponseUsage(
            input_tokens=self.prompt_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=self.cached_tokens),
            output_tokens=self.completion_tokens,
            output_tokens_details=OutputTokensDetails(),
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )


def event_error(ev: TokenEvent) -> APIError:
    """The APIError of an error event."""
    return from_engine(ev.error or internal_error("generation failed"))


class StreamError(ReplyBody):
    """The chunk that reports a failed choice in a completions or chat stream: OpenAI's error shape."""

    error: ErrorDetail

    @classmethod
    def of(cls, e: APIError) -> StreamError:
        return cls(error=ErrorDetail(message=e.message, type=e.type, param=e.param, code=e.code))


class ReplyWriter(abc.ABC):
    """One request's reply, choice by choice, streamed (chunks) or whole (`response`)."""

    end_of_stream: ClassVar[bytes] = b""  # sent after the last chunk

    def __init__(self, tm: TextModel, jobs: Sequence[Job], rid: str, created: int) -> None:
        self.tm, self.jobs, self.rid, self.created = tm, jobs, rid, created

    @abc.abstractmethod
    def opening(self) -> list[ReplyBody]:
        """Chunks sent before any event (and the record's starting state)."""

    @abc.abstractmethod
    async def on_event(self, i: int, ev: TokenEvent) -> list[ReplyBody]:
        """Record choice i's event; return the chunks it makes (nothing may be sent for it)."""

    @abc.abstractmethod
    def closing(self, usage: Usage) -> list[ReplyBody]:
        """The chunks that end a stream whose choices all finished."""

    @abc.abstractmethod
    def failure(self, error: APIError, usage: Usage) -> list[ReplyBody]:
        """The chunks that end a stream when a choice fails (the others stop)."""

    @abc.abstractmethod
    def response(self, usage: Usage) -> ReplyBody:
        """The whole response, from the record."""


class ChoiceWriter(ReplyWriter):
    """A reply of completions or chat completions: its stream ends with the usage chunk when the client asked
    for one, after the error chunk if a choice failed, then [DONE]. `usage_null`: every chunk carries
    `"usage": null` (the client asked for a usage chunk at the end)."""

    end_of_stream = DONE

    def __init__(self, tm: TextModel, jobs: Sequence[Job], rid: str, created: int, include_usage: bool) -> None:
        super().__init__(tm, jobs, rid, created)
        self.usage_null = include_usage

    @abc.abstractmethod
    def usage_chunk(self, usage: Usage) -> ReplyBody:
        """The stream's last chunk when include_usage: no choices, the request's usage."""

    def closing(self, usage: Usage) -> list[ReplyBody]:
        return [self.usage_chunk(usage)] if self.usage_null else []

    def failure(self, error: APIError, usage: Usage) -> list[ReplyBody]:
        return [StreamError.of(error), *self.closing(usage)]


async def respond(
    tm: TextModel,
    jobs: Sequence[Job],
    admission: Admission,
    writer: ReplyWriter,
    *,
    stream: bool,
    request: Request,
    timeout_s: float | None,
) -> dict[str, Any] | StreamingResponse:
    """Run the jobs and reply: an SSE stream (the writer's chunks, then its closing ones or, if a choice fails,
    its failure ones, then its end of stream) or the whole response (an error event raises its APIError; a
    client gone raises 499)."""
    usage = Usage(jobs)
    arrival: float | None = getattr(request.state, "arrival", None)  # set when the request waited for its model
    if stream:
        return sse_response(_chunks(tm, jobs, admission, writer, usage, timeout_s, arrival))
    writer.opening()
    events = run_choices(
        tm.engine, jobs, writer.rid, admission, request, timeout_s=timeout_s, arrival=arrival, lora=tm.lora
    )
    async with aclosing(events) as choices:
        async for i, ev in choices:
            if ev.finish_reason == "error":
                raise event_error(ev)
            usage.add(i, ev)
            await writer.on_event(i, ev)
    return writer.response(usage).body()


async def _chunks(
    tm: TextModel,
    jobs: Sequence[Job],
    admission: Admission,
    writer: ReplyWriter,
    usage: Usage,
    timeout_s: float | None,
    arrival: float | None,
) -> AsyncIterator[bytes]:
    for chunk in writer.opening():
        yield chunk.sse()
    events = run_choices(tm.engine, jobs, writer.rid, admission, timeout_s=timeout_s, arrival=arrival, lora=tm.lora)
    async with aclosing(events) as choices:
        async for i, ev in choices:
            if ev.finish_reason == "error":  # the stream ends with the failure; other choices stop
                for chunk in writer.failure(event_error(ev), usage):
                    yield chunk.sse()
                break
            usage.add(i, ev)
            for chunk in await writer.on_event(i, ev):
                yield chunk.sse()
        else:  # every choice finished
            for chunk in writer.closing(usage):
                yield chunk.sse()
    if writer.end_of_stream:
        yield writer.end_of_stream
