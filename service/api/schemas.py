"""Request bodies of the OpenAI-compatible text endpoints (pydantic: the shape; a wrong one is a 400 naming the
field), and their conversion to `SamplingParams`, whose `validate` checks what each field means (a 400 naming
the field)."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from pydantic_core import PydanticCustomError

from model_core.sampling import MAX_LOGPROBS, SamplingParams, SamplingParamsError
from service.api.errors import APIError

MAX_STOP = 16
MAX_N = 16
MAX_LOGIT_BIAS = 1024
MAX_TOP_LOGPROBS = MAX_LOGPROBS

_T = TypeVar("_T")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


def find_lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string in a JSON value that holds a lone UTF-16 surrogate (JSON allows
    `"\\ud800"`, but it is not text any tokenizer can take), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = find_lone_surrogate(v, f"{path}.{k}" if path else str(k))
        if found is not None:
            return found
    return None


class RequestBody(_Body):
    """A whole request body: refuses text that is not valid Unicode (a 400 naming the field). Fields it does
    not declare are kept in `model_extra` (see `service.api.fields`: refused when OpenAI's and not
    honoured here, else accepted and logged once, as vLLM does)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = find_lone_surrogate(data)
        if where is not None:
            raise PydanticCustomError(
                "lone_surrogate",
                "{param}: the text holds a lone UTF-16 surrogate, which is not valid Unicode",
                {"param": where},
            )
        return data


class StreamOptions(_Body):
    include_usage: bool = False


class JSONSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs` extension: exactly one constraint."""

    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: FunctionName


class ToolCallFunction(_Body):
    name: str
    arguments: str


class ToolCallIn(_Body):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class _Sampling(RequestBody):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    timeout: float | None = Field(None, description="seconds this request may take, > 0 (capped by the server)")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    prompt_logprobs: int | None = Field(
        None, description="vLLM extension: score every prompt token, with this many top logprobs per position (0-20)"
    )


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallIn] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[StrictInt]


def _or(value: _T | None, default: _T) -> _T:
    return default if value is None else value


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """The request's logit_bias with its keys as token ids (their range is SamplingParams' to check)."""
    if not bias:
        return ()
    if len(bias) > MAX_LOGIT_BIAS:
        raise APIError(f"logit_bias accepts at most {MAX_LOGIT_BIAS} entries, got {len(bias)}", param="logit_bias")
    pairs = []
    for k, v in bias.items():
        try:
            pairs.append((int(k), v))
        except ValueError:
            raise APIError(f"logit_bias keys must be token ids, got {k!r}", param="logit_bias") from None
    return tuple(pairs)


def sampling_params(req: _Sampling, *, max_tokens: int, logprobs: int | None, vocab_size: int) -> SamplingParams:
    """The request's SamplingParams (`max_tokens` already resolved). Checked here: the request's shape (n,
    timeout, how many stop strings, stop ids and logit_bias entries, the seed's range); by
    `SamplingParams.validate`: what every sampling field means. Both raise a 400 naming the field."""
    if not 1 <= req.n <= MAX_N:
        raise APIError(f"n must be in [1, {MAX_N}], got {req.n}", param="n", code="invalid_value")
    if req.timeout is not None and not req.timeout > 0:  # also NaN
        raise APIError(f"timeout must be > 0 seconds, got {req.timeout}", param="timeout", code="invalid_value")
    if req.seed is not None and not -(2**63) <= req.seed <= 2**64 - 1:
        raise APIError(f"seed must be in [{-(2**63)}, {2**64 - 1}], got {req.seed}", param="seed", code="invalid_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(f"stop accepts at most {MAX_STOP} strings, got {len(stop)}", param="stop")
    stop_ids = list(req.stop_token_ids or [])
    if len(stop_ids) > MAX_STOP:
        raise APIError(f"stop_token_ids accepts at most {MAX_STOP} ids, got {len(stop_ids)}", param="stop_token_ids")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_or(req.temperature, 1.0),
        top_p=_or(req.top_p, 1.0),
        top_k=0 if req.top_k is None or req.top_k == -1 else req.top_k,  # -1 and 0 both mean off
        min_p=_or(req.min_p, 0.0),
        repetition_penalty=_or(req.repetition_penalty, 1.0),
        presence_penalty=_or(req.presence_penalty, 0.0),
        frequency_penalty=_or(req.frequency_penalty, 0.0),
        logit_bias=_logit_bias(req.logit_bias),
        seed=None if req.seed is None else req.seed % (2**63),
        stop=tuple(stop),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        min_tokens=req.min_tokens,
        prompt_logprobs=req.prompt_logprobs,
    )
    try:
        params.validate(vocab_size)
    except SamplingParamsError as e:
        raise APIError(str(e), param=e.field, code="invalid_value") from None
    return params


class ModelActionRequest(_Body):
    """POST /models/load and /models/unload (llama-server's router mode's routes): the LM to load or unload."""

    model: str


class LoadLoraRequest(_Body):
    """POST /v1/load_lora_adapter (vLLM's route): serve the adapter at `lora_path` as the model `lora_name`, over
    `base_model_name` (default: the first model)."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    base_model_name: str | None = None


class UnloadLoraRequest(_Body):
    """POST /v1/unload_lora_adapter (vLLM's route): stop serving the adapter `lora_name`."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's clients may send it; the name is what counts here
