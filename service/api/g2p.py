"""`POST /v1/completions` with `"model": "cmudict-g2p"`: words in, ARPAbet phones out.

The prompt is a word or a list of words (one choice per word, or n per word); each choice's text is
the phones separated by spaces, as CMUdict writes them ("HH AH0 L OW1"). Greedy by default
(temperature 0). With temperature 0, n > 1 or best_of > 1 runs a beam search of width max(n, best_of)
and returns each word's n best transcriptions, best first; with temperature > 0 (and optionally top_p,
top_k, min_p, seed) n samples. Streaming sends one chunk per phone in the LM's chunk shape. Fields this
model cannot honour (logprobs, echo, suffix, stop, penalties, logit_bias, response_format, ...) are a
400 naming the field.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import Request

from model_core.g2p import Hypothesis, WordError
from model_core.sampling import SamplingParams, SamplingParamsError
from service.api.errors import APIError
from service.api.fields import check_extra_fields
from service.api.model_table import G2P_MODEL
from service.api.schemas import MAX_N, CompletionRequest
from service.api.sse import DONE, sse_data, sse_response
from service.api.state import server_state
from service.engine.seq2seq import BatcherFull, BatcherNotRunning, PhoneEvent, Seq2SeqBatcher, Seq2SeqRequest

MAX_WORDS = 256
MAX_BEAM = MAX_N

# fields of a completions request this model cannot honour, with the values that ask for nothing
_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "logprobs": (None,),
    "echo": (False,),
    "suffix": (None, ""),
    "stop": (None, [], ""),
    "stop_token_ids": (None, []),
    "logit_bias": (None, {}),
    "ignore_eos": (False,),
    "min_tokens": (0,),
    "presence_penalty": (None, 0.0),
    "frequency_penalty": (None, 0.0),
    "repetition_penalty": (None, 1.0),
    "response_format": (None,),
    "structured_outputs": (None,),
    "prompt_logprobs": (None,),
}
_EXTRA_REFUSED = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)


def _check_fields(req: CompletionRequest) -> None:
    for name, allowed in _DEFAULTS.items():
        if getattr(req, name) not in allowed:
            raise APIError(
                f"{name} is not supported by the {G2P_MODEL} model", param=name, code="unsupported_parameter"
            )
    for name in _EXTRA_REFUSED:
        if (req.model_extra or {}).get(name) is not None:
            raise APIError(
                f"{name} is not supported by the {G2P_MODEL} model", param=name, code="unsupported_parameter"
            )
    check_extra_fields(req, "completions")


def _words(req: CompletionRequest, batcher: Seq2SeqBatcher) -> list[str]:
    g2p = batcher.g2p
    p = req.prompt
    if isinstance(p, str):
        items, params = [p], ["prompt"]
    elif p and all(isinstance(x, str) for x in p):
        items, params = list(p), [f"prompt.{i}" for i in range(len(p))]  # type: ignore[arg-type]
    else:
        raise APIError(
            f"prompt must be a word or a non-empty list of words for {G2P_MODEL} (not token ids); "
            f"accepted characters: {g2p.accepted()}",
            param="prompt",
        )
    if len(items) > MAX_WORDS:
        raise APIError(f"at most {MAX_WORDS} words per request, got {len(items)}", param="prompt")
    words = []
    for w, param in zip(items, params):
        try:
            words.append(g2p.normalize(w))
        except WordError as e:
            raise APIError(f"{param}: {e}", param="prompt", code="invalid_word") from e
    return words


def _check_range(name: str, value: float | None, lo: float, hi: float, lo_open: bool = False) -> None:
    if value is not None and (value != value or value < lo or value > hi or (lo_open and value == lo)):
        raise APIError(
            f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", param=name, code="invalid_value"
        )


def build_request(req: CompletionRequest, batcher: Seq2SeqBatcher) -> Seq2SeqRequest:
    """Validate the body (400 naming the field) and turn it into a Seq2SeqRequest."""
    _check_fields(req)
    words = _words(req, batcher)
    max_phones = batcher.g2p.config.max_phones
    _check_range("max_tokens", req.max_tokens, 1, max_phones)
    _check_range("n", req.n, 1, MAX_N)
    _check_range("best_of", req.best_of, 1, MAX_BEAM)
    if req.best_of is not None and req.best_of < req.n:
        raise APIError(f"best_of ({req.best_of}) must be >= n ({req.n})", param="best_of")
    temperature = 0.0 if req.temperature is None else req.temperature
    params = SamplingParams(
        max_tokens=req.max_tokens or max_phones,
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        seed=req.seed,
    )
    try:
        params.validate(vocab_size=len(batcher.g2p.config.phones) + 3)  # the phones and BOS, EOS, PAD
    except SamplingParamsError as e:
        raise APIError(str(e), param=e.field, code="invalid_value") from e
    width = max(req.n, req.best_of or 1)
    if params.greedy and width > 1:  # beam search: the n best of `width` beams
        return Seq2SeqRequest(tuple(words), n=req.n, beam_width=width, params=params)
    if not params.greedy and req.best_of not in (None, req.n):
        raise APIError(
            "best_of > n needs temperature 0 (beam search); with sampling every sample is returned", param="best_of"
        )
    return Seq2SeqRequest(tuple(words), n=req.n, params=params)


def _text(phones: list[str]) -> str:
    return " ".join(phones)


def _usage(rq: Seq2SeqRequest, completion: int) -> dict[str, Any]:
    prompt = sum(len(w) for w in rq.words)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def _with_timeout(aw: Awaitable[list[Hypothesis]], timeout: float | None) -> list[Hypothesis]:
    try:
        return await asyncio.wait_for(aw, timeout) if timeout else await aw
    except TimeoutError as e:
        raise APIError(
            f"the request ran past its timeout of {timeout} s", status_code=504, code="timeout", type="timeout_error"
        ) from e
    except BatcherFull as e:
        raise APIError(str(e), status_code=503, code="queue_full", headers={"Retry-After": "1"}) from e
    except BatcherNotRunning as e:
        raise APIError(f"the {G2P_MODEL} model is unavailable: {e}", status_code=503, code="model_not_ready") from e


async def g2p_completion(req: CompletionRequest, request: Request, batcher: Seq2SeqBatcher) -> Any:
    """The /v1/completions answer for the g2p model (a JSON body or an SSE stream)."""
    if server_state(request).draining:
        raise APIError("the server is shutting down", status_code=503, code="draining", headers={"Retry-After": "1"})
    if not batcher.running:
        raise APIError(f"the {G2P_MODEL} model is not running", status_code=503, code="model_not_ready")
    _check_range("timeout", req.timeout, 0.0, float("inf"), lo_open=True)
    rq = build_request(req, batcher)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": G2P_MODEL}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse_response(_stream(batcher, rq, head, include_usage, req.timeout))
    choices = await _with_timeout(batcher.transcribe(rq), req.timeout)
    return {
        **head,
        "choices": [
            {"index": i, "text": _text(h.phones), "logprobs": None, "finish_reason": "stop" if h.finished else "length"}
            for i, h in enumerate(choices)
        ],
        "usage": _usage(rq, sum(len(h.phones) for h in choices)),
    }


async def _stream(
    batcher: Seq2SeqBatcher, rq: Seq2SeqRequest, head: dict[str, Any], include_usage: bool, timeout: float | None
) -> AsyncIterator[bytes]:
    usage_null = {"usage": None} if include_usage else {}
    events: asyncio.Queue[PhoneEvent] = asyncio.Queue()
    task = asyncio.ensure_future(_with_timeout(batcher.transcribe(rq, events.put_nowait), timeout))
    started = [False] * (len(rq.words) * rq.n)
    open_choices = len(started)
    completion = 0
    try:
        while open_choices:
            if not events.empty():
                ev = events.get_nowait()
            elif task.done():  # failed (or ended) without the rest of its events
                break
            else:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait([getter, task], return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                ev = getter.result()
            if ev.phone is not None:
                text = ev.phone if not started[ev.index] else " " + ev.phone
                started[ev.index] = True
                completion += 1
                yield sse_data(
                    {
                        **head,
                        "choices": [{"index": ev.index, "text": text, "logprobs": None, "finish_reason": None}],
                        **usage_null,
                    }
                )
            else:
                open_choices -= 1
                yield sse_data(
                    {
                        **head,
                        "choices": [
                            {"index": ev.index, "text": "", "logprobs": None, "finish_reason": ev.finish_reason}
                        ],
                        **usage_null,
                    }
                )
        try:
            await task
        except APIError as e:
            yield sse_data(e.body())
            yield DONE
            return
        except Exception:
            yield sse_data(APIError("decoding failed", status_code=500).body())
            yield DONE
            return
        if include_usage:
            yield sse_data({**head, "choices": [], "usage": _usage(rq, completion)})
        yield DONE
    finally:
        if not task.done():
            task.cancel()
