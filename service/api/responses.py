"""POST /v1/responses: OpenAI's Responses API, stateless (nothing is stored, so no `previous_response_id`
and no `store`). The input items become chat messages and run through the chat machinery (`service.api.chat`):
the same template, function tools (`service.api.tools`) and structured outputs (`service.api.structured`);
the reply is a Response object, or with `stream` the Responses API's typed server-sent events."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.api.chat import forced_call_grammar, logprob_entry, render_chat, tool_setup
from service.api.errors import APIError, error_responses
from service.api.fields import check_extra_fields
from service.api.generation import (
    admit,
    default_max_tokens,
    get_text_model,
    resolve_max_tokens,
)
from service.api.json_route import OffLoopJSONRoute
from service.api.model_table import Endpoint, route
from service.api.schemas import (
    MAX_TOP_LOGPROBS,
    ChatCompletionRequest,
    ChatMessage,
    ChatTool,
    FunctionDefinition,
    FunctionName,
    JSONSchemaFormat,
    NamedToolChoice,
    RequestBody,
    ResponseFormat,
    ToolCallFunction,
    ToolCallIn,
    sampling_params,
)
from service.api.serving import Job, Usage, event_error, run_choices
from service.api.sse import sse_data, sse_response
from service.api.structured import compile_grammar, output_constraint
from service.api.text_model import TextModel
from service.api.tools import Function, ReplyStreamer, ToolCall, parse_reply
from service.engine.admission import Admission

router = APIRouter(route_class=OffLoopJSONRoute, responses=error_responses(400, 401, 404, 413, 500, 503, 504))

LOGPROBS_INCLUDE = "message.output_text.logprobs"
MAX_METADATA = 16
TEXT_PARTS = ("input_text", "output_text")
# Responses API fields that service.api.fields does not list, with the values that ask for nothing missing here
UNSUPPORTED_HERE: dict[str, tuple[Any, ...]] = {"context_management": (None, []), "moderation": (None,)}


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class FunctionTool(_Part):
    """A tool in the Responses API's flat shape; only `type: "function"` is served (checked by the route)."""

    type: str
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceObject(_Part):
    type: str
    name: str | None = None


class TextFormat(_Part):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Part):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(RequestBody):
    """The body of POST /v1/responses. `input`: a string (one user message) or a list of items: messages
    (`role` + `content`, a string or input_text/output_text parts), `function_call` and
    `function_call_output`. Past `seed` the fields are extensions, as on the chat route."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    include: list[str] | None = None
    stream: bool = False
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObject | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = None
    text: TextConfig | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    timeout: float | None = Field(None, description="seconds this request may take, > 0 (capped by the server)")


@contextmanager
def _renamed(params: dict[str, str]) -> Iterator[None]:
    """Re-label the `param` of an APIError raised by the chat machinery with this route's field names."""
    try:
        yield
    except APIError as e:
        for old, new in params.items():
            if e.param is not None and (e.param == old or e.param.startswith(old + ".")):
                e.param = new + e.param[len(old) :]
                e.message = e.message.replace(old, new)
                break
        raise


@contextmanager
def _tools_renamed() -> Iterator[None]:
    """Chat's `tools.N.function.parameters` is this route's `tools.N.parameters` (function tools only, in order)."""
    try:
        yield
    except APIError as e:
        if e.param is not None and (m := re.match(r"tools\.(\d+)\.function\.", e.param)):
            new = f"tools.{m.group(1)}."
            e.message = e.message.replace(m.group(0), new)
            e.param = new + e.param[m.end() :]
        raise


def _refuse_unsupported(req: ResponsesRequest) -> None:
    """400 naming each field that asks for what a stateless server without hosted tools cannot do."""
    for name, value in (req.model_extra or {}).items():
        if name in UNSUPPORTED_HERE and value not in UNSUPPORTED_HERE[name]:
            raise APIError(f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    if req.previous_response_id is not None:
        raise APIError(
            "previous_response_id is not supported: this server stores no responses; send the whole "
            "conversation as input items",
            param="previous_response_id",
            code="unsupported_parameter",
        )
    if req.store:
        raise APIError(
            "store=true is not supported: this server stores no responses; send store=false",
            param="store",
            code="unsupported_parameter",
        )
    if req.truncation == "auto":
        raise APIError(
            "truncation 'auto' is not supported; an input longer than the context is a 400",
            param="truncation",
            code="unsupported_parameter",
        )
    if req.reasoning and any(v is not None for v in req.reasoning.values()):
        raise APIError("reasoning is not supported by this model", param="reasoning", code="unsupported_parameter")
    if req.text is not None and req.text.verbosity not in (None, "medium"):
        raise APIError("text.verbosity is not supported", param="text.verbosity", code="unsupported_parameter")
    if req.metadata is not None and (
        len(req.metadata) > MAX_METADATA or any(len(k) > 64 or len(v) > 512 for k, v in req.metadata.items())
    ):
        raise APIError(
            f"metadata: at most {MAX_METADATA} pairs, keys up to 64 and values up to 512 characters", param="metadata"
        )


def _text_of(content: Any, param: str) -> str:
    """The text of a message's content: a string, or a list of input_text/output_text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(f"{param} must be a string or a list of content parts", param=param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise APIError(
                f"{param}[{j}]: only text parts (input_text, output_text) are supported, got {kind!r}",
                param=f"{param}.{j}",
            )
        texts.append(part["text"])
    return "".join(texts)


def _str_field(item: dict[str, Any], name: str, param: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise APIError(f"{param}.{name} is required (a string)", param=f"{param}.{name}")
    return value


def input_messages(req: ResponsesRequest) -> list[ChatMessage]:
    """The conversation as chat messages: `instructions` as a system message first, then the input items;
    consecutive function_call items (and the assistant message before them) become one assistant turn."""
    messages: list[dict[str, Any]] = []
    if req.instructions is not None:
        messages.append({"role": "system", "content": req.instructions})
    items: list[dict[str, Any]] = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for i, item in enumerate(items):
        param = f"input.{i}"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(
                    f"{param}.role must be one of user, system, developer, assistant; got {role!r}",
                    param=f"{param}.role",
                )
            messages.append({"role": role, "content": _text_of(item.get("content"), f"{param}.content")})
        elif kind == "function_call":
            call = ToolCallIn(
                id=_str_field(item, "call_id", param),
                function=ToolCallFunction(
                    name=_str_field(item, "name", param), arguments=_str_field(item, "arguments", param)
                ),
            )
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": _str_field(item, "call_id", param),
                    "content": _text_of(output, f"{param}.output"),
                }
            )
        else:
            raise APIError(
                f"{param}: input items of type {kind!r} are not supported (only message, function_call "
                "and function_call_output)",
                param=f"{param}.type",
            )
    if not messages:
        raise APIError("input must not be empty", param="input")
    return [ChatMessage(**m) for m in messages]


def _chat_tools(req: ResponsesRequest) -> list[ChatTool] | None:
    if req.tools is None:
        return None
    out = []
    for i, t in enumerate(req.tools):
        if t.type != "function":
            raise APIError(
                f"tools[{i}]: tools of type {t.type!r} are not supported; only function tools are",
                param="tools",
                code="unsupported_parameter",
            )
        if t.name is None:
            raise APIError(f"tools[{i}].name is required", param=f"tools.{i}.name")
        out.append(
            ChatTool(
                function=FunctionDefinition(
                    name=t.name, description=t.description, parameters=t.parameters, strict=t.strict
                )
            )
        )
    return out


def _chat_tool_choice(req: ResponsesRequest) -> Literal["none", "auto", "required"] | NamedToolChoice | None:
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        return None if choice == "auto" and not req.tools else choice
    if choice.type != "function":
        raise APIError(
            f"tool_choice of type {choice.type!r} is not supported (only none, auto, required or a function)",
            param="tool_choice",
            code="unsupported_parameter",
        )
    if choice.name is None:
        raise APIError("tool_choice of type function needs a name", param="tool_choice.name")
    return NamedToolChoice(function=FunctionName(name=choice.name))


def _response_format(fmt: TextFormat | None) -> ResponseFormat | None:
    if fmt is None or fmt.type != "json_schema":
        return None if fmt is None else ResponseFormat(type=fmt.type)
    if fmt.schema_ is None:
        raise APIError("text.format of type json_schema needs a schema", param="text.format.schema")
    return ResponseFormat(
        type="json_schema",
        json_schema=JSONSchemaFormat(name=fmt.name, description=fmt.description, schema=fmt.schema_, strict=fmt.strict),
    )


def chat_request(req: ResponsesRequest, messages: list[ChatMessage]) -> ChatCompletionRequest:
    """The equivalent chat request (its tools, tool_choice, response_format and sampling fields)."""
    fmt = req.text.format if req.text is not None else None
    try:
        return ChatCompletionRequest(
            messages=messages,
            tools=_chat_tools(req),
            tool_choice=_chat_tool_choice(req),
            parallel_tool_calls=req.parallel_tool_calls,
            response_format=_response_format(fmt),
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            top_k=req.top_k,
            min_p=req.min_p,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            timeout=req.timeout,
            user=req.user,
        )
    except ValidationError as e:  # only what this module built can fail here
        raise APIError(f"invalid request: {e.errors()[0].get('msg', e)}") from None


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class _Response:
    """The Response object's fields that echo the request; `body()` adds the status and output."""

    id: str
    created_at: int
    echo: dict[str, Any]

    def body(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            **({"completed_at": int(time.time())} if status == "completed" else {}),
            "error": error,
            "incomplete_details": incomplete,
            **self.echo,
            "output": output,
            "usage": usage,
        }


def _echo(req: ResponsesRequest, model: str) -> dict[str, Any]:
    fmt = req.text.format if req.text is not None and req.text.format is not None else TextFormat(type="text")
    choice: Any = req.tool_choice or "auto"
    if isinstance(choice, ToolChoiceObject):
        choice = {"type": choice.type, "name": choice.name}
    return {
        "background": False,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": req.max_tool_calls,
        "metadata": req.metadata or {},
        "model": model,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": False,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True), "verbosity": "medium"},
        "tool_choice": choice,
        "tools": [
            {
                "type": "function",
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
                "strict": t.strict,
            }
            for t in req.tools or []
        ],
        "top_logprobs": req.top_logprobs or 0,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": "disabled",
        "user": req.user,
    }


def _message(msg_id: str, text: str, status: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "message",
        "id": msg_id,
        "status": status,
        "role": "assistant",
        "content": [] if status == "in_progress" and not text else [_text_part(text, logprobs)],
    }


def _text_part(text: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def _function_call(item_id: str, call: ToolCall, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call.id,
        "name": call.name,
        "arguments": arguments,
        "status": status,
    }


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


@router.post(
    "/v1/responses",
    responses={
        200: {
            "description": "A Response object, or with `stream` a text/event-stream of Responses API events",
            "content": {"text/event-stream": {}},
        }
    },
)
async def create_response(
    req: ResponsesRequest, request: Request, tm: Annotated[TextModel, Depends(get_text_model)]
) -> Any:
    route(request, Endpoint.RESPONSES, req.model)
    _refuse_unsupported(req)
    check_extra_fields(req, "responses")
    messages = input_messages(req)
    chat = chat_request(req, messages)
    with _renamed({"tool_choice.function.name": "tool_choice.name"}), _tools_renamed():
        functions, forced = tool_setup(chat)
    with _renamed({"response_format.json_schema.schema": "text.format.schema", "response_format": "text.format"}):
        constraint = output_constraint(chat.response_format, None)
    if forced is not None and constraint is not None:
        raise APIError(
            "text.format cannot be combined with a tool_choice that forces a call: the reply is a tool call",
            param="text.format",
        )
    with _renamed({"messages": "input"}):
        ids = await render_chat(tm, messages, functions=functions)
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise APIError(f"max_output_tokens must be at least 1, got {req.max_output_tokens}", param="max_output_tokens")
    with _renamed({"max_tokens": "max_output_tokens", "prompt": "input"}):
        max_tokens = resolve_max_tokens(tm, len(ids), req.max_output_tokens, default_max_tokens(request, None))
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
        raise APIError(
            f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs}",
            param="top_logprobs",
            code="invalid_value",
        )
    want_logprobs = req.top_logprobs is not None or LOGPROBS_INCLUDE in (req.include or [])
    params = sampling_params(
        chat,
        max_tokens=max_tokens,
        logprobs=(req.top_logprobs or 0) if want_logprobs else None,
        vocab_size=tm.vocab_size,
    )
    grammar = None
    if forced is not None:
        grammar = await compile_grammar(tm, forced_call_grammar(chat, forced), "tools")
    elif constraint is not None:
        grammar = await compile_grammar(tm, constraint[0], "text.format.schema")
    job = Job(ids, params, grammar)
    admission = admit(request, tm, 1, "responses")
    head = _Response(_new_id("resp"), int(time.time()), _echo(req, tm.name))
    if req.stream:
        return sse_response(_stream(tm, job, admission, head, functions, want_logprobs, req.timeout))

    text, finish, usage = "", None, Usage([job])
    logprobs: list[dict[str, Any]] = []
    async with aclosing(run_choices(tm.engine, [job], head.id, admission, request, timeout_s=req.timeout)) as events:
        async for _, ev in events:
            if ev.finish_reason == "error":
                raise event_error(ev)
            usage.add(0, ev)
            if want_logprobs and ev.token_id is not None:
                logprobs.append(logprob_entry(tm, ev).body())
            text += ev.text
            if ev.finish_reason is not None:
                finish = ev.finish_reason
    content, calls = parse_reply(text, functions) if functions else (text, [])
    status = _status(finish)
    output = []
    if content or not calls:
        output.append(_message(_new_id("msg"), content or "", status, logprobs))
    output += [_function_call(_new_id("fc"), c, c.arguments, "completed") for c in calls]
    return head.body(status, output, usage.responses())


@dataclass
class _Events:
    """Numbers the stream's events; each is `event: <type>` plus its JSON data."""

    seq: int = 0
    output: list[dict[str, Any]] = field(default_factory=list)  # the output items done so far

    def __call__(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return b"event: " + kind.encode() + b"\n" + sse_data(data)


async def _stream(
    tm: TextModel,
    job: Job,
    admission: Admission,
    head: _Response,
    functions: list[Function] | None,
    want_logprobs: bool,
    timeout: float | None,
) -> AsyncIterator[bytes]:
    """The Responses API's events: created, in_progress, the message's item/part/text deltas, each function
    call's item and arguments, then completed or incomplete (or error + failed). No [DONE] follows."""
    emit = _Events()
    yield emit("response.created", response=head.body("in_progress", []))
    yield emit("response.in_progress", response=head.body("in_progress", []))
    reply = ReplyStreamer(functions) if functions else None
    msg_id = _new_id("msg")
    text, opened = "", False
    pending: list[dict[str, Any]] = []  # logprobs of tokens whose text is not sent yet
    sent: list[dict[str, Any]] = []
    finish, usage = None, Usage([job])

    def delta(chunk: str) -> Iterator[bytes]:
        nonlocal text, opened, pending
        if not opened:
            opened = True
            yield emit("response.output_item.added", output_index=0, item=_message(msg_id, "", "in_progress", []))
            yield emit(
                "response.content_part.added", item_id=msg_id, output_index=0, content_index=0, part=_text_part("", [])
            )
        if chunk:
            text += chunk
            sent.extend(pending)
            yield emit(
                "response.output_text.delta",
                item_id=msg_id,
                output_index=0,
                content_index=0,
                delta=chunk,
                logprobs=pending,
            )
            pending = []

    async with aclosing(run_choices(tm.engine, [job], head.id, admission, timeout_s=timeout)) as events:
        async for _, ev in events:
            if ev.finish_reason == "error":
                err = event_error(ev)
                yield emit("error", code=err.code, message=err.message, param=None)
                yield emit(
                    "response.failed",
                    response=head.body("failed", emit.output, error={"code": "server_error", "message": err.message}),
                )
                return
            usage.add(0, ev)
            if want_logprobs and ev.token_id is not None:
                pending.append(logprob_entry(tm, ev).body())
            chunk = reply.feed(ev.text) if reply is not None else ev.text
            if chunk:
                for b in delta(chunk):
                    yield b
            if ev.finish_reason is not None:
                finish = ev.finish_reason
    status = _status(finish)
    calls: list[ToolCall] = []
    if reply is not None:
        rest, calls = reply.finish()
        if rest:
            for b in delta(rest):
                yield b
    if not calls and not opened:
        for b in delta(""):
            yield b
    if opened:
        sent.extend(pending)
        yield emit(
            "response.output_text.done", item_id=msg_id, output_index=0, content_index=0, text=text, logprobs=sent
        )
        yield emit(
            "response.content_part.done", item_id=msg_id, output_index=0, content_index=0, part=_text_part(text, sent)
        )
        emit.output.append(_message(msg_id, text, status, sent))
        yield emit("response.output_item.done", output_index=0, item=emit.output[-1])
    for call in calls:
        index, item_id = len(emit.output), _new_id("fc")
        yield emit(
            "response.output_item.added", output_index=index, item=_function_call(item_id, call, "", "in_progress")
        )
        yield emit("response.function_call_arguments.delta", item_id=item_id, output_index=index, delta=call.arguments)
        yield emit(
            "response.function_call_arguments.done",
            item_id=item_id,
            output_index=index,
            name=call.name,
            arguments=call.arguments,
        )
        emit.output.append(_function_call(item_id, call, call.arguments, "completed"))
        yield emit("response.output_item.done", output_index=index, item=emit.output[-1])
    final = "response.completed" if status == "completed" else "response.incomplete"
    yield emit(final, response=head.body(status, emit.output, usage.responses()))
