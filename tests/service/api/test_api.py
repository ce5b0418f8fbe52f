"""The HTTP API in-process (tiny random LM, real SmolLM2 tokenizer): tokenize and detokenize, health and
readiness, the error shape, prompt forms, echo, SSE framing; and over a live uvicorn server (the socket is the
point there), that a client disconnect aborts the request in the engine and frees its KV blocks."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

import service.main
from model_core.lm import CausalLM
from model_core.tokenizer import Tokenizer
from service.api.text_model import TextModel
from service.config import Settings
from service.engine.scheduler import FinishReason
from service.main import create_app
from tests.service.http_checks import assert_error, sse_events
from tests.service.server_utils import (
    TINY_MODEL_NAME,
    InProcessServer,
    LiveServer,
    serve_in_process,
    serve_tiny,
    serve_tiny_in_process,
    tiny_text_model,
)
from tests.utils import tiny_llama

MODEL = TINY_MODEL_NAME
CONTEXT = 1024
MESSAGES = [{"role": "user", "content": "Tell me a story about a dragon."}]


@pytest.fixture(scope="module")
def long_model() -> CausalLM:
    """The tiny LM with a longer context, so that one request can outlive a client's patience."""
    return tiny_llama(max_seq_len=CONTEXT)


@pytest.fixture(scope="module")
def server(long_model: CausalLM, smol_tokenizer: Tokenizer) -> Iterator[InProcessServer]:
    with serve_tiny_in_process(long_model, smol_tokenizer, num_blocks=2 * CONTEXT // 16) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: InProcessServer) -> Iterator[httpx.Client]:
    with server.client(timeout=60.0) as c:
        yield c


def completion(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post("/v1/completions", json={"model": MODEL, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------------------- health, ready
def test_health_and_ready(http: httpx.Client, server: InProcessServer) -> None:
    r = http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = http.get("/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready" and r.json()["model"] == MODEL
    assert server.text_model.engine.is_alive


def test_ready_turns_200_once_the_model_has_loaded(
    monkeypatch: pytest.MonkeyPatch, tiny_model: CausalLM, smol_tokenizer: Tokenizer
) -> None:
    """While the model loads: /health answers, /ready is 503, /v1/models lists it as loading, and a request for it
    waits for the load (as llama-server's router mode and Ollama do) and is then served."""
    release = threading.Event()

    def slow_build(settings: Settings, observer: Any = None) -> TextModel:
        assert release.wait(30.0)
        return tiny_text_model(tiny_model, smol_tokenizer)

    monkeypatch.setattr(service.main, "build_text_model", slow_build)
    app = create_app(Settings(enable_gan=False, served_model_name=MODEL))
    with serve_in_process(app) as live, live.client(timeout=30.0) as c, ThreadPoolExecutor(1) as pool:
        assert c.get("/health").status_code == 200  # liveness does not wait for the model
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        assert any("loading" in reason for reason in r.json()["reasons"])
        (entry,) = [m for m in c.get("/v1/models").json()["data"] if m["kind"] == "text-generation"]
        assert (entry["id"], entry["status"], entry["loaded"]) == (MODEL, {"value": "loading"}, False)
        waiting = pool.submit(c.post, "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        time.sleep(0.2)
        assert not waiting.done()  # it waits for the load
        release.set()
        r = waiting.result(30.0)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        deadline = time.monotonic() + 10.0
        while c.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.get("/ready").json() == {"status": "ready", "model": MODEL}


def test_ready_reports_a_failed_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_build(settings: Settings, observer: Any = None) -> TextModel:
        raise FileNotFoundError("no model at /nowhere.gguf")

    monkeypatch.setattr(service.main, "build_text_model", failing_build)
    with serve_in_process(create_app(Settings(enable_gan=False))) as live, live.client(timeout=30.0) as c:
        deadline = time.monotonic() + 10.0
        while "failed" not in c.get("/ready").text and time.monotonic() < deadline:
            time.sleep(0.01)
        r = c.get("/ready")
        assert r.status_code == 503 and any("/nowhere.gguf" in reason for reason in r.json()["reasons"])
        assert c.get("/health").status_code == 200


# ------------------------------------------------------------------------------ tokenize/detokenize
@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  leading spaces and\ttabs\n\nnewlines",
        "naïve café — 東京 🚀 emoji",
        "<|im_start|>user\nhi<|im_end|>",
    ],
)
def test_tokenize_detokenize_round_trip(http: httpx.Client, smol_tokenizer: Tokenizer, text: str) -> None:
    r = http.post("/tokenize", json={"model": MODEL, "prompt": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == smol_tokenizer.encode(text)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == CONTEXT
    r = http.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": text}


def test_tokenize_messages_matches_chat_prompt_tokens(http: httpx.Client, smol_tokenizer: Tokenizer) -> None:
    r = http.post("/tokenize", json={"messages": MESSAGES})
    assert r.status_code == 200, r.text
    text = smol_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert r.json()["tokens"] == smol_tokenizer.encode(text, add_special_tokens=False)
    chat = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == r.json()["count"]
    no_gen = http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False})
    assert no_gen.json()["count"] < r.json()["count"]
    parts = [{"type": "text", "text": "Tell me a story"}, {"type": "text", "text": " about a dragon."}]
    as_parts = http.post("/tokenize", json={"messages": [{"role": "user", "content": parts}]})
    assert as_parts.status_code == 200 and as_parts.json()["tokens"] == r.json()["tokens"]


def test_tokenize_and_detokenize_errors(http: httpx.Client) -> None:
    assert_error(http.post("/detokenize", json={"tokens": [1, 10**9]}), 400, param="tokens")
    assert_error(http.post("/detokenize", json={"tokens": [-1]}), 400, param="tokens")
    assert_error(http.post("/tokenize", json={}), 400, param="prompt")
    assert_error(http.post("/tokenize", json={"prompt": "a", "messages": MESSAGES}), 400, param="prompt")
    assert_error(http.post("/tokenize", json={"prompt": "a", "model": "other"}), 404, param="model")
    assert_error(http.post("/detokenize", json={"tokens": "abc"}), 400, param="tokens", code="invalid_value")


# ------------------------------------------------------------------------------------- error shape
def test_every_error_has_the_openai_shape(http: httpx.Client) -> None:
    err = assert_error(
        http.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model", "model_not_found"
    )
    assert err["type"] == "not_found_error"
    err = assert_error(http.post("/v1/completions", json={"prompt": "x", "temperature": 5}), 400, "temperature")
    assert err["type"] == "invalid_request_error" and "temperature" in err["message"]
    assert_error(http.post("/v1/chat/completions", json={"messages": "hi"}), 400, "messages")
    assert_error(http.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
    assert_error(http.post("/v1/completions", json={}), 400, "prompt")
    assert_error(
        http.post("/v1/completions", content=b"[1,", headers={"content-type": "application/json"}),
        400,
        None,
        "invalid_json",
    )
    assert_error(http.get("/v1/no-such-route"), 404)
    assert_error(http.get("/v1/completions"), 405)
    assert_error(http.post("/v1/completions", json={"prompt": "x", "suffix": "y"}), 400, "suffix")
    assert_error(http.post("/v1/completions", json={"prompt": "x", "prompt_logprobs": 21}), 400, "prompt_logprobs")
    assert_error(http.post("/v1/completions", json={"prompt": [5, 10**9]}), 400, "prompt")
    assert_error(http.post("/v1/completions", json={"prompt": []}), 400, "prompt")
    assert_error(http.post("/v1/completions", json={"prompt": ""}), 400, "prompt")
    assert_error(http.post("/v1/completions", json={"prompt": "x", "stop": ["a"] * 17}), 400, "stop")
    assert_error(http.post("/v1/completions", json={"prompt": "x", "logit_bias": {"abc": 1}}), 400, "logit_bias")
    assert_error(
        http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        ),
        400,
    )
    # errors of streamed requests are found before the stream starts: a plain JSON error, not SSE
    assert_error(
        http.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True, "top_p": 0}), 400, "top_p"
    )


# ----------------------------------------------------------------------------------- prompt forms
def test_token_id_and_string_list_prompts(http: httpx.Client, smol_tokenizer: Tokenizer) -> None:
    prompts = ["Once upon a time", "The capital of France is", "1, 2, 3,"]
    singles = [completion(http, prompt=p, max_tokens=6) for p in prompts]
    texts = [s["choices"][0]["text"] for s in singles]

    as_ids = completion(http, prompt=smol_tokenizer.encode(prompts[0]), max_tokens=6)
    assert as_ids["choices"][0]["text"] == texts[0]
    assert as_ids["usage"] == singles[0]["usage"]

    listed = completion(http, prompt=prompts, max_tokens=6)
    assert [c["index"] for c in listed["choices"]] == [0, 1, 2]
    assert [c["text"] for c in listed["choices"]] == texts
    assert listed["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)
    assert listed["usage"]["completion_tokens"] == sum(s["usage"]["completion_tokens"] for s in singles)

    ids_list = completion(http, prompt=[smol_tokenizer.encode(p) for p in prompts[:2]], max_tokens=6, n=2)
    assert [c["index"] for c in ids_list["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in ids_list["choices"]] == [texts[0], texts[0], texts[1], texts[1]]  # greedy: n equal


def test_echo(http: httpx.Client, smol_tokenizer: Tokenizer) -> None:
    prompt = "Echo this prompt please"
    plain = completion(http, prompt=prompt, max_tokens=5)
    echoed = completion(http, prompt=prompt, max_tokens=5, echo=True)
    assert echoed["choices"][0]["text"] == prompt + plain["choices"][0]["text"]
    assert echoed["usage"] == plain["usage"]
    ids = smol_tokenizer.encode(prompt)
    by_ids = completion(http, prompt=ids, max_tokens=5, echo=True)
    assert by_ids["choices"][0]["text"] == prompt + plain["choices"][0]["text"]

    r = http.post(
        "/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0, "echo": True, "stream": True}
    )
    events = sse_events(r.content)
    assert events[0]["choices"][0]["text"] == prompt
    assert "".join(e["choices"][0]["text"] for e in events) == echoed["choices"][0]["text"]


# ------------------------------------------------------------------------------------- SSE framing
def test_sse_framing_completions_and_chat(http: httpx.Client) -> None:
    r = http.post(
        "/v1/completions",
        json={
            "prompt": "Stream me",
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    events = sse_events(r.content)
    ids = {e["id"] for e in events}
    assert len(ids) == 1 and next(iter(ids)).startswith("cmpl-")
    assert all(e["object"] == "text_completion" and e["model"] == MODEL for e in events)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]][-1] in ("stop", "length")

    r = http.post(
        "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True}
    )
    events = sse_events(r.content)
    assert all(e["object"] == "chat.completion.chunk" and e["id"].startswith("chatcmpl-") for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["delta"] == {} and events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


# -------------------------------------------------------------------------------------- disconnect
@pytest.fixture(scope="module")
def live_server(smol_tokenizer: Tokenizer) -> Iterator[LiveServer]:
    """A real socket: the client closes its connection mid-request (its own model, not shared with `server`)."""
    with serve_tiny(tiny_llama(max_seq_len=CONTEXT), smol_tokenizer, num_blocks=2 * CONTEXT // 16) as live:
        yield live


@pytest.fixture
def aborts(live_server: LiveServer) -> Iterator[list[str]]:
    """Request ids the engine was asked to abort while the test runs."""
    engine = live_server.text_model.engine
    aborted: list[str] = []
    real_abort = engine.abort

    def recording_abort(request_id: str) -> None:
        aborted.append(request_id)
        real_abort(request_id)

    engine.abort = recording_abort  # type: ignore[method-assign]
    try:
        yield aborted
    finally:
        del engine.abort


def _long_body(path: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": CONTEXT - 64, "temperature": 0, "ignore_eos": True, "stream": stream, "n": 2}
    body.update({"prompt": "A very long story:"} if path == "/v1/completions" else {"messages": MESSAGES})
    return body


def _assert_engine_idle_soon(server: LiveServer, deadline_s: float = 5.0) -> None:
    sched = server.text_model.engine.scheduler
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and (sched.num_running or sched.num_waiting or sched.kv_usage):
        time.sleep(0.01)
    assert sched.num_running == 0 and sched.num_waiting == 0
    assert sched.kv_usage == 0.0


def _assert_still_serves(server: LiveServer) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30.0) as c:
        r = c.post("/v1/completions", json={"prompt": "again", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_disconnect_aborts_and_frees_kv(live_server: LiveServer, aborts: list[str], path: str) -> None:
    engine = live_server.text_model.engine
    with (
        httpx.Client(base_url=live_server.base_url, timeout=30.0) as c,
        c.stream("POST", path, json=_long_body(path, stream=True)) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        rid = json.loads(first[len("data: ") :])["id"]
        got = 1
        for line in lines:
            got += line.startswith("data: ")
            if got >= 6:
                break
        deadline = time.monotonic() + 5.0
        while True:  # both choices are in the engine once tokens flow (chat's role chunks come first)
            seqs = [engine.scheduler.get(f"{rid}-{i}") for i in range(2)]
            if all(s is not None for s in seqs) or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        assert all(s is not None for s in seqs), "both choices should be running"
        assert engine.scheduler.kv_usage > 0
        # leaving the block closes the connection mid-stream
    _assert_engine_idle_soon(live_server)
    for i, seq in enumerate(seqs):
        assert seq is not None and engine.scheduler.get(seq.request_id) is None
        assert seq.finish_reason is FinishReason.ABORT
        assert seq.num_output_tokens < CONTEXT - 64
        assert f"{rid}-{i}" in aborts
    _assert_still_serves(live_server)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_non_streamed_disconnect_aborts_and_frees_kv(live_server: LiveServer, aborts: list[str], path: str) -> None:
    engine = live_server.text_model.engine
    running: list[Any] = []

    def watch() -> None:  # remember the sequences the request runs, to check how they ended
        deadline = time.monotonic() + 10.0
        while len(running) < 2 and time.monotonic() < deadline:
            running[:] = list(engine.scheduler.running)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while the server generates
        httpx.post(
            f"{live_server.base_url}{path}", json=_long_body(path, stream=False), timeout=httpx.Timeout(10.0, read=1.0)
        )
    watcher.join()
    _assert_engine_idle_soon(live_server)
    assert len(running) == 2
    for seq in running:
        assert seq.finish_reason is FinishReason.ABORT and seq.num_output_tokens < CONTEXT - 64
        assert seq.request_id in aborts
    _assert_still_serves(live_server)
