"""POST /v1/completions (OpenAI legacy completions), streaming and not."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request

from model_core.sampling import TokenScore
from service.api.chunks import Completion, CompletionChoice, CompletionLogprobs, PromptLogprobs, ReplyBody
from service.api.errors import APIError, error_responses
from service.api.fields import check_extra_fields
from service.api.g2p import g2p_completion
from service.api.generation import (
    admit,
    choice_params,
    decode_token,
    default_max_tokens,
    encode_prompt,
    new_id,
    resolve_max_tokens,
    vllm_prompt_logprobs,
)
from service.api.json_route import OffLoopJSONRoute
from service.api.model_table import Endpoint, Kind, ServedModel, lm_for, route
from service.api.schemas import CompletionRequest, sampling_params
from service.api.serving import ChoiceWriter, Job, Usage, respond
from service.api.structured import compile_grammar, output_constraint
from service.api.text_model import TextModel
from service.engine.engine import TokenEvent

router = APIRouter(route_class=OffLoopJSONRoute, responses=error_responses(400, 401, 404, 413, 500, 503, 504))
DEFAULT_MAX_TOKENS = 16


async def _prompts(req: CompletionRequest, tm: TextModel) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        return [await encode_prompt(tm, p, "prompt")]
    if not p:
        raise APIError("prompt must not be empty", param="prompt")
    if all(isinstance(x, str) for x in p):
        return [await encode_prompt(tm, x, f"prompt.{i}") for i, x in enumerate(p)]  # type: ignore[arg-type]
    prompts: list[list[int]]
    if all(isinstance(x, int) for x in p):
        prompts = [[int(x) for x in p]]  # type: ignore[arg-type]
    else:
        prompts = [[int(t) for t in x] for x in p]  # type: ignore[union-attr]
    for ids in prompts:
        if any(not 0 <= t < tm.vocab_size for t in ids):
            raise APIError(f"prompt token ids must be in [0, {tm.vocab_size})", param="prompt")
    return prompts


class _LogprobAcc:
    """One choice's `logprobs`: every token so far, with its logprob, top alternatives and text offset."""

    def __init__(self, tm: TextModel) -> None:
        self.tm = tm
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top: list[dict[str, float] | None] = []
        self.offsets: list[int] = []

    def add(self, ev: TokenEvent, offset: int) -> CompletionLogprobs:
        """Record a generated token at text offset `offset`; returns its entry alone (a stream chunk's)."""
        tok = decode_token(self.tm, ev.token_id) if ev.token_id is not None else ""
        top = {decode_token(self.tm, t): lp for t, lp in ev.top_logprobs}
        self.tokens.append(tok)
        self.token_logprobs.append(ev.logprob)
        self.top.append(top)
        self.offsets.append(offset)
        return CompletionLogprobs(tokens=[tok], token_logprobs=[ev.logprob], top_logprobs=[top], text_offset=[offset])

    def add_prompt(self, ids: list[int], scores: list[TokenScore | None] | None, k: int) -> CompletionLogprobs:
        """The echoed prompt's entries (they come first): the first token has no logprob (nothing precedes it);
        each top_logprobs dict holds the prompt token and the k most likely tokens, as vLLM does."""
        start = len(self.tokens)
        offset = 0
        for i, tid in enumerate(ids):
            tok = decode_token(self.tm, tid)
            sc = scores[i] if scores is not None and i > 0 else None
            top: dict[str, float] | None = None
            if sc is not None:
                top = {decode_token(self.tm, t): lp for t, lp in sc.top[:k]}
                top.setdefault(tok, sc.logprob)
            self.tokens.append(tok)
            self.token_logprobs.append(sc.logprob if sc is not None else None)
            self.top.append(top)
            self.offsets.append(offset)
            offset += len(tok)
        return self._slice(start)

    def result(self) -> CompletionLogprobs:
        return self._slice(0)

    def _slice(self, start: int) -> CompletionLogprobs:
        return CompletionLogprobs(
            tokens=self.tokens[start:],
            token_logprobs=self.token_logprobs[start:],
            top_logprobs=self.top[start:],
            text_offset=self.offsets[start:],
        )


class CompletionWriter(ChoiceWriter):
    """The choices of a completion: text (after the echoed prompt, with `echo`), logprobs, finish reason and
    vLLM's prompt_logprobs. A prompt that is scored (echo with logprobs, prompt_logprobs) is echoed with its
    scores on the choice's first event; otherwise the echo opens the reply."""

    def __init__(
        self,
        tm: TextModel,
        req: CompletionRequest,
        jobs: list[Job],
        rid: str,
        created: int,
        include_usage: bool,
        echo_text: list[str],
    ) -> None:
        super().__init__(tm, jobs, rid, created, include_usage)
        self.req, self.echo_text = req, echo_text
        self.echo_lp = req.echo and req.logprobs is not None  # the echoed prompt carries logprobs
        self.scored = self.echo_lp or req.prompt_logprobs is not None
        self.texts = [""] * len(jobs)
        self.finish: list[str | None] = [None] * len(jobs)
        self.lps = [_LogprobAcc(tm) for _ in jobs]
        self.plps: list[PromptLogprobs | None] = [None] * len(jobs)

    def _echo(self, i: int) -> str:
        return self.echo_text[i // self.req.n] if self.req.echo else ""

    def _chunk(self, choice: CompletionChoice) -> Completion:
        extra = {"usage": None} if self.usage_null else {}
        return Completion(id=self.rid, created=self.created, model=self.tm.name, choices=[choice], **extra)

    def opening(self) -> list[ReplyBody]:
        if not self.req.echo or self.scored:
            return []
        out: list[ReplyBody] = []
        for i in range(len(self.jobs)):
            self.texts[i] = self._echo(i)
            out.append(self._chunk(CompletionChoice(index=i, text=self.texts[i], logprobs=None, finish_reason=None)))
        return out

    async def on_event(self, i: int, ev: TokenEvent) -> list[ReplyBody]:
        req = self.req
        out: list[ReplyBody] = []
        if self.scored and ev.prompt_logprobs is not None:  # the first event: the echo and the prompt's scores
            self.texts[i] = self._echo(i)
            ids = self.jobs[i].ids
            plp = (  # a long prompt is decoded off the event loop
                await asyncio.to_thread(self.lps[i].add_prompt, ids, ev.prompt_logprobs, req.logprobs or 0)
                if self.echo_lp
                else None
            )
            extra: dict[str, Any] = {}
            if req.prompt_logprobs is not None:
                self.plps[i] = await asyncio.to_thread(
                    vllm_prompt_logprobs, self.tm, ids, ev.prompt_logprobs, req.prompt_logprobs
                )
                extra["prompt_logprobs"] = self.plps[i]
            choice = CompletionChoice(index=i, text=self.texts[i], logprobs=plp, finish_reason=None, **extra)
            out.append(self._chunk(choice))
        lp = self.lps[i].add(ev, len(self.texts[i])) if req.logprobs is not None and ev.token_id is not None else None
        self.texts[i] += ev.text
        if ev.finish_reason is not None:
            self.finish[i] = ev.finish_reason
        if ev.text or ev.finish_reason is not None or lp is not None:
            out.append(
                self._chunk(CompletionChoice(index=i, text=ev.text, logprobs=lp, finish_reason=ev.finish_reason))
            )
        return out

    def usage_chunk(self, usage: Usage) -> ReplyBody:
        return Completion(id=self.rid, created=self.created, model=self.tm.name, choices=[], usage=usage.openai())

    def response(self, usage: Usage) -> ReplyBody:
        scored = self.req.prompt_logprobs is not None

        def choice(i: int) -> CompletionChoice:
            return CompletionChoice(
                index=i,
                text=self.texts[i],
                logprobs=self.lps[i].result() if self.req.logprobs is not None else None,
                finish_reason=self.finish[i],
                **({"prompt_logprobs": self.plps[i]} if scored else {}),
            )

        return Completion(
            id=self.rid,
            created=self.created,
            model=self.tm.name,
            choices=[choice(i) for i in range(len(self.jobs))],
            usage=usage.openai(),
        )


@router.post(
    "/v1/completions",
    responses={
        200: {"description": "A completion, or with `stream` a text/event-stream", "content": {"text/event-stream": {}}}
    },
)
async def create_completion(req: CompletionRequest, request: Request) -> Any:
    model = route(request, Endpoint.COMPLETIONS, req.model)
    return await _HANDLERS[model.kind](req, request, model)


async def _g2p_completion(req: CompletionRequest, request: Request, model: ServedModel) -> Any:
    assert model.seq2seq is not None
    return await g2p_completion(req, request, model.seq2seq)  # the encoder-decoder model: words in, phones out


async def _lm_completion(req: CompletionRequest, request: Request, model: ServedModel) -> Any:
    check_extra_fields(req, "completions")
    if req.suffix:
        raise APIError("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(
            f"best_of is not supported (best_of={req.best_of}, n={req.n}): the server returns every "
            "choice it generates; set n instead",
            param="best_of",
        )
    constraint = output_constraint(req.response_format, req.structured_outputs)
    tm = await lm_for(request, Endpoint.COMPLETIONS, model)
    prompts = await _prompts(req, tm)
    jobs = []
    default = default_max_tokens(request, DEFAULT_MAX_TOKENS)
    grammar = await compile_grammar(tm, *constraint) if constraint is not None else None
    echo_lp = req.echo and req.logprobs is not None
    score_k = max(req.logprobs or 0 if echo_lp else -1, -1 if req.prompt_logprobs is None else req.prompt_logprobs)
    for ids in prompts:
        max_tokens = resolve_max_tokens(
            tm, len(ids), req.max_tokens, default, allow_zero=req.echo or req.prompt_logprobs is not None
        )
        base = sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs, vocab_size=tm.vocab_size)
        if score_k >= 0:  # the prompt is scored by the prefill: echo with logprobs, prompt_logprobs
            base = replace(base, prompt_logprobs=score_k)
        jobs += [Job(ids, choice_params(base, i), grammar) for i in range(req.n)]
    echo_text = [await asyncio.to_thread(tm.tokenizer.decode, ids, False) if req.echo else "" for ids in prompts]
    admission = admit(request, tm, len(jobs), "completions")
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    writer = CompletionWriter(tm, req, jobs, new_id("cmpl"), int(time.time()), include_usage, echo_text)
    return await respond(tm, jobs, admission, writer, stream=req.stream, request=request, timeout_s=req.timeout)


_HANDLERS = {Kind.TEXT: _lm_completion, Kind.SEQ2SEQ: _g2p_completion}  # by the kind of the model a request names
