"""Bounds on a grammar before it is compiled: llguidance compiles recursively on the calling thread's stack, so a
grammar deep enough (a `$defs` chain of 1,000 objects, a Lark grammar of 2,800 chained rules, measured on an
8 MiB stack) crashes the whole process with a segfault instead of raising. Every request's grammar is measured
here first, iteratively (no Python recursion either), and refused with a `GrammarLimitError` naming the bound.

    check_schema(schema, bounds, "json_schema")   # a parsed JSON schema
    check_lark(text, bounds, "grammar")           # Lark text (GBNF converted first), its %json schemas included
    check_text(text, bounds, "regex")             # any grammar's text: its size

The defaults sit far below the measured crash points (see README, Reliability) and far above real schemas.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GrammarBounds:
    """What one request's grammar may hold. `max_depth`: JSON nesting of a schema document (objects and arrays);
    `max_expanded_depth`: the same with every `$ref` followed (longest path, cycles cut: recursion is fine);
    `max_ref_chain`: `$ref` hops along one path; `max_nodes`: objects and arrays in a schema; `max_rules`:
    rules and terminals of a Lark grammar (GBNF after conversion); `max_bytes`: the grammar's text."""

    max_bytes: int = 256 * 1024
    max_depth: int = 100  # llguidance's JSON parser stops at about 125
    max_expanded_depth: int = 256
    max_ref_chain: int = 128
    max_nodes: int = 20_000
    max_rules: int = 1_000


DEFAULT_BOUNDS = GrammarBounds()


class GrammarLimitError(ValueError):
    """A grammar past one of the bounds; `limit` names it ("max_depth", ...)."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


def check_text(text: str, bounds: GrammarBounds, what: str) -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > bounds.max_bytes:
        raise GrammarLimitError(
            f"{what}: {size} bytes is more than this server compiles (max_bytes {bounds.max_bytes})", "max_bytes"
        )


def check_depth(value: Any, bounds: GrammarBounds, what: str) -> None:
    """Only the plain nesting depth and node count (cheap: before a schema is even serialised)."""
    _walk(value, bounds, what)


def check_schema(schema: Any, bounds: GrammarBounds, what: str) -> None:
    """All the schema bounds of a parsed JSON schema document."""
    _walk(schema, bounds, what)
    depth, hops = _expanded(schema)
    if hops > bounds.max_ref_chain:
        raise GrammarLimitError(
            f"{what}: a chain of {hops} $ref hops is longer than this server compiles "
            f"(max_ref_chain {bounds.max_ref_chain})",
            "max_ref_chain",
        )
    if depth > bounds.max_expanded_depth:
        raise GrammarLimitError(
            f"{what}: nested {depth} levels deep with its $refs followed, deeper than this server compiles "
            f"(max_expanded_depth {bounds.max_expanded_depth})",
            "max_expanded_depth",
        )


# a Lark rule or terminal definition at the start of a line: `name:`, `?name:`, `!name:`, `name.2:`, `NAME.-1:`
_RULE = re.compile(r"^[ \t]*[?!]?[A-Za-z_][A-Za-z0-9_]*(?:\.-?\d+)?[ \t]*:(?!:)", re.MULTILINE)
_JSON_DIRECTIVE = re.compile(r"%json\s*(?=\{)")


def check_lark(text: str, bounds: GrammarBounds, what: str) -> None:
    """Size and rule count of Lark text, and the schema bounds of each `%json {...}` inside it."""
    check_text(text, bounds, what)
    rules = len(_RULE.findall(text))
    if rules > bounds.max_rules:
        raise GrammarLimitError(
            f"{what}: {rules} rules are more than this server compiles (max_rules {bounds.max_rules})", "max_rules"
        )
    decoder = json.JSONDecoder()
    for m in _JSON_DIRECTIVE.finditer(text):
        try:
            schema, _ = decoder.raw_decode(text, m.end())
        except RecursionError:
            raise GrammarLimitError(
                f"{what}: a %json schema is nested deeper than this server compiles (max_depth {bounds.max_depth})",
                "max_depth",
            ) from None
        except ValueError:
            continue  # not JSON: the grammar compiler says what is wrong
        check_schema(schema, bounds, f"{what} (%json)")


def _walk(root: Any, bounds: GrammarBounds, what: str) -> None:
    nodes = 0
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        nodes += 1
        if depth > bounds.max_depth:
            raise GrammarLimitError(
                f"{what}: nested more than {bounds.max_depth} levels deep (max_depth {bounds.max_depth})", "max_depth"
            )
        if nodes > bounds.max_nodes:
            raise GrammarLimitError(
                f"{what}: more than {bounds.max_nodes} objects and arrays (max_nodes {bounds.max_nodes})", "max_nodes"
            )
        stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))


def _resolve(root: Any, ref: str) -> Any:
    """The node a document-local `$ref` (`#`, `#/a/b`) points at, or None."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None  # an anchor or another document: not followed
    node = root
    for raw in ref[2:].split("/"):
        part = urllib.parse.unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _expanded(root: Any) -> tuple[int, int]:
    """(longest nesting with $refs followed, most $ref hops on one path), cycles cut where they close: an
    iterative depth-first search over objects/arrays (child edges) and $refs (ref edges), each node once."""
    done: dict[int, tuple[int, int]] = {}
    on_path: set[int] = set()
    # frame: [node, successors [(node, is_ref)], next index, best depth below, best hops below]
    stack: list[list[Any]] = []

    def push(node: Any) -> None:
        succ: list[tuple[Any, bool]] = []
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                target = _resolve(root, ref)
                if isinstance(target, (dict, list)):
                    succ.append((target, True))
            succ += [(v, False) for v in node.values() if isinstance(v, (dict, list))]
        else:
            succ += [(v, False) for v in node if isinstance(v, (dict, list))]
        on_path.add(id(node))
        stack.append([node, succ, 0, 0, 0])

    if not isinstance(root, (dict, list)):
        return 0, 0
    push(root)
    result = (0, 0)
    while stack:
        frame = stack[-1]
        node, succ, i = frame[0], frame[1], frame[2]
        if i < len(succ):
            frame[2] = i + 1
            child, is_ref = succ[i]
            if id(child) in done:
                d, h = done[id(child)]
            elif id(child) in on_path:
                continue  # a cycle closes here (recursion): no deeper than what is already on the path
            else:
                push(child)
                frame.append(is_ref)  # remembered for when the child's frame ends
                continue
            frame[3] = max(frame[3], d)
            frame[4] = max(frame[4], h + 1 if is_ref else h)
            continue
        stack.pop()
        on_path.discard(id(node))
        value = (frame[3] + 1, frame[4])
        done[id(node)] = value
        if not stack:
            result = value
            break
        parent = stack[-1]
        is_ref = parent.pop()  # pushed when this child's frame started
        parent[3] = max(parent[3], value[0])
        parent[4] = max(parent[4], value[1] + 1 if is_ref else value[1])
    return result
