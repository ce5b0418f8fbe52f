"""Request bodies of the OpenAI-compatible text endpoints (pydantic), and their conversion to
`SamplingParams` with range checks that name the offending field (400, not 422)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model_core.sampling import SamplingParams
from service.api.errors import APIError

MAX_STOP = 16
MAX_N = 16
MAX_LOGIT_BIAS = 1024
MAX_TOP_LOGPROBS = 20


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    timeout: float | None = Field(None, description="seconds this request may take, > 0 (capped by the server)")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def _check(name: str, value: float | int | None, lo: float, hi: float, lo_open: bool = False) -> None:
    if value is None:
        return
    if value != value or value < lo or value > hi or (lo_open and value == lo):
        lo_s = f"({lo}" if lo_open else f"[{lo}"
        raise APIError(f"{name} must be in {lo_s}, {hi}], got {value}", param=name, code="invalid_value")


def sampling_params(req: _Sampling, *, max_tokens: int, logprobs: int | None, vocab_size: int) -> SamplingParams:
    """Range-check the request and build SamplingParams. `max_tokens` is already resolved."""
    _check("temperature", req.temperature, 0.0, 2.0)
    _check("top_p", req.top_p, 0.0, 1.0, lo_open=True)
    if req.top_k is not None and req.top_k != -1:
        _check("top_k", req.top_k, 0, vocab_size)
    _check("min_p", req.min_p, 0.0, 1.0)
    _check("presence_penalty", req.presence_penalty, -2.0, 2.0)
    _check("frequency_penalty", req.frequency_penalty, -2.0, 2.0)
    _check("repetition_penalty", req.repetition_penalty, 0.0, 2.0, lo_open=True)
    _check("n", req.n, 1, MAX_N)
    _check("min_tokens", req.min_tokens, 0, max_tokens)
    _check("logprobs", logprobs, 0, MAX_TOP_LOGPROBS)
    if req.timeout is not None and not req.timeout > 0:  # also NaN
        raise APIError(f"timeout must be > 0 seconds, got {req.timeout}", param="timeout", code="invalid_value")
    if req.seed is not None:
        _check("seed", req.seed, -(2**63), 2**64 - 1)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(f"stop accepts at most {MAX_STOP} strings, got {len(stop)}", param="stop")
    if any(not s for s in stop):
        raise APIError("stop strings must not be empty", param="stop")
    stop_ids = list(req.stop_token_ids or [])
    if len(stop_ids) > MAX_STOP or any(not 0 <= t < vocab_size for t in stop_ids):
        raise APIError(f"stop_token_ids: at most {MAX_STOP} ids in [0, {vocab_size})", param="stop_token_ids")
    bias: list[tuple[int, float]] = []
    if req.logit_bias:
        if len(req.logit_bias) > MAX_LOGIT_BIAS:
            raise APIError(f"logit_bias accepts at most {MAX_LOGIT_BIAS} entries", param="logit_bias")
        for k, v in req.logit_bias.items():
            try:
                tid = int(k)
            except ValueError:
                raise APIError(f"logit_bias keys must be token ids, got {k!r}", param="logit_bias") from None
            if not 0 <= tid < vocab_size:
                raise APIError(f"logit_bias token id {tid} is outside [0, {vocab_size})", param="logit_bias")
            _check("logit_bias", v, -100.0, 100.0)
            bias.append((tid, float(v)))
    seed = None if req.seed is None else req.seed % (2**63)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k in (None, -1) else int(req.top_k),
        min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=tuple(bias),
        seed=seed,
        stop=tuple(stop),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        min_tokens=req.min_tokens,
    )
