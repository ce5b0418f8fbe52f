"""POST /v1/responses through the official `openai` client against the app in-process (a tiny random LM with the
real SmolLM2 tokenizer): greedy text equals the chat route's, input items round-trip, forced function calls
and json_schema outputs validate, the stream's events come in OpenAI's order, and what a stateless server
cannot do is a 400 naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from model_core.tokenizer import Tokenizer
from tests.service.server_utils import TINY_MODEL_NAME, InProcessServer, serve_tiny_in_process
from tests.utils import tiny_llama

MODEL = TINY_MODEL_NAME
ASK = "What is the weather in Paris?"
PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": PARAMS,
    "strict": True,
}
CHAT_TOOL: Any = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": PARAMS},
}
GREEDY: dict[str, Any] = {"temperature": 0}


class Weather(BaseModel):
    city: str = Field(max_length=8)
    days: int = Field(ge=1, le=7)
    unit: Literal["celsius", "fahrenheit"]


@pytest.fixture(scope="module")
def server(smol_tokenizer: Tokenizer) -> Iterator[InProcessServer]:
    # room for the tool prompt (~150 tokens) and bounded JSON whitespace
    with serve_tiny_in_process(tiny_llama(max_seq_len=512), smol_tokenizer) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: InProcessServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{server.base_url}/v1", http_client=server.http_client(), api_key="x", max_retries=0, timeout=60.0
    ) as c:
        yield c


def text_of(r: Any) -> str:
    [message] = [o for o in r.output if o.type == "message"]
    assert message.role == "assistant" and [c.type for c in message.content] == ["output_text"]
    text: str = message.content[0].text
    return text


def status_for(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


# ------------------------------------------------------------------------------------------- text
def test_text_equals_chat_completion(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Name three colours.", max_output_tokens=20, **GREEDY)
    c = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name three colours."}], max_tokens=20, **GREEDY
    )
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL and r.error is None
    assert text_of(r) == c.choices[0].message.content == r.output_text
    assert r.output[0].id.startswith("msg_")  # type: ignore[union-attr]
    assert r.status == status_for(c.choices[0].finish_reason)
    assert r.max_output_tokens == 20 and r.temperature == 0 and r.tools == [] and r.tool_choice == "auto"
    assert r.usage is not None and c.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens) == (c.usage.prompt_tokens, c.usage.completion_tokens)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens == 0 and r.usage.output_tokens_details.reasoning_tokens == 0

    # instructions are a system message first; content parts and "type": "message" items are accepted
    r = client.responses.create(
        model=MODEL,
        instructions="You are terse.",
        max_output_tokens=12,
        input=[{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name three colours."}]}],
        **GREEDY,
    )
    c = client.chat.completions.create(
        model=MODEL,
        max_tokens=12,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}],
        **GREEDY,
    )
    assert r.instructions == "You are terse." and text_of(r) == c.choices[0].message.content
    assert r.usage is not None and c.usage is not None and r.usage.input_tokens == c.usage.prompt_tokens


def test_max_output_tokens_cut_is_incomplete(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=MODEL,
        input="Tell me a story.",
        max_output_tokens=5,
        temperature=0.9,
        extra_body={"ignore_eos": True, "seed": 1},
    )
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 5
    assert r.output[0].status == "incomplete"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------- streaming
def test_stream_events_in_order_and_deltas_join_to_the_text(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": MODEL, "input": "Name three colours.", "max_output_tokens": 16, **GREEDY}
    plain = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{plain.status}",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert len(deltas) > 1
    final = events[-1].response  # type: ignore[union-attr]
    assert "".join(d.delta for d in deltas) == text_of(plain) == text_of(final)
    assert events[-4].text == text_of(plain)  # type: ignore[union-attr]
    assert events[0].response.status == "in_progress" and events[0].response.output == []  # type: ignore[union-attr]
    assert final.id == events[0].response.id and final.usage == plain.usage  # type: ignore[union-attr]

    # the SDK's stream helper accumulates the same response
    with client.responses.stream(
        model=MODEL, input="Name three colours.", max_output_tokens=16, temperature=0
    ) as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        if plain.status == "completed":
            assert stream.get_final_response().output_text == text_of(plain)
    assert "".join(texts) == text_of(plain)

    cut = list(client.responses.create(stream=True, **{**kw, "max_output_tokens": 3}, extra_body={"ignore_eos": True}))
    assert cut[-1].type == "response.incomplete"
    assert cut[-1].response.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]


def _without_ids(response: dict[str, Any]) -> dict[str, Any]:
    """A Response object less what differs between two runs of a request: ids, times and cached tokens (the
    second run finds the first's prompt in the prefix cache)."""
    fresh = ("id", "created_at", "completed_at")
    items = [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in response["output"]]
    usage = {k: v for k, v in response["usage"].items() if k != "input_tokens_details"}
    return {**{k: v for k, v in response.items() if k not in fresh}, "output": items, "usage": usage}


@pytest.mark.parametrize(
    "kw",
    [
        {"input": "Name three colours.", "max_output_tokens": 12, "top_logprobs": 2},
        {"input": "Tell me a story.", "max_output_tokens": 4, "ignore_eos": True, "instructions": "Be terse."},
        {"input": ASK, "tools": [TOOL], "tool_choice": "required", "max_output_tokens": 200},
        {
            "input": [
                {"role": "user", "content": ASK},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "18 degrees"},
            ],
            "tools": [TOOL],
            "max_output_tokens": 10,
        },
    ],
    ids=["logprobs", "cut", "forced-call", "tool-result"],
)
def test_streamed_and_whole_replies_agree(server: InProcessServer, kw: dict[str, Any]) -> None:
    """At temperature 0 the stream's final Response is the whole one: the same items (text, logprobs, calls),
    status and usage; its deltas and done events carry that text and those calls."""
    body = {"temperature": 0, **kw}
    with server.client(timeout=60.0) as http:
        whole = http.post("/v1/responses", json=body).json()
        streamed = http.post("/v1/responses", json={**body, "stream": True})
    events = [json.loads(b.split("\n")[1][6:]) for b in streamed.text.split("\n\n") if b.strip()]
    final = events[-1]["response"]
    assert events[-1]["type"] == f"response.{whole['status']}"
    assert _without_ids(final) == _without_ids(whole)
    assert final["usage"]["output_tokens"] == whole["usage"]["output_tokens"] > 0
    texts = [c["text"] for item in whole["output"] if item["type"] == "message" for c in item["content"]]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "".join(texts)
    calls = [(i["name"], i["arguments"]) for i in whole["output"] if i["type"] == "function_call"]
    done = [(e["name"], e["arguments"]) for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done == calls
    if kw.get("tool_choice") == "required":
        assert len(calls) == 1 and [i["type"] for i in whole["output"]] == ["function_call"]
    if "top_logprobs" in kw:  # sent with the deltas (a token without text yet: with the next one), all at the end
        [message] = whole["output"]
        [text_done] = [e for e in events if e["type"] == "response.output_text.done"]
        logprobs = message["content"][0]["logprobs"]
        assert text_done["logprobs"] == logprobs and len(logprobs) == whole["usage"]["output_tokens"]
        sent = [lp for e in events if e["type"] == "response.output_text.delta" for lp in e["logprobs"]]
        assert sent == logprobs[: len(sent)] and len(sent) > 1


def test_stream_wire_format(server: InProcessServer) -> None:
    """Each event is `event: <type>` plus data of that type; the stream ends without [DONE]."""
    with server.client(timeout=60.0) as http:
        r = http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 4, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in r.text.split("\n\n") if b.strip()]
    assert "[DONE]" not in r.text
    for block in blocks:
        event, data = block.split("\n")
        assert event.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data[6:])["type"] == event[7:]
    assert json.loads(blocks[-1].split("\n")[1][6:])["type"] in ("response.completed", "response.incomplete")


# ------------------------------------------------------------------------------------- function calls
def test_function_call_items_round_trip_as_chat_tool_messages(client: openai.OpenAI) -> None:
    args = json.dumps({"city": "Paris", "unit": "celsius"})
    r = client.responses.create(
        model=MODEL,
        tools=[TOOL],
        max_output_tokens=12,
        **GREEDY,
        input=[
            {"role": "user", "content": ASK},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": args},
            {"type": "function_call_output", "call_id": "call_1", "output": "18 degrees, sunny"},
        ],
    )
    c = client.chat.completions.create(
        model=MODEL,
        tools=[CHAT_TOOL],
        max_tokens=12,
        **GREEDY,
        messages=[
            {"role": "user", "content": ASK},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
        ],
    )
    assert r.usage is not None and c.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens) == (c.usage.prompt_tokens, c.usage.completion_tokens)
    message = c.choices[0].message
    if message.content is not None:
        assert text_of(r) == message.content
    calls = [o for o in r.output if o.type == "function_call"]
    assert [(o.name, o.arguments) for o in calls] == [
        (t.function.name, t.function.arguments) for t in message.tool_calls or []
    ]  # type: ignore[union-attr]


def test_required_tool_choice_gives_a_valid_function_call(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=MODEL,
        input=ASK,
        tools=[TOOL],
        tool_choice="required",
        max_output_tokens=200,
        parallel_tool_calls=False,
        temperature=0.8,
        extra_body={"seed": 2},
    )
    assert r.status == "completed", r.output
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id is not None and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), PARAMS)
    assert r.tool_choice == "required" and r.parallel_tool_calls is False
    assert [t.type for t in r.tools] == ["function"] and r.tools[0].name == "get_weather"  # type: ignore[union-attr]

    # the output items go back as input with the function's result
    items: Any = [
        {"role": "user", "content": ASK},
        *[o.model_dump(exclude_none=True) for o in r.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees"},
    ]
    again = client.responses.create(model=MODEL, tools=[TOOL], max_output_tokens=8, input=items, **GREEDY)
    assert again.usage is not None and r.usage is not None and again.usage.input_tokens > r.usage.input_tokens

    # streamed, with a named tool_choice: the call's item, its arguments, then the completed response
    events = list(
        client.responses.create(
            model=MODEL,
            input=ASK,
            tools=[TOOL],
            max_output_tokens=200,
            stream=True,
            tool_choice={"type": "function", "name": "get_weather"},
            parallel_tool_calls=False,
            temperature=0.8,
            extra_body={"seed": 2},
        )
    )
    kinds = [e.type for e in events]
    assert kinds[-5:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ], kinds
    done: Any = events[-2].item  # type: ignore[union-attr]
    assert done.type == "function_call" and done.name == "get_weather"
    assert events[-3].arguments == done.arguments == events[-4].delta  # type: ignore[union-attr]
    assert done.arguments == call.arguments  # the same seed: the same call as not streamed
    assert events[-1].response.output[-1].arguments == done.arguments  # type: ignore[union-attr]


class Address(BaseModel):
    street: str = Field(max_length=10)
    city: str = Field(max_length=8)


class Move(BaseModel):
    name: str = Field(max_length=8)
    home: Address
    work: Address


class Tree(BaseModel):
    label: str = Field(max_length=6)
    children: list[Tree] = Field(max_length=2)


def test_nested_and_recursive_tool_schemas_give_valid_calls(client: openai.OpenAI) -> None:
    """Tools whose parameters use `$defs`/`$ref` (issue #31: forced calls were a 400 `Pointer '/$defs/...' does
    not exist`), as `openai.pydantic_function_tool` makes them, not streamed and streamed."""
    tools: dict[str, Any] = {}
    for m in (Move, Tree):
        fn = openai.pydantic_function_tool(m)["function"]
        tools[m.__name__] = {"type": "function", "name": fn["name"], "parameters": fn["parameters"], "strict": True}
    done = set()
    for seed in range(3):  # one tool a request: the context (512) has room for one nested schema's prompt
        for name, choice in (("Move", "required"), ("Tree", {"type": "function", "name": "Tree"})):
            r = client.responses.create(
                model=MODEL,
                input=ASK,
                tools=[tools[name]],
                tool_choice=choice,  # type: ignore[arg-type]
                max_output_tokens=180,
                temperature=1.0,
                extra_body={"seed": seed},
            )
            if r.status == "incomplete":  # a recursive call may run past max_output_tokens
                continue
            [call] = r.output
            assert call.type == "function_call" and call.name == name
            (Move if name == "Move" else Tree).model_validate_json(call.arguments)
            done.add(name)
    assert done == {"Move", "Tree"}
    events = list(
        client.responses.create(
            model=MODEL,
            input=ASK,
            tools=[tools["Move"]],
            tool_choice={"type": "function", "name": "Move"},
            max_output_tokens=180,
            temperature=1.0,
            stream=True,
            extra_body={"seed": 1},
        )
    )
    assert events[-1].type == "response.completed", [e.type for e in events]
    Move.model_validate_json(events[-1].response.output[-1].arguments)  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------ structured text
def test_json_schema_text_format_and_parse(client: openai.OpenAI) -> None:
    schema = {**Weather.model_json_schema(), "additionalProperties": False}
    fmt: Any = {"type": "json_schema", "name": "weather", "schema": schema, "strict": True}
    r = client.responses.create(
        model=MODEL,
        input="Weather as JSON.",
        max_output_tokens=250,
        temperature=0.7,
        extra_body={"seed": 4},
        text={"format": fmt},
    )
    assert r.text is not None and r.text.format is not None and r.text.format.type == "json_schema"
    assert r.status == "completed"  # a bounded schema: the seeded sample ends well within the limit
    jsonschema.validate(json.loads(text_of(r)), schema)

    parsed = client.responses.parse(
        model=MODEL, input="Weather as JSON.", text_format=Weather, max_output_tokens=250, **GREEDY
    )
    assert parsed.status == "completed"
    assert isinstance(parsed.output_parsed, Weather)

    obj = client.responses.create(
        model=MODEL, input="JSON please.", max_output_tokens=250, text={"format": {"type": "json_object"}}, **GREEDY
    )
    assert text_of(obj).startswith("{")
    if obj.status == "completed":
        assert isinstance(json.loads(text_of(obj)), dict)


# -------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input.0.type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"max_output_tokens": 100_000}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"extra_body": {"conversation": "conv_1"}}, "conversation"),
        ({"extra_body": {"context_management": [{"type": "compaction"}]}}, "context_management"),
    ],
)
def test_unsupported_or_invalid_fields_are_400_naming_them(
    client: openai.OpenAI, kw: dict[str, Any], param: str
) -> None:
    body: dict[str, Any] = {"model": MODEL, "input": "hi", "max_output_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**body)
    assert e.value.param == param, e.value.message


def test_generation_errors(client: openai.OpenAI) -> None:
    """An error after the request was accepted: an HTTP error, or in a stream `error` then `response.failed`."""
    kw: dict[str, Any] = {
        "model": MODEL,
        "input": "hi",
        "max_output_tokens": 200,
        "extra_body": {"timeout": 1e-6, "ignore_eos": True},
    }
    with pytest.raises(openai.InternalServerError) as e:
        client.responses.create(**kw)
    assert e.value.status_code == 504 and e.value.code == "timeout"
    events = list(client.responses.create(stream=True, **kw))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2].code == "timeout" and "timed out" in events[-2].message  # type: ignore[union-attr]
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None and "timed out" in failed.error.message


def test_accepted_fields_and_unknown_model(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=MODEL,
        input="hi",
        max_output_tokens=2,
        store=False,
        user="u1",
        metadata={"k": "v"},
        include=["message.output_text.logprobs"],
        top_logprobs=2,
        truncation="disabled",
        **GREEDY,
    )
    assert r.store is False and r.metadata == {"k": "v"} and r.user == "u1"
    logprobs = r.output[0].content[0].logprobs  # type: ignore[union-attr]
    assert logprobs is not None and len(logprobs) == r.usage.output_tokens  # type: ignore[union-attr]
    assert all(len(lp.top_logprobs) == 2 and lp.top_logprobs[0].logprob == lp.logprob for lp in logprobs)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-9", input="hi")
