"""Structured outputs: OpenAI's `response_format` and vLLM's `structured_outputs` turned into one grammar
for the engine, compiled off the event loop (cached by the compiler; a bad or unsupported schema, or one
too slow to compile, is a 400 naming the field)."""

from __future__ import annotations

import asyncio

from model_core.grammar import CompiledGrammar, GrammarError, GrammarSpec
from service.api.errors import APIError
from service.api.schemas import ResponseFormat, StructuredOutputs
from service.api.text_model import TextModel


def output_constraint(
    response_format: ResponseFormat | None,
    structured: StructuredOutputs | None,
) -> tuple[GrammarSpec, str] | None:
    """The grammar a request's output must match and the field that asked for it, or None."""
    found: list[tuple[GrammarSpec, str]] = []
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            found.append((GrammarSpec.json_object(), "response_format"))
        else:
            js, param = response_format.json_schema, "response_format.json_schema.schema"
            if js is None or js.schema_ is None:
                raise APIError("response_format of type json_schema needs json_schema.schema", param=param)
            found.append((_schema(js.schema_, param), param))
    if structured is not None:
        given = [
            (name, value)
            for name, value in (
                ("json", structured.json_),
                ("regex", structured.regex),
                ("choice", structured.choice),
                ("grammar", structured.grammar),
                ("json_object", structured.json_object or None),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise APIError(
                "structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
                param="structured_outputs",
            )
        name, value = given[0]
        param = f"structured_outputs.{name}"
        if name == "json":
            found.append((_schema(value, param), param))
        elif name == "regex":
            found.append((GrammarSpec.regex(value), param))  # type: ignore[arg-type]
        elif name == "choice":
            if not value:
                raise APIError("structured_outputs.choice must not be empty", param=param)
            found.append((GrammarSpec.choice(value), param))  # type: ignore[arg-type]
        elif name == "grammar":
            found.append((GrammarSpec.grammar(value), param))  # type: ignore[arg-type]
        else:
            found.append((GrammarSpec.json_object(), param))
    if len(found) > 1:
        raise APIError("give response_format or structured_outputs, not both", param="structured_outputs")
    return found[0] if found else None


def _schema(value: object, param: str) -> GrammarSpec:
    try:
        return GrammarSpec.json_schema(value)
    except GrammarError as e:
        raise APIError(str(e), param=param, code="grammar_limit_exceeded" if e.limit else "invalid_schema") from None


async def compile_grammar(tm: TextModel, spec: GrammarSpec, param: str) -> CompiledGrammar:
    """The compiled grammar; a 400 naming `param` if it is invalid, unsupported, too slow to compile or past one of
    the grammar bounds (code `grammar_limit_exceeded`, the message naming the bound)."""
    try:
        return await asyncio.to_thread(lambda: tm.grammars.compile(spec))
    except GrammarError as e:
        code = "grammar_limit_exceeded" if e.limit else "invalid_grammar"
        raise APIError(str(e), param=param, code=code) from None
