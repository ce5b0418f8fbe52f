"""Chat templates: Hugging Face-style jinja2 templates rendered in a sandbox.

The environment matches what transformers gives templates (trim_blocks, lstrip_blocks, loop controls,
`{% generation %}`, `tojson`, `raise_exception`, `strftime_now`), in jinja2's immutable sandbox; any
error, unsafe access included, becomes a `ChatTemplateError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The chat template is missing, invalid, unsafe or rejected the messages."""


def render_chat_template(source: str, variables: Mapping[str, Any]) -> str:
    """Render the template `source` with `variables` (messages, add_generation_prompt, special tokens, ...)."""
    try:
        return _compile_template(source).render(**variables)
    except SecurityError as e:
        raise ChatTemplateError(f"chat template attempted an unsafe operation: {e}") from e
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e}") from e


class _GenerationTag(Extension):
    """Accept `{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) and render its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, but touching an unsafe attribute fails at once (not only when used)."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env.from_string(source)
