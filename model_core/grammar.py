"""Grammars for constrained decoding: JSON schema, any JSON object, regex, choice, Lark/GBNF grammars.

The grammar engine is llguidance (the engine behind vLLM's "guidance" backend): a Rust library with no
Python dependencies that compiles a grammar lazily against the tokenizer's token trie, so compiling a
tool schema takes about a millisecond and computing one token mask a few microseconds on a CPU.

    compiler = GrammarCompiler(tokenizer, vocab_size)         # once per model (~0.25 s)
    compiled = compiler.compile(GrammarSpec.json_schema(s))   # per request, LRU-cached, thread-safe
    matcher = compiled.matcher()                              # per request: the parser state
    apply_token_masks(logits, [matcher, None, ...])           # per step: disallowed logits -> -inf
    matcher.accept(token_id)                                  # per step: advance with the sampled token

The tokenizer's EOS ids are allowed exactly when the grammar accepts the text so far; once nothing but
EOS can follow, `is_terminated` is true and the caller may end the request without sampling EOS.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

import llguidance
import numpy as np
import torch
from llguidance.gbnf_to_lark import any_to_lark

from model_core.grammar_bounds import (
    DEFAULT_BOUNDS,
    GrammarBounds,
    GrammarLimitError,
    check_depth,
    check_lark,
    check_schema,
    check_text,
)
from model_core.grammar_probe import (
    WORKER_STACK_BYTES,
    CompilerCrash,
    CompileTimeout,
    GrammarProbe,
    ProbeUnavailable,
    limits_dict,
    shared_probe,
)
from model_core.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

log = logging.getLogger(__name__)
T = TypeVar("T")
GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
_KINDS: tuple[str, ...] = get_args(GrammarKind)

# JSON whitespace between tokens: flexible (models write `{"a": 1}` and pretty-print) but bounded, so a
# small model cannot loop on whitespace forever (xgrammar's max_whitespace_cnt plays the same role).
MAX_JSON_WHITESPACE = 20


class GrammarError(ValueError):
    """An invalid or unsupported grammar. `param` names what was wrong ("json_schema", "regex", ...); `limit` the
    bound (`GrammarBounds` field) it is past, if that is why."""

    def __init__(self, message: str, param: str | None = None, limit: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.limit = limit


def _limit_error(e: GrammarLimitError, kind: str) -> GrammarError:
    return GrammarError(str(e), kind, e.limit)


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match; hashable, so it keys the compile cache.

    kind: "json_schema" (value: the schema as JSON text), "json_object" (any JSON object; value ""),
    "regex" (the whole output matches; Rust regex syntax, no look-around), "choice" (value: a JSON list
    of strings, the output is one of them), "grammar" (Lark, or GBNF/EBNF as llama.cpp writes it,
    `root ::= ...`, converted to Lark).
    """

    kind: GrammarKind
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}; expected one of {', '.join(_KINDS)}", "kind")
        if not isinstance(self.value, str):
            raise GrammarError(f"{self.kind}: the value must be a string", self.kind)

    @classmethod
    def json_schema(cls, schema: Any, bounds: GrammarBounds = DEFAULT_BOUNDS) -> GrammarSpec:
        """From a schema (a dict, bool or JSON text). Key order is kept: it is the order of the output's
        properties, so schemas that differ only in key order are different grammars. A schema nested deeper
        than `bounds.max_depth` is refused here, before it is serialised (recursively)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise GrammarError(f"json_schema: not valid JSON: {e}", "json_schema") from None
            except RecursionError:
                raise GrammarError("json_schema: nested too deeply", "json_schema", "max_depth") from None
        try:
            check_depth(schema, bounds, "json_schema")
        except GrammarLimitError as e:
            raise _limit_error(e, "json_schema") from None
        try:
            text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise GrammarError(f"json_schema: not JSON-serialisable: {e}", "json_schema") from None
        return cls("json_schema", text)

    @classmethod
    def json_object(cls) -> GrammarSpec:
        return cls("json_object", "")

    @classmethod
    def regex(cls, pattern: str) -> GrammarSpec:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> GrammarSpec:
        return cls("choice", json.dumps(list(options), ensure_ascii=False))

    @classmethod
    def grammar(cls, text: str) -> GrammarSpec:
        return cls("grammar", text)


class GrammarMatcher:
    """One request's parser state. Not thread-safe: one request, one thread at a time."""

    __slots__ = ("_m", "vocab_size")

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._m = matcher
        self.vocab_size = vocab_size  # the logits width the masks cover

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32 CPU, (N, ceil(V/32)), bit t%32 of word
        t//32 set = token t allowed). An errored matcher allows only EOS."""
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or bitmask.dim() != 2:
            raise ValueError("bitmask must be a 2-D int32 CPU tensor")
        if bitmask.shape[1] != bitmask_width(self.vocab_size):
            raise ValueError(f"bitmask has {bitmask.shape[1]} words per row, need {bitmask_width(self.vocab_size)}")
        v = bitmask[row]  # (W,)
        if not v.is_contiguous():
            raise ValueError("bitmask rows must be contiguous")
        self._m.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())

    def accept(self, token_id: int) -> bool:
        """Advance by one token; False (and the matcher in an error state) if the grammar forbids it."""
        return bool(self._m.consume_token(int(token_id)))

    def validate(self, token_id: int) -> bool:
        """Whether `accept(token_id)` would succeed, without changing the state. llguidance's masks can allow
        a token its parser then refuses (seen with forced bytes inside multi-byte UTF-8 characters), so a
        sampled token is checked before it is kept."""
        return self._m.validate_tokens([int(token_id)]) == 1

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next, whatever the model says (possibly none)."""
        return [int(t) for t in self._m.compute_ff_tokens()]

    def rollback(self, num_tokens: int) -> bool:
        return bool(self._m.rollback(num_tokens))

    @property
    def is_terminated(self) -> bool:
        """Nothing but EOS can follow (the output is complete), or the matcher is in an error state."""
        return bool(self._m.is_stopped())

    @property
    def is_accepting(self) -> bool:
        """The output so far is a complete match (EOS is allowed now)."""
        return bool(self._m.is_accepting())

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a rejected token, a resource limit), or None."""
        return _first_line(self._m.get_error()) if self._m.is_error() else None


COMPILE_STACK_BYTES = WORKER_STACK_BYTES  # 64 MiB, virtual: pages are touched only as deep as a compile goes


def default_limits() -> llguidance.LLParserLimits:
    """llguidance's work limits as this server sets them: its defaults made explicit, with the lexer's states and
    the grammar's size lowered (each lexer state holds 1-2 KB: 100,000 of them bound one grammar near 200 MB),
    and no grammar text in error messages."""
    return llguidance.LLParserLimits(
        max_items_in_row=2_000,
        initial_lexer_fuel=1_000_000,  # ~20 ms of regex analysis at compile time
        step_lexer_fuel=200_000,  # ~15 ms per token mask
        step_max_items=50_000,  # Earley items per token mask
        max_lexer_states=100_000,
        max_grammar_size=200_000,  # symbols in the grammar's productions
        verbose_errors=False,
    )


class _BigStackPool:
    """A fixed pool of daemon threads with `stack_bytes` stacks (ThreadPoolExecutor's threads get the
    process default, 8 MiB here, and start lazily, after any stack size set for them is restored)."""

    def __init__(self, workers: int, stack_bytes: int, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        previous = threading.stack_size(stack_bytes)
        try:
            self._threads = [
                threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(workers)
            ]
            for t in self._threads:
                t.start()
        finally:
            threading.stack_size(previous)

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((future, lambda: fn(*args)))
        return future

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, call = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as e:  # handed to the caller, as ThreadPoolExecutor does
                future.set_exception(e)


class CompiledGrammar:
    """A grammar compiled for one tokenizer; `matcher()` makes a fresh per-request state (~20 us)."""

    def __init__(self, spec: GrammarSpec, template: llguidance.LLMatcher, vocab_size: int, compile_s: float) -> None:
        self.spec = spec
        self.vocab_size = vocab_size
        self.compile_s = compile_s
        self._template = template
        self._lock = threading.Lock()  # matchers are made on the event loop and in worker threads

    def matcher(self) -> GrammarMatcher:
        with self._lock:
            return GrammarMatcher(self._template.deep_copy(), self.vocab_size)


class GrammarCompiler:
    """Compiles GrammarSpecs for one tokenizer and model; an LRU cache of `cache_size` grammars.

    vocab_size is the model's logits width (it may exceed the tokenizer's token count: the extra ids
    are never allowed). Compiling is bounded three times: by `bounds` (`GrammarBounds`: depth, `$ref` chain,
    rules, bytes), checked before llguidance sees the grammar, since its compiler recurses on the thread's
    stack and a deep enough grammar crashes the process; by llguidance's own work limits (lexer fuel, grammar
    size, lexer states; `limits`); and by `max_compile_s` of wall-clock time (waiting for one of the 2 compile
    threads included), past which `compile` raises GrammarError (the native compile cannot be interrupted: it
    finishes in the background, within its work limits, and is not cached). The compile threads run on
    `COMPILE_STACK_BYTES` stacks, about 8x the measured need of the largest grammar the bounds admit.

    And a crash the bounds do not foresee costs one request, not the process: each grammar not compiled before
    is first compiled in a worker process of `probe` (`grammar_probe.GrammarProbe`; "shared": the process's,
    `grammar_probe.shared_probe()`; None: none), with the same limits and stack; one that kills the worker is a
    GrammarError with limit "compiler_crash", and is never compiled here. Thread-safe.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        cache_size: int = 128,
        max_compile_s: float = 5.0,
        limits: llguidance.LLParserLimits | None = None,
        bounds: GrammarBounds = DEFAULT_BOUNDS,
        probe: GrammarProbe | Literal["shared"] | None = "shared",
    ) -> None:
        if not tokenizer.eos_token_ids:
            raise ValueError("constrained decoding needs a tokenizer with an EOS token")
        if vocab_size < tokenizer.vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {tokenizer.vocab_size} tokens")
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.max_compile_s = max_compile_s
        self.eos_token_ids = tuple(tokenizer.eos_token_ids)
        self.bounds = bounds
        self._limits = limits if limits is not None else default_limits()
        self._lltok = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_TokenizerView(tokenizer, vocab_size)), eos_token=list(self.eos_token_ids)
        )
        self._cache: collections.OrderedDict[GrammarSpec, CompiledGrammar] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pool = _BigStackPool(2, COMPILE_STACK_BYTES, "grammar-compile")
        self._probe = shared_probe() if probe == "shared" else probe
        self._probe_limits = limits_dict(self._limits)
        if self._probe is not None:
            try:
                self._probe.warm()  # its first worker starts while the model serves
            except ProbeUnavailable as e:
                log.error("%s; grammars are compiled without a probe", e)

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar of spec (cached); GrammarError if it is invalid, unsupported or too slow."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        future = self._pool.submit(self._compile, spec)
        try:
            compiled = future.result(timeout=self.max_compile_s)
        except concurrent.futures.TimeoutError:
            raise GrammarError(f"{spec.kind}: compiling took longer than {self.max_compile_s:g}s", spec.kind) from None
        with self._lock:
            compiled = self._cache.setdefault(spec, compiled)  # a concurrent compile of spec may have won
            self._cache.move_to_end(spec)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def cached(self) -> int:
        with self._lock:
            return len(self._cache)

    def close(self) -> None:
        self._pool.shutdown()

    def _compile(self, spec: GrammarSpec) -> CompiledGrammar:
        t0 = time.perf_counter()
        grammar = _to_llguidance(spec, self.bounds)
        self._probe_first(spec, grammar)
        template = llguidance.LLMatcher(self._lltok, grammar, log_level=0, limits=self._limits)
        if template.is_error():
            raise GrammarError(_explain(spec.kind, template.get_error()), spec.kind)
        return CompiledGrammar(spec, template, self.vocab_size, time.perf_counter() - t0)

    def _probe_first(self, spec: GrammarSpec, grammar: str) -> None:
        """Compile `grammar` in a probe worker first: a GrammarError if it crashed there or took too long."""
        if self._probe is None:
            return
        try:
            self._probe.check(grammar, self._probe_limits, self.max_compile_s)
        except CompilerCrash as e:
            raise GrammarError(
                f"{spec.kind}: {e}: this server does not compile it (make it smaller or shallower)",
                spec.kind,
                "compiler_crash",
            ) from None
        except CompileTimeout:
            raise GrammarError(f"{spec.kind}: compiling took longer than {self.max_compile_s:g}s", spec.kind) from None
        except ProbeUnavailable as e:  # compiling unprobed beats refusing every grammar
            log.error("%s; compiling without a probe", e)


class _TokenizerView:
    """What llguidance reads from a tokenizer: each token's bytes (special tokens marked with a 0xFF
    prefix, so that no text ever matches them; one entry per logit), EOS/BOS ids, and an encoder."""

    def __init__(self, tok: Tokenizer, vocab_size: int) -> None:
        special = tok.special_token_ids
        self.eos_token_id = tok.eos_token_ids[0]
        self.bos_token_id = tok.bos_token_id
        self.special_token_ids = sorted(special)
        self.tokens = [
            b"\xff" + tok.token_bytes(i) if i in special else tok.token_bytes(i) for i in range(tok.vocab_size)
        ]
        self.tokens += [b""] * (vocab_size - tok.vocab_size)  # ids past the tokenizer's: no bytes, never allowed
        self._tok = tok

    def __call__(self, text: bytes | str) -> list[int]:
        s = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        return self._tok.encode(s, add_special_tokens=False)


def _to_llguidance(spec: GrammarSpec, bounds: GrammarBounds = DEFAULT_BOUNDS) -> str:
    """The llguidance grammar (JSON text) of spec; GrammarError for what cannot even be translated, or is past
    `bounds` (checked before any llguidance call: its translators recurse too)."""
    try:
        return _translate(spec, bounds)
    except GrammarLimitError as e:
        raise _limit_error(e, spec.kind) from None


def _translate(spec: GrammarSpec, bounds: GrammarBounds) -> str:
    kind, value = spec.kind, spec.value
    check_text(value, bounds, kind)
    # overrides, not defaults: a schema's own "x-guidance" options cannot turn on leniency
    opts: JsonCompileOptions = {
        "whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{0,{MAX_JSON_WHITESPACE}}}",
        "lenient": False,
    }
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema('{"type":"object"}', overrides=opts)
    if kind == "json_schema":
        try:
            schema = json.loads(value)
        except ValueError as e:
            raise GrammarError(f"json_schema: not valid JSON: {e}", kind) from None
        except RecursionError:
            raise GrammarLimitError(
                f"json_schema: nested deeper than max_depth {bounds.max_depth}", "max_depth"
            ) from None
        if schema is False:
            raise GrammarError("json_schema: the schema `false` accepts nothing", kind)
        if not isinstance(schema, (dict, bool)):
            raise GrammarError("json_schema: a schema must be a JSON object or a boolean", kind)
        check_schema(schema, bounds, kind)
        try:  # `true` accepts any JSON value, as does {}
            return llguidance.LLMatcher.grammar_from_json_schema(value if schema is not True else "{}", overrides=opts)
        except ValueError as e:
            raise GrammarError(f"json_schema: {_first_line(str(e))}", kind) from None
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        try:
            options = json.loads(value)
        except ValueError as e:
            raise GrammarError(f"choice: not valid JSON: {e}", kind) from None
        if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
            raise GrammarError("choice: must be a non-empty list of strings", kind)
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options))
    if not value.strip():
        raise GrammarError("grammar: the grammar is empty", kind)
    try:
        lark = any_to_lark(value)  # Lark as is; GBNF/EBNF converted to Lark
    except RecursionError:
        raise GrammarLimitError("grammar: nested deeper than this server compiles", "max_depth") from None
    except Exception as e:  # the converter raises what its parser raises
        raise GrammarError(
            f"grammar: Failed to convert the grammar from GBNF to Lark: {_first_line(str(e))}", kind
        ) from None
    check_lark(lark, bounds, kind)
    try:
        return llguidance.LLMatcher.grammar_from_lark(lark)
    except ValueError as e:
        raise GrammarError(f"grammar: {_first_line(str(e))}", kind) from None


_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[(.*?)\]")
_UNKNOWN_FORMAT = re.compile(r"Unknown format: (\S+)")


def _explain(kind: str, error: str) -> str:
    """A user-facing message from llguidance's error, naming unsupported JSON-schema keywords (also those of
    a `%json` schema inside a grammar)."""
    what = "keyword" if kind == "json_schema" else "JSON-schema keyword"
    if m := _UNIMPLEMENTED.search(error):
        keys = [k.strip().strip('"') for k in m.group(1).split(",") if k.strip()]
        names = ", ".join(f"'{k}'" for k in keys)
        return f"{kind}: {what}{'s' if len(keys) > 1 else ''} {names} {'are' if len(keys) > 1 else 'is'} not supported"
    if "oneOf constraints are not supported" in error:
        return f"{kind}: {what} 'oneOf' is not supported when its alternatives may overlap (use 'anyOf')"
    if m := _UNKNOWN_FORMAT.search(error):
        return f"{kind}: {what} 'format' value {m.group(1)!r} is not supported"
    if "regex parse error" in error:  # the line starting "error:" says what is wrong; the rest draws a caret
        reason = [line.strip() for line in error.splitlines() if line.strip().startswith("error:")]
        return f"{kind}: invalid regex: {reason[0][6:].strip() if reason else _first_line(error)}"
    return f"{kind}: {_first_line(error)}"


_WORK_LIMIT = re.compile(r"max is \d+|fuel|too many|limit", re.IGNORECASE)


def is_work_limit(error: str | None) -> bool:
    """Whether a matcher's error is one of llguidance's work limits (Earley items in a row or a step, lexer fuel,
    lexer states) rather than a refused token: the grammar is too costly to follow, not the caller's bug."""
    return bool(error) and _WORK_LIMIT.search(error or "") is not None


def _first_line(s: str) -> str:
    return s.strip().split("\n", 1)[0]


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row of a token bitmask."""
    return (vocab_size + 31) // 32


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return torch.empty((rows, bitmask_width(vocab_size)), dtype=torch.int32)  # (N, W), filled by fill_bitmask


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(N, W) int32 bitmask -> (N, vocab_size) bool, True = allowed; on bitmask's device."""
    if bitmask.device.type == "cpu" and sys.byteorder == "little":  # numpy's unpackbits: ~6x faster on a CPU
        raw = bitmask.contiguous().numpy().view(np.uint8)  # (N, 4W): word w's bit b is byte 4w + b//8, bit b%8
        flags = np.unpackbits(raw, axis=1, count=vocab_size, bitorder="little")  # (N, V) uint8 0/1
        return torch.from_numpy(flags).view(torch.bool)
    return _unpack_with_shifts(bitmask, vocab_size)


def _unpack_with_shifts(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """unpack_bitmask in torch ops, on any device (a GPU's logits: 32x fewer bytes to copy than a bool mask)."""
    shifts = _SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _SHIFTS.setdefault(bitmask.device, torch.arange(32, dtype=torch.int32, device=bitmask.device))
    n, w = bitmask.shape
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # (N, W, 32): bit b of word w is token 32w + b
    return bits.view(n, w * 32)[:, :vocab_size].bool()  # (N, V)


def apply_token_masks(logits: torch.Tensor, matchers: Sequence[GrammarMatcher | None]) -> list[int]:
    """Set the logits (N, V) of tokens each row's grammar forbids to -inf, in place; return the rows whose
    grammar allows no token at all (their logits are all -inf now).

    One bitmask is filled for the constrained rows (matcher not None) and applied to them at once;
    rows without a matcher are not touched and cost nothing.
    """
    n, V = logits.shape
    if len(matchers) != n:
        raise ValueError(f"batch mismatch: logits {n} rows, {len(matchers)} matchers")
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return []
    bitmask = allocate_bitmask(len(rows), V)  # (n_rows, W)
    for j, i in enumerate(rows):
        m = matchers[i]
        assert m is not None
        if m.vocab_size != V:
            raise ValueError(f"row {i}: grammar compiled for {m.vocab_size} logits, got {V}")
        m.fill_bitmask(bitmask, j)
    empty = (bitmask == 0).all(dim=1).tolist()  # (n_rows,): cheap on the packed words
    forbidden = unpack_bitmask(bitmask.to(logits.device), V).logical_not_()  # (n_rows, V)
    if len(rows) == n:
        logits.masked_fill_(forbidden, float("-inf"))
    else:
        idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
        logits[idx] = logits[idx].masked_fill(forbidden, float("-inf"))
    return [i for i, e in zip(rows, empty, strict=True) if e]
