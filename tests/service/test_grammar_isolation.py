"""A grammar that crashes the grammar compiler costs one request a 400, never the server (issue #31). The server
runs as a subprocess (the tiny random llama with the real tokenizer) in two ways a crash can get past the bounds:
its grammar bounds raised (so a Lark chain of 40,000 rules, which segfaults llguidance, reaches the compiler), and a
test hook that makes the probe worker abort on a marker string inside a schema the default bounds admit. Each
crashing request gets a 400 naming the crash; the server keeps serving structured requests and stays healthy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.model_core.test_grammar import lark_chain
from tests.service.http_checks import assert_error
from tests.service.test_grammar_limits import Server, subprocess_server

MARKER = "probe-abort-marker"
CRASHES = 40_000  # Lark chain rules that segfault llguidance on a 64 MiB stack


def _serve(port: int) -> None:
    """The subprocess: the tiny llama, its grammar bounds raised far past the crash points."""
    import uvicorn

    from model_core.default_model import find_default_model
    from model_core.grammar import GrammarCompiler
    from model_core.grammar_bounds import GrammarBounds
    from model_core.tokenizer import Tokenizer
    from service.config import Settings
    from service.main import create_app
    from tests.service.server_utils import tiny_text_model
    from tests.utils import tiny_llama

    tok = Tokenizer.from_gguf(find_default_model())
    tm = tiny_text_model(tiny_llama(), tok)
    app = create_app(Settings(enable_gan=False, enable_g2p=False), text_model=tm)  # the probe: 2 workers
    bounds = GrammarBounds(max_bytes=2**30, max_rules=10**7, max_nodes=10**7)
    tm.grammars = GrammarCompiler(tok, tm.vocab_size, max_compile_s=60, bounds=bounds)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    serve, env = "tests.service.test_grammar_isolation:_serve", {"AIGC_TEST_GRAMMAR_PROBE_ABORT": MARKER}
    with subprocess_server(serve, env, max_tokens=3) as live:
        yield live


def _schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


TYPICAL = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def test_a_grammar_that_crashes_the_compiler_is_a_400_and_the_server_stays_up(server: Server) -> None:
    crash = {"structured_outputs": {"grammar": lark_chain(CRASHES)}}
    for _ in range(2):  # the second time from the probe's cache
        err = assert_error(server.chat(**crash), 400, param="structured_outputs.grammar")
        assert err["code"] == "grammar_limit_exceeded", err
        assert "crashed the grammar compiler (SIGSEGV" in err["message"], err
        server.assert_alive()
    ok = server.chat(response_format=_schema_format(TYPICAL))
    assert ok.status_code == 200, ok.text
    ok = server.chat(structured_outputs={"grammar": lark_chain(2000)})  # past the default bounds, under the crash
    assert ok.status_code == 200, ok.text
    server.assert_alive()


def test_a_crash_the_bounds_do_not_foresee_is_a_400_on_every_route(server: Server) -> None:
    """A small schema (well within the default bounds) that the probe worker aborts on."""
    schema = {"type": "object", "properties": {"k": {"const": MARKER}}}
    err = assert_error(server.chat(response_format=_schema_format(schema)), 400)
    assert "crashed the grammar compiler (SIGABRT" in err["message"], err
    tool = {"type": "function", "function": {"name": "f", "parameters": {**schema, "title": "tool"}}}
    err = assert_error(server.chat(tools=[tool], tool_choice="required"), 400)
    assert "crashed the grammar compiler (SIGABRT" in err["message"], err
    r = server.http.post(
        "/v1/responses",
        json={
            "input": "Go.",
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {**schema, "title": "responses"}}},
        },
    )
    err = assert_error(r, 400)
    assert "crashed the grammar compiler (SIGABRT" in err["message"], err
    r = server.http.post(
        "/v1/completions",
        json={"prompt": "x", "max_tokens": 2, "structured_outputs": {"json": {**schema, "title": "c"}}},
    )
    err = assert_error(r, 400)
    assert "crashed the grammar compiler (SIGABRT" in err["message"], err
    server.assert_alive()
    for _ in range(3):  # structured outputs are served as before
        ok = server.chat(response_format=_schema_format(TYPICAL))
        assert ok.status_code == 200, ok.text
