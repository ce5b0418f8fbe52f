"""A grammar cannot kill the server (issue #31): the server runs as a subprocess (a crash there cannot take the
tests with it), and requests carry the grammars that segfaulted llguidance before the bounds (a `$defs` chain of
1,000 objects, 3,000 and 20,000 chained Lark rules, a forced tool whose parameters chain 300 `$ref`s), then a
hypothesis fuzz of deep and wide schemas, `$ref` chains and cycles, and Lark/GBNF grammars up to and past the
bounds. Every request gets a 200 or a 400 in the error shape, and the process stays up and healthy."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.model_core.test_grammar import defs_chain, gbnf_chain, lark_chain, nested
from tests.service.http_checks import assert_error

REPO = Path(__file__).resolve().parents[2]
CONTEXT = 16384  # room for a forced tool's prompt holding a long schema
ASK = [{"role": "user", "content": "Go."}]


def _serve(port: int) -> None:
    """The subprocess: the tiny random llama with the real tokenizer, served by uvicorn on `port`."""
    import uvicorn

    from model_core.default_model import find_default_model
    from model_core.tokenizer import Tokenizer
    from tests.service.server_utils import tiny_app
    from tests.utils import tiny_llama

    tok = Tokenizer.from_gguf(find_default_model())
    app = tiny_app(tiny_llama(max_seq_len=CONTEXT), tok, num_blocks=CONTEXT // 16 + 64)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


class Server:
    def __init__(self, proc: subprocess.Popen[str], base_url: str, max_tokens: int = 2) -> None:
        self.proc, self.base_url, self.max_tokens = proc, base_url, max_tokens
        self.http = httpx.Client(base_url=base_url, timeout=120.0)

    def assert_alive(self) -> None:
        assert self.proc.poll() is None, f"the server died: exit status {self.proc.returncode}"
        assert self.http.get("/health").status_code == 200

    def chat(self, **body: Any) -> httpx.Response:
        return self.http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": self.max_tokens, **body})


@contextmanager
def subprocess_server(serve: str, env: dict[str, str] | None = None, max_tokens: int = 2) -> Iterator[Server]:
    """`serve(port)` (a module-level function's import path, "tests.x:_serve") run in a subprocess on a free port,
    with `env` added to this process' environment; yields once /ready is 200, terminates it after."""
    module, func = serve.split(":")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from {module} import {func}; {func}({port})"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    live = Server(proc, f"http://127.0.0.1:{port}", max_tokens)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if live.http.get("/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.2)
        yield live
    finally:
        live.http.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with subprocess_server("tests.service.test_grammar_limits:_serve") as live:
        yield live


def schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def tool(parameters: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


def test_the_grammars_that_killed_the_server_are_400s_naming_the_limit(server: Server) -> None:
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"response_format": schema_format(defs_chain(1000))}, "response_format.json_schema.schema", "max_ref_chain"),
        ({"structured_outputs": {"grammar": lark_chain(3000)}}, "structured_outputs.grammar", "max_rules"),
        ({"structured_outputs": {"grammar": lark_chain(20_000)}}, "structured_outputs.grammar", "max_bytes"),
        ({"structured_outputs": {"grammar": gbnf_chain(5000)}}, "structured_outputs.grammar", "max_rules"),
        ({"structured_outputs": {"json": defs_chain(5000, "ref")}}, "structured_outputs.json", "max_ref_chain"),
        ({"tools": [tool(defs_chain(300))], "tool_choice": "required"}, "tools", "max_ref_chain"),
        ({"tools": [tool(nested(60))]}, "tools.0.function.parameters", "max_depth"),
        ({"response_format": schema_format(nested(60))}, "response_format.json_schema.schema", "max_depth"),
    ]
    for body, param, limit in cases:
        err = assert_error(server.chat(**body), 400, param=param, code="grammar_limit_exceeded")
        assert limit in err["message"], err
        server.assert_alive()
    r = server.http.post(
        "/v1/responses",
        json={"input": "Go.", "tools": [{"type": "function", "name": "f", "parameters": nested(60)}]},
    )
    assert_error(r, 400, param="tools.0.parameters", code="grammar_limit_exceeded")
    r = server.http.post(
        "/v1/completions", json={"prompt": "x", "max_tokens": 2, "structured_outputs": {"grammar": lark_chain(3000)}}
    )
    assert_error(r, 400, param="structured_outputs.grammar", code="grammar_limit_exceeded")
    # within the bounds, the same shapes are served
    ok = server.chat(response_format=schema_format(defs_chain(30)), max_tokens=4)
    assert ok.status_code == 200, ok.text
    ok = server.chat(tools=[tool(defs_chain(30))], tool_choice="required", max_tokens=4)
    assert ok.status_code == 200, ok.text
    server.assert_alive()


def _cycle(n: int) -> dict[str, Any]:
    defs = {
        f"C{i}": {"anyOf": [{"type": "null"}, {"type": "array", "items": {"$ref": f"#/$defs/C{(i + 1) % n}"}}]}
        for i in range(n)
    }
    return {"$ref": "#/$defs/C0", "$defs": defs}


def _wide(n: int) -> dict[str, Any]:
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)}}


def _lark_wide(n: int) -> str:
    return "start: " + " | ".join(f"r{i}" for i in range(n)) + "\n" + "\n".join(f'r{i}: "w{i}"' for i in range(n))


SIZES = st.integers(1, 4000) | st.sampled_from([99, 100, 101, 127, 128, 129, 999, 1000, 1001, 2800, 3000])
REQUESTS = st.one_of(
    st.builds(
        lambda n, k: {"response_format": schema_format(defs_chain(n, k))},
        SIZES,
        st.sampled_from(["object", "array", "ref"]),
    ),
    st.builds(lambda n: {"response_format": schema_format(nested(n))}, st.integers(1, 400)),
    st.builds(lambda n: {"structured_outputs": {"json": _wide(n)}}, st.integers(1, 30_000)),
    st.builds(lambda n: {"structured_outputs": {"json": _cycle(n)}}, st.integers(1, 2000)),
    st.builds(lambda n: {"structured_outputs": {"grammar": lark_chain(n)}}, SIZES | st.integers(4000, 30_000)),
    st.builds(lambda n: {"structured_outputs": {"grammar": gbnf_chain(n)}}, SIZES),
    st.builds(lambda n: {"structured_outputs": {"grammar": _lark_wide(n)}}, st.integers(1, 5000)),
    st.builds(lambda n: {"structured_outputs": {"grammar": "start: %json " + json.dumps(defs_chain(n))}}, SIZES),
    st.builds(lambda n: {"tools": [tool(defs_chain(n))], "tool_choice": "required"}, st.integers(1, 400)),
)


@settings(max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(body=REQUESTS)
def test_fuzzed_grammars_get_an_answer_and_the_server_stays_up(server: Server, body: dict[str, Any]) -> None:
    r = server.chat(**body)
    if r.status_code != 200:
        err = assert_error(r, 400)
        # refused before decoding (a bound, an invalid grammar, a prompt too long), or stopped at the first token by
        # one of llguidance's work limits (Earley items per row: a wide object)
        assert err["code"] in ("grammar_limit_exceeded", "invalid_grammar", "context_length_exceeded") or (
            err["code"] == "invalid_request" and "grammar engine's limits" in err["message"]
        ), err
    server.assert_alive()
