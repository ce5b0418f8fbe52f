"""The bodies completions and chat completions send, as typed models: whole responses and stream chunks.

Fields a reply always carries are required (a null is written as null); optional extensions (`usage` on a
chunk when `stream_options.include_usage` is set, vLLM's `prompt_logprobs`, a delta's fields) are written
only when set: every body is dumped with `exclude_unset` (fields with a constant default, such as `object`,
count as set).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


@functools.cache
def _always_written(cls: type[BaseModel]) -> frozenset[str]:
    """Fields with a constant default (`object`, `type`, `role`): written even when not passed."""
    return frozenset(n for n, f in cls.model_fields.items() if not f.is_required() and f.default is not None)


class ReplyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def model_post_init(self, context: Any) -> None:
        self.__pydantic_fields_set__.update(_always_written(type(self)))

    def body(self) -> dict[str, Any]:
        """The JSON body (a dict; the route serialises it)."""
        return self.model_dump(exclude_unset=True)

    def sse(self) -> bytes:
        """One server-sent event carrying this body."""
        return b"data: " + self.model_dump_json(exclude_unset=True).encode() + b"\n\n"


class PromptTokensDetails(ReplyBody):
    cached_tokens: int


class UsageInfo(ReplyBody):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


# vLLM's prompt_logprobs: per prompt position None (the first) or {token id: {logprob, rank, decoded_token}}
PromptLogprobs = list[dict[str, dict[str, Any]] | None]


# ---- /v1/completions --------------------------------------------------------------------------------------
class CompletionLogprobs(ReplyBody):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(ReplyBody):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    prompt_logprobs: PromptLogprobs | None = None


class Completion(ReplyBody):
    """A completion, or (the same shape) one chunk of a streamed one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---- /v1/chat/completions ---------------------------------------------------------------------------------
class TokenLogprob(ReplyBody):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TokenLogprob):
    top_logprobs: list[TokenLogprob]


class ChatLogprobs(ReplyBody):
    content: list[ChatTokenLogprob]


class ToolCallFunction(ReplyBody):
    name: str
    arguments: str


class ToolCallOut(ReplyBody):
    index: int | None = None  # in a stream's delta: which call of the reply
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessageOut(ReplyBody):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(ReplyBody):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(ReplyBody):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None


class ChatDelta(ReplyBody):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChunkChoice(ReplyBody):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(ReplyBody):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    prompt_logprobs: PromptLogprobs | None = None
