"""Temperature 0 gives the same text under any load, through the server, on the real default model: eight chats
sharing a long system prompt, each sent alone on a cold prefix cache, again warm (prefix-cache hits), sixteen at
once, and sixteen at once on a KV cache small enough to preempt; identical text and identical logprobs every
time, with every native build this CPU runs (`--kernels` forced) in its auto dtype."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from model_core.kv_cache import PagedKVCache
from service.config import Settings
from service.main import build_text_model
from tests.service.server_utils import InProcessServer, serve_model_in_process
from tests.utils import native_isas

pytestmark = [
    pytest.mark.heavy,
    pytest.mark.skipif(not native_isas(reference=False), reason="no native SIMD build runs on this CPU"),
]

SYSTEM = (
    "You are the help desk of a small public library. Opening hours: Monday to Friday 9:00 to 19:00, Saturday "
    "10:00 to 16:00, closed on Sundays and public holidays. Members may borrow up to eight items at once for three "
    "weeks; renewals are possible twice online unless someone has reserved the item. Late returns cost 20 cents a "
    "day per item. The reading room has forty seats, free wifi and two printers (10 cents a page). Children's "
    "story time is on Wednesdays at 16:00. Answer briefly and politely, and say when you do not know."
)
QUESTIONS = [
    "When are you open on Saturday?",
    "How many books can I borrow?",
    "What does a late return cost?",
    "Is there wifi?",
    "When is story time?",
    "Can I renew a book?",
    "How much is printing?",
    "Are you open on Sunday?",
]
MAX_TOKENS = 24
Answer = tuple[str, list[float]]


def _body(question: str, model: str) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "logprobs": True,
        "ignore_eos": True,
    }


async def _ask(client: httpx.AsyncClient, question: str, model: str) -> Answer:
    r = await client.post("/v1/chat/completions", json=_body(question, model))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["message"]["content"], [t["logprob"] for t in choice["logprobs"]["content"]]


async def _alone(live: InProcessServer, cold: bool) -> list[Answer]:
    model = live.text_model.name
    out = []
    async with live.async_client(timeout=300) as client:
        for q in QUESTIONS:
            if cold:
                assert (await client.post("/reset_prefix_cache")).status_code == 200
            out.append(await _ask(client, q, model))
    return out


async def _together(live: InProcessServer) -> list[Answer]:
    """Sixteen at once: every question twice."""
    model = live.text_model.name
    async with live.async_client(timeout=300) as client:
        return list(await asyncio.gather(*(_ask(client, q, model) for q in QUESTIONS * 2)))


@contextmanager
def _serve(isa: str, kv_tokens: int | None = None) -> Iterator[InProcessServer]:
    """The default model with kernels `isa`; kv_tokens: a KV cache of about that many tokens (else the default)."""
    settings = Settings(
        kernels=isa, batch_invariant=True, max_model_len=512, max_num_seqs=16, enable_gan=False, enable_g2p=False
    )
    if kv_tokens is not None:
        probe = build_text_model(settings)  # (its cache size per token depends on the dtype auto picks)
        runner = probe.engine.runner
        probe.engine.stop()
        cfg = runner.model.cfg
        per_token = PagedKVCache.bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.hd, runner.dtype)
        settings = settings.model_copy(update={"kv_cache_memory_gb": kv_tokens * per_token / 2**30})
    tm = build_text_model(settings)
    assert tm.batch_invariant, f"{isa}: the default model is not served batch-invariant"
    with serve_model_in_process(tm) as live:
        yield live


@pytest.mark.parametrize("isa", native_isas(reference=False))
def test_same_text_and_logprobs_alone_warm_concurrent_and_preempted(isa: str) -> None:
    with _serve(isa) as live:
        cold = asyncio.run(_alone(live, cold=True))
        warm = asyncio.run(_alone(live, cold=False))
        together = asyncio.run(_together(live))
        engine = live.text_model.engine
        assert engine.stats.max_decode_batch > 1, "the concurrent requests were not batched"
    assert all(text.strip() for text, _ in cold)
    assert warm == cold
    assert together == cold * 2
    with _serve(isa, kv_tokens=560) as live:  # one request's 512-token context and little more: preemption
        squeezed = asyncio.run(_together(live))
        assert live.text_model.engine.scheduler.preemptions > 0, "the small cache preempted nobody"
    assert squeezed == cold * 2
