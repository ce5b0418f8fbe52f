"""Helpers to build an engine on a model and run requests through it in tests."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from model_core.lm import CausalLM
from model_core.native import Kernels
from model_core.sampling import SamplingParams
from model_core.tokenizer import Tokenizer
from service.engine.engine import EngineConfig, LLMEngine, TokenEvent
from service.engine.runner import ModelRunner


def make_engine(
    model: CausalLM,
    tokenizer: Tokenizer,
    *,
    num_blocks: int = 256,
    block_size: int = 16,
    max_num_seqs: int = 32,
    max_num_batched_tokens: int = 256,
    start: bool = True,
    kernels: Kernels | None = None,
    prefix_caching: bool = True,
) -> LLMEngine:
    runner = ModelRunner(model, num_blocks, block_size, tuple(tokenizer.eos_token_ids), kernels)
    engine = LLMEngine(
        runner,
        tokenizer,
        EngineConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            num_blocks=num_blocks,
            max_model_len=model.cfg.max_seq_len,
            enable_prefix_caching=prefix_caching,
        ),
    )
    if start:
        engine.start()
    return engine


async def collect(
    engine: LLMEngine, prompt: Sequence[int], params: SamplingParams, request_id: str | None = None
) -> list[TokenEvent]:
    return [ev async for ev in engine.generate(prompt, params, request_id)]


def run_all(engine: LLMEngine, jobs: Sequence[tuple[Sequence[int], SamplingParams]]) -> list[list[TokenEvent]]:
    async def main() -> list[list[TokenEvent]]:
        return list(await asyncio.gather(*(collect(engine, p, sp) for p, sp in jobs)))

    return asyncio.run(main())
