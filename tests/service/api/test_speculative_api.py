"""Speculative decoding through the API, on the shipped model (batch-invariant on the native kernels): with
`--speculative-method ngram` temperature 0 gives the same text, logprobs, finish reasons and usage as without it,
for completions and chat, streamed and not, with stop strings and n > 1, while drafts are accepted; the
`aigc_spec_decode_*` counters say how many."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from model_core.default_model import find_default_model
from model_core.weights.loader import load_for_inference
from service.api.text_model import TextModel  # noqa: TC001 (a return annotation)
from service.engine.engine import SpecConfig
from tests.service.server_utils import InProcessServer, serve_model_in_process, text_model

pytestmark = pytest.mark.heavy

COUNTING = "Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 1, 2, 3, 4, 5, 6,"
PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished the "
    "great lens and wound the clockwork that turned the light. Ships far out at sea saw the beam sweep across "
    "the water every twelve seconds, and knew where the rocks were."
)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[InProcessServer, InProcessServer]]:
    lm = load_for_inference(find_default_model(), "cpu", "auto", "auto", None, None, None)
    if not lm.batch_invariant:
        pytest.skip("the default model is not batch-invariant on this backend (no native build)")

    def model(**engine: Any) -> TextModel:
        tm = text_model(lm.model, lm.tokenizer, **engine)
        tm.name, tm.batch_invariant = "smol", True
        return tm

    spec = SpecConfig(num_tokens=4, ngram_min=2, ngram_max=4, disable_by_batch_size=4)
    with serve_model_in_process(model(speculative=spec)) as on, serve_model_in_process(model()) as off:
        yield on, off


REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"prompt": COUNTING, "max_tokens": 40, "logprobs": 2}),
    ("/v1/completions", {"prompt": COUNTING, "max_tokens": 40, "stop": [" 17,"], "n": 2}),
    ("/v1/completions", {"prompt": COUNTING, "max_tokens": 30, "stream": True, "logprobs": 1}),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": f"Repeat this text word for word:\n\n{PASSAGE}"}],
            "max_tokens": 60,
            "logprobs": True,
            "top_logprobs": 2,
        },
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": f"Give the lighthouse keeper's routine as JSON.\n\n{PASSAGE}"}],
            "max_tokens": 80,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "routine",
                    "schema": {
                        "type": "object",
                        "properties": {
                            "when": {"type": "string"},
                            "tasks": {"type": "array", "items": {"type": "string"}},
                        },
                        "required": ["when", "tasks"],
                    },
                },
            },
        },
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": f"Repeat this text word for word:\n\n{PASSAGE}"}],
            "max_tokens": 60,
            "stream": True,
            "stream_options": {"include_usage": True},
            "stop": ["twelve"],
        },
    ),
]


def _without_ids(body: Any) -> Any:
    """A response with the fields that differ between any two replies (ids, times) removed."""
    if isinstance(body, dict):
        return {k: _without_ids(v) for k, v in body.items() if k not in ("id", "created", "system_fingerprint")}
    if isinstance(body, list):
        return [_without_ids(v) for v in body]
    return body


def _reply(server: InProcessServer, path: str, body: dict[str, Any]) -> Any:
    r = server.client().post(path, json={"model": "smol", "temperature": 0, **body}, timeout=120)
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        return _without_ids(r.json())
    return [_without_ids(json.loads(line[6:])) for line in r.text.splitlines() if line.startswith("data: {")]


@pytest.mark.parametrize("path, body", REQUESTS, ids=[f"{p.split('/')[-1]}-{i}" for i, (p, _) in enumerate(REQUESTS)])
def test_greedy_replies_are_the_same_with_speculation(
    servers: tuple[InProcessServer, InProcessServer], path: str, body: dict[str, Any]
) -> None:
    on, off = servers
    before = on.text_model.engine.stats.spec_accepted_tokens
    assert _reply(on, path, body) == _reply(off, path, body)
    if path == "/v1/completions" and "stop" not in body:  # the count goes on: drafts from the prompt are kept
        assert on.text_model.engine.stats.spec_accepted_tokens > before + 10


def test_spec_decode_counters(servers: tuple[InProcessServer, InProcessServer]) -> None:
    on, off = servers
    _reply(on, "/v1/completions", {"prompt": COUNTING, "max_tokens": 20})
    text = on.client().get("/metrics").text
    values = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("aigc_spec_decode_num_") and 'position="' not in line
    }
    assert values["aigc_spec_decode_num_draft_tokens_total"] >= values["aigc_spec_decode_num_accepted_tokens_total"] > 0
    assert values["aigc_spec_decode_num_drafts_total"] > 0
    assert 'aigc_spec_decode_num_accepted_tokens_per_pos_total{model="smol",position="0"}' in text
    assert "aigc_spec_decode" not in off.client().get("/metrics").text  # off: no such series


def test_a_draft_model_server_gives_the_same_replies(servers: tuple[InProcessServer, InProcessServer]) -> None:
    """`--speculative-method draft --speculative-model` (the shipped model as its own draft, loaded by the server's
    start-up path): the same greedy replies, and its drafts are all kept."""
    from service.config import Settings
    from service.main import build_text_model

    _, off = servers
    tm = build_text_model(
        Settings(
            enable_gan=False,
            enable_g2p=False,
            served_model_name="smol",
            speculative_method="draft",
            speculative_model=find_default_model(),
            kv_cache_memory_gb=0.25,
        )
    )
    with serve_model_in_process(tm) as draft:
        assert off.client().post("/reset_prefix_cache").status_code == 200  # a fresh cache, as the new server's
        for path, body in REQUESTS[:1] + REQUESTS[3:4]:
            assert _reply(draft, path, body) == _reply(off, path, body)
        stats = draft.text_model.engine.stats
        assert stats.spec_draft_tokens > 20 and stats.spec_accepted_tokens == stats.spec_draft_tokens
        path, body = REQUESTS[4]  # structured output: the draft model guesses without the grammar, whose mask the
        assert _reply(draft, path, body) == _reply(off, path, body)  # verification rows apply
