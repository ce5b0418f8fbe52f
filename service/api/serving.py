"""One response path for completions and chat completions, streamed or not.

An endpoint describes its reply with a `ChoiceWriter`: what to send before any token (`opening`), what each
engine event adds (`on_event`: it updates the writer's own record of every choice and returns the stream
chunks for it), the final usage chunk and the whole response (`response`, built from that record).
`respond()` runs the request's choices on the engine and either streams the chunks as server-sent events
or collects the events and returns the response: both go through the same writer calls, so a streamed
reply and a whole one cannot disagree.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from service.api.chunks import ReplyBody
from service.api.generation import Job, Usage, event_error, run_choices
from service.api.sse import DONE, sse_data, sse_response
from service.api.text_model import TextModel
from service.engine.admission import Admission
from service.engine.engine import TokenEvent


class ChoiceWriter(abc.ABC):
    """One request's reply, choice by choice. `usage_null`: every chunk carries `"usage": null` (the client
    asked for a usage chunk at the end)."""

    def __init__(self, tm: TextModel, jobs: Sequence[Job], rid: str, created: int, include_usage: bool) -> None:
        self.tm, self.jobs, self.rid, self.created = tm, jobs, rid, created
        self.usage_null = include_usage

    @abc.abstractmethod
    def opening(self) -> list[ReplyBody]:
        """Chunks sent before any event (and the record's starting state)."""

    @abc.abstractmethod
    async def on_event(self, i: int, ev: TokenEvent) -> list[ReplyBody]:
        """Record choice i's event; return the chunks it makes (nothing may be sent for it)."""

    @abc.abstractmethod
    def usage_chunk(self, usage: Usage) -> ReplyBody:
        """The stream's last chunk when include_usage: no choices, the request's usage."""

    @abc.abstractmethod
    def response(self, usage: Usage) -> ReplyBody:
        """The whole response, from the record."""


async def respond(
    tm: TextModel,
    jobs: Sequence[Job],
    admission: Admission,
    writer: ChoiceWriter,
    *,
    stream: bool,
    request: Request,
    timeout_s: float | None,
) -> dict[str, Any] | StreamingResponse:
    """Run the jobs and reply: an SSE stream (chunks, an error event if one fails, the usage chunk when asked,
    [DONE]) or the whole response (an error event raises its APIError; a client gone raises 499)."""
    usage = Usage(jobs)
    if stream:
        return sse_response(_chunks(tm, jobs, admission, writer, usage, timeout_s))
    writer.opening()
    events = run_choices(tm.engine, jobs, writer.rid, admission, request, timeout_s=timeout_s)
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
    writer: ChoiceWriter,
    usage: Usage,
    timeout_s: float | None,
) -> AsyncIterator[bytes]:
    for chunk in writer.opening():
        yield chunk.sse()
    async with aclosing(run_choices(tm.engine, jobs, writer.rid, admission, timeout_s=timeout_s)) as choices:
        async for i, ev in choices:
            if ev.finish_reason == "error":  # the stream ends with the error (and [DONE]); other choices stop
                yield sse_data(event_error(ev).body())
                break
            usage.add(i, ev)
            for chunk in await writer.on_event(i, ev):
                yield chunk.sse()
    if writer.usage_null:
        yield writer.usage_chunk(usage).sse()
    yield DONE
