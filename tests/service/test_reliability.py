"""Reliability over real uvicorn on 127.0.0.1 with tiny random LMs and the real SmolLM2 tokenizer.

- Load: 200 requests at concurrency 32, 20% of clients disconnecting at random points: no 5xx,
  every other response equals the reference generate(), no KV block held at the end.
- Overload: with R running and N waiting, the next request gets 503 + Retry-After in the OpenAI error
  shape at once (it never reaches the engine, and what runs or waits is untouched), counted in
  `aigc_requests_rejected_total`; a request that could never fit (prompts x n) is a 400 instead.
- Timeouts: the per-request `timeout` field, the server's cap on it, the queue-wait timeout; streams
  end with an error event and the request's KV blocks are freed.
- Failures: an exception in one request's sampling or detokenizing ends that request only; a failed
  model step ends the requests in it; a dead engine loop turns /ready to 503 and ends in-flight
  streams with an error event; stopping the engine never leaves a request hanging.
- Validation (text and image routes): limits give 400 naming the field and the limit, unknown
  fields are ignored, wrong types give 400 naming the field, bodies over max_body_bytes give 413 (declared or chunked).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import service.engine.output_processor as output_processor
import service.engine.runner as runner_module
from model_core.gan import GANConfig, Generator, save_gan
from model_core.generate import generate
from model_core.lm import CausalLM
from model_core.sampling import SamplingParams
from model_core.stopping import OutputStream
from model_core.tokenizer import Tokenizer
from service.api.images import MAX_FRAMES, MAX_SIZE, MIN_SIZE
from service.api.images import MAX_N as IMAGE_MAX_N
from service.api.schemas import MAX_LOGIT_BIAS, MAX_N, MAX_STOP, MAX_TOP_LOGPROBS
from service.engine.engine import LLMEngine
from service.engine.errors import ErrorKind
from tests.service.http_checks import ERROR_KEYS, assert_error, sse_events
from tests.service.server_utils import TINY_MODEL_NAME, LiveServer, serve_model, text_model
from tests.utils import tiny_llama

MODEL = TINY_MODEL_NAME
LONG_CONTEXT = 1024


# ------------------------------------------------------------------------------------------ helpers
def metric(live: LiveServer, name: str, **labels: str) -> float:
    """The value of one sample in /metrics (0 when absent)."""
    text = httpx.get(f"{live.base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def wait_idle(engine: LLMEngine, timeout_s: float = 10.0) -> None:
    """The engine holds no request and no KV block (within timeout_s)."""
    sched = engine.scheduler
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (sched.has_work or engine.num_pending() or sched.block_pool.num_used):
        time.sleep(0.01)
    assert sched.num_running == 0 and engine.num_pending() == 0
    assert sched.block_pool.num_used == 0 and sched.kv_usage == 0.0
    assert not sched._seqs  # no finished sequence is kept


def wait_for(cond: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@dataclass(frozen=True)
class Ref:
    text: str
    finish: str
    tokens: int


def reference(model: CausalLM, tok: Tokenizer, ids: list[int], max_tokens: int) -> Ref:
    steps = list(
        generate(
            model,
            ids,
            SamplingParams(max_tokens=max_tokens, temperature=0.0),
            tokenizer=tok,
            eos_token_ids=tok.eos_token_ids,
        )
    )
    return Ref("".join(s.text for s in steps), steps[-1].finish_reason or "", len(steps))


def chat_ids(tok: Tokenizer, content: str) -> list[int]:
    return tok.encode(
        tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True),
        add_special_tokens=False,
    )


@pytest.fixture(scope="module")
def long_model() -> CausalLM:
    """A context long enough for a request to outlive the test's patience (ended by abort or timeout)."""
    return tiny_llama(max_seq_len=LONG_CONTEXT)


def long_stream_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": "Tell me everything:",
        "max_tokens": LONG_CONTEXT - 64,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        **extra,
    }


# --------------------------------------------------------------------------------------------- load
LOAD_REQUESTS, LOAD_CONCURRENCY, DISCONNECT_SHARE = 200, 32, 0.2
PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "1, 2, 3,",
    "def add(a, b):",
    "Dear diary, today",
    "In the beginning",
    "Roses are red,",
    "The weather is",
    "Q: why is the sky blue?\nA:",
    "naïve café 東京",
]


@dataclass(frozen=True)
class Job:
    path: str
    prompt: str
    max_tokens: int
    stream: bool
    disconnect_after: int | None  # None: read to the end; k: close after k events (stream) / k ms (not)


@pytest.mark.timeout(240)
def test_load_with_random_disconnects_loses_nothing_and_frees_every_block(
    tiny_model: CausalLM, smol_tokenizer: Tokenizer
) -> None:
    rng = random.Random(1234)
    disconnecting = set(rng.sample(range(LOAD_REQUESTS), round(DISCONNECT_SHARE * LOAD_REQUESTS)))
    jobs = []
    for i in range(LOAD_REQUESTS):
        disconnect = i in disconnecting
        stream = rng.random() < 0.5
        jobs.append(
            Job(
                path=rng.choice(["/v1/completions", "/v1/chat/completions"]),
                prompt=PROMPTS[i % len(PROMPTS)],
                max_tokens=rng.randint(1, 20) if not disconnect else 200,
                stream=stream,
                disconnect_after=(rng.randint(0, 6) if stream else rng.randint(0, 150)) if disconnect else None,
            )
        )
    refs: dict[tuple[str, str, int], Ref] = {}
    for j in jobs:
        key = (j.path, j.prompt, j.max_tokens)
        if j.disconnect_after is None and key not in refs:
            ids = smol_tokenizer.encode(j.prompt) if j.path == "/v1/completions" else chat_ids(smol_tokenizer, j.prompt)
            refs[key] = reference(tiny_model, smol_tokenizer, ids, j.max_tokens)

    tm = text_model(tiny_model, smol_tokenizer, max_num_seqs=32)
    statuses: list[int] = []
    mismatches: list[str] = []
    completed = disconnected = 0

    def body(j: Job) -> dict[str, Any]:
        b: dict[str, Any] = {"model": MODEL, "max_tokens": j.max_tokens, "temperature": 0, "stream": j.stream}
        if j.disconnect_after is not None:
            b["ignore_eos"] = True
        if j.path == "/v1/completions":
            b["prompt"] = j.prompt
        else:
            b["messages"] = [{"role": "user", "content": j.prompt}]
        return b

    def check(j: Job, text: str, finish: str | None, tokens: int | None) -> None:
        ref = refs[(j.path, j.prompt, j.max_tokens)]
        if text != ref.text or finish != ref.finish or (tokens is not None and tokens != ref.tokens):
            mismatches.append(f"{j}: got {(text, finish, tokens)}, want {ref}")

    async def one(client: httpx.AsyncClient, j: Job) -> None:
        nonlocal completed, disconnected
        if j.disconnect_after is not None and not j.stream:
            try:  # the client gives up after a random delay: the connection closes mid-request
                r = await asyncio.wait_for(client.post(j.path, json=body(j)), j.disconnect_after / 1000)
                statuses.append(r.status_code)
            except TimeoutError:
                pass
            disconnected += 1
            return
        if j.stream:
            async with client.stream("POST", j.path, json=body(j)) as r:
                statuses.append(r.status_code)
                if r.status_code != 200:
                    await r.aread()
                    return
                lines: list[str] = []
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        lines.append(line[len("data: ") :])
                        if j.disconnect_after is not None and len(lines) >= j.disconnect_after:
                            break  # leaving the block closes the connection mid-stream
            if j.disconnect_after is not None:
                disconnected += 1
                return
            assert lines[-1] == "[DONE]", lines[-3:]
            events = [json.loads(x) for x in lines[:-1]]
            assert not any("error" in e for e in events), events
            if j.path == "/v1/completions":
                text = "".join(e["choices"][0]["text"] for e in events)
                finish = events[-1]["choices"][0]["finish_reason"]
            else:
                text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
                finish = events[-1]["choices"][0]["finish_reason"]
            check(j, text, finish, None)
        else:
            r = await client.post(j.path, json=body(j))
            statuses.append(r.status_code)
            if r.status_code != 200:
                return
            c = r.json()["choices"][0]
            check(
                j,
                c["text"] if "text" in c else c["message"]["content"],
                c["finish_reason"],
                r.json()["usage"]["completion_tokens"],
            )
        completed += 1

    async def main(base_url: str) -> None:
        sem = asyncio.Semaphore(LOAD_CONCURRENCY)
        limits = httpx.Limits(max_connections=LOAD_CONCURRENCY, max_keepalive_connections=LOAD_CONCURRENCY)
        async with httpx.AsyncClient(base_url=base_url, timeout=60.0, limits=limits) as client:

            async def guarded(j: Job) -> None:
                async with sem:
                    await one(client, j)

            await asyncio.gather(*(guarded(j) for j in jobs))

    with serve_model(tm) as live:
        t0 = time.monotonic()
        asyncio.run(main(live.base_url))
        elapsed = time.monotonic() - t0
        wait_idle(tm.engine)
        aborted = metric(live, "aigc_request_success_total", finish_reason="abort")
        assert httpx.get(f"{live.base_url}/ready").status_code == 200
    n_disc = sum(j.disconnect_after is not None for j in jobs)
    print(
        f"\nload: {LOAD_REQUESTS} requests, concurrency {LOAD_CONCURRENCY}, {n_disc} disconnecting, "
        f"{completed} completed, {aborted:.0f} aborted in the engine, {elapsed:.1f}s, statuses "
        f"{sorted(set(statuses))}, KV blocks in use at the end {tm.engine.scheduler.block_pool.num_used}"
    )
    assert not [s for s in statuses if s >= 500], statuses
    assert all(s == 200 for s in statuses), sorted(set(statuses))
    assert completed == LOAD_REQUESTS - n_disc and disconnected == n_disc
    assert not mismatches, mismatches[:3]
    assert aborted >= 1  # the disconnects really reached the engine
    assert tm.engine.stats.max_decode_batch > 8, "the load did not batch"


# ----------------------------------------------------------------------------------------- overload
def rejected(live: LiveServer, endpoint: str, reason: str) -> float:
    return metric(live, "aigc_requests_rejected_total", endpoint=endpoint, reason=reason)


@pytest.mark.timeout(120)
def test_overload_gets_503_with_retry_after_at_once_and_is_counted(
    long_model: CausalLM, smol_tokenizer: Tokenizer
) -> None:
    running, queue = 2, 3
    tm = text_model(long_model, smol_tokenizer, max_num_seqs=running, max_waiting=queue)
    engine = tm.engine
    with serve_model(tm) as live, httpx.Client(base_url=live.base_url, timeout=30.0) as c:
        streams = []
        try:
            for _ in range(running + queue):  # fill every running slot and the whole queue
                s = c.stream("POST", "/v1/completions", json=long_stream_body())
                r = s.__enter__()
                streams.append(s)
                assert r.status_code == 200
            wait_for(
                lambda: engine.scheduler.num_running == running and engine.num_pending() == queue, what="a full engine"
            )
            before = rejected(live, "completions", "queue_full")
            # refused at once, not after waiting on the busy engine: a refused request never reaches
            # engine.generate (admission says no before it is queued), and nothing running or queued ends
            entered: list[str | None] = []
            real_generate = engine.generate

            def spy(*args: Any, **kwargs: Any) -> Any:
                entered.append(kwargs.get("request_id", args[2] if len(args) > 2 else None))
                return real_generate(*args, **kwargs)

            engine.generate = spy  # type: ignore[method-assign]
            try:
                for _ in range(7):  # request number N + running + 1, several times
                    r = c.post("/v1/completions", json={"model": MODEL, "prompt": "one more", "max_tokens": 4})
                    err = assert_error(r, 503, code="queue_full")
                    assert err["type"] == "service_unavailable" and str(queue) in err["message"]
                    assert r.headers["retry-after"] == "1"
                    assert engine.scheduler.num_running == running and engine.num_pending() == queue
                    assert c.get("/health").status_code == 200
                r = c.post(
                    "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True}
                )
                assert_error(r, 503, code="queue_full")  # a stream is refused before it starts: plain JSON
                assert r.headers["retry-after"] == "1"
                r = c.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2})
                assert_error(r, 503, code="queue_full")
            finally:
                del engine.generate
            assert entered == []
            assert rejected(live, "completions", "queue_full") == before + 8
            assert rejected(live, "chat", "queue_full") == 1
            assert engine.scheduler.num_running == running and engine.num_pending() == queue  # nothing was lost
        finally:
            for s in streams:
                s.__exit__(None, None, None)
        wait_idle(engine)
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "room again", "max_tokens": 3})
        assert r.status_code == 200, r.text


def test_a_request_that_can_never_fit_is_400_not_503(tiny_model: CausalLM, smol_tokenizer: Tokenizer) -> None:
    """More sequences in one request (prompts x n) than the server ever runs at once: retrying is futile."""
    tm = text_model(tiny_model, smol_tokenizer, max_num_seqs=2, max_waiting=3)
    with serve_model(tm) as live, httpx.Client(base_url=live.base_url, timeout=30.0) as c:
        r = c.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2})
        err = assert_error(r, 400, param="n")
        assert "5" in err["message"] and "6" in err["message"]
        assert "retry-after" not in r.headers
        r = c.post("/v1/completions", json={"prompt": ["a", "b", "c", "d", "e"], "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and len(r.json()["choices"]) == 5


# ----------------------------------------------------------------------------------------- timeouts
def read_stream(c: httpx.Client, path: str, body: dict[str, Any]) -> tuple[list[Any], float]:
    t0 = time.monotonic()
    r = c.post(path, json=body)
    assert r.status_code == 200, r.text
    return sse_events(r.content), time.monotonic() - t0


def stream_error(events: list[Any]) -> dict[str, Any]:
    """The one error event of a stream: the last event but for an optional usage chunk."""
    errors = [(i, e["error"]) for i, e in enumerate(events) if "error" in e]
    assert len(errors) == 1, events[-3:]
    i, err = errors[0]
    assert all(e["choices"] == [] and "usage" in e for e in events[i + 1 :]), events[i:]
    assert set(err) == ERROR_KEYS
    return err


@pytest.mark.timeout(120)
def test_per_request_timeout_ends_streams_with_an_error_and_frees_blocks(
    long_model: CausalLM, smol_tokenizer: Tokenizer
) -> None:
    tm = text_model(long_model, smol_tokenizer, request_timeout_s=600.0)
    with serve_model(tm) as live, httpx.Client(base_url=live.base_url, timeout=30.0) as c:
        events, took = read_stream(c, "/v1/completions", long_stream_body(timeout=0.4))
        err = stream_error(events)
        assert err["code"] == "timeout" and err["type"] == "timeout_error" and "0.4" in err["message"]
        assert any(e.get("choices") and e["choices"][0]["text"] for e in events), "it ran before it timed out"
        assert took < 10.0
        wait_idle(tm.engine)

        events, _ = read_stream(
            c,
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "go on"}],
                "max_tokens": LONG_CONTEXT - 64,
                "ignore_eos": True,
                "stream": True,
                "timeout": 0.3,
                "stream_options": {"include_usage": True},
            },
        )
        assert stream_error(events)["code"] == "timeout"
        wait_idle(tm.engine)

        body = long_stream_body(timeout=0.3, stream=False, n=2)
        err = assert_error(c.post("/v1/completions", json=body), 504, code="timeout")
        assert err["type"] == "timeout_error"
        wait_idle(tm.engine)
        r = c.post("/v1/completions", json={"prompt": "quick", "max_tokens": 3, "timeout": 30})
        assert r.status_code == 200, r.text


@pytest.mark.timeout(120)
def test_server_timeout_caps_the_per_request_timeout(long_model: CausalLM, smol_tokenizer: Tokenizer) -> None:
    tm = text_model(long_model, smol_tokenizer, request_timeout_s=0.5)
    with serve_model(tm) as live, httpx.Client(base_url=live.base_url, timeout=30.0) as c:
        for asked in (None, 1000.0):  # no timeout, and one above the server's: the server's 0.5 s applies
            events, _ = read_stream(c, "/v1/completions", long_stream_body(**({"timeout": asked} if asked else {})))
            err = stream_error(events)
            assert err["code"] == "timeout" and "0.5" in err["message"]
            wait_idle(tm.engine)
        events, _ = read_stream(c, "/v1/completions", long_stream_body(timeout=0.2))  # a shorter one is kept
        assert "0.2" in stream_error(events)["message"]
        wait_idle(tm.engine)


@pytest.mark.timeout(120)
def test_queue_wait_timeout(long_model: CausalLM, smol_tokenizer: Tokenizer) -> None:
    tm = text_model(long_model, smol_tokenizer, max_num_seqs=1, queue_timeout_s=0.4)
    engine = tm.engine
    with serve_model(tm) as live, httpx.Client(base_url=live.base_url, timeout=30.0) as c:
        with c.stream("POST", "/v1/completions", json=long_stream_body()) as hog:  # takes the only slot
            assert hog.status_code == 200
            wait_for(lambda: engine.scheduler.num_running == 1, what="the first request to run")
            t0 = time.monotonic()
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": "waiting", "max_tokens": 4})
            took = time.monotonic() - t0
            err = assert_error(r, 503, code="queue_timeout")
            assert err["type"] == "service_unavailable" and "0.4" in err["message"]
            assert 0.3 < took < 10.0
            events, _ = read_stream(
                c,
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "waiting"}], "max_tokens": 4, "stream": True},
            )
            assert stream_error(events)["code"] == "queue_timeout"
            assert engine.scheduler.num_running == 1  # the running one is not affected
        wait_idle(engine)


# ----------------------------------------------------------------------------------------- failures
POISON_SEED = 666


@pytest.fixture(scope="module")
def server(tiny_model: CausalLM, smol_tokenizer: Tokenizer) -> Iterator[LiveServer]:
    with serve_model(text_model(tiny_model, smol_tokenizer), max_body_bytes=64 * 1024) as live:
        yield live


def greedy_jobs(tiny_model: CausalLM, tok: Tokenizer) -> list[tuple[str, Ref]]:
    return [(p, reference(tiny_model, tok, tok.encode(p), 12)) for p in PROMPTS[:4]]


def run_concurrently(base_url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:
            return list(await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies)))

    return asyncio.run(main())


def test_failing_sampling_ends_only_that_request(
    server: LiveServer, tiny_model: CausalLM, smol_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_sample = runner_module.sample
    calls = {"poisoned": 0}

    def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
        if any(p.seed == POISON_SEED for p in params):
            calls["poisoned"] += 1
            raise RuntimeError("injected sampling failure")
        return real_sample(logits, params, generators)

    monkeypatch.setattr(runner_module, "sample", sample)
    refs = greedy_jobs(tiny_model, smol_tokenizer)
    bodies = [{"prompt": p, "max_tokens": 12, "temperature": 0} for p, _ in refs]
    bodies.insert(2, {"prompt": "poisoned", "max_tokens": 12, "temperature": 0, "seed": POISON_SEED})
    for stream in (False, True):
        rs = run_concurrently(server.base_url, [{**b, "stream": stream} for b in bodies])
        poisoned = rs.pop(2)
        if stream:
            assert poisoned.status_code == 200
            err = stream_error(sse_events(poisoned.content))
        else:
            err = assert_error(poisoned, 500)
        assert err["code"] == "internal_error" and "sampling failed" in err["message"]
        assert "Traceback" not in poisoned.text
        for r, (_, ref) in zip(rs, refs, strict=True):
            assert r.status_code == 200, r.text
            if stream:
                events = sse_events(r.content)
                assert "".join(e["choices"][0]["text"] for e in events) == ref.text
            else:
                assert r.json()["choices"][0]["text"] == ref.text
                assert r.json()["usage"]["completion_tokens"] == ref.tokens
    assert calls["poisoned"] >= 2
    wait_idle(server.text_model.engine)
    assert server.text_model.engine.is_alive


def test_failing_detokenizer_ends_only_that_request(
    server: LiveServer, tiny_model: CausalLM, smol_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = "\u0000poison"

    class PoisonedStream(OutputStream):
        def step(self, token_id: int) -> tuple[str, str | None]:
            if marker in self.matcher.stops and self.num_tokens >= 2:
                raise UnicodeError("injected detokenizer failure")
            return super().step(token_id)

    monkeypatch.setattr(output_processor, "OutputStream", PoisonedStream)
    refs = greedy_jobs(tiny_model, smol_tokenizer)
    bodies = [{"prompt": p, "max_tokens": 12, "temperature": 0} for p, _ in refs]
    bodies.append({"prompt": "poisoned", "max_tokens": 12, "temperature": 0, "stop": [marker]})
    for stream in (False, True):
        rs = run_concurrently(server.base_url, [{**b, "stream": stream} for b in bodies])
        poisoned = rs.pop()
        if stream:
            events = sse_events(poisoned.content)
            assert len([e for e in events if "choices" in e]) <= 2  # at most two tokens went out before it
            err = stream_error(events)
        else:
            err = assert_error(poisoned, 500)
        assert err["code"] == "internal_error" and "detokenization failed" in err["message"]
        for r, (_, ref) in zip(rs, refs, strict=True):
            assert r.status_code == 200
            text = (
                "".join(e["choices"][0]["text"] for e in sse_events(r.content))
                if stream
                else r.json()["choices"][0]["text"]
            )
            assert text == ref.text
    wait_idle(server.text_model.engine)


def test_a_failed_model_step_ends_its_requests_not_the_loop(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = server.text_model.engine
    real_execute = engine.runner.execute
    failures = {"left": 1}

    def execute(out: Any) -> Any:
        if failures["left"] and out.decodes:
            failures["left"] -= 1
            raise RuntimeError("injected forward failure")
        return real_execute(out)

    monkeypatch.setattr(engine.runner, "execute", execute)
    r = httpx.post(
        f"{server.base_url}/v1/completions", json={"prompt": "x", "max_tokens": 8, "ignore_eos": True}, timeout=30
    )
    err = assert_error(r, 500, code="internal_error")
    assert "model step failed" in err["message"] and "Traceback" not in r.text
    assert failures["left"] == 0 and engine.is_alive
    wait_idle(engine)
    r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x", "max_tokens": 8}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.timeout(120)
def test_dead_engine_loop_fails_streams_and_turns_ready_503(long_model: CausalLM, smol_tokenizer: Tokenizer) -> None:
    tm = text_model(long_model, smol_tokenizer)
    engine = tm.engine
    with serve_model(tm) as live, httpx.Client(base_url=live.base_url, timeout=httpx.Timeout(30.0)) as c:
        assert c.get("/ready").status_code == 200
        outcome: dict[str, Any] = {}

        def non_streamed() -> None:
            outcome["r"] = httpx.post(
                f"{live.base_url}/v1/completions", json=long_stream_body(stream=False), timeout=30.0
            )

        t = threading.Thread(target=non_streamed)
        with c.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "talk"}],
                "max_tokens": LONG_CONTEXT - 64,
                "ignore_eos": True,
                "stream": True,
            },
        ) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(4):
                next(x for x in lines if x.startswith("data: "))
            t.start()
            wait_for(lambda: engine.scheduler.num_running == 2, what="both requests to run")

            def broken_schedule(*args: Any) -> Any:
                raise RuntimeError("injected scheduler corruption")

            engine.scheduler.schedule = broken_schedule  # type: ignore[method-assign]
            t0 = time.monotonic()
            rest = [x[len("data: ") :] for x in lines if x.startswith("data: ")]  # ends: no hang
            took = time.monotonic() - t0
        assert rest[-1] == "[DONE]"
        err = json.loads(rest[-2])["error"]
        assert err["code"] == "engine_dead" and err["type"] == "service_unavailable"
        assert "injected scheduler corruption" in err["message"] and "Traceback" not in err["message"]
        assert took < 10.0
        t.join(30.0)
        assert_error(outcome["r"], 503, code="engine_dead")

        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        assert any("engine" in reason for reason in r.json()["reasons"])
        assert c.get("/health").status_code == 200  # liveness is not readiness
        before = rejected(live, "completions", "engine_dead")
        r = c.post("/v1/completions", json={"prompt": "anyone?", "max_tokens": 2})
        assert_error(r, 503, code="engine_dead")
        assert r.headers["retry-after"] == "1"
        assert rejected(live, "completions", "engine_dead") == before + 1


def test_stopping_the_engine_ends_in_flight_requests(tiny_model: CausalLM, smol_tokenizer: Tokenizer) -> None:
    """Shutdown (or any exit of the loop) ends every request with an error event, never a hang."""
    tm = text_model(tiny_model, smol_tokenizer, max_num_seqs=1)
    engine = tm.engine
    engine.start()

    async def main() -> list[list[Any]]:
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

        async def run(rid: str) -> list[Any]:
            return [ev async for ev in engine.generate([5, 6, 7], params, rid)]

        tasks = [asyncio.create_task(run(f"r{i}")) for i in range(3)]  # one runs, two wait
        while engine.scheduler.num_running == 0:
            await asyncio.sleep(0.005)
        await asyncio.to_thread(engine.stop)
        return await asyncio.wait_for(asyncio.gather(*tasks), 10.0)

    results = asyncio.run(main())
    for events in results:
        err = events[-1].error
        assert events[-1].finish_reason == "error" and err is not None and err.kind is ErrorKind.ENGINE_DEAD
        assert len(events) < 200
    assert not engine.is_alive


# --------------------------------------------------------------------------------------- validation
def test_limits_are_400_naming_the_field_and_the_limit(server: LiveServer) -> None:
    url = f"{server.base_url}/v1/completions"
    chat = f"{server.base_url}/v1/chat/completions"
    ctx = server.text_model.max_model_len
    msgs = [{"role": "user", "content": "hi"}]
    cases: list[tuple[str, dict[str, Any], str, str]] = [
        (url, {"prompt": "x", "n": MAX_N + 1}, "n", str(MAX_N)),
        (url, {"prompt": "x", "n": 0}, "n", "1"),
        (url, {"prompt": "x", "stop": ["s"] * (MAX_STOP + 1)}, "stop", str(MAX_STOP)),
        (url, {"prompt": "x", "stop_token_ids": [1] * (MAX_STOP + 1)}, "stop_token_ids", str(MAX_STOP)),
        (
            url,
            {"prompt": "x", "logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}},
            "logit_bias",
            str(MAX_LOGIT_BIAS),
        ),
        (url, {"prompt": "x", "logit_bias": {"5": 500}}, "logit_bias", "100"),
        (url, {"prompt": "x", "max_tokens": ctx}, "max_tokens", str(ctx)),
        (url, {"prompt": "x", "max_tokens": 0}, "max_tokens", "1"),
        (url, {"prompt": "hello " * ctx, "max_tokens": 1}, "prompt", str(ctx)),
        (url, {"prompt": list(range(1, ctx + 2))}, "prompt", str(ctx)),
        (url, {"prompt": "x", "logprobs": MAX_TOP_LOGPROBS + 1}, "logprobs", str(MAX_TOP_LOGPROBS)),
        (url, {"prompt": "x", "temperature": 2.5}, "temperature", "2.0"),
        (url, {"prompt": "x", "timeout": -1}, "timeout", "0"),
        (url, {"prompt": "x", "min_tokens": 50, "max_tokens": 5}, "min_tokens", "5"),
        (chat, {"messages": [{"role": "user", "content": "hello " * ctx}]}, "prompt", str(ctx)),
        (chat, {"messages": msgs, "max_completion_tokens": ctx}, "max_tokens", str(ctx)),
        (chat, {"messages": msgs, "n": MAX_N + 1, "stream": True}, "n", str(MAX_N)),
        (
            chat,
            {"messages": msgs, "logprobs": True, "top_logprobs": MAX_TOP_LOGPROBS + 1},
            "top_logprobs",
            str(MAX_TOP_LOGPROBS),
        ),
    ]
    for target, body, param, limit in cases:
        r = httpx.post(target, json=body, timeout=30)
        err = assert_error(r, 400, param=param)
        assert param in err["message"] or param == "prompt", (body, err)
        assert limit in err["message"], (body, err)
        assert err["type"] == "invalid_request_error"
    wait_idle(server.text_model.engine)


def test_unknown_fields_are_ignored(server: LiveServer) -> None:
    base = {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
    plain = httpx.post(f"{server.base_url}/v1/completions", json=base, timeout=30)
    extra = httpx.post(
        f"{server.base_url}/v1/completions",
        timeout=30,
        json={**base, "frobnicate": True, "best_of_luck": [1, 2], "nested": {"a": {"b": None}}, "service_tier": "auto"},
    )
    assert plain.status_code == extra.status_code == 200
    assert extra.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        timeout=30,
        json={
            "messages": [{"role": "user", "content": "hi", "unknown_part": 1}],
            "max_tokens": 2,
            "parallel_tool_calls": 1,
        },
    )
    assert r.status_code == 200, r.text
    r = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "hi", "what": "ever"}, timeout=30)
    assert r.status_code == 200


def test_wrong_types_are_400_naming_the_field(server: LiveServer) -> None:
    url = f"{server.base_url}/v1/completions"
    chat = f"{server.base_url}/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    cases: list[tuple[str, Any, str]] = [
        (url, {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        (url, {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        (url, {"prompt": "x", "n": [2]}, "n"),
        (url, {"prompt": "x", "temperature": "hot"}, "temperature"),
        (url, {"prompt": "x", "stop": 5}, "stop"),
        (url, {"prompt": "x", "logit_bias": ["a"]}, "logit_bias"),
        (url, {"prompt": "x", "stream": {"yes": 1}}, "stream"),
        (url, {"prompt": {"text": "x"}}, "prompt"),
        (url, {"prompt": "x", "timeout": "soon"}, "timeout"),
        (chat, {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (chat, {"messages": msgs, "stream_options": "yes"}, "stream_options"),
        (url, ["not", "an", "object"], ""),
    ]
    for target, body, param in cases:
        r = httpx.post(target, json=body, timeout=30)
        err = assert_error(r, 400, code="invalid_value")
        assert err["type"] == "invalid_request_error" and (err["param"] or "") == param, (body, err)
        if param:
            assert param in err["message"]


def test_image_limits_are_400_naming_the_field_and_the_limit(
    tiny_model: CausalLM, smol_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    gan_dir = save_gan(
        Generator(GANConfig(z_dim=8, embed_dim=4, g_width=4, d_width=4, image_size=32)).eval(), tmp_path / "gan"
    )
    with (
        serve_model(text_model(tiny_model, smol_tokenizer), enable_gan=True, gan_path=str(gan_dir)) as live,
        httpx.Client(base_url=live.base_url, timeout=30.0) as c,
    ):
        url = "/v1/images/generations"
        cases: list[tuple[dict[str, Any], str, str]] = [
            ({"prompt": "7", "n": IMAGE_MAX_N + 1}, "n", str(IMAGE_MAX_N)),
            ({"prompt": "7", "n": 0}, "n", "1"),
            ({"prompt": "7", "size": f"{2 * MAX_SIZE}x{2 * MAX_SIZE}"}, "size", str(MAX_SIZE)),
            ({"prompt": "7", "size": f"{MIN_SIZE // 2}x{MIN_SIZE // 2}"}, "size", str(MIN_SIZE)),
            ({"prompt": "7", "size": "64x32"}, "size", str(MAX_SIZE)),
            (
                {"prompt": "7", "interpolate": {"seeds": [1, 2], "steps": MAX_FRAMES + 1}},
                "interpolate.steps",
                str(MAX_FRAMES),
            ),
        ]
        for body, param, limit in cases:
            err = assert_error(c.post(url, json=body), 400, param=param)
            assert param in err["message"] and limit in err["message"], (body, err)
        assert_error(c.post(url, json={"prompt": "7", "n": "many"}), 400, param="n")
        r = c.post(url, json={"prompt": "7", "n": IMAGE_MAX_N, "size": f"{MAX_SIZE}x{MAX_SIZE}", "style": "ignored"})
        assert r.status_code == 200 and len(r.json()["data"]) == IMAGE_MAX_N


def test_body_over_the_limit_is_413(server: LiveServer) -> None:
    limit = 64 * 1024
    big = {"prompt": "x" * (limit + 10), "max_tokens": 1}
    r = httpx.post(f"{server.base_url}/v1/completions", json=big, timeout=30)  # declared Content-Length
    err = assert_error(r, 413, code="body_too_large")
    assert str(limit) in err["message"]
    payload = json.dumps(big).encode()

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer, counted as it arrives
        for i in range(0, len(payload), 8192):
            yield payload[i : i + 8192]

    r = httpx.post(
        f"{server.base_url}/v1/completions", content=chunks(), timeout=30, headers={"content-type": "application/json"}
    )
    assert "content-length" not in r.request.headers
    err = assert_error(r, 413, code="body_too_large")
    assert str(limit) in err["message"]
    r = httpx.post(
        f"{server.base_url}/v1/completions", json={"prompt": "x" * (limit // 2), "max_tokens": 1}, timeout=30
    )
    assert r.status_code != 413  # under the limit it is parsed (and may fail on the context length)
    wait_idle(server.text_model.engine)
