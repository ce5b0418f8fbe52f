"""Function calling for models whose chat template does not describe tools itself.

The tools go into the prompt as a system message (the generic tool prompt below, documented in the
README); the model answers a call as `<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>`, the
form SmolLM2 and the Hermes/Qwen family were trained on. With `tool_choice` "required" or a named
function the reply is generated under a grammar that only admits that form with arguments valid under
each tool's parameter schema; with "auto" the reply is parsed (a call, or text for the user). Past calls
and tool results are written back into the prompt in the same form, so conversations round-trip.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from model_core.grammar import GrammarSpec

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_PARALLEL_CALLS = 16  # calls in one forced reply
FUNCTION_DEFS = "__tool_parameters_"  # the combined call schema's definition of function i's parameters: + str(i)

TOOL_PROMPT = """You can call functions to help answer. The functions, as JSON schemas:
<tools>
{tools}
</tools>
To call functions, reply with nothing but
<tool_call>[{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}]</tool_call>
listing one object per call. The results come back in messages from the tool. When no function is
needed, reply to the user directly."""


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def system_prompt(functions: list[Function]) -> str:
    described = [
        {"name": f.name, **({"description": f.description} if f.description else {}), "parameters": f.parameters}
        for f in functions
    ]
    return TOOL_PROMPT.format(tools="\n".join(json.dumps(d, ensure_ascii=False) for d in described))


def with_tools(messages: list[dict[str, Any]], functions: list[Function]) -> list[dict[str, Any]]:
    """The conversation as a template without tool support renders it: the tool prompt joins the system
    message (or becomes one), past calls become `<tool_call>` text, tool results are wrapped."""
    prompt = system_prompt(functions) if functions else None
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": _loads_or_text(c["function"]["arguments"])}
                for c in m.pop("tool_calls")
            ]
            text = OPEN + json.dumps(calls, ensure_ascii=False) + CLOSE
            m["content"] = (m.get("content") or "") + text
        if m["role"] == "tool":
            m["content"] = "<tool_response>\n" + (m.get("content") or "") + "\n</tool_response>"
            m.pop("tool_call_id", None)
        out.append(m)
    if prompt is not None:
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _loads_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def call_grammar(functions: list[Function], parallel: bool) -> GrammarSpec:
    """A grammar admitting exactly `<tool_call>[calls]</tool_call>` whose calls name one of `functions` with
    arguments valid under its parameter schema (one call unless `parallel`).

    Each parameter schema becomes a definition of the combined schema (`#/$defs/<FUNCTION_DEFS><i>`) and its
    local `$ref`s are rebased onto it (`#/$defs/Addr` -> `#/$defs/<FUNCTION_DEFS><i>/$defs/Addr`, `#` ->
    `#/$defs/<FUNCTION_DEFS><i>`), so nested, shared and recursive definitions keep pointing where they did."""
    defs: dict[str, Any] = {}
    alternatives = []
    for i, f in enumerate(functions):
        base = f"#/$defs/{FUNCTION_DEFS}{i}"
        arguments, has_refs = _prepare(f.parameters, base)
        if has_refs:
            defs[f"{FUNCTION_DEFS}{i}"] = arguments
            arguments = {"$ref": base}
        alternatives.append(
            {
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": arguments},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    call = {"anyOf": alternatives}
    # JSON on one line (at most a space between tokens: calls are parsed, not read), and no leniency: a
    # parameter schema keyword the engine cannot enforce fails the compile (a 400) instead of being ignored
    array: dict[str, Any] = {
        "type": "array",
        "items": call,
        "minItems": 1,
        "maxItems": MAX_PARALLEL_CALLS if parallel else 1,
        "x-guidance": {"whitespace_pattern": "[\x20]?", "lenient": False},
    }
    if defs:
        array["$defs"] = defs
    lark = f'start: "{OPEN}" calls "{CLOSE}"\ncalls: %json {json.dumps(array)}\n'  # key order kept: name first
    return GrammarSpec.grammar(lark)


# keywords whose values are data, not schemas: a "$ref" key inside them is not a reference
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
# keywords whose values map names (of properties, definitions) to schemas: their keys are not keywords
_NAME_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
# a nested object schema with one of these says itself which properties it takes (or combines with others)
_OPEN_OR_COMBINED = frozenset(
    {"additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "anyOf", "oneOf", "$ref"}
)


def _prepare(parameters: dict[str, Any], base: str) -> tuple[dict[str, Any], bool]:
    """(a function's parameter schema as the call grammar uses it, whether it has document-local refs).

    A copy, with every document-local `$ref` (`#`, `#/...`: a JSON pointer from the schema's root) moved under
    `base`, the pointer at which the schema will sit (other refs, anchors and remote ones, are left as they
    are), and without room for arguments it does not name, unless it says otherwise: a function takes the
    arguments it declares (a small model otherwise tends to copy the schema into the call, or to invent keys
    that never end). So the root, when an object, and each nested object schema with `properties` (not a
    member of an `allOf`, nor combined with other schemas) get `additionalProperties: false`. Iterative: a
    schema nested deeper than Python's recursion limit is refused by the grammar bounds, not by a
    RecursionError here."""
    found = False
    out: dict[str, Any] = {}
    # (source, its copy, role): "schema" (a schema), "member" (a schema not to close: in an allOf),
    # "names" (names -> schemas), "list" (a list of schemas), "allOf" (a list of members)
    stack: list[tuple[Any, Any, str]] = [(parameters, out, "schema")]
    while stack:
        src, dst, role = stack.pop()
        for k, v in src.items() if isinstance(src, dict) else enumerate(src):
            new: Any = v
            keyword = role in ("schema", "member")
            if keyword and k == "$ref" and isinstance(v, str) and (v == "#" or v.startswith("#/")):
                new, found = base + v[1:], True
            elif isinstance(v, (dict, list)) and not (keyword and k in _DATA_KEYWORDS):
                new = {} if isinstance(v, dict) else []
                if isinstance(v, list):
                    child = "allOf" if keyword and k == "allOf" else "list"
                else:
                    child = "names" if keyword and k in _NAME_MAPS else "member" if role == "allOf" else "schema"
                stack.append((v, new, child))
            if isinstance(dst, dict):
                dst[k] = new
            else:
                dst.append(new)
        if role == "schema" and isinstance(src, dict) and src.get("type") == "object":
            if (src is parameters and "additionalProperties" not in src) or (
                "properties" in src and not _OPEN_OR_COMBINED.intersection(src)
            ):
                dst["additionalProperties"] = False
    return out, found


def parse_reply(text: str, functions: list[Function]) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a model reply: the calls it makes in the tool-call form (or as a bare JSON call),
    and the text around them. A reply whose calls do not parse, or name an unknown function, is content."""
    names = {f.name for f in functions}
    start = text.find(OPEN)
    if start >= 0:
        end = text.find(CLOSE, start)
        body = text[start + len(OPEN) : end if end >= 0 else len(text)]
        calls = _calls(body, names)
        if calls is not None:
            rest = (text[:start] + (text[end + len(CLOSE) :] if end >= 0 else "")).strip()
            return rest or None, calls
        return text, []
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        calls = _calls(stripped, names)
        if calls is not None:
            return None, calls
    return text, []


def _calls(body: str, names: set[str]) -> list[ToolCall] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append(ToolCall(new_call_id(), item["name"], json.dumps(args, ensure_ascii=False)))
    return calls or None


class ReplyStreamer:
    """Splits a streamed reply into text for the user, sent as it comes, and tool calls, kept back until
    the reply ends: text that may still turn out to open a call (a prefix of `<tool_call>`, or a reply
    that starts as JSON) is held until it is known."""

    def __init__(self, functions: list[Function]) -> None:
        self.functions = functions
        self.text = ""
        self.sent = 0  # characters of self.text already sent as content
        self.in_call = False

    def feed(self, delta: str) -> str:
        """Add generated text; return the content that can be sent now."""
        self.text += delta
        if self.in_call:
            return ""
        start = self.text.find(OPEN, self.sent)
        if start >= 0:
            self.in_call = True
            return self._send_to(start)
        if self.sent == 0 and self.text.lstrip()[:1] in ("{", "["):
            return ""  # maybe a bare JSON call: decided at the end
        return self._send_to(len(self.text) - _held_prefix(self.text[self.sent :]))

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of the reply: (content still to send, the calls)."""
        if self.in_call or (self.sent == 0 and self.text.lstrip()[:1] in ("{", "[")):
            content, calls = parse_reply(self.text[self.sent :], self.functions)
            if calls:
                return content or "", calls
        return self._send_to(len(self.text)), []

    def _send_to(self, end: int) -> str:
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out


def _held_prefix(text: str) -> int:
    """Length of the longest end of `text` that begins `<tool_call>` (to hold back until known)."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0
