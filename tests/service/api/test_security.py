"""Security over real uvicorn on 127.0.0.1: API keys (from the setting, the environment, the CLI and a
file) guard every route but the public ones with a 401 in OpenAI's shape; CORS is off by default and
answers preflights only for configured origins; no error body carries a stack trace or file contents;
path traversal finds nothing."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Route

import service.api.tokenize as tokenize_module
from model_core.lm import CausalLM
from model_core.tokenizer import Tokenizer
from service.api import ui
from service.config import Settings, parse_settings
from service.main import create_app
from tests.service.server_utils import TINY_MODEL_NAME, LiveServer, serve, tiny_text_model

KEYS = ("sk-alpha-0123456789", "sk-beta-9876543210")
FILE_KEY = "sk-from-file-abcdef"
ORIGIN = "https://app.example"
ERROR_KEYS = {"message", "type", "param", "code"}
PUBLIC = ("/health", "/ready", "/metrics", *ui.PUBLIC_PATHS)  # the playground's page and assets
LEAK_MARKERS = ("Traceback", 'File "', "root:x:0:0", "/work/", "site-packages", '.py", line')


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api_keys.txt"
    path.write_text(f"# one key per line; comments and blank lines are skipped\n\n  {FILE_KEY}  \n# sk-commented-out\n")
    return path


@pytest.fixture(scope="module")
def secured(tiny_model: CausalLM, smol_tokenizer: Tokenizer, key_file: Path) -> Iterator[LiveServer]:
    """Keys from the setting and from a file, CORS for one origin, the default public paths."""
    settings = Settings(enable_gan=False, api_keys=list(KEYS), api_key_file=str(key_file), cors_origins=[ORIGIN])
    with serve(create_app(settings, text_model=tiny_text_model(tiny_model, smol_tokenizer))) as live:
        yield live


@pytest.fixture(scope="module")
def open_server(tiny_model: CausalLM, smol_tokenizer: Tokenizer) -> Iterator[LiveServer]:
    """The defaults: no keys, no CORS."""
    with serve(create_app(Settings(enable_gan=False), text_model=tiny_text_model(tiny_model, smol_tokenizer))) as live:
        yield live


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_401(r: httpx.Response) -> None:
    assert r.status_code == 401, (r.request.url, r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    assert r.headers["www-authenticate"] == "Bearer"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    assert body["error"]["type"] == "authentication_error" and body["error"]["code"] == "invalid_api_key"
    assert "x-request-id" in r.headers


def assert_no_leak(text: str) -> None:
    for marker in LEAK_MARKERS:
        assert marker not in text, (marker, text[:500])


def routes(live: LiveServer) -> list[tuple[str, str]]:
    """(method, concrete path) of every route: those in the OpenAPI schema and the app's own (docs)."""
    out = [
        (m.upper(), p.replace("{model_id}", TINY_MODEL_NAME))
        for p, ops in live.app.openapi()["paths"].items()
        for m in ops
    ]
    for r in live.app.routes:
        if isinstance(r, Route) and r.include_in_schema is False:
            out += [(m, r.path) for m in sorted(r.methods or ()) if m != "HEAD"]
    return out


BODIES: dict[str, dict[str, Any]] = {
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [1, 2]},
    "/v1/images/generations": {"prompt": "7", "size": "32x32"},
}


# ------------------------------------------------------------------------------------------ API keys
def test_every_protected_route_needs_a_valid_key(secured: LiveServer) -> None:
    protected = [(m, p) for m, p in routes(secured) if p not in PUBLIC]
    for route in [
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("POST", "/tokenize"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
    ]:
        assert route in protected, protected
    wrong = [
        None,
        "Bearer",
        "Bearer sk-wrong",
        f"Basic {KEYS[0]}",
        f"Bearer {KEYS[0][:-1]}",
        f"Bearer {KEYS[0]}x",
        f"Token {KEYS[0]}",
        f"{KEYS[0]}",
        "Bearer sk-commented-out",
        "Bearer # one key per line; comments and blank lines are skipped",
    ]
    with httpx.Client(base_url=secured.base_url, timeout=30.0) as c:
        for method, path in protected:
            for header in wrong:
                headers = {"Authorization": header} if header is not None else {}
                r = c.request(method, path, json=BODIES.get(path), headers=headers)
                assert_401(r)
                assert_no_leak(r.text)
        # unknown paths are 401 as well: without a key nobody learns which routes exist
        assert_401(c.get("/v1/secret-admin"))
        assert c.get("/v1/secret-admin", headers=auth(KEYS[0])).status_code == 404


@pytest.mark.parametrize("key", [*KEYS, FILE_KEY])
def test_each_configured_key_is_accepted(secured: LiveServer, key: str) -> None:
    with httpx.Client(base_url=secured.base_url, timeout=30.0, headers=auth(key)) as c:
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert c.get("/v1/models").json()["data"][0]["id"] == TINY_MODEL_NAME
        assert c.post("/tokenize", json={"prompt": "hi"}).status_code == 200
        assert c.get("/openapi.json").status_code == 200
        # the scheme is case-insensitive and extra spaces are tolerated
        assert c.get("/v1/models", headers={"Authorization": f"bearer  {key}"}).status_code == 200


def test_public_paths_stay_open(secured: LiveServer) -> None:
    with httpx.Client(base_url=secured.base_url, timeout=30.0) as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/ready").status_code == 200
        r = c.get("/metrics")
        assert r.status_code == 200 and "aigc_" in r.text
        assert c.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 200


def test_public_paths_are_configurable(tiny_model: CausalLM, smol_tokenizer: Tokenizer) -> None:
    settings = Settings(enable_gan=False, api_keys=[KEYS[0]], public_paths=["/health"])
    with (
        serve(create_app(settings, text_model=tiny_text_model(tiny_model, smol_tokenizer))) as live,
        httpx.Client(base_url=live.base_url, timeout=30.0) as c,
    ):
        assert c.get("/health").status_code == 200
        assert_401(c.get("/ready"))
        assert_401(c.get("/metrics"))
        assert c.get("/metrics", headers=auth(KEYS[0])).status_code == 200


def test_a_malformed_authorization_header_is_401_not_500(secured: LiveServer) -> None:
    for raw in (b"Bearer \xff\xfe\x00", b"Bearer " + b"k" * 8000, b"\x00", b"Bearer\tsk-alpha-0123456789"):
        with socket.create_connection(("127.0.0.1", secured.port), timeout=10) as s:
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: " + raw + b"\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        status = int(data.split(b" ", 2)[1])
        assert status in (400, 401), data[:200]
        assert_no_leak(data.decode("latin-1"))


def test_keys_from_the_environment_the_cli_and_a_file(
    monkeypatch: pytest.MonkeyPatch, key_file: Path, tmp_path: Path
) -> None:
    monkeypatch.setenv("AIGC_API_KEYS", f"{KEYS[0]}, {KEYS[1]}")
    assert Settings().all_api_keys() == list(KEYS)
    monkeypatch.setenv("AIGC_API_KEY_FILE", str(key_file))
    assert Settings().all_api_keys() == [*KEYS, FILE_KEY]
    monkeypatch.delenv("AIGC_API_KEYS")
    monkeypatch.delenv("AIGC_API_KEY_FILE")
    assert parse_settings(["--api-key", "a1", "--api-key", "a2"]).all_api_keys() == ["a1", "a2"]
    assert parse_settings([]).all_api_keys() == []
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="holds no keys"):
        Settings(api_key_file=str(empty))
    with pytest.raises(ValueError, match="api_key_file"):
        Settings(api_key_file=str(tmp_path / "missing.txt"))


def test_no_keys_means_no_authentication(open_server: LiveServer) -> None:
    with httpx.Client(base_url=open_server.base_url, timeout=30.0) as c:
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200


# ---------------------------------------------------------------------------------------------- CORS
def preflight(c: httpx.Client, origin: str, path: str = "/v1/chat/completions") -> httpx.Response:
    return c.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_cors_is_off_by_default(open_server: LiveServer) -> None:
    with httpx.Client(base_url=open_server.base_url, timeout=30.0) as c:
        r = preflight(c, ORIGIN)
        assert r.status_code in (404, 405) and not any(h.startswith("access-control-") for h in r.headers)
        r = c.get("/v1/models", headers={"Origin": ORIGIN})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_preflight_with_configured_origins(secured: LiveServer) -> None:
    with httpx.Client(base_url=secured.base_url, timeout=30.0) as c:
        r = preflight(c, ORIGIN)  # no key needed: browsers send preflights without credentials
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in r.headers["access-control-allow-methods"]
        allowed = r.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "content-type" in allowed

        r = preflight(c, "https://evil.example")
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = c.options("/v1/chat/completions", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "DELETE"})
        assert r.status_code == 400

        r = c.get("/v1/models", headers={"Origin": ORIGIN, **auth(KEYS[0])})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        r = c.get("/v1/models", headers={"Origin": "https://evil.example", **auth(KEYS[0])})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        # a 401 is readable by the allowed origin's script (it can tell the user the key is wrong)
        r = c.get("/v1/models", headers={"Origin": ORIGIN})
        assert_401(r)
        assert r.headers["access-control-allow-origin"] == ORIGIN


# -------------------------------------------------------------------------------- leaks, traversal
def raw_get(port: int, target: bytes) -> tuple[int, bytes]:
    """A request line sent as is (clients would normalise `..` away)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


TRAVERSALS = [
    b"/../../../../etc/passwd",
    b"/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    b"/v1/../../etc/passwd",
    b"/static/..%2f..%2f..%2fetc%2fpasswd",
    b"/v1/models/..%2f..%2f..%2fetc%2fpasswd",
    b"/v1/models/../../../etc/passwd",
    b"//etc/passwd",
    b"/docs/../../pyproject.toml",
    b"/..%5c..%5c..%5cwindows%5cwin.ini",
    b"/%00/etc/passwd",
    b"/v1/models/%2e%2e%2f%2e%2e%2fREADME.md",
    b"/openapi.json/../../service/config.py",
]


def test_path_traversal_finds_nothing(open_server: LiveServer, secured: LiveServer) -> None:
    for target in TRAVERSALS:
        status, body = raw_get(open_server.port, target)
        assert status in (400, 404), (target, status, body[:200])
        text = body.decode("utf-8", "replace")
        assert_no_leak(text)
        assert "[project]" not in text and "class Settings" not in text and "[fonts]" not in text
        status, body = raw_get(secured.port, target)  # with keys: refused before any routing
        assert status in (400, 401), (target, status)


def test_no_error_body_carries_a_stack_trace(open_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "root:x:0:0:root:/root:/bin/bash at /work/secret/file.py"
    json_type = {"content-type": "application/json"}

    def exploding_check(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(secret)

    monkeypatch.setattr(tokenize_module, "text_model", exploding_check)
    with httpx.Client(base_url=open_server.base_url, timeout=30.0) as c:
        for _ in range(3):  # an unexpected exception inside a route; the connection stays usable
            r = c.post("/tokenize", json={"prompt": "hi"})
            assert r.status_code == 500
            body = r.json()
            assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
            assert body["error"]["type"] == "internal_server_error" and secret not in r.text
            assert_no_leak(r.text)
            assert len(r.headers["x-request-id"]) == 32
        monkeypatch.undo()
        responses = [
            c.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": ', headers=json_type),
            c.post("/v1/completions", json={"prompt": "x", "max_tokens": {"$gt": ""}}),
            c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "{{ 7*7 }}{% raw %}"}]}),
            c.post("/v1/completions", json={"prompt": "x", "model": "../../etc/passwd"}),
            c.get("/v1/models/..%2f..%2fetc%2fpasswd"),
            c.post("/detokenize", json={"tokens": [-1]}),
            c.post("/v1/completions", content=b"\xff\xfe\x00garbage", headers=json_type),
            c.post("/v1/completions", data={"prompt": "x"}),  # a form, not JSON
            c.request("TRACE", "/v1/completions"),
            c.request("PUT", "/health"),
        ]
        for r in responses:
            assert r.status_code < 500, (r.request.url, r.text)
            assert_no_leak(r.text)
            if r.status_code != 200:
                assert set(r.json()) == {"error"}


def test_request_ids_are_sanitised(open_server: LiveServer) -> None:
    with httpx.Client(base_url=open_server.base_url, timeout=30.0) as c:
        assert c.get("/health", headers={"X-Request-ID": "abc-123.x:y"}).headers["x-request-id"] == "abc-123.x:y"
        for bad in ("a" * 200, "<script>alert(1)</script>", "id with spaces", "ä"):
            rid = c.get("/health", headers=[(b"X-Request-ID", bad.encode())]).headers["x-request-id"]
            assert rid != bad and len(rid) == 32 and rid.isalnum()
