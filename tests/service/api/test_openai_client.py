"""The official `openai` client against the app in-process over a tiny random LM and the real
SmolLM2 tokenizer: texts equal the reference generate(), streaming equals non-streaming, logprobs,
stop strings, exact usage, and errors surface as the client's exception classes."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from model_core.generate import Step, generate
from model_core.lm import CausalLM
from model_core.sampling import SamplingParams
from model_core.tokenizer import Tokenizer
from tests.service.server_utils import TINY_MODEL_NAME, InProcessServer, serve_tiny_in_process

MODEL = TINY_MODEL_NAME
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
]


@pytest.fixture(scope="module")
def server(tiny_model: CausalLM, smol_tokenizer: Tokenizer) -> Iterator[InProcessServer]:
    with serve_tiny_in_process(tiny_model, smol_tokenizer) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: InProcessServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{server.base_url}/v1", http_client=server.http_client(), api_key="x", max_retries=0, timeout=60.0
    ) as c:
        yield c


def reference(model: CausalLM, tok: Tokenizer, prompt_ids: list[int], params: SamplingParams) -> list[Step]:
    return list(generate(model, prompt_ids, params, tokenizer=tok, eos_token_ids=tok.eos_token_ids))


def chat_ids(tok: Tokenizer, messages: list[Any]) -> list[int]:
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def assert_sorted_logprobs(values: list[float]) -> None:
    assert values == sorted(values, reverse=True)
    assert all(v <= 0.0 and math.isfinite(v) for v in values)


# ---------------------------------------------------------------------------------------------- models
def test_models_list_and_retrieve(client: openai.OpenAI, server: InProcessServer) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, "cmudict-g2p"]  # the LM first, then the G2P model
    assert models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# ------------------------------------------------------------------------------- greedy == reference
def test_completion_greedy_equals_reference_and_stream(
    client: openai.OpenAI, tiny_model: CausalLM, smol_tokenizer: Tokenizer
) -> None:
    ids = smol_tokenizer.encode(PROMPT)
    ref = reference(tiny_model, smol_tokenizer, ids, greedy(24))
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and len(r.choices) == 1
    assert r.choices[0].text == "".join(s.text for s in ref)
    assert r.choices[0].finish_reason == ref[-1].finish_reason
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref))
    assert r.usage.total_tokens == len(ids) + len(ref)

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True))
    assert all(c.id == chunks[0].id and len(c.choices) == 1 and c.choices[0].index == 0 for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == r.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_greedy_equals_reference_and_stream(
    client: openai.OpenAI, tiny_model: CausalLM, smol_tokenizer: Tokenizer
) -> None:
    ids = chat_ids(smol_tokenizer, MESSAGES)
    ref = reference(tiny_model, smol_tokenizer, ids, greedy(20))
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and len(r.choices) == 1
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == "".join(s.text for s in ref)
    assert r.choices[0].finish_reason == ref[-1].finish_reason
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref))

    chunks = list(
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0, stream=True)
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    finishes = [c.choices[0].finish_reason for c in chunks]
    assert finishes[-1] == r.choices[0].finish_reason and finishes.count(None) == len(chunks) - 1


def test_max_completion_tokens_and_ignore_eos_give_exact_usage(client: openai.OpenAI) -> None:
    for n_tok in (1, 7, 33):
        r = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=n_tok, temperature=0.8, seed=3, extra_body={"ignore_eos": True}
        )
        assert r.choices[0].finish_reason == "length"
        assert r.usage is not None and r.usage.completion_tokens == n_tok
        c = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_completion_tokens=n_tok,
            temperature=0.8,
            seed=3,
            extra_body={"ignore_eos": True},
        )
        assert c.choices[0].finish_reason == "length"
        assert c.usage is not None and c.usage.completion_tokens == n_tok


# ------------------------------------------------------------------------------------------ n > 1
def test_completion_n_choices_are_seeded_and_distinct(
    client: openai.OpenAI, tiny_model: CausalLM, smol_tokenizer: Tokenizer
) -> None:
    kw: dict[str, Any] = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 11,
        "n": 3,
        "extra_body": {"ignore_eos": True},
    }
    r = client.completions.create(**kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3, "n choices of a seeded request must use distinct seeds"
    assert r.usage is not None and r.usage.completion_tokens == 3 * 12
    assert r.usage.prompt_tokens == len(smol_tokenizer.encode(PROMPT))
    # choice 0 uses the request's seed: it equals the reference sampler with that seed
    ref = reference(
        tiny_model,
        smol_tokenizer,
        smol_tokenizer.encode(PROMPT),
        SamplingParams(max_tokens=12, temperature=1.0, seed=11, ignore_eos=True),
    )
    assert texts[0] == "".join(s.text for s in ref)

    streamed: dict[int, str] = {}
    finished: list[int] = []
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
            if c.finish_reason is not None:
                finished.append(c.index)
    assert sorted(finished) == [0, 1, 2]
    assert [streamed[i] for i in range(3)] == texts


def test_chat_n_choices(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 10,
        "temperature": 1.0,
        "seed": 5,
        "n": 2,
        "extra_body": {"ignore_eos": True},
    }
    r = client.chat.completions.create(**kw)
    assert sorted(c.index for c in r.choices) == [0, 1]
    texts = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
    assert texts[0] != texts[1]
    streamed = ["", ""]
    roles: list[int] = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            if c.delta.role == "assistant":
                roles.append(c.index)
            streamed[c.index] += c.delta.content or ""
    assert sorted(roles) == [0, 1]
    assert streamed == texts


# -------------------------------------------------------------------------------------- logprobs
def test_completion_logprobs_match_reference(
    client: openai.OpenAI, tiny_model: CausalLM, smol_tokenizer: Tokenizer
) -> None:
    ids = smol_tokenizer.encode(PROMPT)
    ref = reference(tiny_model, smol_tokenizer, ids, greedy(10, logprobs=3, ignore_eos=True))
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert lp.top_logprobs is not None and lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for j, step in enumerate(ref):
        top = lp.top_logprobs[j]
        assert 1 <= len(top) <= 3  # token strings of distinct ids can coincide (e.g. partial UTF-8)
        assert_sorted_logprobs(list(top.values()))
        assert lp.tokens[j] == smol_tokenizer.decode([step.token_id], skip_special_tokens=False)
        assert step.logprob is not None and step.top_logprobs is not None
        assert lp.token_logprobs[j] == pytest.approx(step.logprob, abs=1e-4)
        assert lp.token_logprobs[j] == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the best token
        want = {smol_tokenizer.decode([t], skip_special_tokens=False): v for t, v in step.top_logprobs}
        assert top.keys() == want.keys()
        assert list(top.values()) == pytest.approx(list(want.values()), abs=1e-4)

    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            logprobs=3,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    s_tokens: list[str] = []
    s_lps: list[float | None] = []
    for c in chunks:
        slp = c.choices[0].logprobs
        if slp is not None:
            s_tokens += slp.tokens or []
            s_lps += slp.token_logprobs or []
    assert s_tokens == lp.tokens
    assert s_lps == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_chat_logprobs(client: openai.OpenAI, tiny_model: CausalLM, smol_tokenizer: Tokenizer) -> None:
    ids = chat_ids(smol_tokenizer, MESSAGES)
    ref = reference(tiny_model, smol_tokenizer, ids, greedy(8, logprobs=2, ignore_eos=True))
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content is not None and len(lp.content) == 8
    for entry, step in zip(lp.content, ref, strict=True):
        assert entry.token == smol_tokenizer.decode([step.token_id], skip_special_tokens=False)
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert step.logprob is not None and step.top_logprobs is not None
        assert entry.logprob == pytest.approx(step.logprob, abs=1e-4)
        assert len(entry.top_logprobs) == 2
        assert_sorted_logprobs([t.logprob for t in entry.top_logprobs])
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in step.top_logprobs], abs=1e-4)

    streamed = []
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        extra_body={"ignore_eos": True},
    ):
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                streamed += c.logprobs.content
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in lp.content]

    plain = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True, extra_body={"ignore_eos": True}
    )
    assert plain.choices[0].logprobs is not None and plain.choices[0].logprobs.content is not None
    assert [e.top_logprobs for e in plain.choices[0].logprobs.content] == [[], [], []]
    none = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0)
    assert none.choices[0].logprobs is None


# ------------------------------------------------------------------------------------ stop strings
def _pick_stop(text: str) -> tuple[str, str]:
    """A stop string taken from the second half of `text`, and the prefix before its first occurrence."""
    for start in range(len(text) // 2, len(text) - 3):
        stop = text[start : start + 3]
        if stop.strip() and stop.isprintable():
            return stop, text[: text.find(stop)]
    raise AssertionError(f"no usable stop string in {text!r}")


def test_completion_stop_string(client: openai.OpenAI, tiny_model: CausalLM, smol_tokenizer: Tokenizer) -> None:
    full = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
    )
    stop, expected = _pick_stop(full.choices[0].text)
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "\x00zz"], extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    # completion_tokens counts up to and including the token that completed the stop string
    out = [
        s.token_id
        for s in reference(tiny_model, smol_tokenizer, smol_tokenizer.encode(PROMPT), greedy(30, ignore_eos=True))
    ]
    k = next(k for k in range(1, 31) if stop in smol_tokenizer.decode(out[:k]))
    assert r.usage is not None and r.usage.completion_tokens == k

    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=30,
            temperature=0,
            stop=stop,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_stop_string(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
    )
    assert full.choices[0].message.content is not None
    stop, expected = _pick_stop(full.choices[0].message.content)
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=30, temperature=0, stop=stop, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=30,
            temperature=0,
            stop=[stop],
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------------- stream usage chunk
def test_stream_include_usage(client: openai.OpenAI, smol_tokenizer: Tokenizer) -> None:
    kw: dict[str, Any] = {
        "max_tokens": 9,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, n=2, **kw))
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    assert last.usage.prompt_tokens == len(smol_tokenizer.encode(PROMPT))
    assert last.usage.completion_tokens == 2 * 9
    assert last.usage.total_tokens == last.usage.prompt_tokens + 18

    chat = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, **kw))
    *body_c, last_c = chat
    assert last_c.choices == [] and last_c.usage is not None
    assert all(c.usage is None for c in body_c)
    assert (last_c.usage.prompt_tokens, last_c.usage.completion_tokens) == (len(chat_ids(smol_tokenizer, MESSAGES)), 9)

    no_usage = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, stream=True))
    assert all(c.usage is None and len(c.choices) == 1 for c in no_usage)


# ------------------------------------------------------------------------------------------ errors
def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=2)
    assert e.value.status_code == 404 and e.value.code == "model_not_found" and e.value.param == "model"
    assert "gpt-9" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES, max_tokens=2, stream=True)


def test_prompt_longer_than_context_is_bad_request(client: openai.OpenAI, server: InProcessServer) -> None:
    limit = server.text_model.max_model_len
    long_prompt = "hello " * (limit + 10)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4)
    assert str(limit) in e.value.message and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4, stream=True)
    assert str(limit) in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}])
    assert str(limit) in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # the prompt fits, prompt + max_tokens does not
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=limit)
    assert str(limit) in e.value.message and e.value.param == "max_tokens"


def test_out_of_range_sampling_is_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=5)
    assert "temperature" in e.value.message and e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=5, stream=True)
    assert "temperature" in e.value.message
    bad: list[dict[str, Any]] = [
        {"top_p": 0.0},
        {"n": 0},
        {"presence_penalty": 3.0},
        {"logprobs": 50},
        {"max_tokens": 0},
    ]
    for kw in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=PROMPT, **{"max_tokens": 2, **kw})
        assert e.value.param == next(iter(kw)), kw
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, top_logprobs=2)
    assert e.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, logprobs=True, top_logprobs=21)
    assert e.value.param == "top_logprobs" and "top_logprobs" in e.value.message


def test_malformed_body_is_a_400_naming_the_field(client: openai.OpenAI, server: InProcessServer) -> None:
    """A field of the wrong type or value is OpenAI's (and vLLM's) 400 invalid_request_error with `param` naming
    the field, not FastAPI's 422 (the client raised UnprocessableEntityError before issue #31)."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"messages": "not a list"})
    assert e.value.param == "messages" and "list" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, extra_body={"prompt": {"a": 1}})
    assert e.value.param == "prompt" and e.value.code == "invalid_value"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])  # type: ignore
    assert e.value.param == "messages.0.role"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            response_format={"type": "xml_schema"},  # type: ignore[arg-type,typeddict-item]
        )
    assert e.value.param == "response_format.type" and "json_schema" in e.value.message
    assert e.value.type == "invalid_request_error"  # type: ignore[attr-defined]
    # union-typed fields are named as fields, not as the union branch pydantic tried (`stop.str`)
    for extra, param in [
        ({"stop": 5}, "stop"),
        ({"tool_choice": {"type": "function"}}, "tool_choice"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body=extra)
        assert e.value.param == param, (extra, e.value.body)
        assert e.value.body["message"].startswith(f"{param}: "), e.value.body  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", text={"format": {"type": "xml"}})  # type: ignore[typeddict-item]
    assert e.value.param == "text.format.type"
    # the OpenAPI schema documents the 400 and no 422
    spec = server.app.openapi()
    assert all("422" not in op["responses"] for ops in spec["paths"].values() for op in ops.values())
    assert "400" in spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    with server.client(timeout=10) as http:
        r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()) == {"error"}  # not JSON at all: OpenAI's 400
    assert r.json()["error"]["param"] is None and r.json()["error"]["code"] == "invalid_json"
