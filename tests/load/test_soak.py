"""Soak: steady mixed load for a fixed time against a live server in this process; memory and file
descriptors must not grow. Marked slow: run with `-m slow`; `SOAK_SECONDS` (default 30) sets the
measured period, `SOAK_WARMUP_SECONDS` (default 10) the warm-up before the baseline is taken.

The load mixes streamed and non-streamed completions and chats with fresh prompts (so tokenizer caches
see new text all the time), clients that disconnect mid-stream, requests rejected by validation, hostile
bodies (lone surrogates, null content, prompts longer than the context, bodies that are not JSON),
tokenize/detokenize, image generations and metric scrapes, while a probe times /health every 50 ms. The
baseline (RSS, open fds, metric series) is taken after warm-up with every client closed; the same
figures are taken at the end, again with every client closed: RSS and fds within 5%, the same metric
series, no request left in the engine, no 5xx, and /health's p99 reported.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from model_core.gan import GANConfig, Generator, save_gan
from model_core.tokenizer import Tokenizer
from service.engine.engine import LLMEngine
from tests.service.server_utils import TINY_MODEL_NAME, LiveServer, serve_model, text_model
from tests.utils import tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "30"))
WARMUP_SECONDS = float(os.environ.get("SOAK_WARMUP_SECONDS", "10"))
CLIENTS = 8
TOLERANCE = 0.05
WORDS = ("alpha", "beta", "gamma", "delta", "dragon", "castle", "river", "stone", "naïve", "東京", "🚀", "42")


@pytest.fixture(scope="module")
def live(smol_tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    gan_dir: Path = save_gan(
        Generator(GANConfig(z_dim=8, embed_dim=4, g_width=4, d_width=4, image_size=32)).eval(),
        tmp_path_factory.mktemp("gan"),
    )
    tm = text_model(tiny_llama(max_seq_len=256), smol_tokenizer, max_num_seqs=16, max_waiting=64)
    with serve_model(tm, enable_gan=True, gan_path=str(gan_dir)) as server:
        yield server


HOSTILE = [  # (path, raw body, expected status)
    ("/v1/completions", b'{"prompt": "a\\ud800b"}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": null}]}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "tool", "content": "x"}]}', 400),
    ("/v1/completions", b'{"prompt": [true, false]}', 400),
    ("/v1/completions", b'{"prompt": "x", "best_of": 4}', 400),
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b'{"prompt": "' + b"word " * 30000 + b'"}', 400),  # longer than the context
]


async def client_loop(base_url: str, seed: int, until: float, tally: Counter[str]) -> None:
    """One client: random requests back to back until `until` (monotonic)."""
    rng = random.Random(seed)

    async def count_status(response: httpx.Response) -> None:
        tally[f"status_{response.status_code}"] += 1

    async with httpx.AsyncClient(base_url=base_url, timeout=60.0, event_hooks={"response": [count_status]}) as c:
        while time.monotonic() < until:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) + f" #{rng.randrange(10**9)}"
            kind = rng.choices(
                ["cmpl", "chat", "stream", "disconnect", "invalid", "hostile", "tokenize", "image", "metrics"],
                weights=[4, 3, 4, 2, 1, 1, 1, 1, 1],
            )[0]
            tally[kind] += 1
            if kind == "cmpl":
                r = await c.post(
                    "/v1/completions",
                    json={
                        "prompt": prompt,
                        "max_tokens": rng.randint(1, 24),
                        "temperature": rng.choice([0, 0.8]),
                        "n": rng.randint(1, 2),
                    },
                )
                assert r.status_code == 200, r.text
            elif kind == "chat":
                logprobs = {"logprobs": True, "top_logprobs": 2} if rng.random() < 0.3 else {}
                r = await c.post(
                    "/v1/chat/completions",
                    json={
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": rng.randint(1, 24),
                        "stop": [rng.choice(WORDS)],
                        **logprobs,
                    },
                )
                assert r.status_code == 200, r.text
            elif kind in ("stream", "disconnect"):
                path = rng.choice(["/v1/completions", "/v1/chat/completions"])
                body = {
                    "max_tokens": rng.randint(4, 48),
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    **(
                        {"prompt": prompt}
                        if path == "/v1/completions"
                        else {"messages": [{"role": "user", "content": prompt}]}
                    ),
                }
                async with c.stream("POST", path, json=body) as r:
                    assert r.status_code == 200
                    n = 0
                    async for line in r.aiter_lines():
                        n += line.startswith("data: ")
                        if kind == "disconnect" and n >= 3:
                            break  # the client goes away mid-stream
                        if line.startswith("data: {") and "error" in json.loads(line[len("data: ") :]):
                            raise AssertionError(line)
            elif kind == "invalid":
                r = await c.post("/v1/completions", json={"prompt": prompt, "n": 99})
                assert r.status_code == 400
            elif kind == "hostile":
                path, raw, status = rng.choice(HOSTILE)
                r = await c.post(path, content=raw, headers={"content-type": "application/json"})
                assert r.status_code == status, (raw[:80], r.text)
            elif kind == "tokenize":
                r = await c.post("/tokenize", json={"prompt": prompt})
                assert r.status_code == 200
                r = await c.post("/detokenize", json={"tokens": r.json()["tokens"]})
                assert r.status_code == 200 and r.json()["prompt"] == prompt
            elif kind == "image":
                r = await c.post(
                    "/v1/images/generations",
                    json={"prompt": str(rng.randrange(10)), "size": "32x32", "n": rng.randint(1, 4)},
                )
                assert r.status_code == 200, r.text
            else:
                assert (await c.get("/metrics")).status_code == 200


async def probe_health(base_url: str, until: float, latencies: list[float]) -> None:
    """/health every 50 ms on its own connection: what a liveness probe sees under the load."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as c:
        while time.monotonic() < until:
            t = time.perf_counter()
            assert (await c.get("/health")).status_code == 200
            latencies.append(time.perf_counter() - t)
            await asyncio.sleep(0.05)


def run_load(base_url: str, seconds: float, seed: int) -> tuple[Counter[str], list[float]]:
    tally: Counter[str] = Counter()
    health: list[float] = []

    async def main() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(
            probe_health(base_url, until, health),
            *(client_loop(base_url, seed * 1000 + i, until, tally) for i in range(CLIENTS)),
        )

    asyncio.run(main())
    return tally, health


def engine_errors(base_url: str) -> int:
    """Requests the engine ended in error (a stream's status is 200 before it can fail)."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("aigc_request_success_total{") and 'finish_reason="error"' in line
    )


def metric_series(base_url: str) -> set[str]:
    """Names and labels of every sample in /metrics (not the values)."""
    lines = httpx.get(f"{base_url}/metrics", timeout=30).text.splitlines()
    return {line.rsplit(" ", 1)[0] for line in lines if line and not line.startswith("#")}


def settle(engine: LLMEngine, proc: psutil.Process, timeout_s: float = 20.0) -> tuple[int, int]:
    """Wait until the engine is idle and the fd count has stopped moving; then (RSS bytes, open fds)."""
    deadline = time.monotonic() + timeout_s
    while engine.scheduler.has_work or engine.num_pending():
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.05)
    last = -1
    while time.monotonic() < deadline:  # closed connections are reaped by the server asynchronously
        gc.collect()
        fds = proc.num_fds()
        if fds == last:
            break
        last = fds
        time.sleep(0.5)
    return proc.memory_info().rss, proc.num_fds()


@pytest.mark.timeout(int(SOAK_SECONDS + WARMUP_SECONDS + 240))
def test_soak_memory_and_fds_stay_flat(live: LiveServer) -> None:
    proc = psutil.Process()
    engine = live.text_model.engine
    warm, _ = run_load(live.base_url, WARMUP_SECONDS, seed=1)
    rss0, fds0 = settle(engine, proc)
    series0 = metric_series(live.base_url)

    t0 = time.monotonic()
    tally, health = run_load(live.base_url, SOAK_SECONDS, seed=2)
    took = time.monotonic() - t0
    rss1, fds1 = settle(engine, proc)
    series1 = metric_series(live.base_url)

    requests = sum(n for k, n in tally.items() if not k.startswith("status_"))
    report = {
        "soak_seconds": round(took, 1),
        "requests": requests,
        "requests_per_s": round(requests / took, 1),
        "warmup_requests": sum(warm.values()),
        "mix": dict(tally),
        "rss_after_warmup_mib": round(rss0 / 2**20, 1),
        "rss_end_mib": round(rss1 / 2**20, 1),
        "rss_change_pct": round(100 * (rss1 - rss0) / rss0, 2),
        "fds_after_warmup": fds0,
        "fds_end": fds1,
        "metric_series": [len(series0), len(series1)],
        "responses_5xx": sum(n for k, n in tally.items() if k.startswith("status_5")),
        "engine_errors": engine_errors(live.base_url),
        "health_probes": len(health),
        "health_p50_ms": round(1e3 * statistics.median(health), 2),
        "health_p99_ms": round(1e3 * statistics.quantiles(health, n=100)[98], 2),
        "health_max_ms": round(1e3 * max(health), 2),
    }
    print("\nsoak: " + json.dumps(report, ensure_ascii=False))
    assert requests > 0 and all(tally[k] > 0 for k in ("cmpl", "chat", "stream", "disconnect", "hostile"))
    assert report["responses_5xx"] == 0 and report["engine_errors"] == 0
    assert rss1 <= rss0 * (1 + TOLERANCE), report
    assert abs(fds1 - fds0) <= max(1, TOLERANCE * fds0), report
    assert series1 == series0, sorted(series1 ^ series0)  # no per-request label: series do not grow
    sched = engine.scheduler
    assert sched.block_pool.num_used == 0 and not sched.has_work and not engine._inbox and not engine._aborts
    assert len(sched._seqs) == 0  # nothing finished is kept
    assert engine.is_alive
    assert TINY_MODEL_NAME in httpx.get(f"{live.base_url}/v1/models", timeout=30).text
