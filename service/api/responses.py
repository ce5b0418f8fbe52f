"""POST /v1/responses: OpenAI's Responses API, stateless (nothing is stored, so no `previous_response_id`
and no `store`). The input items become chat messages and run through the chat machinery (`service.api.chat`):
the same template, function tools (`service.api.tools`) and structured outputs (`service.api.structured`);
the reply is a Response object, or with `stream` the Responses API's typed server-sent events."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.api.chat import forced_call_grammar, logprob_entry, render_chat, tool_setup
from service.api.chunks import ChatTokenLogprob, ReplyBody
from service.api.errors import APIError, error_responses
from service.api.fields import check_extra_fields
from service.api.generation import (
    admit,
    check_top_logprobs,
    default_max_tokens,
    new_id,
    resolve_max_tokens,
)
from service.api.json_route import OffLoopJSONRoute
from service.api.model_table import Endpoint, route, text_model
from service.api.response_objects import (
    ContentPartAdded,
    ContentPartDone,
    ErrorEvent,
    FunctionCallArgumentsDelta,
    FunctionCallArgumentsDone,
    FunctionCallItem,
    FunctionChoice,
    FunctionToolOut,
    IncompleteDetails,
    ItemStatus,
    OutputItem,
    OutputItemAdded,
    OutputItemDone,
    OutputMessage,
    OutputText,
    OutputTextDelta,
    OutputTextDone,
    Reasoning,
    Response,
    ResponseCompleted,
    ResponseCreated,
    ResponseError,
    ResponseFailed,
    ResponseIncomplete,
    ResponseInProgress,
    ResponseStatus,
    ResponseUsage,
    TextFormatOut,
    TextOptions,
)
from service.api.schemas import (
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
from service.api.serving import Job, ReplyWriter, Usage, respond
from service.api.structured import compile_grammar, output_constraint
from service.api.text_model import TextModel
from service.api.tools import Function, ReplyStreamer, ToolCall, parse_reply
from service.engine.engine import TokenEvent

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
    messages: list[ChatMessage] = []
    if req.instructions is not None:
        messages.append(ChatMessage(role="system", content=req.instructions))
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
            messages.append(ChatMessage(role=role, content=_text_of(item.get("content"), f"{param}.content")))
        elif kind == "function_call":
            call = ToolCallIn(
                id=_str_field(item, "call_id", param),
                function=ToolCallFunction(
                    name=_str_field(item, "name", param), arguments=_str_field(item, "arguments", param)
                ),
            )
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif kind == "function_call_output":
            call_id, output = _str_field(item, "call_id", param), _text_of(item.get("output"), f"{param}.output")
            messages.append(ChatMessage(role="tool", tool_call_id=call_id, content=output))
        else:
            raise APIError(
                f"{param}: input items of type {kind!r} are not supported (only message, function_call "
                "and function_call_output)",
                param=f"{param}.type",
            )
    if not messages:
        raise APIError("input must not be empty", param="input")
    return messages


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


def response_head(req: ResponsesRequest, rid: str, created_at: int, model: str) -> Response:
    """The Response object in progress, without output: its id and the request's settings it echoes."""
    fmt = req.text.format if req.text is not None and req.text.format is not None else None
    asked = req.tool_choice or "auto"
    choice = FunctionChoice(type=asked.type, name=asked.name) if isinstance(asked, ToolChoiceObject) else asked
    return Response(
        id=rid,
        created_at=created_at,
        status="in_progress",
        error=None,
        incomplete_details=None,
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        max_tool_calls=req.max_tool_calls,
        metadata=req.metadata or {},
        model=model,
        parallel_tool_calls=req.parallel_tool_calls is not False,
        previous_response_id=None,
        reasoning=Reasoning(effort=None, summary=None),
        temperature=1.0 if req.temperature is None else req.temperature,
        text=TextOptions(
            format=TextFormatOut(**fmt.model_dump(exclude_none=True)) if fmt is not None else TextFormatOut(type="text")
        ),
        tool_choice=choice,
        tools=[
            FunctionToolOut(name=t.name, description=t.description, parameters=t.parameters, strict=t.strict)
            for t in req.tools or []
        ],
        top_logprobs=req.top_logprobs or 0,
        top_p=1.0 if req.top_p is None else req.top_p,
        user=req.user,
        output=[],
        usage=None,
    )


def _item_status(finish_reason: str | None) -> Literal["completed", "incomplete"]:
    return "incomplete" if finish_reason == "length" else "completed"


def _message(msg_id: str, text: str, status: ItemStatus, logprobs: list[ChatTokenLogprob]) -> OutputMessage:
    content = [] if status == "in_progress" and not text else [OutputText(text=text, logprobs=logprobs)]
    return OutputMessage(id=msg_id, status=status, content=content)


def _function_call(item_id: str, call: ToolCall, arguments: str, status: ItemStatus) -> FunctionCallItem:
    return FunctionCallItem(id=item_id, call_id=call.id, name=call.name, arguments=arguments, status=status)


class ResponseWriter(ReplyWriter):
    """The Response of one choice: a message (its text and, when asked, its tokens' logprobs) and the function
    calls the reply makes. The whole response parses the whole reply; the stream sends created and
    in_progress, the message's item, part and text deltas as the text comes, the items' done events and each
    call's item and arguments when the reply ends, then completed or incomplete (or error + failed). No
    [DONE] follows."""

    def __init__(
        self, tm: TextModel, job: Job, head: Response, functions: list[Function] | None, want_logprobs: bool
    ) -> None:
        super().__init__(tm, [job], head.id, head.created_at)
        self.head, self.functions, self.want_logprobs = head, functions, want_logprobs
        self.raw = ""  # the reply as generated
        self.finish: str | None = None
        self.logprobs: list[ChatTokenLogprob] = []  # every generated token's
        self.msg_id = new_id("msg", "_")
        # the stream's record
        self.seq = 0  # the next event's sequence_number
        self.reply = ReplyStreamer(functions) if functions else None
        self.text = ""  # the message's text sent so far
        self.opened = False  # the message's item and part were sent
        self.unsent = 0  # logprobs[unsent:]: tokens whose text is not sent yet
        self.output: list[OutputItem] = []  # the items done so far

    def _next(self) -> int:
        self.seq += 1
        return self.seq - 1

    def _response(
        self,
        status: ResponseStatus,
        output: list[OutputItem],
        usage: ResponseUsage | None = None,
        error: ResponseError | None = None,
    ) -> Response:
        update: dict[str, object] = {"status": status, "output": list(output), "usage": usage, "error": error}
        if status == "completed":
            update["completed_at"] = int(time.time())
        if status == "incomplete":
            update["incomplete_details"] = IncompleteDetails(reason="max_output_tokens")
        return self.head.model_copy(update=update)

    def opening(self) -> list[ReplyBody]:
        head = self._response("in_progress", [])
        return [
            ResponseCreated(sequence_number=self._next(), response=head),
            ResponseInProgress(sequence_number=self._next(), response=head),
        ]

    def _delta(self, chunk: str) -> list[ReplyBody]:
        """The message's text `chunk` (opening the message first); "" only opens it."""
        out: list[ReplyBody] = []
        if not self.opened:
            self.opened = True
            out.append(
                OutputItemAdded(
                    sequence_number=self._next(), output_index=0, item=_message(self.msg_id, "", "in_progress", [])
                )
            )
            part = OutputText(text="", logprobs=[])
            out.append(
                ContentPartAdded(
                    sequence_number=self._next(), item_id=self.msg_id, output_index=0, content_index=0, part=part
                )
            )
        if chunk:
            self.text += chunk
            logprobs, self.unsent = self.logprobs[self.unsent :], len(self.logprobs)
            out.append(
                OutputTextDelta(
                    sequence_number=self._next(),
                    item_id=self.msg_id,
                    output_index=0,
                    content_index=0,
                    delta=chunk,
                    logprobs=logprobs,
                )
            )
        return out

    async def on_event(self, i: int, ev: TokenEvent) -> list[ReplyBody]:
        self.raw += ev.text
        if self.want_logprobs and ev.token_id is not None:
            self.logprobs.append(logprob_entry(self.tm, ev))
        chunk = self.reply.feed(ev.text) if self.reply is not None else ev.text
        out = self._delta(chunk) if chunk else []
        if ev.finish_reason is not None:
            self.finish = ev.finish_reason
            out += self._items_done()
        return out

    def _items_done(self) -> list[ReplyBody]:
        """At the end of the reply: the rest of the text, the message's done events, each call's events."""
        status = _item_status(self.finish)
        calls: list[ToolCall] = []
        out: list[ReplyBody] = []
        if self.reply is not None:
            rest, calls = self.reply.finish()
            if rest:
                out += self._delta(rest)
        if not calls and not self.opened:
            out += self._delta("")
        if self.opened:
            text, logprobs, msg_id = self.text, self.logprobs, self.msg_id
            out += [
                OutputTextDone(
                    sequence_number=self._next(),
                    item_id=msg_id,
                    output_index=0,
                    content_index=0,
                    text=text,
                    logprobs=logprobs,
                ),
                ContentPartDone(
                    sequence_number=self._next(),
                    item_id=msg_id,
                    output_index=0,
                    content_index=0,
                    part=OutputText(text=text, logprobs=logprobs),
                ),
            ]
            self.output.append(_message(self.msg_id, self.text, status, self.logprobs))
            out.append(OutputItemDone(sequence_number=self._next(), output_index=0, item=self.output[-1]))
        for call in calls:
            index, item_id = len(self.output), new_id("fc", "_")
            item = _function_call(item_id, call, "", "in_progress")
            out.append(OutputItemAdded(sequence_number=self._next(), output_index=index, item=item))
            out += [
                FunctionCallArgumentsDelta(
                    sequence_number=self._next(), item_id=item_id, output_index=index, delta=call.arguments
                ),
                FunctionCallArgumentsDone(
                    sequence_number=self._next(),
                    item_id=item_id,
                    output_index=index,
                    name=call.name,
                    arguments=call.arguments,
                ),
            ]
            self.output.append(_function_call(item_id, call, call.arguments, "completed"))
            out.append(OutputItemDone(sequence_number=self._next(), output_index=index, item=self.output[-1]))
        return out

    def closing(self, usage: Usage) -> list[ReplyBody]:
        response = self._response(_item_status(self.finish), self.output, usage.responses())
        if response.status == "completed":
            return [ResponseCompleted(sequence_number=self._next(), response=response)]
        return [ResponseIncomplete(sequence_number=self._next(), response=response)]

    def failure(self, error: APIError, usage: Usage) -> list[ReplyBody]:
        failed = self._response("failed", self.output, error=ResponseError(code="server_error", message=error.message))
        return [
            ErrorEvent(sequence_number=self._next(), code=error.code, message=error.message, param=None),
            ResponseFailed(sequence_number=self._next(), response=failed),
        ]

    def response(self, usage: Usage) -> ReplyBody:
        content, calls = parse_reply(self.raw, self.functions) if self.functions else (self.raw, [])
        status = _item_status(self.finish)
        output: list[OutputItem] = []
        if content or not calls:
            output.append(_message(self.msg_id, content or "", status, self.logprobs))
        output += [_function_call(new_id("fc", "_"), c, c.arguments, "completed") for c in calls]
        return self._response(status, output, usage.responses())


@router.post(
    "/v1/responses",
    responses={
        200: {
            "description": "A Response object, or with `stream` a text/event-stream of Responses API events",
            "content": {"text/event-stream": {}},
        }
    },
)
async def create_response(req: ResponsesRequest, request: Request) -> Any:
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
    tm = await text_model(request, Endpoint.RESPONSES, req.model)
    with _renamed({"messages": "input"}):
        ids = await render_chat(tm, messages, functions=functions)
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise APIError(f"max_output_tokens must be at least 1, got {req.max_output_tokens}", param="max_output_tokens")
    with _renamed({"max_tokens": "max_output_tokens", "prompt": "input"}):
        max_tokens = resolve_max_tokens(tm, len(ids), req.max_output_tokens, default_max_tokens(request, None))
    check_top_logprobs(req.top_logprobs)
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
    head = response_head(req, new_id("resp", "_"), int(time.time()), tm.name)
    writer = ResponseWriter(tm, job, head, functions, want_logprobs)
    return await respond(tm, [job], admission, writer, stream=req.stream, request=request, timeout_s=req.timeout)
