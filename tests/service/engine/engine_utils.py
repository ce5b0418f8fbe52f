"""Helpers to build an engine on a model and run requests through it in tests."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from model_core.lm import CausalLM
from model_core.sampling import SamplingParams
from model_core.tokenizer import Tokenizer
from service.engine.engine import EngineConfig, LLMEngine, TokenEvent, build_engine


def make_engine(
    model: CausalLM,
    tokenizer: Tokenizer,
    *,
    start: bool = True,
    prefix_caching: bool = True,
    num_blocks: int = 256,
    max_num_batched_tokens: int = 256,
    **config: Any,
) -> LLMEngine:
    """An engine over `model` built as the server builds one (`build_engine`); `config`: other EngineConfig
    fields (max_num_seqs, block_size, max_waiting, timeouts)."""
    engine = build_engine(
        model,
        tokenizer,
        EngineConfig(
            num_blocks=num_blocks,
            max_num_batched_tokens=max(max_num_batched_tokens, config.get("max_num_seqs", 0)),
            max_model_len=model.cfg.max_seq_len,
            enable_prefix_caching=prefix_caching,
            **config,
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
