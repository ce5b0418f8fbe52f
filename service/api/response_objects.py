"""The bodies the Responses API sends, as typed models: the Response object, its output items and the stream's
events, on the conventions of `service.api.chunks` (`ReplyBody`: a field is written when it was passed or has
a constant default; a null the reply always carries is passed as None).

A stream event is written as `event: <type>` plus its data; `sequence_number` numbers the events of a stream
from 0.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from service.api.chunks import ChatTokenLogprob, ReplyBody

ItemStatus = Literal["in_progress", "completed", "incomplete"]
ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


# ---- the Response object ----------------------------------------------------------------------------------
class InputTokensDetails(ReplyBody):
    cached_tokens: int
    cache_write_tokens: int = 0


class OutputTokensDetails(ReplyBody):
    reasoning_tokens: int = 0


class ResponseUsage(ReplyBody):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class OutputText(ReplyBody):
    """A message's text part, with the logprobs of its tokens (empty unless asked for)."""

    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)  # none are made
    logprobs: list[ChatTokenLogprob]


class OutputMessage(ReplyBody):
    type: Literal["message"] = "message"
    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallItem(ReplyBody):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str  # a JSON object as text
    status: ItemStatus


OutputItem = OutputMessage | FunctionCallItem


class ResponseError(ReplyBody):
    code: str
    message: str


class IncompleteDetails(ReplyBody):
    reason: Literal["max_output_tokens"]


class Reasoning(ReplyBody):
    effort: str | None
    summary: str | None


class TextFormatOut(ReplyBody):
    """The echoed `text.format`: the fields the request set."""

    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, serialization_alias="schema")  # the client's JSON schema
    strict: bool | None = None


class TextOptions(ReplyBody):
    format: TextFormatOut
    verbosity: Literal["medium"] = "medium"


class FunctionToolOut(ReplyBody):
    type: Literal["function"] = "function"
    name: str | None
    description: str | None
    parameters: dict[str, Any] | None  # the client's JSON schema
    strict: bool | None


class FunctionChoice(ReplyBody):
    type: str
    name: str | None


class Response(ReplyBody):
    """The Response object: its status and output, and the settings of the request that made it."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    completed_at: int | None = None  # only once completed
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    background: bool = False
    instructions: str | None
    max_output_tokens: int | None
    max_tool_calls: int | None
    metadata: dict[str, str]
    model: str
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: Reasoning
    service_tier: Literal["default"] = "default"
    store: bool = False
    temperature: float
    text: TextOptions
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice
    tools: list[FunctionToolOut]
    top_logprobs: int
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    user: str | None
    output: list[OutputItem]
    usage: ResponseUsage | None


# ---- stream events ----------------------------------------------------------------------------------------
class ResponseEvent(ReplyBody):
    """One event of a Responses API stream."""

    type: str
    sequence_number: int

    @model_serializer(mode="wrap")
    def _numbered_last(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The event's fields, `sequence_number` last (as this server has always written it)."""
        data: dict[str, Any] = handler(self)
        data["sequence_number"] = data.pop("sequence_number")
        return data

    def sse(self) -> bytes:
        return b"event: " + self.type.encode() + b"\n" + super().sse()


class ResponseCreated(ResponseEvent):
    type: Literal["response.created"] = "response.created"
    response: Response


class ResponseInProgress(ResponseEvent):
    type: Literal["response.in_progress"] = "response.in_progress"
    response: Response


class ResponseCompleted(ResponseEvent):
    type: Literal["response.completed"] = "response.completed"
    response: Response


class ResponseIncomplete(ResponseEvent):
    type: Literal["response.incomplete"] = "response.incomplete"
    response: Response


class ResponseFailed(ResponseEvent):
    type: Literal["response.failed"] = "response.failed"
    response: Response


class OutputItemAdded(ResponseEvent):
    type: Literal["response.output_item.added"] = "response.output_item.added"
    output_index: int
    item: OutputItem


class OutputItemDone(ResponseEvent):
    type: Literal["response.output_item.done"] = "response.output_item.done"
    output_index: int
    item: OutputItem


class ContentPartAdded(ResponseEvent):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class ContentPartDone(ResponseEvent):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class OutputTextDelta(ResponseEvent):
    """New text of a message, with the logprobs of the tokens it completes."""

    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[ChatTokenLogprob]


class OutputTextDone(ResponseEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[ChatTokenLogprob]


class FunctionCallArgumentsDelta(ResponseEvent):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDone(ResponseEvent):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(ResponseEvent):
    """An error after the stream began (`response.failed` follows)."""

    type: Literal["error"] = "error"
    code: str | None
    message: str
    param: str | None
