"""POST /v1/chat/completions: messages rendered with the model's chat template, streaming and not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from service.api.errors import APIError, error_responses
from service.api.generation import (
    TextModel,
    admit,
    check_model,
    choice_params,
    event_error,
    get_text_model,
    new_id,
    resolve_max_tokens,
    run_choices,
)
from service.api.schemas import MAX_TOP_LOGPROBS, ChatCompletionRequest, ChatMessage, sampling_params
from service.api.sse import DONE, sse_data, sse_response
from service.engine.engine import TokenEvent

router = APIRouter(responses=error_responses(400, 401, 404, 413, 422, 500, 503, 504))


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(f"messages[{i}].content: only text parts are supported",
                                   param=f"messages.{i}.content")
                parts.append(part["text"])
            content = "".join(parts)
        d: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out


def render_chat(tm: TextModel, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
    try:
        text = tm.tokenizer.apply_chat_template(message_dicts(messages), add_generation_prompt=add_generation_prompt)
    except APIError:
        raise
    except Exception as e:  # template errors (raise_exception, sandbox) are the client's input problem
        raise APIError(f"could not apply the chat template: {e}", param="messages") from None
    return tm.tokenizer.encode(text, add_special_tokens=False)


def _logprob_entry(tm: TextModel, ev: TokenEvent) -> dict[str, Any]:
    def one(tid: int, lp: float) -> dict[str, Any]:
        s = tm.tokenizer.decode([tid], skip_special_tokens=False)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    assert ev.token_id is not None
    entry = one(ev.token_id, ev.logprob if ev.logprob is not None else 0.0)
    entry["top_logprobs"] = [one(t, lp) for t, lp in ev.top_logprobs]
    return entry


@router.post("/v1/chat/completions", responses={200: {
    "description": "A chat completion, or with `stream` a text/event-stream", "content": {"text/event-stream": {}}}})
async def create_chat_completion(req: ChatCompletionRequest, request: Request,
                                 tm: Annotated[TextModel, Depends(get_text_model)]) -> Any:
    check_model(tm, req.model)
    ids = render_chat(tm, req.messages)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = resolve_max_tokens(tm, len(ids), requested, None)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
        raise APIError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs}",
                       param="top_logprobs", code="invalid_value")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    base = sampling_params(req, max_tokens=max_tokens, logprobs=logprobs, vocab_size=tm.vocab_size)
    jobs = [(ids, choice_params(base, i)) for i in range(req.n)]
    admit(request, tm, len(jobs), "chat")
    rid, created = new_id("chatcmpl"), int(time.time())

    def head(obj: str) -> dict[str, Any]:
        return {"id": rid, "object": obj, "created": created, "model": tm.name, "system_fingerprint": None}

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse_response(_stream(tm, jobs, rid, head, len(ids), include_usage, logprobs is not None,
                                    req.timeout))

    texts = [""] * len(jobs)
    finish: list[str | None] = [None] * len(jobs)
    lps: list[list[dict[str, Any]]] = [[] for _ in jobs]
    completion_tokens = 0
    async with aclosing(run_choices(tm.engine, jobs, rid, request, timeout_s=req.timeout)) as events:
        async for i, ev in events:
            if ev.finish_reason == "error":
                raise event_error(ev)
            if logprobs is not None and ev.token_id is not None:
                lps[i].append(_logprob_entry(tm, ev))
            texts[i] += ev.text
            if ev.finish_reason is not None:
                finish[i] = ev.finish_reason
                completion_tokens += ev.completion_tokens
    return {
        **head("chat.completion"),
        "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                     "logprobs": {"content": lps[i]} if logprobs is not None else None,
                     "finish_reason": finish[i]} for i in range(len(jobs))],
        "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                  "total_tokens": len(ids) + completion_tokens},
    }


async def _stream(tm: TextModel, jobs: list, rid: str, head: Any, prompt_tokens: int, include_usage: bool,
                  want_logprobs: bool, timeout: float | None) -> AsyncIterator[bytes]:
    usage_null = {"usage": None} if include_usage else {}
    for i in range(len(jobs)):
        yield sse_data({**head("chat.completion.chunk"), "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
            **usage_null})
    completion_tokens = 0
    async with aclosing(run_choices(tm.engine, jobs, rid, timeout_s=timeout)) as events:
        async for i, ev in events:
            if ev.finish_reason == "error":
                yield sse_data(event_error(ev).body())
                break
            lp = {"content": [_logprob_entry(tm, ev)]} if want_logprobs and ev.token_id is not None else None
            if ev.text or lp is not None:
                yield sse_data({**head("chat.completion.chunk"), "choices": [
                    {"index": i, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None}], **usage_null})
            if ev.finish_reason is not None:
                completion_tokens += ev.completion_tokens
                yield sse_data({**head("chat.completion.chunk"), "choices": [
                    {"index": i, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason}], **usage_null})
    if include_usage:
        yield sse_data({**head("chat.completion.chunk"), "choices": [], "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}})
    yield DONE
