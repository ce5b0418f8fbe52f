"""Batch invariance (model_core.lm): on a model the loader would make batch-invariant, every request's tokens and
logprobs out of the engine equal its solo run (the reference generate()) bit for bit, whatever arrives when,
however its prompt is chunked, whether its prefix was cached and whether it was preempted and recomputed.

A property test: hypothesis draws arrival times, prompt lengths and shared prefixes, the step's token budget,
the KV cache's size (small enough to preempt) and greedy or seeded sampling."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_core.generate import generate
from model_core.lm import CausalLM
from model_core.qmatmul import ALL_ROWS
from model_core.sampling import SamplingParams
from model_core.tokenizer import Tokenizer
from model_core.weights.loader import invariance_gap
from service.engine.engine import EngineConfig, LLMEngine, TokenEvent, build_engine
from tests.utils import kernels_for, native_isas, tiny_llama_q4

ISAS = native_isas(reference=False)
pytestmark = pytest.mark.skipif(not ISAS, reason="no native SIMD build runs on this CPU")
DTYPES = {"avx512bf16": torch.bfloat16}  # the dtype each build runs (its int8 or exact mode); others: float32
_MODELS: dict[str, CausalLM] = {}


def invariant_model(isa: str) -> CausalLM:
    """A tiny 4-bit llama served as the loader serves a GGUF in batch-invariant mode."""
    if isa not in _MODELS:
        model = tiny_llama_q4(ALL_ROWS, kernels_for(isa), DTYPES.get(isa, torch.float32), seed=3)
        assert invariance_gap(model) is None
        model.batch_invariant = True
        _MODELS[isa] = model
    return _MODELS[isa]


def solo(model: CausalLM, isa: str, prompt: list[int], params: SamplingParams) -> list[tuple[int, float | None]]:
    return [
        (s.token_id, s.logprob)
        for s in generate(model, prompt, params, eos_token_ids=(), kernels=kernels_for(isa))  # type: ignore[misc]
    ]


async def _request(engine: LLMEngine, delay: float, prompt: list[int], params: SamplingParams) -> list[TokenEvent]:
    await asyncio.sleep(delay)
    return [ev async for ev in engine.generate(prompt, params)]


def run_engine(
    engine: LLMEngine, jobs: list[tuple[float, list[int], SamplingParams]]
) -> list[list[tuple[int, float | None]]]:
    async def main() -> list[list[TokenEvent]]:
        return list(await asyncio.gather(*(_request(engine, d, p, sp) for d, p, sp in jobs)))

    return [[(e.token_id, e.logprob) for e in events if e.token_id is not None] for events in asyncio.run(main())]


@st.composite
def workloads(draw: st.DrawFn) -> tuple[list[tuple[float, list[int], SamplingParams]], int, int]:
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    prefixes = [[rng.randrange(3, 49152) for _ in range(rng.randint(1, 30))] for _ in range(2)]
    jobs = []
    for i in range(draw(st.integers(2, 7))):
        own = [rng.randrange(3, 49152) for _ in range(draw(st.integers(1, 20)))]
        prompt = (rng.choice(prefixes) if draw(st.booleans()) else []) + own
        greedy = draw(st.booleans())
        params = SamplingParams(
            max_tokens=draw(st.integers(1, 24)),
            temperature=0.0 if greedy else 0.8,
            top_p=1.0 if greedy else 0.9,
            seed=None if greedy else 1000 + i,
            logprobs=1,
            ignore_eos=True,
        )
        jobs.append((draw(st.sampled_from([0.0, 0.0, 0.002, 0.01, 0.03])), prompt, params))
    budget = draw(st.sampled_from([8, 16, 33, 128]))
    blocks = draw(st.sampled_from([10, 16, 64]))  # x 8 tokens: 10 blocks hold one longest request, not several
    return jobs, budget, blocks


@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=workloads())
def test_every_request_equals_its_solo_run_under_any_load(
    isa: str, smol_tokenizer: Tokenizer, case: tuple[list[tuple[float, list[int], SamplingParams]], int, int]
) -> None:
    jobs, budget, blocks = case
    model = invariant_model(isa)
    engine = build_engine(
        model,
        smol_tokenizer,
        EngineConfig(
            max_num_seqs=8,
            max_num_batched_tokens=budget,
            block_size=8,
            num_blocks=blocks,
            max_model_len=80,
            enable_prefix_caching=True,
        ),
    )
    engine.start()
    try:
        first = run_engine(engine, jobs)
        again = run_engine(engine, jobs[:2])  # the same requests again: prefix-cache hits
    finally:
        engine.stop()
    for (_, prompt, params), got in zip(jobs, first, strict=True):
        assert got == solo(model, isa, prompt, params)
    assert again == first[:2]


@pytest.mark.parametrize("isa", ISAS)
def test_preemption_and_recompute_keep_every_token(isa: str, smol_tokenizer: Tokenizer) -> None:
    """Six long requests in a cache that holds two at a time: sequences are preempted and their prompts and
    outputs recomputed as prompt chunks, and still give their solo tokens and logprobs."""
    model = invariant_model(isa)
    rng = random.Random(7)
    jobs = [
        (
            0.0,
            [rng.randrange(3, 49152) for _ in range(rng.randint(20, 40))],
            SamplingParams(max_tokens=36, temperature=0.0, logprobs=2, ignore_eos=True),
        )
        for _ in range(6)
    ]
    engine = build_engine(
        model,
        smol_tokenizer,
        EngineConfig(max_num_seqs=6, max_num_batched_tokens=64, block_size=8, num_blocks=20, max_model_len=80),
    )
    engine.start()
    try:
        got = run_engine(engine, jobs)
    finally:
        engine.stop()
    assert engine.scheduler.preemptions > 0, "the cache was large enough: nothing was preempted"
    for (_, prompt, params), out in zip(jobs, got, strict=True):
        assert out == solo(model, isa, prompt, params)
