"""schemas.sampling_params: request-shape limits here, the meaning of every field by SamplingParams.validate;
either way a 400 naming a field the request set."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from model_core.sampling import SamplingParams
from service.api.errors import APIError
from service.api.schemas import MAX_LOGIT_BIAS, MAX_N, MAX_STOP, CompletionRequest, sampling_params

VOCAB = 50


def _floats(lo: float, hi: float) -> st.SearchStrategy[float]:
    """Values inside [lo, hi], at its edges, just outside, and NaN / infinities."""
    return st.one_of(
        st.floats(lo, hi),
        st.sampled_from([lo, hi, lo - 1e-9, hi + 1e-9, lo - 1.0, hi + 1.0, math.nan, math.inf, -math.inf]),
    )


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(lo - 2, hi + 2), st.sampled_from([lo, hi, lo - 1, hi + 1]))


_token = _ints(0, VOCAB - 1)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "temperature": _floats(0.0, 2.0),
    "top_p": _floats(0.0, 1.0),
    "top_k": _ints(-1, VOCAB),
    "min_p": _floats(0.0, 1.0),
    "presence_penalty": _floats(-2.0, 2.0),
    "frequency_penalty": _floats(-2.0, 2.0),
    "repetition_penalty": _floats(0.0, 2.0),
    "seed": st.one_of(st.integers(-(2**64), 2**65), st.sampled_from([-(2**63), 2**64 - 1, -(2**63) - 1, 2**64])),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=MAX_STOP + 1)),
    "stop_token_ids": st.lists(_token, max_size=MAX_STOP + 1),
    "n": _ints(1, MAX_N),
    "logit_bias": st.dictionaries(
        st.one_of(_token.map(str), st.text(max_size=3), st.sampled_from(["01", " 1", "+2", "1e3"])),
        _floats(-100.0, 100.0),
        max_size=4,
    ),
    "ignore_eos": st.booleans(),
    "min_tokens": _ints(0, 20),
    "timeout": _floats(0.0, 100.0),
    "prompt_logprobs": _ints(0, 20),
    "logprobs": _ints(0, 20),
}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({"max_tokens": _ints(0, 20)}, optional=FIELDS))
def test_sampling_params_returns_valid_params_or_a_400_naming_a_request_field(body: dict[str, Any]) -> None:
    try:
        req = CompletionRequest.model_validate({"prompt": "x", **body})
    except ValidationError:  # the wrong shape: the validation 400, not this function's
        return
    try:
        params = sampling_params(req, max_tokens=body["max_tokens"], logprobs=req.logprobs, vocab_size=VOCAB)
    except APIError as e:
        assert e.status_code == 400
        assert e.param in body, (e.param, e.message, body)
        assert e.param in e.message, e.message
        return
    params.validate(VOCAB)
    assert params.seed is None or 0 <= params.seed < 2**63
    assert params.top_k >= 0
    assert len(params.logit_bias) == len(req.logit_bias or {})


def _request(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "x", **fields})


def _error(max_tokens: int = 16, **fields: Any) -> APIError:
    req = _request(**fields)
    with pytest.raises(APIError) as e:
        sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs, vocab_size=VOCAB)
    assert e.value.status_code == 400
    return e.value


@pytest.mark.parametrize(
    ("fields", "param", "limit"),
    [
        ({"temperature": 2.01}, "temperature", "2.0"),
        ({"top_p": 0}, "top_p", "(0.0, 1.0]"),
        ({"top_k": VOCAB + 1}, "top_k", str(VOCAB)),
        ({"top_k": -2}, "top_k", "-1"),
        ({"repetition_penalty": 0}, "repetition_penalty", "(0.0, 2.0]"),  # 0 is not "unset"
        ({"repetition_penalty": 2.5}, "repetition_penalty", "2.0"),
        ({"min_p": -0.5}, "min_p", "[0.0, 1.0]"),
        ({"logit_bias": {"5": 500}}, "logit_bias", "100"),
        ({"logit_bias": {str(VOCAB): 1}}, "logit_bias", f"[0, {VOCAB})"),
        ({"logit_bias": {"1": 1, "01": 2}}, "logit_bias", "unique"),
        ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias", str(MAX_LOGIT_BIAS)),
        ({"stop": ["a", ""]}, "stop", "non-empty"),
        ({"stop": ["s"] * (MAX_STOP + 1)}, "stop", str(MAX_STOP)),
        ({"stop_token_ids": [VOCAB]}, "stop_token_ids", f"[0, {VOCAB})"),
        ({"stop_token_ids": [1] * (MAX_STOP + 1)}, "stop_token_ids", str(MAX_STOP)),
        ({"logprobs": 21}, "logprobs", "20"),
        ({"prompt_logprobs": -1}, "prompt_logprobs", "20"),
        ({"min_tokens": 17}, "min_tokens", "16"),
        ({"n": 0}, "n", "1"),
        ({"timeout": 0}, "timeout", "0"),
        ({"seed": 2**64}, "seed", str(2**64 - 1)),
    ],
)
def test_each_bad_field_is_a_400_naming_it_and_its_limit(fields: dict[str, Any], param: str, limit: str) -> None:
    e = _error(**fields)
    assert e.param == param and param in e.message and limit in e.message, e.message


def test_max_tokens_zero_is_taken_and_negative_refused() -> None:
    assert sampling_params(_request(), max_tokens=0, logprobs=None, vocab_size=VOCAB).max_tokens == 0
    assert _error(max_tokens=-1).param == "max_tokens"


def test_defaults_and_conversions() -> None:
    assert sampling_params(_request(), max_tokens=16, logprobs=None, vocab_size=VOCAB) == SamplingParams()
    req = _request(top_k=-1, seed=-1, stop="x", logit_bias={"7": -3}, min_p=0, temperature=0)
    p = sampling_params(req, max_tokens=4, logprobs=2, vocab_size=VOCAB)
    assert (p.top_k, p.seed, p.stop, p.logit_bias, p.logprobs) == (0, 2**63 - 1, ("x",), ((7, -3.0),), 2)
    assert p.greedy
