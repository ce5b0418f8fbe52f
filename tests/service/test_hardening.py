"""Hardening, round two (issue #17): each item of the hostile-client report, against a live server.

1. Big inputs never hold the event loop: megabyte prompts are parsed, tokenized and their token lists
   serialised on worker threads, and /health answers while that work runs; a prompt that cannot fit the
   context in characters is refused before it is tokenized.
2. Admission is exact: bursts ten times the queue get 200 or 503 + Retry-After, and the waiting gauge never
   exceeds --max-waiting.
4. Lone surrogates are a 400 naming the field.  5. Message content, tool_call_id and best_of are checked.
6. CORS preflights with the openai JS SDK's headers pass; refusals are in the error shape.
7. A slow or lying body gets a 408 and frees its slot.  8. The small ones.
(3, shutdown, is in test_shutdown.py: it needs a real process.)
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

import service.api.json_route as json_route
import service.api.tokenize as tokenize_module
from model_core.gan import GANConfig, Generator, save_gan
from model_core.lm import CausalLM
from model_core.tokenizer import Tokenizer
from service.config import Settings, parse_settings
from service.main import create_app
from tests.service.http_checks import assert_error, sse_events
from tests.service.server_utils import LiveServer, serve, text_model, tiny_text_model
from tests.utils import tiny_llama

ORIGIN = "https://app.example"
BIG = ("The quick brown fox jumps over the lazy dog. 12345 " * 80000)[:3_900_000]  # under the 4 MiB body limit


@pytest.fixture(scope="module")
def server(
    tiny_model: CausalLM,
    smol_tokenizer: Tokenizer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    gan_dir = save_gan(
        Generator(GANConfig(z_dim=8, embed_dim=4, g_width=4, d_width=4, image_size=32)).eval(),
        tmp_path_factory.mktemp("gan") / "gan",
    )
    settings = Settings(gan_path=str(gan_dir), cors_origins=[ORIGIN], request_body_timeout_s=1.0)
    with serve(create_app(settings, text_model=tiny_text_model(tiny_model, smol_tokenizer))) as live:
        yield live


@pytest.fixture()
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60.0) as c:
        yield c


def post_json(c: httpx.Client, path: str, body: bytes) -> httpx.Response:
    return c.post(path, content=body, headers={"content-type": "application/json"})


# ----------------------------------------------------------------------------- 1. the event loop
def test_big_inputs_never_hold_the_event_loop(
    server: LiveServer, smol_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heavy work on a megabyte body (parsing its JSON, tokenizing it, serialising the token list) runs
    off the event loop's thread, and the loop answers /health while that work is still in progress: each
    such call probes /health from inside itself before it goes on (were it on the loop, the probe could
    not be answered until it returned, and it would time out)."""
    [loop_thread] = [t.ident for t in threading.enumerate() if t.name == f"uvicorn-{server.port}"]
    big_count = len(smol_tokenizer.encode(BIG))  # before the tokenizer is wrapped
    calls: list[tuple[str, int | None, int]] = []  # (what, thread, /health status seen while it ran)

    def off_loop(what: str, fn: Any, is_big: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if is_big(*args):
                try:
                    with httpx.Client(base_url=server.base_url, timeout=10.0) as c:
                        status = c.get("/health").status_code
                except httpx.TimeoutException:
                    status = 0
                calls.append((what, threading.get_ident(), status))
            return fn(*args, **kwargs)

        return wrapper

    big = 64 * 1024
    monkeypatch.setattr(
        json_route, "json", SimpleNamespace(loads=off_loop("json.loads", json.loads, lambda s: len(s) > big))
    )
    tok = server.text_model.tokenizer
    monkeypatch.setattr(tok, "encode", off_loop("encode", tok.encode, lambda text, *a: len(text) > big))
    monkeypatch.setattr(
        tokenize_module,
        "_tokens_json",
        off_loop("tokens_json", tokenize_module._tokens_json, lambda ids, *a: len(ids) > big // 8),
    )
    # bodies serialised once here: the load threads share this process, so they must not hold the GIL
    # with JSON work of their own
    loads = [
        ("/tokenize", json.dumps({"prompt": BIG}).encode()),
        ("/v1/completions", json.dumps({"prompt": BIG, "max_tokens": 1}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": BIG}]}).encode()),
        (
            "/v1/completions",
            json.dumps({"prompt": "Hello there", "n": 16, "max_tokens": 64, "ignore_eos": True}).encode(),
        ),
    ]
    results: dict[int, httpx.Response] = {}

    def hit(i: int, path: str, body: bytes) -> None:
        with httpx.Client(base_url=server.base_url, timeout=300.0) as c:
            results[i] = post_json(c, path, body)

    threads = [threading.Thread(target=hit, args=(i, *loads[i % len(loads)])) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # before the fix, four such prompts froze /health for 34 s: all of this ran on the loop
    assert sorted(what for what, _, _ in calls) == ["encode"] * 2 + ["json.loads"] * 6 + ["tokens_json"] * 2, calls
    assert all(thread != loop_thread for _, thread, _ in calls), calls
    assert all(status == 200 for _, _, status in calls), calls
    for i, r in results.items():
        path = loads[i % len(loads)][0]
        if path == "/tokenize":
            assert r.status_code == 200 and r.json()["count"] == big_count
        elif i % len(loads) == 3:
            assert r.status_code == 200 and len(r.json()["choices"]) == 16
        else:  # far longer than the context in characters: refused before tokenizing
            err = assert_error(r, 400, code="context_length_exceeded")
            assert err["param"] in ("prompt", "messages") and "characters" in err["message"]


def test_a_prompt_refused_for_length_is_never_tokenized(
    server: LiveServer, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    tm = server.text_model
    calls = []
    monkeypatch.setattr(tm.tokenizer, "encode", lambda *a, **k: calls.append(1) or [1])
    text = "x" * (tm.max_prompt_chars + 1)
    assert_error(http.post("/v1/completions", json={"prompt": text}), 400, "prompt", "context_length_exceeded")
    assert_error(http.post("/v1/completions", json={"prompt": ["ok", text]}), 400, "prompt.1")
    assert_error(
        http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]}),
        400,
        "messages",
        "context_length_exceeded",
    )
    assert calls == [1]  # only the short "ok"


# ----------------------------------------------------------------------------- 2. admission
def test_bursts_ten_times_the_queue_get_200_or_503_and_the_gauge_stays_under_max_waiting(
    tiny_model: CausalLM, smol_tokenizer: Tokenizer
) -> None:
    max_waiting, max_num_seqs = 4, 2
    tm = text_model(tiny_model, smol_tokenizer, max_num_seqs=max_num_seqs, max_waiting=max_waiting)
    with serve(create_app(Settings(enable_gan=False), text_model=tm)) as live:
        engine = tm.engine
        gauge: list[float] = []
        stop = threading.Event()

        def watch() -> None:  # the gauge as /metrics reads it, sampled as fast as the engine changes it
            while not stop.is_set():
                gauge.append(engine.state()["aigc_num_requests_waiting"])
                time.sleep(0.0005)

        statuses: list[tuple[int, str | None, bool]] = []
        lock = threading.Lock()
        burst = 10 * (max_waiting + max_num_seqs)

        def one(i: int, barrier: threading.Barrier) -> None:
            stream = i % 2 == 0
            body = {"prompt": [1, 2, 3, i], "max_tokens": 24, "ignore_eos": True, "stream": stream}
            with httpx.Client(base_url=live.base_url, timeout=120.0) as c:
                barrier.wait()
                r = c.post("/v1/completions", json=body)
                ok = True
                if r.status_code == 200 and stream:
                    events = sse_events(r.content)
                    ok = not any("error" in e for e in events if isinstance(e, dict))
                with lock:
                    statuses.append((r.status_code, r.headers.get("retry-after"), ok))

        watcher = threading.Thread(target=watch)
        watcher.start()
        for _ in range(3):
            barrier = threading.Barrier(burst)
            threads = [threading.Thread(target=one, args=(i, barrier)) for i in range(burst)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        stop.set()
        watcher.join()
        ok = [s for s in statuses if s[0] == 200]
        refused = [s for s in statuses if s[0] == 503]
        print(
            f"\n{len(statuses)} requests in 3 bursts of {burst}: {len(ok)} x 200, {len(refused)} x 503; "
            f"waiting gauge max {max(gauge):.0f} over {len(gauge)} samples (limit {max_waiting})"
        )
        assert len(ok) + len(refused) == len(statuses)  # nothing else: no 504, no 500
        assert all(s[2] for s in ok)  # no 200 stream ended in an error
        assert all(s[1] for s in refused)  # Retry-After
        assert len(ok) >= 3 * (max_waiting + max_num_seqs)  # each burst filled the server
        assert max(gauge) <= max_waiting
        assert engine.admission.active == 0 and engine.scheduler.block_pool.num_used == 0


# ----------------------------------------------------------------------------- 4, 5. input checks
SURROGATE = b'"a\\ud800b"'


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", b'{"prompt": ' + SURROGATE + b"}", "prompt"),
        ("/v1/completions", b'{"prompt": ["ok", ' + SURROGATE + b"]}", "prompt.1"),
        ("/v1/completions", b'{"prompt": "ok", "stop": [' + SURROGATE + b"]}", "stop.0"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": ' + SURROGATE + b"}]}",
            "messages.0.content",
        ),
        ("/tokenize", b'{"prompt": ' + SURROGATE + b"}", "prompt"),
    ],
)
def test_lone_surrogates_are_a_400_naming_the_field(http: httpx.Client, path: str, body: bytes, param: str) -> None:
    err = assert_error(post_json(http, path, body), 400, param, "invalid_unicode")
    assert "surrogate" in err["message"]
    # a valid pair written as escapes is text, and is accepted
    ok = post_json(http, "/tokenize", b'{"prompt": "a\\ud83d\\ude00b"}')
    assert ok.status_code == 200 and ok.json()["count"] >= 1


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "user"}], "messages.0.content"),
        ([{"role": "user", "content": None}], "messages.0.content"),
        ([{"role": "system", "content": "be brief"}, {"role": "user", "content": None}], "messages.1.content"),
        ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}], "messages.1.tool_call_id"),
    ],
)
def test_messages_are_checked(http: httpx.Client, messages: list[dict[str, Any]], param: str) -> None:
    assert_error(http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2}), 400, param)


def test_best_of_is_refused_unless_it_equals_n(http: httpx.Client) -> None:
    err = assert_error(
        http.post("/v1/completions", json={"prompt": "hi", "best_of": 3, "max_tokens": 2}), 400, "best_of"
    )
    assert "best_of" in err["message"]
    r = http.post("/v1/completions", json={"prompt": "hi", "best_of": 2, "n": 2, "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


# ----------------------------------------------------------------------------- 6. CORS
def test_cors_preflight_with_the_openai_js_sdk_headers(http: httpx.Client) -> None:
    sdk_headers = (
        "authorization, content-type, x-stainless-arch, x-stainless-lang, x-stainless-os, "
        "x-stainless-package-version, x-stainless-retry-count, x-stainless-runtime, "
        "x-stainless-runtime-version, x-stainless-timeout"
    )
    r = http.options(
        "/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": sdk_headers,
        },
    )
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    allowed = {h.strip() for h in r.headers["access-control-allow-headers"].lower().split(",")}
    assert {h.strip() for h in sdk_headers.split(",")} <= allowed
    r = http.options(
        "/v1/chat/completions",
        headers={
            "Origin": "https://evil.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": sdk_headers,
        },
    )
    err = assert_error(r, 400, code="cors_refused")
    assert "origin" in err["message"] and "access-control-allow-origin" not in r.headers


# ----------------------------------------------------------------------------- 7. slow bodies
def raw_exchange(port: int, head: bytes, body_parts: list[bytes], gap_s: float, wait_s: float) -> tuple[int, bytes]:
    """Send the head, then each body part `gap_s` apart; return the status and body of the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(head)
        data = b""
        s.settimeout(gap_s)
        for part in body_parts:
            try:
                data += s.recv(65536)
                break  # the server answered already
            except TimeoutError:
                s.sendall(part)
        s.settimeout(wait_s)
        try:
            while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < 10:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
    head_part, _, body = data.partition(b"\r\n\r\n")
    return int(head_part.split(b" ", 2)[1]), body


@pytest.mark.parametrize("kind", ["lying_length", "trickle"])
def test_slow_or_lying_bodies_get_408_and_free_their_slot(server: LiveServer, kind: str) -> None:
    body = json.dumps({"prompt": "hello", "max_tokens": 2}).encode()
    length = len(body) + 100 if kind == "lying_length" else len(body)
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(length).encode() + b"\r\n\r\n"
    )
    parts = [body] if kind == "lying_length" else [body[i : i + 1] for i in range(len(body))]
    t0 = time.monotonic()
    status, reply = raw_exchange(server.port, head, parts, gap_s=0.2, wait_s=10.0)
    took = time.monotonic() - t0
    assert status == 408, reply
    assert json.loads(reply)["error"]["code"] == "request_body_timeout"
    assert took < 5.0  # request_body_timeout_s is 1 s here
    deadline = time.monotonic() + 5
    while server.app.state.server.inflight.count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.app.state.server.inflight.count == 0


def test_a_body_still_arriving_when_a_drain_starts_gets_503(server: LiveServer) -> None:
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head + b'{"prompt": ')
        time.sleep(0.2)
        server.app.state.server.draining = True
        try:
            data = b""
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        finally:
            server.app.state.server.draining = False
    head_part, _, body = data.partition(b"\r\n\r\n")
    assert head_part.split(b" ", 2)[1] == b"503" and b"retry-after: 1" in head_part.lower()
    assert json.loads(body)["error"]["code"] == "draining"


# ----------------------------------------------------------------------------- 8. the small ones
def test_wrong_content_type_is_415(http: httpx.Client) -> None:
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = http.post("/v1/completions", content=b'{"prompt": "hi"}', headers={"content-type": ctype})
        assert_error(r, 415, code="unsupported_media_type")
    r = http.post(
        "/v1/completions",
        content=b'{"prompt": "hi", "max_tokens": 1}',
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 200


def test_head_answers_like_get(http: httpx.Client) -> None:
    for path in ("/health", "/ready", "/v1/models", "/metrics"):
        r = http.head(path)
        assert r.status_code == 200 and r.content == b"", path
        assert r.headers["content-type"].split(";")[0] == http.get(path).headers["content-type"].split(";")[0]


def test_images_check_the_model_and_ascii_sizes(http: httpx.Client) -> None:
    url = "/v1/images/generations"
    assert_error(http.post(url, json={"prompt": "7", "model": "dall-e-3"}), 404, "model", "model_not_found")
    assert_error(http.post(url, json={"prompt": "7", "size": "\uff13\uff12x\uff13\uff12"}), 400, "size")  # fullwidth
    assert_error(http.post(url, json={"prompt": "7", "size": "\u0663\u0662x\u0663\u0662"}), 400, "size")  # Arabic-Indic
    assert http.post(url, json={"prompt": "7", "model": "gan-digits", "size": "32x32"}).status_code == 200


def test_booleans_are_not_token_ids(http: httpx.Client) -> None:
    assert_error(http.post("/v1/completions", json={"prompt": [True, False]}), 400, code="invalid_value")
    assert_error(http.post("/detokenize", json={"tokens": [True]}), 400, code="invalid_value")


def test_help_shows_real_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--help"])
    out = capsys.readouterr().out
    assert "PydanticUndefined" not in out
    assert "default /health,/ready,/metrics" in out and "--max-tokens-default" in out


def test_max_tokens_default_caps_requests_that_set_no_limit(
    tiny_model: CausalLM, smol_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    model = tiny_llama(max_seq_len=256)
    app = create_app(
        Settings(enable_gan=False, max_tokens_default=5), text_model=tiny_text_model(model, smol_tokenizer)
    )
    with serve(app) as live, httpx.Client(base_url=live.base_url, timeout=60.0) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        r = c.post("/v1/completions", json={"prompt": "hi", "ignore_eos": True})
        assert r.json()["usage"]["completion_tokens"] == 5
        r = c.post("/v1/completions", json={"prompt": "hi", "ignore_eos": True, "max_tokens": 9})
        assert r.json()["usage"]["completion_tokens"] == 9  # an explicit limit wins


def _exchange(port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send a whole raw request; return the response's head and body once the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_conflicting_body_framing_is_a_400_that_closes_the_connection(server: LiveServer) -> None:
    """Content-Length with Transfer-Encoding (or two different Content-Lengths): a proxy in front and this
    server could split the bytes into different requests (request smuggling), so neither framing is trusted."""
    body = b'{"prompt": "hi", "max_tokens": 1}'
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    start = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    for head in (
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,
        b"Transfer-Encoding: chunked\r\nContent-Length: 200\r\n\r\n" + chunked,
    ):
        status, payload = _exchange(server.port, start + head)  # the server closes: nothing is smuggled after
        assert status.startswith(b"HTTP/1.1 400") and b"connection: close" in status.lower(), status
        err = json.loads(payload)["error"]
        assert err["code"] == "conflicting_framing" and "Transfer-Encoding" in err["message"]
    status, _ = _exchange(server.port, start + b"Content-Length: 33\r\nContent-Length: 5\r\n\r\n" + body)
    assert status.startswith(b"HTTP/1.1 400"), status
    # one framing alone is served
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        assert c.post("/v1/completions", content=body, headers={"content-type": "application/json"}).status_code == 200
        chunks = iter([body[:10], body[10:]])
        r = c.post("/v1/completions", content=chunks, headers={"content-type": "application/json"})  # chunked
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "method, path, what",
    [
        ("POST", "/v1/embeddings", "embedding model"),
        ("POST", "/v1/audio/transcriptions", "audio"),
        ("POST", "/v1/audio/speech", "audio"),
        ("POST", "/v1/moderations", "moderation"),
        ("GET", "/v1/files", "files"),
        ("POST", "/v1/images/edits", "image edits"),
        ("GET", "/v1/responses/resp_123", "stored responses"),
        ("POST", "/v1/rerank", "reranking"),
    ],
)
def test_unsupported_routes_say_what_this_server_does_not_serve(
    http: httpx.Client, method: str, path: str, what: str
) -> None:
    err = assert_error(http.request(method, path, json={"input": "x", "model": "m"}), 404, code="unsupported_endpoint")
    assert err["type"] == "not_found_error"
    assert err["message"].startswith(f"{path}: this server does not serve") and what in err["message"], err
    assert "/v1/chat/completions" in err["message"]  # and what it serves instead


def test_unsupported_routes_through_the_openai_client(server: LiveServer) -> None:
    import openai

    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError, match="embedding model") as e:
            client.embeddings.create(model="m", input="hello")
        assert e.value.code == "unsupported_endpoint"
        with pytest.raises(openai.NotFoundError, match="moderation"):
            client.moderations.create(input="hello")
    err = assert_error(httpx.get(f"{server.base_url}/v1/no-such-route", timeout=10), 404)
    assert err["code"] is None and err["message"] == "Not Found"  # other unknown paths: a plain 404
