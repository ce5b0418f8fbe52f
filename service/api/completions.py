"""POST /v1/completions (OpenAI legacy completions), streaming and not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request

from model_core.sampling import TokenScore
from service.api.errors import APIError, error_responses
from service.api.fields import check_extra_fields
from service.api.g2p import G2P_MODEL, g2p_completion, get_g2p_batcher
from service.api.generation import (
    Job,
    TextModel,
    Usage,
    admit,
    check_model,
    choice_params,
    decode_token,
    default_max_tokens,
    encode_prompt,
    event_error,
    get_text_model,
    new_id,
    resolve_max_tokens,
    run_choices,
    vllm_prompt_logprobs,
)
from service.api.json_route import OffLoopJSONRoute
from service.api.schemas import CompletionRequest, sampling_params
from service.api.sse import DONE, sse_data, sse_response
from service.api.structured import compile_grammar, output_constraint
from service.engine.admission import Admission
from service.engine.engine import TokenEvent

router = APIRouter(route_class=OffLoopJSONRoute, responses=error_responses(400, 401, 404, 413, 422, 500, 503, 504))
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
    def __init__(self, tm: TextModel) -> None:
        self.tm = tm
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top: list[dict[str, float] | None] = []
        self.offsets: list[int] = []

    def add(self, ev: TokenEvent, offset: int) -> dict[str, Any]:
        tok = decode_token(self.tm, ev.token_id) if ev.token_id is not None else ""
        top = {decode_token(self.tm, t): lp for t, lp in ev.top_logprobs}
        self.tokens.append(tok)
        self.token_logprobs.append(ev.logprob)
        self.top.append(top)
        self.offsets.append(offset)
        return {"tokens": [tok], "token_logprobs": [ev.logprob], "top_logprobs": [top], "text_offset": [offset]}

    def add_prompt(self, ids: list[int], scores: list[TokenScore | None] | None, k: int) -> dict[str, Any]:
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
        return {
            "tokens": self.tokens[start:],
            "token_logprobs": self.token_logprobs[start:],
            "top_logprobs": self.top[start:],
            "text_offset": self.offsets[start:],
        }

    def result(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top,
            "text_offset": self.offsets,
        }


@router.post(
    "/v1/completions",
    responses={
        200: {"description": "A completion, or with `stream` a text/event-stream", "content": {"text/event-stream": {}}}
    },
)
async def create_completion(req: CompletionRequest, request: Request) -> Any:
    g2p = get_g2p_batcher(request)
    if req.model == G2P_MODEL and g2p is not None:  # the encoder-decoder model: words in, phones out
        return await g2p_completion(req, request, g2p)
    return await _lm_completion(req, request, get_text_model(request))


async def _lm_completion(req: CompletionRequest, request: Request, tm: TextModel) -> Any:
    check_model(tm, req.model)
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
    rid, created = new_id("cmpl"), int(time.time())

    def head() -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": tm.name}

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse_response(_stream(tm, req, jobs, admission, rid, head, echo_text, include_usage))

    texts = [echo_text[i // req.n] for i in range(len(jobs))]
    finish: list[str | None] = [None] * len(jobs)
    lps = [_LogprobAcc(tm) for _ in jobs]
    plps: list[Any] = [None] * len(jobs)
    usage = Usage(jobs)
    async with aclosing(run_choices(tm.engine, jobs, rid, admission, request, timeout_s=req.timeout)) as events:
        async for i, ev in events:
            if ev.finish_reason == "error":
                raise event_error(ev)
            usage.add(i, ev)
            if ev.prompt_logprobs is not None:  # the choice's first event; a long prompt is decoded off the loop
                if echo_lp:
                    await asyncio.to_thread(lps[i].add_prompt, jobs[i].ids, ev.prompt_logprobs, req.logprobs or 0)
                if req.prompt_logprobs is not None:
                    plps[i] = await asyncio.to_thread(
                        vllm_prompt_logprobs, tm, jobs[i].ids, ev.prompt_logprobs, req.prompt_logprobs
                    )
            if req.logprobs is not None and ev.token_id is not None:
                lps[i].add(ev, len(texts[i]))
            texts[i] += ev.text
            if ev.finish_reason is not None:
                finish[i] = ev.finish_reason
    extra = [{"prompt_logprobs": plps[i]} if req.prompt_logprobs is not None else {} for i in range(len(jobs))]
    return {
        **head(),
        "choices": [
            {
                "index": i,
                "text": texts[i],
                "logprobs": lps[i].result() if req.logprobs is not None else None,
                "finish_reason": finish[i],
                **extra[i],
            }
            for i in range(len(jobs))
        ],
        "usage": usage.openai(),
    }


async def _stream(
    tm: TextModel,
    req: CompletionRequest,
    jobs: list[Job],
    admission: Admission,
    rid: str,
    head: Any,
    echo_text: list[str],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    usage_null = {"usage": None} if include_usage else {}
    offsets = [0] * len(jobs)
    lps = [_LogprobAcc(tm) for _ in jobs]
    usage = Usage(jobs)
    scored = req.echo and req.logprobs is not None or req.prompt_logprobs is not None
    if req.echo and not scored:
        for i in range(len(jobs)):
            offsets[i] = len(echo_text[i // req.n])
            yield sse_data(
                {
                    **head(),
                    "choices": [{"index": i, "text": echo_text[i // req.n], "logprobs": None, "finish_reason": None}],
                    **usage_null,
                }
            )
    async with aclosing(run_choices(tm.engine, jobs, rid, admission, timeout_s=req.timeout)) as events:
        async for i, ev in events:
            if ev.finish_reason == "error":
                yield sse_data(event_error(ev).body())
                break
            usage.add(i, ev)
            if scored and ev.prompt_logprobs is not None:  # first event: the echo and the prompt's scores first
                echo = echo_text[i // req.n] if req.echo else ""
                offsets[i] = len(echo)
                plp = (
                    await asyncio.to_thread(lps[i].add_prompt, jobs[i].ids, ev.prompt_logprobs, req.logprobs or 0)
                    if req.echo and req.logprobs is not None
                    else None
                )
                extra = (
                    {
                        "prompt_logprobs": await asyncio.to_thread(
                            vllm_prompt_logprobs, tm, jobs[i].ids, ev.prompt_logprobs, req.prompt_logprobs
                        )
                    }
                    if (req.prompt_logprobs is not None)
                    else {}
                )
                yield sse_data(
                    {
                        **head(),
                        "choices": [{"index": i, "text": echo, "logprobs": plp, "finish_reason": None, **extra}],
                        **usage_null,
                    }
                )
            lp = lps[i].add(ev, offsets[i]) if req.logprobs is not None and ev.token_id is not None else None
            offsets[i] += len(ev.text)
            if ev.text or ev.finish_reason is not None or lp is not None:
                yield sse_data(
                    {
                        **head(),
                        "choices": [{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}],
                        **usage_null,
                    }
                )
    if include_usage:
        yield sse_data({**head(), "choices": [], "usage": usage.openai()})
    yield DONE
