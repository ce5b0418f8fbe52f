"""Grammar compile isolation (issue #31): a grammar is compiled in a probe worker process before the server
compiles it, so a native crash inside llguidance that the bounds do not foresee costs a worker, not the process.
The crashing grammar here is real: a Lark chain of 40,000 rules segfaults llguidance on the compile threads' 64 MiB
stack (the bounds refuse it, so the tests raise them); nothing of it is compiled in the test process."""

from __future__ import annotations

import json
import time

import llguidance
import pytest

from model_core.grammar import GrammarCompiler, GrammarError, GrammarSpec, default_limits
from model_core.grammar_bounds import GrammarBounds
from model_core.grammar_probe import (
    CompilerCrash,
    CompileTimeout,
    GrammarProbe,
    configure_shared_probe,
    limits_dict,
    shared_probe,
)
from model_core.tokenizer import Tokenizer
from tests.model_core.test_grammar import lark_chain

CRASHES = 40_000  # Lark chain rules that crash the native compiler (20,000 compile)
NO_BOUNDS = GrammarBounds(max_bytes=2**30, max_rules=10**7, max_nodes=10**7)
LIMITS = limits_dict(default_limits())
TYPICAL = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}},
    },
    "required": ["name", "age"],
}


@pytest.fixture
def probe():
    p = GrammarProbe(workers=1)
    yield p
    p.close()


def _schema(s):
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(s))


def test_a_grammar_that_crashes_the_compiler_costs_a_worker_and_is_remembered(probe):
    crash = llguidance.LLMatcher.grammar_from_lark(lark_chain(CRASHES))
    with pytest.raises(CompilerCrash, match="SIGSEGV"):
        probe.check(crash, LIMITS, timeout_s=60)
    assert probe.crashes == 1 and probe.alive() == 1  # the lost worker is replaced
    probe.check(_schema(TYPICAL), LIMITS, timeout_s=60)  # the next grammar is probed as usual
    probes = probe.probes
    with pytest.raises(CompilerCrash):  # the verdict is cached: no second crash
        probe.check(crash, LIMITS, timeout_s=60)
    assert probe.crashes == 1 and probe.probes == probes
    probe.check(llguidance.LLMatcher.grammar_from_lark("start: foo"), LIMITS)  # invalid is not a crash


def test_a_worker_that_aborts_is_a_crash_too(monkeypatch):
    monkeypatch.setenv("AIGC_TEST_GRAMMAR_PROBE_ABORT", "probe-abort-marker")
    p = GrammarProbe(workers=2)
    try:
        with pytest.raises(CompilerCrash, match="SIGABRT"):
            p.check(_schema({"const": "probe-abort-marker"}), LIMITS, timeout_s=60)
        p.check(_schema(TYPICAL), LIMITS, timeout_s=60)
        assert p.crashes == 1
    finally:
        p.close()


def test_a_probe_past_its_timeout_is_killed_and_the_worker_replaced(probe):
    probe.check(_schema(TYPICAL), LIMITS, timeout_s=60)  # a worker is up
    slow = llguidance.LLMatcher.grammar_from_lark(lark_chain(20_000))  # ~0.2 s to compile
    with pytest.raises(CompileTimeout):
        probe.check(slow, LIMITS, timeout_s=0.01)
    assert probe.alive() == 1
    probe.check(slow, LIMITS, timeout_s=60)  # not cached as a failure: it compiles given the time


def test_the_compiler_refuses_what_crashed_a_worker_and_keeps_compiling(smol_tokenizer: Tokenizer):
    probe = GrammarProbe(workers=1)
    compiler = GrammarCompiler(
        smol_tokenizer, smol_tokenizer.vocab_size, max_compile_s=60, bounds=NO_BOUNDS, probe=probe
    )
    try:
        with pytest.raises(GrammarError) as e:
            compiler.compile(GrammarSpec.grammar(lark_chain(CRASHES)))
        assert e.value.limit == "compiler_crash" and e.value.param == "grammar"
        assert str(e.value).startswith("grammar: the grammar crashed the grammar compiler (SIGSEGV"), str(e.value)
        compiler.compile(GrammarSpec.json_schema(TYPICAL)).matcher()
        with pytest.raises(GrammarError) as e:  # invalid grammars keep their own errors
            compiler.compile(GrammarSpec.grammar("start: foo"))
        assert e.value.limit is None and "foo" in str(e.value)
    finally:
        compiler.close()
        probe.close()


def test_a_probe_adds_little_to_a_cold_compile_and_nothing_to_a_cached_grammar(probe):
    probe.check(_schema({"type": "integer"}), LIMITS, timeout_s=60)  # the worker is ready
    cold, cached = [], []
    for i in range(20):
        g = _schema({**TYPICAL, "title": f"t{i}"})
        t = time.perf_counter()
        probe.check(g, LIMITS)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        probe.check(g, LIMITS)
        cached.append(time.perf_counter() - t)
    cold.sort()
    cached.sort()
    assert cold[len(cold) // 2] < 0.05, cold  # ~0.3 ms unloaded
    assert cached[len(cached) // 2] < 0.001, cached  # ~15 us: a hash and a dict lookup


def test_the_shared_probe_is_configured_by_its_worker_count():
    configure_shared_probe(0)
    try:
        assert shared_probe() is None
    finally:
        configure_shared_probe(2)
    p = shared_probe()
    assert p is not None and p.workers == 2 and shared_probe() is p
