"""End to end on the real default model (SmolLM2-135M-Instruct, auto dtype: bf16 where the CPU has
it), loaded once through `build_text_model` and served by uvicorn: concurrent chat streams give
coherent answers and are batched by the engine; served greedy text equals the reference generate()."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator

import openai
import pytest

from model_core.generate import generate
from model_core.sampling import SamplingParams
from service.api.text_model import TextModel
from service.config import Settings
from service.main import build_text_model, create_app
from tests.service.server_utils import LiveServer, serve

pytestmark = pytest.mark.heavy  # the real model served end to end (make test-fast skips it)

QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "What do bees make?",
    "How many days are there in a week?",
    "What is the opposite of hot?",
    "Which planet do we live on?",
    "What animal says moo?",
    "What is water made of?",
]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    settings = Settings(max_model_len=1024, kv_cache_memory_gb=0.25, max_num_seqs=16, enable_gan=False)
    t0 = time.perf_counter()
    tm: TextModel = build_text_model(settings)
    print(f"\nloaded {tm.name} ({tm.engine.runner.dtype}) in {time.perf_counter() - t0:.1f} s")
    with serve(create_app(settings, text_model=tm)) as live:
        yield live


def is_coherent(text: str) -> bool:
    """Non-empty, mostly ASCII, and made of several real words."""
    if not text.strip():
        return False
    ascii_share = sum(c.isascii() for c in text) / len(text)
    words = re.findall(r"[A-Za-z]{2,}", text)
    return ascii_share > 0.9 and len(words) >= 3


async def _ask_all(server: LiveServer, questions: list[str]) -> list[tuple[str, str | None]]:
    async with openai.AsyncOpenAI(
        base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=300.0
    ) as client:
        model = server.text_model.name

        async def ask(q: str) -> tuple[str, str | None]:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": q}],
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
            )
            text, finish = "", None
            async for chunk in stream:
                for c in chunk.choices:
                    text += c.delta.content or ""
                    finish = c.finish_reason or finish
            return text, finish

        return list(await asyncio.gather(*(ask(q) for q in questions)))


def test_concurrent_chat_streams_are_coherent_and_batched(server: LiveServer) -> None:
    stats = server.text_model.engine.stats
    rows0, steps0 = stats.decode_rows, stats.decode_steps
    t0 = time.perf_counter()
    answers = asyncio.run(_ask_all(server, QUESTIONS))
    wall = time.perf_counter() - t0
    mean_batch = (stats.decode_rows - rows0) / max(stats.decode_steps - steps0, 1)
    tokens = sum(len(server.text_model.tokenizer.encode(t, add_special_tokens=False)) for t, _ in answers)
    print(
        f"8 streams in {wall:.1f} s (~{tokens / wall:.0f} tok/s); decode batch mean {mean_batch:.2f}, "
        f"max {stats.max_decode_batch}; lifetime mean {stats.mean_decode_batch:.2f}"
    )
    for q, (text, finish) in zip(QUESTIONS, answers, strict=True):
        print(f"  {q!r} -> {text!r} [{finish}]")
        assert finish in ("stop", "length"), (q, finish)
        assert is_coherent(text), (q, text)
    assert "Paris" in answers[0][0]
    assert stats.max_decode_batch > 1 and mean_batch > 1, "the engine did not batch the concurrent streams"
    kv = server.text_model.engine.scheduler.kv_usage
    assert kv == 0.0 and server.text_model.engine.scheduler.num_running == 0


def test_served_greedy_completion_equals_reference(server: LiveServer) -> None:
    tm = server.text_model
    prompt = "The capital of France is"
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=300.0) as client:
        r = client.completions.create(model=tm.name, prompt=prompt, max_tokens=12, temperature=0)
    ids = tm.tokenizer.encode(prompt)
    ref = list(
        generate(
            tm.engine.runner.model,
            ids,
            SamplingParams(max_tokens=12, temperature=0.0),
            tokenizer=tm.tokenizer,
            eos_token_ids=tm.tokenizer.eos_token_ids,
        )
    )
    assert r.choices[0].text == "".join(s.text for s in ref)
    assert r.usage is not None and r.usage.completion_tokens == len(ref)
    assert "Paris" in r.choices[0].text
