"""What the completions and chat routes share: the serving context, token-limit resolution, and
running n choices of one or more prompts on the engine, merged into one stream of events."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request

from model_core.grammar import CompiledGrammar
from model_core.sampling import SamplingParams, TokenScore
from service.api.chunks import PromptTokensDetails, UsageInfo
from service.api.errors import APIError, from_engine
from service.api.state import server_state
from service.api.text_model import TextModel
from service.engine.admission import Admission
from service.engine.engine import LLMEngine, TokenEvent, error_event
from service.engine.errors import EngineError, internal_error


def check_prompt_chars(tm: TextModel, chars: int, param: str) -> None:
    """Refuse, before tokenizing it, a text too long to fit the context whatever its tokens: no token is
    longer than `max_token_bytes` bytes, so a text of C characters has at least C / max_token_bytes tokens."""
    if chars > tm.max_prompt_chars:
        raise APIError(
            f"This model's maximum context length is {tm.max_model_len} tokens; your prompt of {chars} "
            f"characters cannot fit in it (at most {tm.max_prompt_chars} characters can).",
            param=param,
            code="context_length_exceeded",
        )


async def encode_prompt(tm: TextModel, text: str, param: str) -> list[int]:
    """Token ids of a prompt, tokenized off the event loop (the tokenizer releases the GIL for long texts)."""
    check_prompt_chars(tm, len(text), param)
    return await asyncio.to_thread(tm.tokenizer.encode, text)


def default_max_tokens(request: Request, fallback: int | None) -> int | None:
    """The completion limit of a request that sets none: the server's `--max-tokens-default`, else the
    endpoint's own `fallback` (None: the rest of the context)."""
    configured = server_state(request).settings.max_tokens_default
    return fallback if configured is None else configured


def get_text_model(request: Request) -> TextModel:
    tm = server_state(request).text_model
    if tm is None:
        raise APIError("the text model is not loaded yet", status_code=503, code="model_not_ready")
    return tm


def admit(request: Request, tm: TextModel, n: int, endpoint: str) -> Admission:
    """Admission control, decided when the request arrives: room for its n sequences is reserved at once
    (pass the ticket to `run_choices`), or 503 + Retry-After when the server is full or the engine is down;
    400 when the request needs more sequences than the server ever holds at once (retrying could not help)."""
    capacity = tm.engine.admission.capacity
    if n > capacity:
        raise APIError(
            f"this request needs {n} sequences (prompts x n); the server accepts at most {capacity} at once",
            param="n",
            code="too_many_sequences",
        )
    state = server_state(request)
    if state.draining:
        refused = APIError("the server is shutting down", 503, code="draining", headers={"Retry-After": "1"})
    else:
        try:
            return tm.engine.admit(n)
        except EngineError as e:  # full (queue_full) or down (engine_dead): 503 + Retry-After
            refused = from_engine(e)
    state.metrics.rejected.labels(endpoint, refused.code).inc()
    raise refused


def check_model(tm: TextModel, requested: str | None) -> None:
    if requested is not None and requested != tm.name:
        raise APIError(
            f"The model '{requested}' does not exist; available: '{tm.name}'",
            status_code=404,
            param="model",
            code="model_not_found",
        )


def resolve_max_tokens(
    tm: TextModel, prompt_len: int, requested: int | None, default: int | None, allow_zero: bool = False
) -> int:
    """OpenAI/vLLM semantics: prompt + max_tokens must fit the context; unset means `default` or the rest.
    allow_zero: max_tokens 0 (score the prompt, generate nothing) is allowed; then the prompt may fill the context."""
    room = tm.max_model_len - prompt_len
    if prompt_len == 0:
        raise APIError("the prompt is empty", param="prompt")
    if allow_zero and requested == 0 and room >= 0:
        return 0
    if room < 1:
        raise APIError(
            f"This model's maximum context length is {tm.max_model_len} tokens. However, your prompt has "
            f"{prompt_len} tokens, which leaves no room for a completion.",
            param="prompt",
            code="context_length_exceeded",
        )
    if requested is None:
        return room if default is None else min(default, room)
    if requested < 1:
        raise APIError(
            f"max_tokens must be at least 1, got {requested}"
            + (" (0 only to score the prompt: with echo or prompt_logprobs)" if requested == 0 else ""),
            param="max_tokens",
        )
    if requested > room:
        raise APIError(
            f"This model's maximum context length is {tm.max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion). "
            "Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def choice_params(base: SamplingParams, i: int) -> SamplingParams:
    """The i-th of n choices: a distinct seed when the request fixed one, so the n choices differ."""
    if i == 0 or base.seed is None:
        return base
    return replace(base, seed=(base.seed + i) % (2**63))


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
) -> AsyncGenerator[tuple[int, TokenEvent], None]:
    """Run every job concurrently; yield (job index, event) as they come.
    Leaving the iterator early (client gone) cancels every job, which aborts it in the engine; close it
    with `contextlib.aclosing` so that this happens at once. Given the `request` of a non-streamed
    response, a client disconnect also aborts every job and raises APIError(499)."""
    queue: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue()

    async def consume(i: int, job: Job) -> None:
        try:
            async for ev in engine.generate(
                job.ids, job.params, f"{request_id}-{i}", timeout_s=timeout_s, admission=admission, grammar=job.grammar
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

    def responses(self) -> dict[str, Any]:
        """The `usage` object of the Responses API."""
        return {
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": self.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def event_error(ev: TokenEvent) -> APIError:
    """The APIError of an error event."""
    return from_engine(ev.error or internal_error("generation failed"))


def decode_token(tm: TextModel, token_id: int) -> str:
    return tm.tokenizer.decode([token_id], skip_special_tokens=False)


def vllm_prompt_logprobs(
    tm: TextModel, ids: list[int], scores: list[TokenScore | None] | None, k: int
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs` reply: None for the first token, then per position
    {token_id: {"logprob", "rank", "decoded_token"}} for the prompt token and the k most likely ones."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for i, tid in enumerate(ids):
        sc = scores[i] if scores is not None and i > 0 else None
        if sc is None:
            out.append(None)
            continue
        entry = {str(tid): {"logprob": sc.logprob, "rank": sc.rank, "decoded_token": decode_token(tm, tid)}}
        for r, (t, lp) in enumerate(sc.top[:k], start=1):
            entry.setdefault(str(t), {"logprob": lp, "rank": r, "decoded_token": decode_token(tm, t)})
        out.append(entry)
    return out
