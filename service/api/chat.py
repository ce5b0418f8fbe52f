"""POST /v1/chat/completions: messages rendered with the model's chat template, streaming and not; tools
(`service.api.tools`) and structured outputs (`service.api.structured`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request

from model_core.grammar import GrammarSpec
from model_core.grammar_bounds import DEFAULT_BOUNDS, GrammarLimitError, check_depth
from service.api.chunks import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    PromptLogprobs,
    ReplyBody,
    TokenLogprob,
    ToolCallFunction,
    ToolCallOut,
)
from service.api.errors import APIError, error_responses
from service.api.fields import check_extra_fields
from service.api.generation import (
    admit,
    check_prompt_chars,
    check_top_logprobs,
    choice_params,
    decode_token,
    default_max_tokens,
    new_id,
    resolve_max_tokens,
    vllm_prompt_logprobs,
)
from service.api.json_route import OffLoopJSONRoute
from service.api.model_table import Endpoint, route, text_model
from service.api.schemas import ChatCompletionRequest, ChatMessage, sampling_params
from service.api.serving import ChoiceWriter, Job, Usage, respond
from service.api.structured import compile_grammar, output_constraint
from service.api.text_model import TextModel
from service.api.tools import Function, ReplyStreamer, ToolCall, call_grammar, parse_reply, with_tools
from service.engine.engine import TokenEvent

router = APIRouter(route_class=OffLoopJSONRoute, responses=error_responses(400, 401, 404, 413, 500, 503, 504))


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template takes them, checked as OpenAI checks them: every role but the
    assistant's needs content (the assistant's, content or tool calls), a tool result needs the id of the
    call it answers, and only an assistant makes calls."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if content is None and not (m.role == "assistant" and m.tool_calls):
            raise APIError(
                f"messages[{i}]: a{'n' if m.role == 'assistant' else ''} {m.role} message needs content"
                + (" or tool_calls" if m.role == "assistant" else ""),
                param=f"messages.{i}.content",
            )
        if m.role == "tool" and not m.tool_call_id:
            raise APIError(
                f"messages[{i}]: a tool message needs the tool_call_id of the call it answers",
                param=f"messages.{i}.tool_call_id",
            )
        if m.tool_calls and m.role != "assistant":
            raise APIError(f"messages[{i}]: only assistant messages carry tool_calls", param=f"messages.{i}.tool_calls")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(
                        f"messages[{i}].content: only text parts are supported", param=f"messages.{i}.content"
                    )
                parts.append(part["text"])
            content = "".join(parts)
        d: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.name:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def template_knows_tools(tm: TextModel) -> bool:
    """Whether the model's chat template renders `tools` itself (else the generic tool prompt is used)."""
    return "tools" in (tm.tokenizer.chat_template or "")


def _render(
    tm: TextModel, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: list[dict[str, Any]] | None
) -> list[int]:
    try:
        text = tm.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    except Exception as e:  # template errors (raise_exception, sandbox) are the client's input problem
        raise APIError(f"could not apply the chat template: {e}", param="messages") from None
    return tm.tokenizer.encode(text, add_special_tokens=False)


async def render_chat(
    tm: TextModel,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    limit_length: bool = True,
    functions: list[Function] | None = None,
) -> list[int]:
    """The prompt's token ids, templated and tokenized off the event loop. With `limit_length`, messages
    that could not fit the context whatever their tokens are refused before any of that work. `functions`:
    the tools the model may call, described by its template or by the generic tool prompt."""
    dicts = message_dicts(messages)
    tools = None
    if template_knows_tools(tm):
        tools = [
            {
                "type": "function",
                "function": {"name": f.name, "description": f.description or "", "parameters": f.parameters},
            }
            for f in functions or []
        ] or None
    elif functions is not None or any(d.get("tool_calls") or d["role"] == "tool" for d in dicts):
        dicts = with_tools(dicts, functions or [])
    if limit_length:
        check_prompt_chars(tm, sum(len(d["content"]) for d in dicts), "messages")
    return await asyncio.to_thread(_render, tm, dicts, add_generation_prompt, tools)


def tool_setup(req: ChatCompletionRequest) -> tuple[list[Function] | None, list[Function] | None]:
    """(the functions the model is told about, the functions a call is forced to) from tools/tool_choice."""
    tools = req.tools or []
    choice = req.tool_choice
    if choice is not None and not tools and choice != "none":
        raise APIError("tool_choice needs tools", param="tool_choice")
    functions = [
        Function(t.function.name, t.function.description, t.function.parameters or {"type": "object", "properties": {}})
        for t in tools
    ]
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise APIError("tools: function names must be unique", param="tools")
    for i, f in enumerate(functions):  # before the schema is serialised into the prompt or a grammar (recursively)
        param = f"tools.{i}.function.parameters"
        try:
            check_depth(f.parameters, DEFAULT_BOUNDS, param)
        except GrammarLimitError as e:
            raise APIError(str(e), param=param, code="grammar_limit_exceeded") from None
    if not functions or choice == "none":
        return None, None
    if choice == "required":
        return functions, functions
    if choice is not None and choice != "auto":
        named = [f for f in functions if f.name == choice.function.name]
        if not named:
            raise APIError(
                f"tool_choice names {choice.function.name!r}, which is not in tools",
                param="tool_choice.function.name",
            )
        return functions, named
    return functions, None


def forced_call_grammar(req: ChatCompletionRequest, forced: list[Function]) -> GrammarSpec:
    """The grammar of a forced reply: one call, or with `required` and `parallel_tool_calls: true` several
    (only when asked for: a small model under a forced call tends to repeat it)."""
    return call_grammar(forced, parallel=req.parallel_tool_calls is True and req.tool_choice == "required")


@router.post(
    "/v1/chat/completions",
    responses={
        200: {
            "description": "A chat completion, or with `stream` a text/event-stream",
            "content": {"text/event-stream": {}},
        }
    },
)
async def create_chat_completion(req: ChatCompletionRequest, request: Request) -> Any:
    route(request, Endpoint.CHAT, req.model)  # an unknown model is a 404 before any other check
    check_extra_fields(req, "chat")
    functions, forced = tool_setup(req)
    constraint = output_constraint(req.response_format, req.structured_outputs)
    if forced is not None and constraint is not None:
        raise APIError(
            f"{constraint[1]} cannot be combined with tool_choice {req.tool_choice!r}: the reply is a tool call",
            param=constraint[1].split(".")[0],
        )
    tm = await text_model(request, Endpoint.CHAT, req.model)
    ids = await render_chat(tm, req.messages, functions=functions)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = resolve_max_tokens(tm, len(ids), requested, default_max_tokens(request, None))
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs")
    check_top_logprobs(req.top_logprobs)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    base = sampling_params(req, max_tokens=max_tokens, logprobs=logprobs, vocab_size=tm.vocab_size)
    grammar = None
    if forced is not None:
        grammar = await compile_grammar(tm, forced_call_grammar(req, forced), "tools")
    elif constraint is not None:
        grammar = await compile_grammar(tm, *constraint)
    jobs = [Job(ids, choice_params(base, i), grammar) for i in range(req.n)]
    admission = admit(request, tm, len(jobs), "chat")
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    writer = ChatWriter(tm, req, jobs, new_id("chatcmpl"), int(time.time()), include_usage, functions)
    return await respond(tm, jobs, admission, writer, stream=req.stream, request=request, timeout_s=req.timeout)


def _finish_reason(reason: str | None, calls: list[ToolCall]) -> str | None:
    return "tool_calls" if calls and reason == "stop" else reason


def logprob_entry(tm: TextModel, ev: TokenEvent) -> ChatTokenLogprob:
    """A generated token's logprobs as chat completions and the Responses API write them."""

    def one(tid: int, lp: float) -> TokenLogprob:
        s = decode_token(tm, tid)
        return TokenLogprob(token=s, logprob=lp, bytes=list(s.encode("utf-8")))

    assert ev.token_id is not None
    first = one(ev.token_id, ev.logprob if ev.logprob is not None else 0.0)
    return ChatTokenLogprob(**dict(first), top_logprobs=[one(t, lp) for t, lp in ev.top_logprobs])


def _tool_call(k: int | None, call: ToolCall) -> ToolCallOut:
    fn = ToolCallFunction(name=call.name, arguments=call.arguments)
    return ToolCallOut(id=call.id, function=fn) if k is None else ToolCallOut(index=k, id=call.id, function=fn)


class ChatWriter(ChoiceWriter):
    """The choices of a chat completion: the assistant's content, tool calls (with tools: the stream sends
    content as it comes and the calls when the reply ends; the whole reply is parsed at once), logprobs,
    finish reason, and vLLM's prompt_logprobs for the request (its own chunk, first)."""

    def __init__(
        self,
        tm: TextModel,
        req: ChatCompletionRequest,
        jobs: list[Job],
        rid: str,
        created: int,
        include_usage: bool,
        functions: list[Function] | None,
    ) -> None:
        super().__init__(tm, jobs, rid, created, include_usage)
        self.req, self.functions = req, functions
        self.want_logprobs = req.logprobs
        self.texts = [""] * len(jobs)
        self.finish: list[str | None] = [None] * len(jobs)
        self.lps: list[list[ChatTokenLogprob]] = [[] for _ in jobs]
        self.prompt_lps: PromptLogprobs | None = None
        self.replies = [ReplyStreamer(functions) if functions else None for _ in jobs]

    def _chunk(
        self, i: int, delta: ChatDelta, logprobs: ChatLogprobs | None = None, finish: str | None = None
    ) -> ChatCompletionChunk:
        return self._chunk_of([ChatChunkChoice(index=i, delta=delta, logprobs=logprobs, finish_reason=finish)])

    def _chunk_of(self, choices: list[ChatChunkChoice], **extra: Any) -> ChatCompletionChunk:
        if self.usage_null:
            extra["usage"] = None
        return ChatCompletionChunk(
            id=self.rid, created=self.created, model=self.tm.name, system_fingerprint=None, choices=choices, **extra
        )

    def opening(self) -> list[ReplyBody]:
        return [self._chunk(i, ChatDelta(role="assistant", content="")) for i in range(len(self.jobs))]

    async def on_event(self, i: int, ev: TokenEvent) -> list[ReplyBody]:
        out: list[ReplyBody] = []
        k = self.req.prompt_logprobs
        if k is not None and self.prompt_lps is None and ev.prompt_logprobs is not None:  # decoded off the loop
            self.prompt_lps = await asyncio.to_thread(
                vllm_prompt_logprobs, self.tm, self.jobs[i].ids, ev.prompt_logprobs, k
            )
            out.append(self._chunk_of([], prompt_logprobs=self.prompt_lps))
        self.texts[i] += ev.text
        reply = self.replies[i]
        text = reply.feed(ev.text) if reply is not None else ev.text
        lp = None
        if self.want_logprobs and ev.token_id is not None:
            entry = logprob_entry(self.tm, ev)
            self.lps[i].append(entry)
            lp = ChatLogprobs(content=[entry])
        if text or lp is not None:
            out.append(self._chunk(i, ChatDelta(content=text), lp))
        if ev.finish_reason is not None:
            self.finish[i] = ev.finish_reason
            calls: list[ToolCall] = []
            if reply is not None:
                rest, calls = reply.finish()
                if rest:
                    out.append(self._chunk(i, ChatDelta(content=rest)))
                for n, call in enumerate(calls):
                    out.append(self._chunk(i, ChatDelta(tool_calls=[_tool_call(n, call)])))
            out.append(self._chunk(i, ChatDelta(), None, _finish_reason(ev.finish_reason, calls)))
        return out

    def usage_chunk(self, usage: Usage) -> ReplyBody:
        return ChatCompletionChunk(
            id=self.rid,
            created=self.created,
            model=self.tm.name,
            system_fingerprint=None,
            choices=[],
            usage=usage.openai(),
        )

    def response(self, usage: Usage) -> ReplyBody:
        choices = []
        for i in range(len(self.jobs)):
            text = self.texts[i]
            content, calls = parse_reply(text, self.functions) if self.functions else (text, [])
            message = ChatMessageOut(content=content)
            if calls:
                message = ChatMessageOut(content=content, tool_calls=[_tool_call(None, c) for c in calls])
            choices.append(
                ChatChoice(
                    index=i,
                    message=message,
                    logprobs=ChatLogprobs(content=self.lps[i]) if self.want_logprobs else None,
                    finish_reason=_finish_reason(self.finish[i], calls),
                )
            )
        extra = {"prompt_logprobs": self.prompt_lps} if self.req.prompt_logprobs is not None else {}
        return ChatCompletion(
            id=self.rid,
            created=self.created,
            model=self.tm.name,
            system_fingerprint=None,
            choices=choices,
            usage=usage.openai(),
            **extra,
        )
