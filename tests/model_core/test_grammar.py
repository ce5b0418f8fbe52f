"""Constrained decoding with the real default tokenizer: random walks through each grammar's token masks
(tokens drawn only among the allowed ones) must end in text the grammar describes; EOS is allowed exactly
when the text so far is complete; unsupported JSON-schema keywords are refused by name."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import random
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_core.grammar import (
    CompiledGrammar,
    GrammarCompiler,
    GrammarError,
    GrammarMatcher,
    GrammarSpec,
    _unpack_with_shifts,
    allocate_bitmask,
    apply_token_masks,
    unpack_bitmask,
)
from model_core.tokenizer import Tokenizer

PROPS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Walks apply thousands of one-row masks: one intra-op thread is much steadier on a shared machine
    (two threads spin against any other process: 100x slower measured under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def compiler(smol_tokenizer: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(smol_tokenizer, smol_tokenizer.vocab_size)


def allowed_tokens(m: GrammarMatcher, vocab: int) -> list[int]:
    logits = torch.zeros(1, vocab)
    apply_token_masks(logits, [m])
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


@functools.cache
def _token_table(tok: Tokenizer, vocab: int) -> tuple[list[bytes], torch.Tensor, torch.Tensor, int]:
    """Every token's bytes; which tokens start with a closing bracket; which start with a quote; the id of
    the token "x" (allowed only inside a JSON string, where a quote is what ends it)."""
    pieces = [tok.token_bytes(i) for i in range(tok.vocab_size)] + [b""] * (vocab - tok.vocab_size)
    brackets = torch.tensor([p[:1] in (b"}", b"]") for p in pieces])
    quotes = torch.tensor([p[:1] == b'"' for p in pieces])
    return pieces, brackets, quotes, pieces.index(b"x")


def walk(compiled: CompiledGrammar, tok: Tokenizer, seed: int, max_steps: int = 600, check_eos: Any = None) -> bytes:
    """Draw tokens among the allowed ones until EOS or the grammar is complete; returns the bytes.

    Half of the draws are uniform among the allowed tokens; the other half prefer what ends things (EOS;
    a quote inside a string; a closing bracket elsewhere), so that walks end. check_eos(text) -> bool, if
    given, is checked against whether EOS is allowed at every step."""
    rng = random.Random(seed)
    V = compiled.vocab_size
    pieces, brackets, quotes, x_id = _token_table(tok, V)
    eos = list(tok.eos_token_ids)
    m = compiled.matcher()
    out = b""
    logits = torch.zeros(1, V)
    for _ in range(max_steps):
        x = logits.clone()
        apply_token_masks(x, [m])
        allowed = torch.isfinite(x[0])  # (V,) bool
        ids = allowed.nonzero().flatten()
        assert ids.numel(), f"no token allowed after {out!r}"
        eos_ok = bool(allowed[eos].any())
        assert eos_ok == m.is_accepting, out
        if check_eos is not None:
            assert eos_ok == check_eos(out.decode("utf-8")), out
        if m.is_terminated:
            assert set(ids.tolist()) <= set(eos), "a complete grammar allows only EOS"
            return out
        pool = ids
        if rng.random() < 0.5:
            ending = torch.tensor([e for e in eos if allowed[e]], dtype=torch.long)
            if not ending.numel():
                ending = (allowed & (quotes if bool(allowed[x_id]) else brackets)).nonzero().flatten()
            pool = ending if ending.numel() else ids
        t = int(pool[rng.randrange(pool.numel())])
        assert m.accept(t), m.error
        if t in eos:
            assert m.is_terminated
            return out
        out += pieces[t]
    raise AssertionError(f"walk did not end in {max_steps} steps: {out[:200]!r}")


# ---- random JSON schemas ------------------------------------------------------------------------------
_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


@st.composite
def _string(draw: st.DrawFn) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "string"}
    kind = draw(st.sampled_from(["plain", "lengths", "pattern", "format"]))
    if kind == "lengths":
        lo = draw(st.integers(0, 4))
        s.update(minLength=lo, maxLength=lo + draw(st.integers(0, 8)))
    elif kind == "pattern":
        s["pattern"] = draw(st.sampled_from(["^[a-z]{2,5}$", "^[0-9]{3}-[0-9]{2}$", "^(yes|no)$"]))
    elif kind == "format":
        s["format"] = draw(st.sampled_from(["date", "uuid", "ipv4"]))
    return s


@st.composite
def _integer(draw: st.DrawFn) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "integer"}
    step = draw(st.none() | st.integers(2, 5))
    if draw(st.booleans()):
        # at least `step` consecutive integers, so that one is a multiple of step: a narrower range may hold
        # none ({"minimum": 1, "maximum": 1, "multipleOf": 2}), an unsatisfiable schema, which llguidance
        # rightly refuses (test_invalid_grammars_raise)
        lo = draw(st.integers(-1000, 1000))
        s.update(minimum=lo, maximum=lo + draw(st.integers((step or 1) - 1, 500)))
    elif draw(st.booleans()):
        s["exclusiveMinimum"] = draw(st.integers(-5, 5))
    if step is not None:
        s["multipleOf"] = step
    return s


@st.composite
def _number(draw: st.DrawFn) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "number"}
    if draw(st.booleans()):
        lo = draw(st.floats(-100, 100, allow_nan=False).map(lambda x: round(x, 2)))
        s.update(minimum=lo, maximum=lo + draw(st.integers(1, 50)))
    return s


# SmolLM2's vocabulary cannot spell U+40000..U+BFFFF (no token holds the lead bytes F1/F2): keep below them.
# No lone surrogates (category Cs, which st.characters includes): they are no Unicode text, no UTF-8 output
# can match them, and llguidance refuses such a schema ("Value is not JSON serializable", a GrammarError)
_enum_value = st.one_of(
    st.text(st.characters(max_codepoint=0x3FFFF, exclude_categories=["Cs"]), max_size=6),
    st.integers(-9, 99),
    st.booleans(),
    st.none(),
)
_enum = st.lists(_enum_value, min_size=1, max_size=4, unique_by=lambda v: json.dumps(v)).map(lambda xs: {"enum": xs})
_scalar = st.one_of(
    _string(),
    _integer(),
    _number(),
    st.just({"type": "boolean"}),
    _enum,
    st.just({"type": ["string", "null"], "maxLength": 5}),
)


def _object(values: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        names = draw(st.lists(_names, min_size=1, max_size=4, unique=True))
        props = {n: draw(values) for n in names}
        required = [n for n in names if draw(st.booleans())] or names[:1]
        s: dict[str, Any] = {"type": "object", "properties": props, "required": required}
        if draw(st.booleans()):
            s["additionalProperties"] = False
        return s

    return build()


def _array(values: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        lo = draw(st.integers(0, 2))
        return {"type": "array", "items": draw(values), "minItems": lo, "maxItems": lo + draw(st.integers(0, 2))}

    return build()


_value = st.recursive(_scalar, lambda inner: st.one_of(_object(inner), _array(inner)), max_leaves=6)
json_schemas = _object(_value)


@PROPS
@given(schema=json_schemas, seed=st.integers(0, 2**32 - 1))
def test_random_walks_through_a_json_schema_give_valid_documents(compiler, smol_tokenizer, schema, seed):
    compiled = compiler.compile(GrammarSpec.json_schema(schema))
    text = walk(compiled, smol_tokenizer, seed, max_steps=1500).decode("utf-8")
    doc = json.loads(text)
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(doc)


@pytest.mark.parametrize("seed", range(3))
def test_json_object_walk_gives_an_object(compiler, smol_tokenizer, seed):
    compiled = compiler.compile(GrammarSpec.json_object())
    m = compiled.matcher()
    assert not set(smol_tokenizer.eos_token_ids) & set(allowed_tokens(m, compiled.vocab_size))  # "" is no object
    assert isinstance(json.loads(walk(compiled, smol_tokenizer, seed, max_steps=3000)), dict)


def test_property_order_follows_the_schema(compiler, smol_tokenizer):
    schema = {"type": "object", "properties": {"z": {"const": 1}, "a": {"const": 2}}, "required": ["z", "a"]}
    text = walk(compiler.compile(GrammarSpec.json_schema(schema)), smol_tokenizer, 0).decode()
    assert list(json.loads(text)) == ["z", "a"]


# ---- regex, choice, grammars: EOS allowed exactly when the text matches ------------------------------
@pytest.mark.parametrize("pattern", [r"[0-9]{3}-[a-z]{2,4}", r"(ab|cd)+x?", r"-?(0|[1-9][0-9]{0,3})(\.[0-9]{1,2})?"])
@pytest.mark.parametrize("seed", range(3))
def test_regex_walk_matches_and_eos_iff_full_match(compiler, smol_tokenizer, pattern, seed):
    compiled = compiler.compile(GrammarSpec.regex(pattern))
    text = walk(compiled, smol_tokenizer, seed, check_eos=lambda s: re.fullmatch(pattern, s) is not None)
    assert re.fullmatch(pattern, text.decode())


@pytest.mark.parametrize("seed", range(4))
def test_choice_walk_gives_one_of_the_options(compiler, smol_tokenizer, seed):
    options = ["yes", "yesterday", "no", "peut-être", 'say "hi"\n']
    compiled = compiler.compile(GrammarSpec.choice(options))
    assert walk(compiled, smol_tokenizer, seed, check_eos=lambda s: s in options).decode() in options


@pytest.mark.parametrize(
    "text",
    [
        'root ::= "(" digits ("," digits)* ")"\ndigits ::= [0-9]+',  # GBNF, as llama.cpp writes it
        'start: "(" DIGITS ("," DIGITS)* ")"\nDIGITS: /[0-9]+/',  # Lark
    ],
)
@pytest.mark.parametrize("seed", range(3))
def test_gbnf_and_lark_grammars(compiler, smol_tokenizer, text, seed):
    pattern = r"\([0-9]+(,[0-9]+)*\)"
    compiled = compiler.compile(GrammarSpec.grammar(text))
    out = walk(compiled, smol_tokenizer, seed, check_eos=lambda s: re.fullmatch(pattern, s) is not None)
    assert re.fullmatch(pattern, out.decode())


# ---- refusals ----------------------------------------------------------------------------------------
S = {"type": "string"}


@pytest.mark.parametrize(
    "keyword, schema",
    [
        ("propertyNames", {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}}),
        ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}),
        ("dependentSchemas", {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}),
        ("dependencies", {"type": "object", "dependencies": {"a": ["b"]}}),
        ("if", {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}),
        ("not", {"not": S}),
        ("uniqueItems", {"type": "array", "items": S, "uniqueItems": True}),
        ("contains", {"type": "array", "contains": {"type": "integer"}}),
        ("unevaluatedProperties", {"type": "object", "properties": {"a": S}, "unevaluatedProperties": False}),
        ("unevaluatedItems", {"type": "array", "prefixItems": [S], "unevaluatedItems": False}),
        ("oneOf", {"oneOf": [{"type": "number"}, {"type": "integer"}]}),
        ("format", {"type": "string", "format": "no-such-format"}),
        ("propertyNames", {"type": "object", "x-guidance": {"lenient": True}, "propertyNames": S}),  # no way around
        ("uniqueItems", {"type": "object", "properties": {"deep": {"type": "array", "uniqueItems": True}}}),
    ],
)
def test_unsupported_keywords_are_refused_by_name(compiler, keyword, schema):
    with pytest.raises(GrammarError, match=f"'{keyword}'") as e:
        compiler.compile(GrammarSpec.json_schema(schema))
    assert e.value.param == "json_schema"
    assert "not supported" in str(e.value)


@pytest.mark.parametrize(
    "spec, param",
    [
        (GrammarSpec("json_schema", "{not json"), "json_schema"),
        (GrammarSpec.json_schema({"type": "strin"}), "json_schema"),
        (GrammarSpec.json_schema([1, 2]), "json_schema"),
        (GrammarSpec.json_schema({"type": "array", "minItems": 3, "maxItems": 1}), "json_schema"),
        (GrammarSpec.json_schema({"type": "integer", "minimum": 1, "maximum": 1, "multipleOf": 2}), "json_schema"),
        (GrammarSpec.json_schema({"type": "string", "pattern": "(["}), "json_schema"),
        (GrammarSpec.json_schema({"$ref": "#/$defs/missing"}), "json_schema"),
        (GrammarSpec.json_schema(False), "json_schema"),
        (GrammarSpec.regex("(a"), "regex"),
        (GrammarSpec.regex("(?=a)a"), "regex"),
        (GrammarSpec.choice([]), "choice"),
        (GrammarSpec("choice", '["a", 1]'), "choice"),
        (GrammarSpec.grammar("start: undefined_rule"), "grammar"),
        (GrammarSpec.grammar("root ::= [a-"), "grammar"),
        (GrammarSpec.grammar("  "), "grammar"),
    ],
)
def test_invalid_grammars_raise(compiler, spec, param):
    with pytest.raises(GrammarError) as e:
        compiler.compile(spec)
    assert e.value.param == param
    assert str(e.value).startswith(param + ":")


def test_spec_validation():
    with pytest.raises(GrammarError):
        GrammarSpec("xml", "<a/>")  # type: ignore[arg-type]
    with pytest.raises(GrammarError):
        GrammarSpec.json_schema({"x": float("nan")})
    assert GrammarSpec.json_schema('{"b": 1, "a": 2}') == GrammarSpec.json_schema({"b": 1, "a": 2})


# ---- the compiler: cache, threads, time limit, vocab -------------------------------------------------
def test_cache_returns_the_same_object_and_evicts_lru(smol_tokenizer):
    c = GrammarCompiler(smol_tokenizer, smol_tokenizer.vocab_size, cache_size=2)
    a, b, d = (GrammarSpec.regex(p) for p in ("a+", "b+", "d+"))
    ca = c.compile(a)
    assert c.compile(GrammarSpec.regex("a+")) is ca
    cb = c.compile(b)
    assert c.compile(a) is ca  # a is now the most recent
    c.compile(d)  # evicts b
    assert c.cached() == 2
    assert c.compile(a) is ca and c.compile(b) is not cb
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(c.compile, [GrammarSpec.json_schema({"type": "object", "properties": {"k": S}})] * 16))
    assert all(g is got[0] for g in got)
    c.close()


def test_compile_time_limit(smol_tokenizer):
    c = GrammarCompiler(smol_tokenizer, smol_tokenizer.vocab_size, max_compile_s=1e-6)
    with pytest.raises(GrammarError, match="longer than") as e:
        c.compile(GrammarSpec.json_schema({"enum": [f"value-{i}" for i in range(3000)]}))
    assert e.value.param == "json_schema"
    assert c.cached() == 0
    c.close()


def test_model_vocab_wider_than_the_tokenizer_never_allows_extra_ids(smol_tokenizer):
    n_tok, V = smol_tokenizer.vocab_size, smol_tokenizer.vocab_size + 77
    compiled = GrammarCompiler(smol_tokenizer, V).compile(GrammarSpec.regex(r"(.|\s){0,40}"))  # most tokens
    m = compiled.matcher()
    allowed = allowed_tokens(m, V)
    assert len(allowed) > 40000 and max(allowed) < n_tok
    with pytest.raises(ValueError, match="logits"):
        apply_token_masks(torch.zeros(1, n_tok), [m])


def test_masks_touch_only_constrained_rows_and_accept_checks_tokens(compiler, smol_tokenizer):
    compiled = compiler.compile(GrammarSpec.choice(["yes", "no"]))
    V = compiled.vocab_size
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    m = compiled.matcher()
    apply_token_masks(logits, [None, m, None])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert torch.equal(logits[1, allowed], before[1, allowed])
    assert all(
        b"yes".startswith(smol_tokenizer.token_bytes(t)) or b"no".startswith(smol_tokenizer.token_bytes(t))
        for t in allowed
    )
    apply_token_masks(logits, [None, None, None])  # nothing constrained: a no-op
    with pytest.raises(ValueError, match="batch mismatch"):
        apply_token_masks(logits, [m])
    # the mask is a pure query: filling it twice gives the same bits
    bm = allocate_bitmask(2, V)
    m.fill_bitmask(bm, 0)
    m.fill_bitmask(bm, 1)
    assert torch.equal(bm[0], bm[1])
    assert torch.equal(unpack_bitmask(bm, V)[0], torch.isfinite(logits[1]))
    bad = smol_tokenizer.encode("maybe", add_special_tokens=False)[0]
    assert not m.accept(bad) and m.error


def test_complete_grammar_allows_both_eos_ids_only(compiler, smol_tokenizer):
    eos = set(smol_tokenizer.eos_token_ids)
    assert len(eos) == 2  # <|im_end|> and <|endoftext|>
    compiled = compiler.compile(
        GrammarSpec.json_schema(
            {"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"], "additionalProperties": False}
        )
    )
    m = compiled.matcher()
    for t in smol_tokenizer.encode('{"a":1}', add_special_tokens=False):
        assert not m.is_terminated
        assert m.accept(t), m.error
    assert m.is_terminated and m.is_accepting
    assert set(allowed_tokens(m, compiled.vocab_size)) == eos


def test_unsupported_keywords_in_a_grammars_json_are_refused_by_name(compiler):
    lark = 'start: "<call>" args "</call>"\nargs: %json {"type": "object", "propertyNames": {"maxLength": 3}}'
    with pytest.raises(GrammarError, match="JSON-schema keyword 'propertyNames' is not supported") as e:
        compiler.compile(GrammarSpec.grammar(lark))
    assert e.value.param == "grammar"


def test_bitmask_unpacking_paths_agree():
    """Bit b of word w is token 32w + b, in numpy's unpacking (CPU) and in the torch one (GPUs)."""
    g = torch.Generator().manual_seed(0)
    bm = torch.randint(-(2**31), 2**31 - 1, (3, 7), dtype=torch.int32, generator=g)
    want = torch.tensor([[(int(bm[r, t // 32]) >> (t % 32)) & 1 for t in range(200)] for r in range(3)]).bool()
    assert torch.equal(unpack_bitmask(bm, 200), want)
    assert torch.equal(_unpack_with_shifts(bm, 200), want)


# ---- bounds before compiling (issue #31: deep grammars crashed the process inside llguidance) ----------------
def defs_chain(n: int, kind: str = "object") -> dict[str, Any]:
    """A0 -> $ref A1 -> ... -> An: each link an object property, an array's items, or a bare $ref."""

    def link(i: int) -> dict[str, Any]:
        ref = {"$ref": f"#/$defs/A{i + 1}"}
        if kind == "object":
            return {"type": "object", "properties": {"next": ref}, "required": ["next"], "additionalProperties": False}
        return {"type": "array", "items": ref, "minItems": 1} if kind == "array" else ref

    defs = {f"A{i}": link(i) for i in range(n)}
    defs[f"A{n}"] = {"type": "string", "maxLength": 3}
    return {"$ref": "#/$defs/A0", "$defs": defs}


def lark_chain(n: int) -> str:
    return "start: r0\n" + "\n".join([f"r{i}: r{i + 1}" for i in range(n)] + [f'r{n}: "a"'])


def gbnf_chain(n: int) -> str:
    return "root ::= r0\n" + "\n".join([f"r{i} ::= r{i + 1}" for i in range(n)] + [f'r{n} ::= "a"'])


def nested(n: int) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "integer"}
    for _ in range(n):
        s = {"type": "object", "properties": {"x": s}, "required": ["x"]}
    return s


@pytest.mark.parametrize(
    "spec, limit",
    [
        (GrammarSpec.json_schema(defs_chain(1000)), "max_ref_chain"),  # the issue's: segfaulted
        (GrammarSpec.json_schema(defs_chain(5000, "ref")), "max_ref_chain"),
        (GrammarSpec.json_schema(defs_chain(100)), "max_expanded_depth"),  # 100 hops of 3 levels each
        (GrammarSpec.grammar(lark_chain(3000)), "max_rules"),  # segfaulted
        (GrammarSpec.grammar(gbnf_chain(5000)), "max_rules"),  # segfaulted
        (GrammarSpec.grammar(lark_chain(20_000)), "max_bytes"),  # the issue's 640 KB grammar: segfaulted
        (GrammarSpec.grammar("start: %json " + json.dumps(defs_chain(1000))), "max_ref_chain"),
        (GrammarSpec("json_schema", json.dumps(nested(60))), "max_depth"),
        (GrammarSpec("json_schema", "[" * 5000 + "]" * 5000), "max_depth"),  # deeper than json.loads recurses
        (GrammarSpec.regex("a" * 300_000), "max_bytes"),
    ],
    ids=lambda v: v if isinstance(v, str) else f"{v.kind}-{len(v.value)}",
)
def test_grammars_past_the_bounds_are_refused_naming_the_limit(compiler, spec, limit):
    with pytest.raises(GrammarError) as e:
        compiler.compile(spec)
    assert e.value.limit == limit and e.value.param == spec.kind
    assert limit in str(e.value) and str(e.value).startswith(spec.kind)


def test_a_schema_too_deep_to_serialise_is_refused_when_the_spec_is_made():
    deep: Any = {}
    for _ in range(5000):  # json.dumps would raise RecursionError
        deep = {"properties": {"x": deep}}
    with pytest.raises(GrammarError) as e:
        GrammarSpec.json_schema(deep)
    assert e.value.limit == "max_depth" and e.value.param == "json_schema"


def test_the_bounds_admit_what_they_state(compiler, smol_tokenizer):
    ok = [
        GrammarSpec.grammar(lark_chain(990)),  # max_rules 1,000 (start and the last rule count too)
        GrammarSpec.grammar(gbnf_chain(990)),
        GrammarSpec.json_schema(defs_chain(120, "ref")),  # max_ref_chain 128
        GrammarSpec.json_schema(defs_chain(60)),  # about 180 levels with the $refs followed
        GrammarSpec.json_schema(nested(45)),  # 91 levels: max_depth 100
        GrammarSpec.json_schema(  # recursion (a cycle through $ref) is not a chain: it compiles
            {
                "$defs": {
                    "T": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/T"}}}}
                },
                "$ref": "#/$defs/T",
            }
        ),
        GrammarSpec.json_schema(
            {"type": "object", "properties": {"self": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}}
        ),
    ]
    for spec in ok:
        compiler.compile(spec).matcher()
    walk = compiler.compile(GrammarSpec.json_schema(defs_chain(40))).matcher()
    text = _greedy_walk(walk, smol_tokenizer)
    assert text.count('"next"') == 40


def _greedy_walk(m: GrammarMatcher, tok: Tokenizer, max_steps: int = 400) -> str:
    ids: list[int] = []
    while not m.is_terminated and len(ids) < max_steps:
        allowed = [t for t in allowed_tokens(m, tok.vocab_size) if t not in tok.eos_token_ids]
        if not allowed:
            break
        ids.append(allowed[0])
        assert m.accept(allowed[0])
    return tok.decode(ids)


def test_bounds_measure_nodes_chains_and_cycles():
    from model_core.grammar_bounds import GrammarBounds, GrammarLimitError, _expanded, check_schema

    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(200)}}
    with pytest.raises(GrammarLimitError) as e:
        check_schema(wide, GrammarBounds(max_nodes=100), "json_schema")
    assert e.value.limit == "max_nodes"
    check_schema(wide, GrammarBounds(), "json_schema")
    assert _expanded(defs_chain(10, "ref"))[1] == 11  # hops: the root's, then A0 .. A9
    cycle = {
        "$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]}},
        "$ref": "#/$defs/A",
    }
    depth, hops = _expanded(cycle)
    assert hops == 2 and depth < 10  # the cycle is cut where it closes
    assert _expanded({"$ref": "#/nowhere", "a": {"$ref": "http://x/y"}}) == (2, 0)  # unresolved refs: not followed


CRASH_PROBE = """
import json, sys
from model_core.default_model import find_default_model
from model_core.grammar import GrammarCompiler, GrammarError, GrammarSpec
from model_core.tokenizer import Tokenizer
from tests.model_core.test_grammar import defs_chain, gbnf_chain, lark_chain
tok = Tokenizer.from_gguf(find_default_model())
c = GrammarCompiler(tok, tok.vocab_size, max_compile_s=60)
specs = [GrammarSpec.json_schema(defs_chain(1000)), GrammarSpec.json_schema(defs_chain(5000, "ref")),
         GrammarSpec.grammar(lark_chain(3000)), GrammarSpec.grammar(lark_chain(20000)),
         GrammarSpec.grammar(gbnf_chain(5000))]
for spec in specs:
    try:
        c.compile(spec)
        print("compiled")
    except GrammarError as e:
        print("refused", e.limit)
"""


def test_grammars_that_crashed_the_process_are_refused_in_a_subprocess():
    """Compiled unbounded, each of these segfaults llguidance (measured: a `$defs` chain of 1,000 objects, Lark
    chains of 2,800 rules, GBNF of 5,000, on an 8 MiB stack); run where a crash cannot take the tests with it."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", CRASH_PROBE], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.split("\n")[:5] == [
        "refused max_ref_chain",
        "refused max_ref_chain",
        "refused max_rules",
        "refused max_bytes",
        "refused max_rules",
    ], proc.stdout
