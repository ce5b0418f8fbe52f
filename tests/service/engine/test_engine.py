"""The batched engine equals the reference generate(): greedy, and seeded sampling per request."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from model_core.generate import generate
from model_core.sampling import SamplingParams
from tests.service.engine.engine_utils import collect, make_engine, run_all
from tests.utils import kernels_for, native_isas


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(rng.randint(1, 90))] for _ in range(n)]


def _reference(model, tok, prompt, params, kernels=None):
    return [
        s.token_id
        for s in generate(model, prompt, params, tokenizer=tok, eos_token_ids=tok.eos_token_ids, kernels=kernels)
    ]


@pytest.mark.parametrize("isa", ["torch", *native_isas(reference=False)[:1]])
def test_sixteen_concurrent_greedy_requests_equal_reference(tiny_model, smol_tokenizer, isa):
    """With PyTorch alone and with the best native kernels here (decode attention read in place)."""
    kernels = None if isa == "torch" else kernels_for(isa)
    prompts = _prompts(16)
    params = [SamplingParams(max_tokens=random.Random(i).randint(1, 40), temperature=0.0) for i in range(16)]
    tiny_model.kernels = kernels  # (the model's backend: its KV cache's attention runs on these kernels)
    try:
        engine = make_engine(tiny_model, smol_tokenizer, max_num_batched_tokens=64)  # chunked prefill
        try:
            results = run_all(engine, list(zip(prompts, params, strict=True)))
        finally:
            engine.stop()
    finally:
        tiny_model.kernels = None
    for prompt, p, events in zip(prompts, params, results, strict=True):
        assert [e.token_id for e in events] == _reference(tiny_model, smol_tokenizer, prompt, p, kernels)
        assert events[-1].finish_reason in ("stop", "length")
        assert events[-1].completion_tokens == len(events)
    assert engine.stats.max_decode_batch > 1, "requests were not batched"
    assert engine.scheduler.kv_usage == 0.0


def test_seeded_sampling_is_independent_of_batch(tiny_model, smol_tokenizer):
    prompts = _prompts(8, seed=1)
    params = [SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=100 + i) for i in range(8)]
    engine = make_engine(tiny_model, smol_tokenizer)
    try:
        batched = run_all(engine, list(zip(prompts, params, strict=True)))
        alone = [run_all(engine, [(p, sp)])[0] for p, sp in zip(prompts[:3], params[:3], strict=True)]
    finally:
        engine.stop()
    for i in range(3):
        assert [e.token_id for e in batched[i]] == [e.token_id for e in alone[i]]
        assert [e.token_id for e in batched[i]] == _reference(tiny_model, smol_tokenizer, prompts[i], params[i])


def test_abort_frees_blocks_within_one_step(tiny_model, smol_tokenizer):
    engine = make_engine(tiny_model, smol_tokenizer)

    async def main() -> None:
        it = engine.generate(_prompts(1)[0], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True), "r1")
        got = 0
        async for _ in it:
            got += 1
            if got == 3:
                assert engine.scheduler.block_pool.num_used > 0  # 197 tokens to go: it holds its blocks
                break
        await it.aclose()
        steps = engine.stats.steps
        deadline = time.monotonic() + 5
        while engine.scheduler.get("r1") is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        assert engine.scheduler.get("r1") is None
        assert engine.stats.steps - steps <= 2
        assert engine.scheduler.kv_usage == 0.0

    try:
        asyncio.run(main())
    finally:
        engine.stop()


def test_a_prompt_that_leaves_no_room_is_never_queued(tiny_model, smol_tokenizer):
    """The API refuses it with a 400 naming the prompt (tests/service/api/test_api.py, test_hardening.py); the engine
    asserts it, and a request that got past anyway takes nothing and leaves the engine healthy."""
    engine = make_engine(tiny_model, smol_tokenizer)
    try:
        for prompt in ([5] * 256, []):
            with pytest.raises(AssertionError, match="prompt"):
                asyncio.run(collect(engine, prompt, SamplingParams(max_tokens=4)))
        assert engine.admission.active == 0 and engine.is_alive and engine.scheduler.num_waiting == 0
    finally:
        engine.stop()
