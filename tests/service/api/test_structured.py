"""Structured outputs and tool calling through real clients against the app in-process (issue #12).

The model is the tiny random-weight llama with the real SmolLM2 tokenizer: it knows nothing, so whatever
is valid in its output is the grammar's doing. Every constrained reply that ends by itself ("stop") must
validate. (LangChain, instructor and openai-agents run against the real model: tests/e2e/test_clients.py.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from model_core.tokenizer import Tokenizer
from tests.service.http_checks import assert_error, sse_events
from tests.service.server_utils import TINY_MODEL_NAME, InProcessServer, serve_tiny_in_process
from tests.utils import tiny_llama

MODEL = TINY_MODEL_NAME
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 8}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=150)
    role: Literal["admin", "user"]


@pytest.fixture(scope="module")
def server(smol_tokenizer: Tokenizer) -> Iterator[InProcessServer]:
    # room for the tool prompt and a few hundred tokens of bounded JSON whitespace
    with serve_tiny_in_process(tiny_llama(max_seq_len=1024), smol_tokenizer, num_blocks=512) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: InProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, http_client=server.http_client())


@pytest.fixture()
def http(server: InProcessServer) -> Iterator[httpx.Client]:
    with server.client(timeout=120.0) as c:
        yield c


def chat(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 600, **body})
    assert r.status_code == 200, r.text
    return r.json()


def assert_valid_calls(message: dict[str, Any], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    calls = message["tool_calls"]
    assert calls and message["content"] is None
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
    return calls


# ----------------------------------------------------------------------------- response_format
def test_openai_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    for seed in range(3):
        done = client.chat.completions.parse(
            model=MODEL, messages=ASK, response_format=Person, max_tokens=600, temperature=1.0, seed=seed
        )
        choice = done.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Person)


def test_json_object_and_json_schema_streamed_and_n(http: httpx.Client) -> None:
    schema = Person.model_json_schema()
    body = chat(
        http,
        n=3,
        temperature=1.0,
        seed=5,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
    )
    for choice in body["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    r = http.post(
        "/v1/chat/completions",
        json={
            "messages": ASK,
            "max_tokens": 600,
            "stream": True,
            "n": 2,
            "temperature": 1.0,
            "response_format": {"type": "json_object"},
        },
    )
    texts = ["", ""]
    finish = [None, None]
    for event in sse_events(r.content):
        for c in event["choices"]:
            texts[c["index"]] += c["delta"].get("content") or ""
            finish[c["index"]] = c["finish_reason"] or finish[c["index"]]
    for text, reason in zip(texts, finish, strict=True):  # any object: a random model may go on for ever
        assert text.startswith("{") and reason in ("stop", "length")
        if reason == "stop":
            assert isinstance(json.loads(text), dict)


def test_structured_outputs_extension_on_completions(http: httpx.Client) -> None:
    def complete(**so: Any) -> str:
        r = http.post(
            "/v1/completions",
            json={"prompt": "Answer:", "max_tokens": 60, "temperature": 1.0, "structured_outputs": so},
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        return str(r.json()["choices"][0]["text"])

    assert complete(choice=["yes", "no", "maybe"]) in ("yes", "no", "maybe")
    assert complete(regex=r"[0-9]{3}-[a-z]{2}")[3] == "-"
    text = complete(json={"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3})
    assert 2 <= len(json.loads(text)) <= 3
    assert complete(grammar='root ::= "a" ("b" | "c")') in ("ab", "ac")  # GBNF, as llama.cpp writes it


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {
                            "type": "object",
                            "properties": {"a": {"type": "string", "format": "not-a-format-anyone-knows"}},
                        },
                    },
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs.grammar"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"functions": [WEATHER["function"]]}, "functions"),
        ({"store": True}, "store"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(
    http: httpx.Client, body: dict[str, Any], param: str
) -> None:
    assert_error(http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body}), 400, param)


def test_unknown_vendor_fields_are_accepted(http: httpx.Client) -> None:
    body = chat(http, max_tokens=3, store=False, modalities=["text"], service_tier="auto", my_vendor_field={"a": 1})
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


# ----------------------------------------------------------------------------- property: random schemas
LEAF = st.one_of(
    st.just({"type": "boolean"}),
    st.builds(
        lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
        st.integers(-1000, 1000),
        st.integers(0, 1000),
    ),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 8)),
    st.builds(
        lambda vs: {"enum": vs},
        st.lists(st.text("abcxyz ", min_size=1, max_size=5), min_size=1, max_size=4, unique=True),
    ),
    st.just({"type": "number", "minimum": 0, "maximum": 1}),
    st.just({"type": "null"}),
)


def _object(props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}


SCHEMAS = st.recursive(
    LEAF,
    lambda inner: st.one_of(
        st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), inner, min_size=1, max_size=3).map(_object),
        st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, inner, st.integers(0, 3)),
    ),
    max_leaves=5,
).map(lambda s: s if s.get("type") == "object" else _object({"value": s}))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, seed=st.integers(0, 2**31), stream=st.booleans())
def test_random_schemas_at_temperature_one_always_validate(
    http: httpx.Client, schema: dict[str, Any], seed: int, stream: bool
) -> None:
    body = {
        "messages": ASK,
        "max_tokens": 600,
        "temperature": 1.0,
        "seed": seed,
        "n": 2,
        "stream": stream,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        texts, finish = ["", ""], [None, None]
        for event in sse_events(r.content):
            for c in event["choices"]:
                texts[c["index"]] += c["delta"].get("content") or ""
                finish[c["index"]] = c["finish_reason"] or finish[c["index"]]
    else:
        texts = [c["message"]["content"] for c in r.json()["choices"]]
        finish = [c["finish_reason"] for c in r.json()["choices"]]
    for text, reason in zip(texts, finish, strict=True):
        assert reason in ("stop", "length")
        if reason == "stop":
            jsonschema.validate(json.loads(text), schema)


# ----------------------------------------------------------------------------- tools
def test_required_and_named_tool_choice_always_give_valid_calls(http: httpx.Client) -> None:
    for seed in range(4):
        body = chat(
            http, tools=[WEATHER, TIME], tool_choice="required", temperature=1.0, seed=seed, parallel_tool_calls=False
        )
        choice = body["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        assert len(assert_valid_calls(choice["message"], [WEATHER, TIME])) == 1
    body = chat(
        http,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=1.0,
        seed=9,
    )
    calls = assert_valid_calls(body["choices"][0]["message"], [WEATHER, TIME])
    assert {c["function"]["name"] for c in calls} == {"get_time"}


def test_streamed_tool_calls_use_openai_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",  # type: ignore[list-item]
        max_tokens=600,
        temperature=1.0,
        seed=3,
        stream=True,
        parallel_tool_calls=False,
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    content = ""
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += tc.id or ""
                entry["name"] += (tc.function.name if tc.function else None) or ""
                entry["arguments"] += (tc.function.arguments if tc.function else None) or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and content == "" and calls
    for entry in calls.values():
        assert entry["id"].startswith("call_") and entry["name"] == "get_weather"
        jsonschema.validate(json.loads(entry["arguments"]), WEATHER["function"]["parameters"])  # type: ignore[index]


def test_a_tool_conversation_round_trips_into_the_prompt(http: httpx.Client, server: InProcessServer) -> None:
    call = {
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
    }
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "18 degrees, sunny"},
    ]
    r = http.post("/tokenize", json={"messages": messages})
    assert r.status_code == 200
    prompt = server.text_model.tokenizer.decode(r.json()["tokens"], skip_special_tokens=False)
    assert '"name": "get_weather"' in prompt and '"city": "Paris"' in prompt and "18 degrees, sunny" in prompt
    body = chat(http, messages=messages, tools=[WEATHER], max_tokens=5)
    assert body["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    # the tool prompt describes the tools only when there are tools to call
    r = http.post("/tokenize", json={"messages": ASK})
    assert "get_weather" not in server.text_model.tokenizer.decode(r.json()["tokens"], skip_special_tokens=False)


def test_auto_tool_choice_parses_the_models_reply() -> None:
    from service.api.tools import Function, ReplyStreamer, parse_reply

    fns = [Function("get_weather", None, WEATHER["function"]["parameters"])]  # type: ignore[index]
    reply = (
        'Let me check.<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}]'
        "</tool_call>"
    )
    content, calls = parse_reply(reply, fns)
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].arguments) == {"city": "Oslo", "unit": "celsius"}
    assert parse_reply('{"name": "get_weather", "arguments": {"city": "Oslo"}}', fns)[1]  # a bare JSON call
    assert parse_reply('<tool_call>[{"name": "unknown", "arguments": {}}]</tool_call>', fns)[1] == []
    assert parse_reply("Just text.", fns) == ("Just text.", [])
    for cut in range(1, len(reply)):  # streamed in any two pieces: the same split
        s = ReplyStreamer(fns)
        sent = s.feed(reply[:cut]) + s.feed(reply[cut:])
        rest, streamed_calls = s.finish()
        assert sent + rest == "Let me check." and [c.name for c in streamed_calls] == ["get_weather"]
    s = ReplyStreamer(fns)
    assert s.feed("Hello <tool") == "Hello " and s.feed(" no") == "<tool no" and s.finish() == ("", [])


# ----------------------------------------------------------------------------- nested tool schemas (issue #31)
class Address(BaseModel):
    street: str = Field(max_length=10)
    city: str = Field(max_length=8)


class Move(BaseModel):
    """What `openai.pydantic_function_tool` makes of nested models: `$defs` shared by two properties."""

    name: str = Field(max_length=8)
    home: Address
    work: Address


class Tree(BaseModel):
    """A recursive model: its `$defs` entry refers to itself."""

    label: str = Field(max_length=6)
    children: list[Tree] = Field(max_length=2)


# draft-07 `definitions`, a `$ref` to the root itself, and a property named like a keyword holding a ref
ROOT_RECURSIVE = {
    "type": "function",
    "function": {
        "name": "outline",
        "parameters": {
            "type": "object",
            "definitions": {"leaf": {"type": "string", "maxLength": 5}},
            "properties": {
                "title": {"$ref": "#/definitions/leaf"},
                "sub": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
                "default": {"const": {"$ref": "#/not/a/ref"}},
            },
            "required": ["title", "sub", "default"],
            "additionalProperties": False,
        },
    },
}


def nested_tools() -> list[dict[str, Any]]:
    return [openai.pydantic_function_tool(Move), openai.pydantic_function_tool(Tree), ROOT_RECURSIVE]  # type: ignore[list-item]


def test_nested_shared_and_recursive_tool_schemas_give_valid_calls(http: httpx.Client) -> None:
    tools = nested_tools()
    assert all("$ref" in json.dumps(t) for t in tools)
    finished: dict[str, int] = {}
    named = [(t["function"]["name"], [t]) for t in tools]  # one tool each: room in the context to finish
    for seed in range(3):
        for choice, offered in [("required", tools), *named]:
            if choice != "required":
                choice = {"type": "function", "function": {"name": choice}}
            body = chat(
                http,
                tools=offered,
                tool_choice=choice,
                temperature=1.0,
                seed=seed,
                parallel_tool_calls=False,
                max_tokens=250 if offered is tools else 500,
            )
            c = body["choices"][0]
            assert c["finish_reason"] in ("tool_calls", "length"), c  # recursion may run to max_tokens
            if c["finish_reason"] == "tool_calls":
                for call in assert_valid_calls(c["message"], tools):
                    finished[call["function"]["name"]] = finished.get(call["function"]["name"], 0) + 1
                    if call["function"]["name"] == "Move":
                        Move.model_validate_json(call["function"]["arguments"])
                    if call["function"]["name"] == "Tree":
                        Tree.model_validate_json(call["function"]["arguments"])
    assert set(finished) == {"Move", "Tree", "outline"}, finished


def test_nested_tool_schema_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=nested_tools(),  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "Move"}},
        max_tokens=250,
        temperature=1.0,
        seed=1,
        stream=True,
    )
    arguments, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                arguments += (tc.function.arguments if tc.function else None) or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    Move.model_validate_json(arguments)


def test_instructor_tools_mode_with_nested_models(client: openai.OpenAI) -> None:
    instructor = pytest.importorskip("instructor")
    patched = instructor.from_openai(client, mode=instructor.Mode.TOOLS)
    for seed in range(2):
        move = patched.chat.completions.create(
            model=MODEL,
            response_model=Move,
            messages=ASK,
            max_tokens=600,
            temperature=1.0,
            seed=seed,
            max_retries=0,
        )
        assert isinstance(move, Move) and isinstance(move.work, Address)


def test_call_grammar_rebases_each_tools_refs() -> None:
    from service.api.tools import FUNCTION_DEFS, Function, call_grammar

    params = openai.pydantic_function_tool(Move)["function"]["parameters"]  # type: ignore[typeddict-item]
    spec = call_grammar([Function("a", None, params), Function("b", None, params)], parallel=True)
    schema = json.loads(spec.value.split("%json ", 1)[1])
    refs = {a["properties"]["arguments"]["$ref"] for a in schema["items"]["anyOf"]}
    assert refs == {f"#/$defs/{FUNCTION_DEFS}0", f"#/$defs/{FUNCTION_DEFS}1"}
    moved = schema["$defs"][f"{FUNCTION_DEFS}1"]
    assert moved["properties"]["home"] == {"$ref": f"#/$defs/{FUNCTION_DEFS}1/$defs/Address"}
    assert params["properties"]["home"] == {"$ref": "#/$defs/Address"}  # the tool's own schema is not changed
    # nested objects that do not say otherwise take only their properties (instructor sends no
    # additionalProperties): a small model cannot invent keys that never end
    plain = Move.model_json_schema()
    assert "additionalProperties" not in plain["$defs"]["Address"]
    closed = json.loads(call_grammar([Function("a", None, plain)], parallel=False).value.split("%json ", 1)[1])
    assert closed["$defs"][f"{FUNCTION_DEFS}0"]["$defs"]["Address"]["additionalProperties"] is False
    assert closed["$defs"][f"{FUNCTION_DEFS}0"]["additionalProperties"] is False
    combined = {"type": "object", "properties": {"a": {"allOf": [{"type": "object", "properties": {"x": {}}}]}}}
    kept = json.loads(call_grammar([Function("c", None, combined)], parallel=False).value.split("%json ", 1)[1])
    assert (
        "additionalProperties"
        not in kept["items"]["anyOf"][0]["properties"]["arguments"]["properties"]["a"]["allOf"][0]
    )
    # a tool without refs is inlined, as before
    flat = call_grammar([Function("w", None, WEATHER["function"]["parameters"])], parallel=False)  # type: ignore[index]
    assert "$defs" not in json.loads(flat.value.split("%json ", 1)[1])
