"""What the text routes share before a request reaches the engine: the loaded LM from the server state, admission,
prompt and token-limit checks, per-choice sampling parameters, ids and token text. Running the choices on the engine
and writing the reply is `service.api.serving`."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from typing import Any

from fastapi import Request

from model_core.sampling import MAX_LOGPROBS, SamplingParams, TokenScore
from service.api.errors import APIError, from_engine
from service.api.state import server_state
from service.api.text_model import TextModel
from service.engine.admission import Admission
from service.engine.errors import EngineError


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
    state.metrics.rejected.labels(endpoint, refused.code, tm.name).inc()
    raise refused


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


def new_id(prefix: str, sep: str = "-") -> str:
    """A reply's or item's id: `chatcmpl-…`, `cmpl-…`; the Responses API's with `sep="_"` (`resp_…`, `msg_…`)."""
    return f"{prefix}{sep}{uuid.uuid4().hex}"


def check_top_logprobs(value: int | None, param: str = "top_logprobs") -> None:
    """400 for a number of top logprobs the sampler does not give."""
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise APIError(f"{param} must be in [0, {MAX_LOGPROBS}], got {value}", param=param, code="invalid_value")


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
