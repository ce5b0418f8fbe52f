"""The grapheme-to-phoneme model `cmudict-g2p` served next to the LM on /v1/completions (in-process, the
shipped checkpoint, a tiny random LM): routing by `model`, words and lists of words, streaming, beams and
samples, the 400s, /v1/models kinds, metrics labelled by model, and micro-batching."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from model_core.g2p import G2P, load_g2p
from model_core.lm import CausalLM
from model_core.tokenizer import Tokenizer
from service.config import Settings
from service.engine.seq2seq import Seq2SeqBatcher, Seq2SeqRequest
from tests.service.http_checks import assert_error, sse_events
from tests.service.server_utils import TINY_MODEL_NAME, InProcessServer, serve_tiny_in_process

G2P_MODEL = "cmudict-g2p"
WORDS = ["porpoise", "memorizing", "any", "ad-lib", "sathyavagiswaran", "baby-sit", "expansionary"]


@pytest.fixture(scope="module")
def g2p() -> G2P:
    return load_g2p()


@pytest.fixture(scope="module")
def server(tiny_model: CausalLM, smol_tokenizer: Tokenizer) -> Iterator[InProcessServer]:
    with serve_tiny_in_process(tiny_model, smol_tokenizer, settings=Settings(enable_gan=False)) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: InProcessServer) -> Iterator[httpx.Client]:
    with server.client(timeout=60.0) as c:
        yield c


def g2p_post(http: httpx.Client, **body: Any) -> httpx.Response:
    return http.post("/v1/completions", json={"model": G2P_MODEL, **body})


def ok(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = g2p_post(http, **body)
    assert r.status_code == 200, r.text
    return r.json()


def texts(body: dict[str, Any]) -> list[str]:
    assert [c["index"] for c in body["choices"]] == list(range(len(body["choices"])))
    return [c["text"] for c in body["choices"]]


# ------------------------------------------------------------------------------------------- models
def test_models_list_each_with_its_kind(http: httpx.Client, g2p: G2P) -> None:
    data = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == [TINY_MODEL_NAME, G2P_MODEL]  # the LM first (clients take data[0])
    assert [m["kind"] for m in data] == ["text-generation", "seq2seq"]
    entry = http.get(f"/v1/models/{G2P_MODEL}").json()
    assert entry == data[1] and entry["max_model_len"] == g2p.config.max_word_len
    assert http.get(f"/v1/models/{TINY_MODEL_NAME}").json() == data[0]
    err = assert_error(http.get("/v1/models/no-such-model"), 404, param="model", code="model_not_found")
    assert G2P_MODEL in err["message"] and TINY_MODEL_NAME in err["message"]


def test_routing_by_model(http: httpx.Client) -> None:
    body = ok(http, prompt="hello")
    assert body["model"] == G2P_MODEL and body["object"] == "text_completion"
    r = http.post(
        "/v1/completions", json={"model": TINY_MODEL_NAME, "prompt": "hello", "max_tokens": 3, "temperature": 0}
    )
    assert r.status_code == 200 and r.json()["model"] == TINY_MODEL_NAME  # the LM path is unchanged
    r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})  # no model: the LM
    assert r.status_code == 200 and r.json()["model"] == TINY_MODEL_NAME
    assert_error(
        http.post("/v1/completions", json={"model": "cmudict", "prompt": "hello"}),
        404,
        param="model",
        code="model_not_found",
    )
    chat = http.post("/v1/chat/completions", json={"model": G2P_MODEL, "messages": [{"role": "user", "content": "a"}]})
    assert_error(chat, 404, param="model")  # only /v1/completions serves it


# -------------------------------------------------------------------------------------- transcribing
def test_word_and_list_of_words_match_the_model(http: httpx.Client, g2p: G2P) -> None:
    expected = [" ".join(p) for p in g2p.greedy(WORDS)]
    body = ok(http, prompt="Porpoise")  # normalised: case and surrounding spaces
    assert texts(body) == expected[:1] and body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["logprobs"] is None
    n = len(expected[0].split())
    assert body["usage"] == {
        "prompt_tokens": 8,
        "completion_tokens": n,
        "total_tokens": 8 + n,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    body = ok(http, prompt=WORDS)
    assert texts(body) == expected
    assert body["usage"]["prompt_tokens"] == sum(map(len, WORDS))
    assert body["usage"]["completion_tokens"] == sum(len(t.split()) for t in expected)
    assert all(len(t.split()) >= 2 and t == t.strip() for t in expected)
    cut = ok(http, prompt="expansionary", max_tokens=3)["choices"][0]
    assert cut["text"].split() == expected[-1].split()[:3] and cut["finish_reason"] == "length"


def test_streaming_one_chunk_per_phone(http: httpx.Client, g2p: G2P) -> None:
    expected = [" ".join(p) for p in g2p.greedy(WORDS[:3])]
    r = g2p_post(http, prompt=WORDS[:3], stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.content)
    got = [""] * 3
    finish: list[str | None] = [None] * 3
    for ev in events[:-1]:
        assert ev["object"] == "text_completion" and ev["model"] == G2P_MODEL and ev["usage"] is None
        (c,) = ev["choices"]
        assert finish[c["index"]] is None  # nothing after a choice's finish
        got[c["index"]] += c["text"]
        finish[c["index"]] = c["finish_reason"]
        assert c["finish_reason"] is not None or c["text"].strip() in g2p.config.phones
    assert got == expected and finish == ["stop"] * 3
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == sum(
        len(t.split()) for t in expected
    )
    beams = g2p_post(http, prompt="porpoise", n=2, stream=True)
    chunks = sse_events(beams.content)
    assert "usage" not in chunks[0]
    joined = ["", ""]
    for ev in chunks:
        joined[ev["choices"][0]["index"]] += ev["choices"][0]["text"]
    assert joined == texts(ok(http, prompt="porpoise", n=2))


def test_beams_and_samples(http: httpx.Client, g2p: G2P) -> None:
    nbest = g2p.beam_search(["porpoise", "any"], width=3, n=3)
    body = ok(http, prompt=["porpoise", "any"], n=3)  # temperature 0: the 3 best of 3 beams, best first
    assert texts(body) == [" ".join(h.phones) for b in nbest for h in b]
    assert len(set(texts(body)[:3])) == 3
    wide = g2p.beam_search(["porpoise"], width=5, n=2)[0]
    assert texts(ok(http, prompt="porpoise", n=2, best_of=5)) == [" ".join(h.phones) for h in wide]
    assert texts(ok(http, prompt="porpoise", best_of=4))[0] == " ".join(g2p.beam_search(["porpoise"], 4)[0][0].phones)
    sampled = ok(http, prompt=["sathyavagiswaran"], n=4, temperature=1.5, seed=11)
    assert texts(sampled) == texts(ok(http, prompt=["sathyavagiswaran"], n=4, temperature=1.5, seed=11))
    assert len(set(texts(sampled))) > 1


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "prompt,needle",
    [
        ("", "empty"),
        (["hello", "  "], "prompt.1: empty"),
        ("a" * 33, "at most 32"),
        ("héllo", "'é'"),
        ("two words", "' '"),
        ([1, 2, 3], "not token ids"),
        ([[1, 2]], "not token ids"),
        ([], "non-empty"),
        (["a"] * 257, "at most 256 words"),
    ],
)
def test_bad_words_are_400_naming_the_accepted_characters(http: httpx.Client, prompt: Any, needle: str) -> None:
    err = assert_error(g2p_post(http, prompt=prompt), 400, param="prompt")
    assert needle in err["message"], err
    if needle not in ("at most 32", "at most 256 words"):
        assert "a-z" in err["message"] and "apostrophe" in err["message"], err


@pytest.mark.parametrize(
    "field,value",
    [
        ("logprobs", 1),
        ("echo", True),
        ("suffix", "x"),
        ("stop", ["AH0"]),
        ("logit_bias", {"5": 1.0}),
        ("presence_penalty", 0.5),
        ("response_format", {"type": "json_object"}),
        ("tools", [{"type": "function"}]),
        ("prompt_logprobs", 1),
        ("min_tokens", 2),
    ],
)
def test_fields_it_cannot_honour_are_400_naming_them(http: httpx.Client, field: str, value: Any) -> None:
    assert_error(g2p_post(http, prompt="hello", **{field: value}), 400, param=field, code="unsupported_parameter")


@pytest.mark.parametrize(
    "body,param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 49}, "max_tokens"),
        ({"n": 17}, "n"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"temperature": 1, "best_of": 3}, "best_of"),
        ({"timeout": 0}, "timeout"),
    ],
)
def test_out_of_range_values_are_400(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    assert_error(g2p_post(http, prompt="hello", **body), 400, param=param)


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_carry_the_model_label(http: httpx.Client) -> None:
    ok(http, prompt=["porpoise", "any"])
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200  # the LM
    text = http.get("/metrics").text
    lines = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert lines[f'aigc_prompt_tokens_total{{model="{G2P_MODEL}"}}'] >= 11
    assert lines[f'aigc_generation_tokens_total{{model="{G2P_MODEL}"}}'] >= 4
    assert lines[f'aigc_request_success_total{{finish_reason="stop",model="{G2P_MODEL}"}}'] >= 2
    assert lines[f'aigc_seq2seq_batch_size_count{{model="{G2P_MODEL}"}}'] >= 1
    assert lines[f'aigc_e2e_request_latency_seconds_count{{model="{G2P_MODEL}"}}'] >= 1
    assert f'aigc_e2e_request_latency_seconds_count{{model="{TINY_MODEL_NAME}"}}' in lines  # the LM's own


def test_disabled_or_missing_checkpoint_is_not_served(
    tiny_model: CausalLM, smol_tokenizer: Tokenizer, tmp_path: Any
) -> None:
    for settings in (Settings(enable_gan=False, enable_g2p=False), Settings(enable_gan=False, g2p_path=str(tmp_path))):
        with (
            serve_tiny_in_process(tiny_model, smol_tokenizer, settings=settings) as live,
            live.client(timeout=30.0) as c,
        ):
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [TINY_MODEL_NAME]
            assert_error(c.post("/v1/completions", json={"model": G2P_MODEL, "prompt": "hi"}), 404, param="model")


# ------------------------------------------------------------------------------------------ batching
def test_concurrent_requests_share_batches_and_equal_one_at_a_time(g2p: G2P) -> None:
    words = WORDS * 3

    async def main() -> tuple[list[list[str]], int, list[int]]:
        sizes: list[int] = []
        b = Seq2SeqBatcher(g2p, max_batch=64, max_wait_ms=50, on_batch=lambda rows, reqs, s: sizes.append(rows))
        await b.start()
        try:
            out = await asyncio.gather(*(b.transcribe(Seq2SeqRequest((w,))) for w in words))
        finally:
            await b.stop()
        return [o[0].phones for o in out], b.batches, sizes

    got, batches, sizes = asyncio.run(main())
    assert got == [g2p.greedy([w])[0] for w in words]
    assert batches < len(words) and sum(sizes) == len(words)


def test_batcher_streams_events_and_refuses_after_stop(g2p: G2P) -> None:
    async def main() -> None:
        b = Seq2SeqBatcher(g2p, max_batch=8, max_wait_ms=1)
        await b.start()
        events: list[Any] = []
        res = await b.transcribe(Seq2SeqRequest(("porpoise", "any"), n=1), events.append)
        await asyncio.sleep(0)  # events are delivered through the loop
        for i, h in enumerate(res):
            assert [e.phone for e in events if e.index == i and e.phone] == h.phones
            assert [e.finish_reason for e in events if e.index == i and e.finish_reason] == ["stop"]
        await b.stop()
        with pytest.raises(RuntimeError, match="not running"):
            await b.transcribe(Seq2SeqRequest(("any",)))

    asyncio.run(main())


def test_openai_client(server: InProcessServer, g2p: G2P) -> None:
    import openai

    with openai.OpenAI(
        base_url=f"{server.base_url}/v1", http_client=server.http_client(), api_key="x", max_retries=0, timeout=60.0
    ) as client:
        assert client.models.retrieve(G2P_MODEL).id == G2P_MODEL
        out = client.completions.create(model=G2P_MODEL, prompt=["porpoise", "any"])
        assert [c.text for c in out.choices] == [" ".join(p) for p in g2p.greedy(["porpoise", "any"])]
        streamed = "".join(
            c.choices[0].text
            for c in client.completions.create(model=G2P_MODEL, prompt="porpoise", stream=True)
            if c.choices
        )
        assert streamed == out.choices[0].text
        with pytest.raises(openai.BadRequestError, match="a-z"):
            client.completions.create(model=G2P_MODEL, prompt="naïve")
        with pytest.raises(openai.BadRequestError, match="a-z") as e:  # the Kelvin sign: not an ASCII "K"
            client.completions.create(model=G2P_MODEL, prompt="\u212aelvin")
        assert e.value.param == "prompt"


def test_benchmark_client(server: InProcessServer) -> None:
    from benchmarks.g2p import FALLBACK_WORDS, run_level, table

    async def main() -> Any:
        async with server.async_client(timeout=60.0) as c:
            return [await run_level(c, list(FALLBACK_WORDS), 4, 12, k, {}) for k in (1, 3)]

    one, three = asyncio.run(main())
    assert (one.words, one.errors, three.words, three.errors) == (12, 0, 36, 0)
    assert one.words_per_s > 0 and one.phones_per_word > 2
    assert table([one, three]).count("\n") == 3
