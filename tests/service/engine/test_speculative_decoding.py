"""Speculative decoding in the engine (n-gram drafts verified in the batched step): on a batch-invariant model
every greedy request gives its solo run's tokens and logprobs bit for bit with speculation on, whatever arrives
when, with penalties, preemption and prefix-cache hits; sampled requests keep the model's distribution (a
chi-square test of on against off); stop ids and max_tokens end a request inside an accepted draft."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_core.lm import CausalLM
from model_core.sampling import SamplingParams
from model_core.tokenizer import Tokenizer
from service.engine import engine_core
from service.engine.engine import EngineConfig, LLMEngine, SpecConfig, build_engine
from tests.service.engine.test_batch_invariance import ISAS, invariant_model, run_engine, solo
from tests.utils import tiny_llama

pytestmark = pytest.mark.skipif(not ISAS, reason="no native SIMD build runs on this CPU")

SPEC = SpecConfig(num_tokens=4, ngram_min=1, ngram_max=3, disable_by_batch_size=8)


def spec_engine(
    isa: str,
    tok: Tokenizer,
    budget: int = 64,
    blocks: int = 64,
    spec: SpecConfig | None = SPEC,
    draft: CausalLM | None = None,
) -> LLMEngine:
    engine = build_engine(
        invariant_model(isa),
        tok,
        EngineConfig(
            max_num_seqs=8,
            max_num_batched_tokens=budget,
            block_size=8,
            num_blocks=blocks,
            max_model_len=96,
            enable_prefix_caching=True,
            speculative=spec,
        ),
        draft_model=draft,
    )
    engine.start()
    return engine


class OracleProposer:
    """A stand-in for the n-gram proposer that knows each prompt's greedy continuation (`ANSWERS`) and proposes
    it with about a third of its tokens wrong (the first wrong one ends what verification can keep): drafts that
    are accepted, partly accepted and rejected, whatever the tiny random model writes."""

    ANSWERS: dict[tuple[int, ...], list[int]] = {}
    WRONG = 0.3  # the share of draft tokens made wrong

    def __init__(self, min_n: int, max_n: int, tokens: list[int]) -> None:
        self.prompt, self.output = list(tokens), []  # type: tuple[list[int], list[int]]
        self.answer = self.ANSWERS.get(tuple(tokens), [])

    def extend(self, tokens: Iterable[int]) -> None:
        self.output.extend(tokens)

    def propose(self, k: int) -> list[int]:
        n = len(self.output)
        rng = random.Random(n * 7919 + len(self.prompt))
        return [t if rng.random() >= self.WRONG else t + 1 for t in self.answer[n : n + k]]


@pytest.fixture
def oracle(monkeypatch: pytest.MonkeyPatch) -> type[OracleProposer]:
    monkeypatch.setattr(engine_core, "NgramProposer", OracleProposer)
    monkeypatch.setattr(OracleProposer, "ANSWERS", {})
    monkeypatch.setattr(OracleProposer, "WRONG", 0.3)
    return OracleProposer


def looping_prompt(rng: random.Random, n: int) -> list[int]:
    """Tokens from a short repeating pattern (with the odd change): n-gram lookups find matches."""
    pattern = [rng.randrange(3, 49152) for _ in range(rng.randint(2, 5))]
    return [t if rng.random() > 0.1 else rng.randrange(3, 49152) for t in (pattern * n)[:n]]


@st.composite
def workloads(draw: st.DrawFn) -> tuple[list[tuple[float, list[int], SamplingParams]], int, int]:
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    jobs = []
    for _ in range(draw(st.integers(1, 6))):
        penalties = draw(st.booleans())
        params = SamplingParams(
            max_tokens=draw(st.integers(1, 30)),
            temperature=0.0,
            logprobs=draw(st.sampled_from([None, 0, 2])),
            presence_penalty=0.5 if penalties else 0.0,
            frequency_penalty=0.3 if penalties else 0.0,
            repetition_penalty=1.2 if penalties else 1.0,
            ignore_eos=True,
        )
        jobs.append((draw(st.sampled_from([0.0, 0.0, 0.005, 0.02])), looping_prompt(rng, rng.randint(2, 40)), params))
    return jobs, draw(st.sampled_from([8, 16, 64])), draw(st.sampled_from([12, 24, 64]))  # budget, blocks of 8


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=workloads())
def test_greedy_requests_equal_their_solo_runs_with_speculation(
    isa: str,
    smol_tokenizer: Tokenizer,
    oracle: type[OracleProposer],
    case: tuple[list[tuple[float, list[int], SamplingParams]], int, int],
) -> None:
    jobs, budget, blocks = case
    model = invariant_model(isa)
    wants = []
    for _, prompt, params in jobs:
        want = solo(model, isa, prompt, params)
        oracle.ANSWERS[tuple(prompt)] = [t for t, _ in want]
        wants.append(want if params.logprobs is not None else [(t, None) for t, _ in want])
    engine = spec_engine(isa, smol_tokenizer, budget, blocks)
    try:
        first = run_engine(engine, jobs)
        again = run_engine(engine, jobs[:2])  # prefix-cache hits, drafts again
    finally:
        engine.stop()
    assert first == wants
    assert again == first[:2]


@pytest.mark.parametrize("isa", ISAS)
def test_drafts_are_accepted_and_preemption_keeps_every_token(
    isa: str, smol_tokenizer: Tokenizer, oracle: type[OracleProposer]
) -> None:
    rng = random.Random(11)
    jobs = [
        (0.0, looping_prompt(rng, 30), SamplingParams(max_tokens=40, temperature=0.0, logprobs=1, ignore_eos=True))
        for _ in range(5)
    ]
    model = invariant_model(isa)
    for _, prompt, params in jobs:
        oracle.ANSWERS[tuple(prompt)] = [t for t, _ in solo(model, isa, prompt, params)]
    engine = spec_engine(isa, smol_tokenizer, budget=48, blocks=24)  # 24 blocks of 8: two or three at a time
    try:
        got = run_engine(engine, jobs)
        stats = engine.core.stats
    finally:
        engine.stop()
    assert engine.scheduler.preemptions > 0, "nothing was preempted"
    assert stats.spec_accepted_tokens > 20 and stats.spec_draft_tokens >= stats.spec_accepted_tokens
    assert stats.spec_accepted_at[0] <= stats.spec_proposed_at[0]
    for (_, prompt, params), out in zip(jobs, got, strict=True):
        assert out == solo(model, isa, prompt, params)


@pytest.mark.parametrize("isa", ISAS[:1])
def test_a_stop_id_or_max_tokens_inside_an_accepted_draft_ends_the_request(
    isa: str, smol_tokenizer: Tokenizer, oracle: type[OracleProposer]
) -> None:
    rng = random.Random(5)
    prompt = looping_prompt(rng, 30)
    model = invariant_model(isa)
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ref = [t for t, _ in solo(model, isa, prompt, greedy)]
    oracle.ANSWERS[tuple(prompt)] = ref
    stop_at = next(i for i in range(3, 30) if ref[i] not in ref[:i])  # a token that first appears at i
    engine = spec_engine(isa, smol_tokenizer)
    try:
        stopped = run_engine(engine, [(0.0, prompt, dataclasses.replace(greedy, stop_token_ids=(ref[stop_at],)))])
        short = run_engine(engine, [(0.0, prompt, dataclasses.replace(greedy, max_tokens=7))])
    finally:
        engine.stop()
    assert [t for t, _ in stopped[0]] == ref[: stop_at + 1]
    assert [t for t, _ in short[0]] == ref[:7]


@pytest.mark.parametrize("isa", ISAS[:1])
def test_sampled_outputs_keep_the_models_distribution(
    isa: str, smol_tokenizer: Tokenizer, oracle: type[OracleProposer]
) -> None:
    """The four tokens of many seeded requests, with speculation on and off: a chi-square test of
    homogeneity finds no difference (at the 99.9% level). The drafts are the greedy continuation."""
    rng = random.Random(2)
    prompt = looping_prompt(rng, 24)
    model = invariant_model(isa)
    greedy = SamplingParams(max_tokens=4, temperature=0)
    oracle.ANSWERS[tuple(prompt)] = [t for t, _ in solo(model, isa, prompt, greedy)]
    oracle.WRONG = 0.0
    n = 300
    every_batch = SpecConfig(num_tokens=3, ngram_min=1, ngram_max=3, disable_by_batch_size=n)
    counts: list[dict[tuple[int, ...], int]] = []
    accepted = 0
    for spec in (every_batch, None):
        engine = spec_engine(isa, smol_tokenizer, blocks=256, spec=spec)
        try:
            jobs = [
                (0.0, prompt, SamplingParams(max_tokens=4, temperature=1.0, top_k=3, seed=s, ignore_eos=True))
                for s in range(n)
            ]
            outs = run_engine(engine, jobs)
            accepted += engine.core.stats.spec_accepted_tokens
        finally:
            engine.stop()
        c: dict[tuple[int, ...], int] = {}
        for out in outs:
            key = tuple(t for t, _ in out)
            c[key] = c.get(key, 0) + 1
        counts.append(c)
    assert accepted > 20, f"speculation did not run: {accepted}"
    cells = sorted(set(counts[0]) | set(counts[1]), key=lambda k: -(counts[0].get(k, 0) + counts[1].get(k, 0)))
    big = [k for k in cells if counts[0].get(k, 0) + counts[1].get(k, 0) >= 10]
    table = [[c.get(k, 0) for k in big] + [n - sum(c.get(k, 0) for k in big)] for c in counts]
    total = [a + b for a, b in zip(*table, strict=True)]
    stat = sum((row[j] - total[j] / 2) ** 2 / (total[j] / 2) for row in table for j in range(len(total)) if total[j])
    dof = sum(1 for t in total if t) - 1
    assert dof >= 2
    assert stat < chi2_999(dof), (stat, dof, table)


def chi2_999(dof: int) -> float:
    """The 99.9% quantile of chi-square with dof degrees of freedom (Wilson-Hilferty; within 1% for dof >= 2)."""
    a = 2 / (9 * dof)
    return dof * (1 - a + 3.0902 * a**0.5) ** 3


DRAFT = SpecConfig(method="draft", num_tokens=4, disable_by_batch_size=8)


@pytest.mark.parametrize("isa", ISAS[:1])
@pytest.mark.parametrize("same", [True, False], ids=["draft-is-the-model", "another-draft"])
def test_draft_model_proposals_keep_every_greedy_token(isa: str, smol_tokenizer: Tokenizer, same: bool) -> None:
    """A draft model (the model itself: every draft is kept; another tiny model: few are) with its own KV cache:
    greedy outputs equal the solo runs, through preemption (a pool of 24 blocks) and prefix-cache hits."""
    model = invariant_model(isa)
    draft = model if same else tiny_llama(seed=9)
    rng = random.Random(4)
    jobs = [
        (0.0, looping_prompt(rng, rng.randint(5, 30)), SamplingParams(max_tokens=30, temperature=0.0, logprobs=1))
        for _ in range(4)
    ]
    engine = spec_engine(isa, smol_tokenizer, budget=48, blocks=24, spec=DRAFT, draft=draft)
    try:
        got = run_engine(engine, jobs)
        again = run_engine(engine, jobs[:1])
        stats = engine.core.stats
        free = engine.core.draft.pool.num_free if engine.core.draft is not None else -1
    finally:
        engine.stop()
    for (_, prompt, params), out in zip(jobs, got, strict=True):
        assert out == [(t, lp) for t, lp in solo(model, isa, prompt, params)][: len(out)]
        assert len(out) == 30 or out[-1][0] in smol_tokenizer.eos_token_ids
    assert again == got[:1]
    assert stats.spec_draft_tokens > 20
    if same:  # the target's own greedy guesses are always right
        assert stats.spec_accepted_tokens == stats.spec_draft_tokens
    assert free == 24  # every request's draft blocks went back


def test_a_draft_method_needs_a_draft_model(smol_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="draft model"):
        build_engine(tiny_llama(), smol_tokenizer, EngineConfig(num_blocks=16, speculative=DRAFT))
    with pytest.raises(ValueError, match="draft model"):
        ngram = EngineConfig(num_blocks=16, speculative=SPEC)
        build_engine(tiny_llama(), smol_tokenizer, ngram, draft_model=tiny_llama())


def test_drafts_on_a_torch_model_give_its_tokens(smol_tokenizer: Tokenizer, oracle: type[OracleProposer]) -> None:
    """On a model without the native kernels (PyTorch attention over gathered keys, masks per row), verification
    rows see the right keys: tokens equal, logprobs within float32 rounding of the engine without speculation."""
    model = tiny_llama(seed=5)
    rng = random.Random(8)
    jobs = [
        (0.0, looping_prompt(rng, 20), SamplingParams(max_tokens=24, temperature=0.0, logprobs=0, ignore_eos=True))
        for _ in range(3)
    ]

    def run(spec: SpecConfig | None) -> tuple[list[list[tuple[int, float | None]]], int]:
        config = EngineConfig(num_blocks=64, block_size=8, max_model_len=96, speculative=spec)
        engine = build_engine(model, smol_tokenizer, config)
        engine.start()
        try:
            return run_engine(engine, jobs), engine.core.stats.spec_accepted_tokens
        finally:
            engine.stop()

    off, _ = run(None)
    for (_, prompt, _), out in zip(jobs, off, strict=True):  # drafts: the tokens without speculation, partly wrong
        oracle.ANSWERS[tuple(prompt)] = [t for t, _ in out]
    on, accepted = run(SPEC)
    assert accepted > 10
    for a, b in zip(on, off, strict=True):
        assert [t for t, _ in a] == [t for t, _ in b]
        assert all(abs((x or 0) - (y or 0)) < 1e-4 for (_, x), (_, y) in zip(a, b, strict=True))


def test_a_failing_proposer_costs_only_the_drafts(
    smol_tokenizer: Tokenizer, oracle: type[OracleProposer], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: OracleProposer, k: int) -> list[int]:
        raise RuntimeError("proposer bug")

    monkeypatch.setattr(OracleProposer, "propose", broken)
    model = tiny_llama(seed=6)
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    out = []
    for spec in (SPEC, None):
        config = EngineConfig(num_blocks=32, block_size=8, max_model_len=96, speculative=spec)
        engine = build_engine(model, smol_tokenizer, config)
        engine.start()
        try:
            out.append(run_engine(engine, [(0.0, prompt, params)])[0])
        finally:
            engine.stop()
    assert out[0] == out[1] and len(out[0]) == 12


@pytest.mark.parametrize("isa", ISAS[:1])
def test_constrained_requests_keep_their_tokens_with_drafts(
    isa: str, smol_tokenizer: Tokenizer, oracle: type[OracleProposer]
) -> None:
    """Drafts for requests with a grammar: each verification row gets the grammar's mask at its position (the draft
    cut where the grammar refuses it, the matcher rolled back): greedy outputs equal those without speculation, and
    seeded samples are valid JSON of the schema."""
    import json

    import jsonschema

    from model_core.grammar import GrammarCompiler, GrammarSpec

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "maximum": 9}},
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    model = invariant_model(isa)
    compiled = GrammarCompiler(smol_tokenizer, model.cfg.vocab_size).compile(GrammarSpec.json_schema(schema))
    rng = random.Random(3)
    prompts = [looping_prompt(rng, 12) + [i] for i in range(3)]
    greedy = SamplingParams(max_tokens=40, temperature=0.0)
    sampled = [SamplingParams(max_tokens=40, temperature=1.0, seed=s) for s in range(3)]

    async def one(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[int]:
        events = [ev async for ev in engine.generate(prompt, params, grammar=compiled)]
        return [ev.token_id for ev in events if ev.token_id is not None]

    def run(spec: SpecConfig | None, jobs: list[tuple[list[int], SamplingParams]]) -> tuple[list[list[int]], int]:
        engine = spec_engine(isa, smol_tokenizer, spec=spec)
        try:

            async def main() -> list[list[int]]:
                return list(await asyncio.gather(*(one(engine, p, sp) for p, sp in jobs)))

            return asyncio.run(main()), engine.core.stats.spec_accepted_tokens
        finally:
            engine.stop()

    off, _ = run(None, [(p, greedy) for p in prompts])
    for p, out in zip(prompts, off, strict=True):
        oracle.ANSWERS[tuple(p)] = out
    on, accepted = run(SPEC, [(p, greedy) for p in prompts])
    assert on == off and accepted > 5
    samples, _ = run(SPEC, [(prompts[0], sp) for sp in sampled])
    for out in samples:
        jsonschema.validate(json.loads(smol_tokenizer.decode(out)), schema)
