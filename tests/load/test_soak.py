"""Soak: steady mixed load for a fixed time against a live server in this process; memory and file
descriptors must not grow. Marked slow: run with `-m slow`; `SOAK_SECONDS` (default 30) sets the
measured period, `SOAK_WARMUP_SECONDS` (default 60) the warm-up before the baseline is taken.

The load mixes streamed and non-streamed completions and chats with fresh prompts (so tokenizer caches
see new text all the time), clients that disconnect mid-stream, requests rejected by validation, hostile
bodies (lone surrogates, null content, prompts longer than the context, bodies that are not JSON),
tokenize/detokenize, image generations and metric scrapes, while a probe times /health every 50 ms.

And hostile traffic from issue #31 alongside it: structured-output and forced-tool requests (chat,
completions, the Responses API) with JSON schemas and Lark/GBNF grammars drawn fresh (the generators of
`tests/service/test_grammar_limits.py`), some within the grammar bounds (200) and some past them (deep
`$defs`/`$ref` chains, deep nesting, very wide objects, thousands of chained Lark/GBNF rules: 400
`grammar_limit_exceeded` in the error shape); sockets that trickle a request header line a second, and
bursts of idle connections, all of which the server must close within its header timeout
(`HEADER_TIMEOUT_S`, served with the protocol of `python -m service`) plus 2 s.

The baseline (RSS, open fds, metric series, child processes: the grammar probe workers) is taken after
warm-up with every client closed; the same figures are taken at the end, again with every client closed:
RSS and fds within 5%, the same metric series and number of child processes, no request left in the
engine, no 5xx at all, and /health's p99 reported.
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
from typing import Any

import httpx
import psutil
import pytest

from model_core.gan import GANConfig, Generator, save_gan
from model_core.tokenizer import Tokenizer
from service.engine.engine import LLMEngine
from tests.model_core.test_grammar import defs_chain, gbnf_chain, lark_chain, nested
from tests.service.http_checks import assert_error
from tests.service.server_utils import TINY_MODEL_NAME, LiveServer, serve_model, text_model
from tests.service.test_grammar_limits import _cycle, _lark_wide, _wide, schema_format, tool
from tests.utils import tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "30"))
WARMUP_SECONDS = float(os.environ.get("SOAK_WARMUP_SECONDS", "60"))  # RSS settles after about a minute
CLIENTS = 8
TOLERANCE = 0.05
CONTEXT = 16384
HEADER_TIMEOUT_S = 3.0  # the server's header-read timeout in the soak (the default is 30 s)
CLOSE_SLACK_S = 2.0  # a slow or idle socket must be closed by HEADER_TIMEOUT_S + this
TRICKLERS = 3  # sockets trickling header lines at any time
IDLE_BURST = 40  # idle connections opened at once, every IDLE_EVERY_S
IDLE_EVERY_S = 15.0
WORDS = ("alpha", "beta", "gamma", "delta", "dragon", "castle", "river", "stone", "naïve", "東京", "🚀", "42")


@pytest.fixture(scope="module")
def live(smol_tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    gan_dir: Path = save_gan(
        Generator(GANConfig(z_dim=8, embed_dim=4, g_width=4, d_width=4, image_size=32)).eval(),
        tmp_path_factory.mktemp("gan"),
    )
    # a context that holds a forced tool's prompt with a schema past the bounds (the prompt's length is checked first)
    tm = text_model(tiny_llama(max_seq_len=CONTEXT), smol_tokenizer, max_num_seqs=16, max_waiting=64)
    with serve_model(
        tm, enable_gan=True, gan_path=str(gan_dir), header_timeout_s=HEADER_TIMEOUT_S, http_guards=True
    ) as server:
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


def grammar_request(rng: random.Random, within: bool) -> tuple[str, dict[str, Any]]:
    """A structured-output or forced-tool request (path, body) with a grammar drawn fresh: within the bounds of
    `model_core/grammar_bounds.py` (`within`) or past one of them."""
    chat = {"messages": [{"role": "user", "content": "Go."}], "max_tokens": 4}
    kind = rng.choice(["object", "array", "ref"])
    if within:
        shape = rng.randrange(10)
        if shape == 0:  # every $ref hop of an object chain is 3 levels (max_expanded_depth 256)
            return "/v1/chat/completions", {
                **chat,
                "response_format": schema_format(defs_chain(rng.randint(1, 60), kind)),
            }
        if shape == 1:  # 2 levels a step (max_depth 100)
            return "/v1/chat/completions", {**chat, "response_format": schema_format(nested(rng.randint(1, 45)))}
        if shape == 2:
            return "/v1/chat/completions", {**chat, "structured_outputs": {"json": _wide(rng.randint(1, 40))}}
        if shape == 3:
            return "/v1/chat/completions", {**chat, "structured_outputs": {"json": _cycle(rng.randint(1, 40))}}
        if shape == 4:  # max_rules 1,000
            return "/v1/chat/completions", {**chat, "structured_outputs": {"grammar": lark_chain(rng.randint(1, 900))}}
        if shape == 5:
            return "/v1/chat/completions", {**chat, "structured_outputs": {"grammar": gbnf_chain(rng.randint(1, 900))}}
        if shape == 6:
            return "/v1/chat/completions", {**chat, "structured_outputs": {"grammar": _lark_wide(rng.randint(1, 300))}}
        if shape == 7:
            body = {"prompt": "x", "max_tokens": 4, "structured_outputs": {"grammar": lark_chain(rng.randint(1, 900))}}
            return "/v1/completions", body
        if shape == 8:  # the tool's schema goes into the prompt
            choice = rng.choice(["required", {"type": "function", "function": {"name": "f"}}])
            return "/v1/chat/completions", {
                **chat,
                "tools": [tool(defs_chain(rng.randint(1, 30), kind))],
                "tool_choice": choice,
            }
        grammar = "start: %json " + json.dumps(defs_chain(rng.randint(1, 40), kind))
        return "/v1/chat/completions", {**chat, "structured_outputs": {"grammar": grammar}}
    shape = rng.randrange(10)
    if shape == 0:  # max_ref_chain 128
        return "/v1/chat/completions", {
            **chat,
            "response_format": schema_format(defs_chain(rng.randint(129, 3000), kind)),
        }
    if shape == 1:
        return "/v1/chat/completions", {**chat, "response_format": schema_format(nested(rng.randint(60, 400)))}
    if shape == 2:  # max_nodes 20,000
        return "/v1/chat/completions", {**chat, "structured_outputs": {"json": _wide(rng.randint(20_500, 30_000))}}
    if shape == 3:  # max_rules, and past 8,000 rules max_bytes
        return "/v1/chat/completions", {
            **chat,
            "structured_outputs": {"grammar": lark_chain(rng.randint(1001, 30_000))},
        }
    if shape == 4:
        return "/v1/chat/completions", {**chat, "structured_outputs": {"grammar": gbnf_chain(rng.randint(1001, 5000))}}
    if shape == 5:
        return "/v1/chat/completions", {**chat, "structured_outputs": {"grammar": _lark_wide(rng.randint(1000, 5000))}}
    if shape == 6:
        body = {"prompt": "x", "max_tokens": 4, "structured_outputs": {"grammar": lark_chain(rng.randint(1001, 5000))}}
        return "/v1/completions", body
    if shape == 7 and rng.random() < 0.5:  # tool parameters are measured as they arrive
        return "/v1/chat/completions", {**chat, "tools": [tool(nested(rng.randint(60, 400)))]}
    if shape == 7:  # the combined grammar of a forced call; its prompt (up to 45 tokens a link) fits CONTEXT
        choice = rng.choice(["required", {"type": "function", "function": {"name": "f"}}])
        return "/v1/chat/completions", {
            **chat,
            "tools": [tool(defs_chain(rng.randint(129, 200), kind))],
            "tool_choice": choice,
        }
    if shape == 8:
        tools = [{"type": "function", "name": "f", "parameters": nested(rng.randint(60, 400))}]
        return "/v1/responses", {"input": "Go.", "max_output_tokens": 4, "tools": tools}
    grammar = "start: %json " + json.dumps(defs_chain(rng.randint(129, 2000), kind))
    return "/v1/chat/completions", {**chat, "structured_outputs": {"grammar": grammar}}


async def client_loop(base_url: str, seed: int, until: float, tally: Counter[str]) -> None:
    """One client: random requests back to back until `until` (monotonic)."""
    rng = random.Random(seed)

    async def count_status(response: httpx.Response) -> None:
        tally[f"status_{response.status_code}"] += 1

    async with httpx.AsyncClient(base_url=base_url, timeout=60.0, event_hooks={"response": [count_status]}) as c:
        while time.monotonic() < until:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) + f" #{rng.randrange(10**9)}"
            kind = rng.choices(
                [
                    "cmpl",
                    "chat",
                    "stream",
                    "disconnect",
                    "invalid",
                    "hostile",
                    "tokenize",
                    "image",
                    "metrics",
                    "grammar_ok",
                    "grammar_over",
                ],
                weights=[4, 3, 4, 2, 1, 1, 1, 1, 1, 2, 2],
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
            elif kind in ("grammar_ok", "grammar_over"):
                path, body = grammar_request(rng, within=kind == "grammar_ok")
                r = await c.post(path, json=body)
                if kind == "grammar_ok":
                    assert r.status_code == 200, (path, json.dumps(body)[:200], r.text)
                else:
                    assert_error(r, 400, code="grammar_limit_exceeded")
            else:
                assert (await c.get("/metrics")).status_code == 200


async def sample_rss(until: float, every: float, samples: list[float]) -> None:
    """The process's RSS (MiB) every `every` seconds under the load: the shape behind the start and end figures."""
    proc = psutil.Process()
    while time.monotonic() + every <= until:
        await asyncio.sleep(every)
        samples.append(round(proc.memory_info().rss / 2**20, 1))


async def probe_health(base_url: str, until: float, latencies: list[float]) -> None:
    """/health every 50 ms on its own connection: what a liveness probe sees under the load."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as c:
        while time.monotonic() < until:
            t = time.perf_counter()
            assert (await c.get("/health")).status_code == 200
            latencies.append(time.perf_counter() - t)
            await asyncio.sleep(0.05)


async def closed_after(port: int, trickle: bool) -> tuple[float, bytes]:
    """Open a connection; send a request line and then a header line a second (`trickle`), or nothing; return how
    long the server took to close it (inf: not in HEADER_TIMEOUT_S + 10 s) and what it sent (b"RESET" for a
    reset). The lines go out half a second off the whole seconds, so that none crosses the server's close of the
    connection (a line that arrives after it makes the client's kernel drop the 408 for a reset)."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    read = asyncio.ensure_future(reader.read())  # until the server closes
    try:
        if trickle:
            writer.write(b"GET /health HTTP/1.1\r\nHost: soak\r\n")
            await asyncio.wait({read}, timeout=0.5)
        i = 0
        while not read.done() and time.monotonic() - t0 < HEADER_TIMEOUT_S + 10:
            if trickle:
                writer.write(f"X-Slow-{i}: {i}\r\n".encode())
                i += 1
            await asyncio.wait({read}, timeout=1.0)
        if not read.done():
            read.cancel()
            return float("inf"), b""
        took = time.monotonic() - t0
        try:
            return took, read.result()
        except ConnectionError:
            return took, b"RESET"
    finally:
        writer.close()


async def slow_sockets(port: int, until: float, tally: Counter[str], closes: list[float]) -> None:
    """TRICKLERS sockets trickling header lines back to back, and IDLE_BURST idle ones every IDLE_EVERY_S: each must
    be closed within HEADER_TIMEOUT_S + CLOSE_SLACK_S, a trickling one with a 408."""

    async def trickler() -> None:
        while time.monotonic() < until:
            took, data = await closed_after(port, trickle=True)
            tally["trickle"] += 1
            closes.append(took)
            assert data.startswith(b"HTTP/1.1 408 "), data[:200]

    async def idle_bursts() -> None:
        while time.monotonic() + IDLE_EVERY_S < until:
            await asyncio.sleep(IDLE_EVERY_S)
            for took, data in await asyncio.gather(*(closed_after(port, trickle=False) for _ in range(IDLE_BURST))):
                tally["idle"] += 1
                closes.append(took)
                assert data == b"", data[:200]

    await asyncio.gather(idle_bursts(), *(trickler() for _ in range(TRICKLERS)))


def run_load(
    live: LiveServer, seconds: float, seed: int, rss: list[float] | None = None
) -> tuple[Counter[str], list[float], list[float]]:
    tally: Counter[str] = Counter()
    health: list[float] = []
    closes: list[float] = []
    rss = [] if rss is None else rss

    async def main() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(
            probe_health(live.base_url, until, health),
            slow_sockets(live.port, until, tally, closes),
            sample_rss(until, max(5.0, seconds / 10), rss),
            *(client_loop(live.base_url, seed * 1000 + i, until, tally) for i in range(CLIENTS)),
        )

    asyncio.run(main())
    return tally, health, closes


def fill_grammar_caches(live: LiveServer, seed: int, concurrency: int = 4) -> None:
    """Fresh grammars within the bounds, from `concurrency` clients at once, until the server's cache of compiled
    grammars is full and its probe has started its workers: the baseline then holds what the load fills."""
    rng = random.Random(seed)
    bodies = [grammar_request(rng, within=True) for _ in range(live.text_model.grammars.cache_size + 32)]

    async def client(mine: list[tuple[str, dict[str, Any]]]) -> None:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=60.0) as c:
            for path, body in mine:
                r = await c.post(path, json=body)
                assert r.status_code == 200, r.text

    async def main() -> None:
        await asyncio.gather(*(client(bodies[i::concurrency]) for i in range(concurrency)))

    asyncio.run(main())


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
    warm, _, _ = run_load(live, WARMUP_SECONDS, seed=1)
    fill_grammar_caches(live, seed=3)
    rss0, fds0 = settle(engine, proc)
    series0 = metric_series(live.base_url)
    children0 = len(proc.children(recursive=True))  # the grammar probe workers

    t0 = time.monotonic()
    rss_trace: list[float] = []
    tally, health, closes = run_load(live, SOAK_SECONDS, seed=2, rss=rss_trace)
    took = time.monotonic() - t0
    rss1, fds1 = settle(engine, proc)
    series1 = metric_series(live.base_url)
    children1 = len(proc.children(recursive=True))

    sockets = ("trickle", "idle")
    requests = sum(n for k, n in tally.items() if not k.startswith("status_") and k not in sockets)
    report = {
        "soak_seconds": round(took, 1),
        "requests": requests,
        "requests_per_s": round(requests / took, 1),
        "warmup_requests": sum(warm.values()),
        "mix": dict(tally),
        "rss_after_warmup_mib": round(rss0 / 2**20, 1),
        "rss_end_mib": round(rss1 / 2**20, 1),
        "rss_change_pct": round(100 * (rss1 - rss0) / rss0, 2),
        "rss_under_load_mib": rss_trace,
        "fds_after_warmup": fds0,
        "fds_end": fds1,
        "child_processes": [children0, children1],
        "slow_sockets": {k: tally[k] for k in sockets},
        "slow_socket_closed_s_max": round(max(closes), 2),
        "metric_series": [len(series0), len(series1)],
        "responses_5xx": sum(n for k, n in tally.items() if k.startswith("status_5")),
        "engine_errors": engine_errors(live.base_url),
        "health_probes": len(health),
        "health_p50_ms": round(1e3 * statistics.median(health), 2),
        "health_p99_ms": round(1e3 * statistics.quantiles(health, n=100)[98], 2),
        "health_max_ms": round(1e3 * max(health), 2),
    }
    print("\nsoak: " + json.dumps(report, ensure_ascii=False))
    kinds = ("cmpl", "chat", "stream", "disconnect", "hostile", "grammar_ok", "grammar_over", "trickle")
    assert requests > 0 and all(tally[k] > 0 for k in kinds), report
    assert max(closes) <= HEADER_TIMEOUT_S + CLOSE_SLACK_S, report
    # probe workers replaced when one dies, never piling up (a pool not yet full after warm-up may still grow to it)
    workers = live.app.state.server.settings.grammar_probe_workers
    assert children1 == children0 or children0 < children1 <= workers, report
    assert report["responses_5xx"] == 0 and report["engine_errors"] == 0
    assert rss1 <= rss0 * (1 + TOLERANCE), report
    assert abs(fds1 - fds0) <= max(1, TOLERANCE * fds0), report
    assert series1 == series0, sorted(series1 ^ series0)  # no per-request label: series do not grow
    sched = engine.scheduler
    assert sched.block_pool.num_used == 0 and not sched.has_work and not engine.core._inbox and not engine.core._aborts
    assert len(sched._seqs) == 0  # nothing finished is kept
    assert engine.is_alive
    assert TINY_MODEL_NAME in httpx.get(f"{live.base_url}/v1/models", timeout=30).text
