"""LoRA adapters in the engine: requests for the base model and two adapters, interleaved, run together in the same
continuous-batching steps, and each gets the output of its model alone (the reference generate() with its adapter:
bit for bit on a batch-invariant quantized model, tokens and logprobs); the prefix cache never shares blocks between
adapters or with the base; adapters are added and removed while the engine runs."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from model_core.backend import select_backend  # noqa: E402
from model_core.generate import generate  # noqa: E402
from model_core.sampling import SamplingParams  # noqa: E402
from model_core.weights.loader import LoadedLM, load_lm  # noqa: E402
from model_core.weights.lora import load_lora  # noqa: E402
from service.engine.engine import LLMEngine, TokenEvent  # noqa: E402
from service.engine.errors import EngineError  # noqa: E402
from tests.model_core.lora_files import base_model, write_peft  # noqa: E402
from tests.model_core.tiny_formats import tiny_hf_llama, write_gguf, write_hf_dir  # noqa: E402
from tests.service.engine.engine_utils import make_engine  # noqa: E402
from tests.utils import native_isas  # noqa: E402

SIMD = native_isas(reference=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedLM, dict[str, Path]]:
    """A Q4_0 tiny llama served as the server serves a GGUF (native kernels, batch-invariant) where a SIMD build
    runs, else its dense fp32 form; and two PEFT adapters of it."""
    d = tmp_path_factory.mktemp("lora-engine")
    path = write_gguf(base_model(), d / "base-q4_0.gguf", "Q4_0").path
    if SIMD:
        backend = select_backend(SIMD[0])
        lm = load_lm(path, torch.float32, quantized_max_rows=None, backend=backend, batch_invariant=True)
        assert lm.model.batch_invariant
    else:
        lm = load_lm(path, native_decode=False, pack=False)
    return lm, {name: write_peft(d / name, name, seed=20 + i) for i, name in enumerate(("a", "b"))}


def _engine(lm: LoadedLM, adapters: dict[str, Path], **config: int) -> LLMEngine:
    engine = make_engine(lm.model, lm.tokenizer, **config)
    for name, path in adapters.items():
        engine.add_lora(load_lora(path, lm.config, name=name))
    return engine


async def _request(
    engine: LLMEngine, delay: float, prompt: list[int], params: SamplingParams, lora: str | None
) -> list[TokenEvent]:
    await asyncio.sleep(delay)
    return [ev async for ev in engine.generate(prompt, params, lora=lora)]


def _run(engine: LLMEngine, jobs: list[tuple[float, list[int], SamplingParams, str | None]]) -> list[list[TokenEvent]]:
    async def main() -> list[list[TokenEvent]]:
        return list(await asyncio.gather(*(_request(engine, *job) for job in jobs)))

    return asyncio.run(main())


def test_interleaved_requests_get_their_model_alone(served: tuple[LoadedLM, dict[str, Path]]) -> None:
    lm, paths = served
    engine = _engine(lm, paths, max_num_seqs=8, max_num_batched_tokens=32)
    try:
        rng = random.Random(0)
        shared = [rng.randrange(3, 300) for _ in range(20)]
        jobs = []
        for i in range(12):
            lora = (None, "a", "b")[i % 3]
            prompt = (shared if i % 2 else []) + [rng.randrange(3, 300) for _ in range(rng.randint(2, 14))]
            greedy = i % 4 != 3
            params = SamplingParams(
                max_tokens=rng.randint(4, 12),
                temperature=0.0 if greedy else 0.9,
                seed=None if greedy else 100 + i,
                logprobs=1,
                ignore_eos=True,
            )
            jobs.append((0.002 * rng.randint(0, 20), prompt, params, lora))
        outs = _run(engine, jobs)
        assert engine.stats.max_decode_batch >= 3  # they did run together
        served_loras = engine.loras
    finally:
        engine.stop()
    kernels = lm.backend.kernels
    for (_, prompt, params, lora), events in zip(jobs, outs, strict=True):
        got = [(e.token_id, e.logprob) for e in events if e.token_id is not None]
        adapter = served_loras[lora] if lora is not None else None
        solo = [(s.token_id, s.logprob) for s in generate(lm.model, prompt, params, kernels=kernels, lora=adapter)]
        if lm.model.batch_invariant:
            assert got == solo, f"{lora or 'base'} request differs from its model alone"
        else:  # dense fp32: rows round by their batch's shape; the tokens are the same
            assert [t for t, _ in got] == [t for t, _ in solo]


def test_prefix_cache_is_keyed_by_adapter(served: tuple[LoadedLM, dict[str, Path]]) -> None:
    lm, paths = served
    engine = _engine(lm, paths, block_size=4)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    prompt = list(range(10, 30))  # 20 tokens: 4 full blocks before the last token
    sched = engine.scheduler

    def hits_of(lora: str | None) -> int:
        before = sched.prefix_cache_hits
        _run(engine, [(0.0, prompt, params, lora)])
        return sched.prefix_cache_hits - before

    try:
        assert hits_of(None) == 0
        assert hits_of("a") == 0  # the base's blocks hold the base's KV
        assert hits_of("b") == 0
        assert hits_of("a") == 16  # its own
        assert hits_of(None) == 16
        engine.remove_lora("a")
        engine.add_lora(load_lora(paths["a"], lm.config, name="a"))  # reloaded: a new key
        assert hits_of("a") == 0
    finally:
        engine.stop()


def test_adapters_added_and_removed_at_run_time(served: tuple[LoadedLM, dict[str, Path]], tmp_path: Path) -> None:
    lm, paths = served
    engine = _engine(lm, {})
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    try:
        with pytest.raises(EngineError, match="no LoRA adapter named 'a'"):
            _run(engine, [(0.0, [5, 6, 7], params, "a")])
        served_a = engine.add_lora(load_lora(paths["a"], lm.config, name="a"))
        assert engine.loras == {"a": served_a}
        with pytest.raises(ValueError, match="already served"):
            engine.add_lora(load_lora(paths["b"], lm.config, name="a"))
        assert len(_run(engine, [(0.0, [5, 6, 7], params, "a")])[0]) == 3
        assert engine.remove_lora("a") is served_a
        with pytest.raises(EngineError, match="no LoRA adapter named 'a'"):
            _run(engine, [(0.0, [5, 6, 7], params, "a")])
        with pytest.raises(KeyError):
            engine.remove_lora("a")
        # an adapter read for another model (same family, other sizes) does not fit this one
        other_dir = write_hf_dir(tiny_hf_llama(seed=0, hidden=96, n_heads=6, ffn=128), tmp_path / "wide")
        other = load_lm(other_dir, native_decode=False, pack=False)
        from peft import LoraConfig, get_peft_model

        get_peft_model(tiny_hf_llama(seed=0, hidden=96, n_heads=6, ffn=128), LoraConfig(r=2)).save_pretrained(
            tmp_path / "wide-lora"
        )
        with pytest.raises(ValueError, match="blocks.0.attn.qkv"):
            engine.add_lora(load_lora(tmp_path / "wide-lora", other.config))
    finally:
        engine.stop()


def test_speculative_drafts_are_verified_with_the_requests_adapter(
    served: tuple[LoadedLM, dict[str, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Speculative decoding with adapters: a draft's verification rows run with their request's adapter, so greedy
    requests for the base and two adapters keep their model's tokens (drafts: the true continuation, partly wrong)."""
    from service.engine import engine_core
    from service.engine.engine import SpecConfig
    from tests.service.engine.test_speculative_decoding import OracleProposer

    lm, paths = served
    monkeypatch.setattr(engine_core, "NgramProposer", OracleProposer)
    monkeypatch.setattr(OracleProposer, "ANSWERS", {})
    rng = random.Random(1)
    jobs = []
    for i in range(6):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randint(3, 12))] + [i]  # distinct prompts
        jobs.append(
            (0.0, prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), (None, "a", "b")[i % 3])
        )
    engine = _engine(lm, paths, max_num_seqs=8, max_num_batched_tokens=64)
    try:
        loras = engine.loras
    finally:
        engine.stop()
    kernels = lm.backend.kernels
    wants = []
    for _, prompt, params, lora in jobs:
        adapter = loras[lora] if lora is not None else None
        want = [s.token_id for s in generate(lm.model, prompt, params, kernels=kernels, lora=adapter)]
        OracleProposer.ANSWERS[tuple(prompt)] = want
        wants.append(want)
    spec = SpecConfig(num_tokens=4, disable_by_batch_size=8)
    engine = make_engine(lm.model, lm.tokenizer, max_num_seqs=8, max_num_batched_tokens=64, speculative=spec)
    for adapter in loras.values():
        engine.add_lora(adapter)
    try:
        outs = _run(engine, jobs)
        accepted = engine.stats.spec_accepted_tokens
    finally:
        engine.stop()
    assert accepted > 10
    for want, events in zip(wants, outs, strict=True):
        assert [e.token_id for e in events if e.token_id is not None] == want
