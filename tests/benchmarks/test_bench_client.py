"""The benchmark client: SSE parsing, vLLM metric definitions, bounded runs, against a fake streaming server.

The fake OpenAI-compatible server emits chunks with known delays, so TTFT/ITL/TPOT can be checked
against what it did; timing checks are lower bounds plus generous sanity upper bounds only.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from benchmarks import run as bench_run
from benchmarks.grounded import code_file, passage
from benchmarks.prompts import PROMPT_SETS, make_prompts
from benchmarks.run import (
    count_tokens,
    ctx_per_slot,
    llama_quantize_binary,
    model_file,
    parse_args,
    quantize_gguf,
    roofline_fractions,
    server_facts,
    stop_process,
    targets,
)
from benchmarks.serve import (
    BenchConfig,
    RequestResult,
    SSEDecoder,
    arrival_delays,
    build_payload,
    compute_metrics,
    parse_chunk,
    run_benchmark,
    send_request,
)
from model_core.default_model import find_default_model
from model_core.tokenizer import Tokenizer


def _fake_app() -> FastAPI:
    """Streams `max_tokens` tokens: an empty first chunk at once, content after `fake_ttft`, then every `fake_itl`."""
    app = FastAPI()
    app.state.count = defaultdict(int)
    app.state.inflight = defaultdict(int)
    app.state.max_inflight = defaultdict(int)

    async def handle(request: Request, chat: bool) -> Any:
        body = await request.json()
        tag = body.get("fake_tag", "")
        app.state.count[tag] += 1
        if body.get("fake_status"):
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=int(body["fake_status"]))
        n, per = int(body["max_tokens"]), int(body.get("fake_tokens_per_chunk", 1))
        ttft, itl = float(body.get("fake_ttft", 0.0)), float(body.get("fake_itl", 0.0))

        def chunk(text: str, finish: str | None = None) -> bytes:
            ch = (
                {"index": 0, "delta": {"content": text} if text else {"role": "assistant"}, "finish_reason": finish}
                if chat
                else {"index": 0, "text": text, "finish_reason": finish}
            )
            return f"data: {json.dumps({'choices': [ch]})}\n\n".encode()

        async def events() -> AsyncIterator[bytes]:
            app.state.inflight[tag] += 1
            app.state.max_inflight[tag] = max(app.state.max_inflight[tag], app.state.inflight[tag])
            try:
                yield chunk("")  # a role / empty chunk: must not count as the first token
                yield b": keep-alive comment\n\n"
                await asyncio.sleep(ttft)
                emitted = 0
                while emitted < n:
                    if emitted:
                        await asyncio.sleep(itl)
                    k = min(per, n - emitted)
                    yield chunk("tok " * k)
                    emitted += k
                yield chunk("", "length")
                if body.get("fake_usage", True) and body.get("stream_options", {}).get("include_usage"):
                    yield f"data: {json.dumps({'choices': [], 'usage': {'prompt_tokens': 7, 'completion_tokens': n}})}\n\n".encode()  # noqa: E501
                yield b"data: [DONE]\n\n"
            finally:
                app.state.inflight[tag] -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await handle(request, chat=True)

    return app


class _ThreadServer:
    def __init__(self, app: FastAPI) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> _ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, FastAPI]]:
    app = _fake_app()
    with _ThreadServer(app) as srv:
        yield srv.url, app


def _cfg(url: str, tag: str, **kw: Any) -> BenchConfig:
    extra = {"fake_tag": tag, **kw.pop("extra", {})}
    return BenchConfig(base_url=url, model="fake", prompts=("p1", "p2", "p3"), extra_body=extra, **kw)


# --- SSE and chunk parsing ---------------------------------------------------------------------------------------


def test_sse_decoder_is_independent_of_how_bytes_are_split() -> None:
    stream = (
        'data: {"a": 1}\r\n\r\n: comment\n\nevent: x\ndata: {"b":\ndata: "é€"}\n\nid: 3\ndata:[DONE]\n\n'
    ).encode()
    whole = SSEDecoder().feed(stream)
    assert whole == ['{"a": 1}', '{"b":\n"é€"}', "[DONE]"]
    dec, pieces = SSEDecoder(), []
    for i in range(len(stream)):  # byte by byte, splitting multi-byte UTF-8 characters
        pieces += dec.feed(stream[i : i + 1])
    assert pieces == whole
    assert SSEDecoder().feed(b'data: {"x": 1}\n') == []  # no blank line yet: the event is not complete


def test_parse_chunk_shapes() -> None:
    assert parse_chunk({"choices": [{"index": 0, "text": "hi", "finish_reason": None}]}) == ("hi", None, None)
    assert parse_chunk({"choices": [{"index": 0, "delta": {"content": "yo"}}]}) == ("yo", None, None)
    assert parse_chunk({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}) == ("", None, None)
    # llama-server's last chunk: empty text, a finish reason, timings and usage
    usage = {"prompt_tokens": 3, "completion_tokens": 5}
    assert parse_chunk(
        {"choices": [{"text": "", "finish_reason": "length"}], "usage": usage, "timings": {"predicted_n": 5}}
    ) == ("", usage, None)
    assert parse_chunk({"error": {"message": "boom", "type": "x"}})[2] == "boom"
    assert parse_chunk([1, 2])[2] is not None  # not a JSON object: an error, not a crash


def test_payload_asks_for_equal_work() -> None:
    cfg = BenchConfig(base_url="http://h/", model="m", prompts=("p",), output_len=17, extra_body={"seed": 1})
    body = build_payload(cfg, "hello")
    assert body == {
        "model": "m",
        "prompt": "hello",
        "max_tokens": 17,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "seed": 1,
    }
    chat = build_payload(BenchConfig(base_url="u", model="m", prompts=("p",), endpoint="chat", ignore_eos=False), "q")
    assert chat["messages"] == [{"role": "user", "content": "q"}] and "ignore_eos" not in chat


# --- metric definitions ------------------------------------------------------------------------------------------


def _pct(xs: list[float], q: float) -> float:
    """Linear-interpolation percentile, written out (numpy's default method)."""
    s = sorted(xs)
    r = q / 100 * (len(s) - 1)
    lo = math.floor(r)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (r - lo)


def test_compute_metrics_follows_vllm_definitions() -> None:
    rng = np.random.default_rng(0)
    ok = []
    for i in range(37):
        n = int(rng.integers(1, 40))
        itl = [float(x) for x in rng.uniform(0.01, 0.1, size=max(n - 1, 0))]
        ttft = float(rng.uniform(0.05, 2.0))
        ok.append(
            RequestResult(
                ok=True,
                ttft=ttft,
                itl=itl,
                e2e=ttft + sum(itl) + 0.003,
                output_tokens=n,
                prompt_tokens=10 + i,
                chunks=n,
            )
        )
    bad = [RequestResult(error="HTTP 503"), RequestResult(cancelled=True, error="cancelled")]
    m = compute_metrics(ok + bad, duration_s=12.5)
    assert (m.completed, m.failed, m.cancelled) == (37, 1, 1)
    assert m.total_output_tokens == sum(r.output_tokens for r in ok)
    assert m.output_throughput == pytest.approx(m.total_output_tokens / 12.5)
    assert m.request_throughput == pytest.approx(37 / 12.5)
    assert m.total_token_throughput == pytest.approx((m.total_output_tokens + sum(r.prompt_tokens for r in ok)) / 12.5)
    ttfts = [r.ttft * 1000 for r in ok]
    assert m.mean_ttft_ms == pytest.approx(sum(ttfts) / len(ttfts))
    assert m.median_ttft_ms == pytest.approx(_pct(ttfts, 50))
    assert m.p99_ttft_ms == pytest.approx(_pct(ttfts, 99))
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) * 1000 for r in ok if r.output_tokens > 1]
    assert len(tpots) < len(ok) or all(r.output_tokens > 1 for r in ok)  # single-token requests have no TPOT
    assert m.median_tpot_ms == pytest.approx(_pct(tpots, 50))
    assert m.p99_tpot_ms == pytest.approx(_pct(tpots, 99))
    itls = [g * 1000 for r in ok for g in r.itl]  # pooled over requests, not averaged per request
    assert m.mean_itl_ms == pytest.approx(sum(itls) / len(itls))
    assert m.p99_itl_ms == pytest.approx(_pct(itls, 99))
    assert m.median_e2el_ms == pytest.approx(_pct([r.e2e * 1000 for r in ok], 50))
    assert m.median_tpot_ms is not None and m.decode_tok_s == pytest.approx(1000 / m.median_tpot_ms)


def test_compute_metrics_with_nothing_completed() -> None:
    m = compute_metrics([RequestResult(error="x")], duration_s=1.0)
    assert m.completed == 0 and m.failed == 1 and m.median_ttft_ms is None and m.decode_tok_s is None
    assert m.output_throughput == 0.0


def test_poisson_arrivals() -> None:
    assert arrival_delays(5, math.inf) == [0.0] * 5
    gaps = arrival_delays(4000, 4.0, seed=3)
    assert gaps == arrival_delays(4000, 4.0, seed=3) and gaps != arrival_delays(4000, 4.0, seed=4)
    assert np.mean(gaps) == pytest.approx(0.25, rel=0.1)
    assert np.std(gaps) == pytest.approx(0.25, rel=0.15)  # exponential: std == mean
    with pytest.raises(ValueError):
        arrival_delays(3, 0.0)


# --- against the fake server -------------------------------------------------------------------------------------


def test_ttft_itl_tpot_of_one_stream(fake: tuple[str, FastAPI]) -> None:
    url, _ = fake
    cfg = _cfg(url, "one", output_len=5, extra={"fake_ttft": 0.2, "fake_itl": 0.05})

    async def go() -> RequestResult:
        import httpx

        async with httpx.AsyncClient() as c:
            return await send_request(c, cfg, "hello")

    r = asyncio.run(go())
    assert r.ok, r.error
    assert 0.2 <= r.ttft < 0.2 + 2.0  # the empty first chunk did not count as the first token
    assert len(r.itl) == 4 and all(0.04 <= g < 2.0 for g in r.itl)
    assert r.output_tokens == 5 and r.prompt_tokens == 7 and r.chunks == 5
    assert r.e2e >= r.ttft + sum(r.itl) - 1e-9
    m = compute_metrics([r], 1.0)
    assert m.median_tpot_ms == pytest.approx((r.e2e - r.ttft) / 4 * 1000)


def test_usage_beats_chunk_count_and_chunks_are_the_fallback(fake: tuple[str, FastAPI]) -> None:
    url, _ = fake

    async def go(**extra: Any) -> RequestResult:
        import httpx

        async with httpx.AsyncClient() as c:
            return await send_request(c, _cfg(url, "usage", output_len=6, extra=extra), "x")

    with_usage = asyncio.run(go(fake_tokens_per_chunk=2))
    assert with_usage.chunks == 3 and with_usage.output_tokens == 6
    without = asyncio.run(go(fake_usage=False))
    assert without.chunks == 6 and without.output_tokens == 6 and without.prompt_tokens == 0


def test_chat_stream_shape(fake: tuple[str, FastAPI]) -> None:
    url, _ = fake
    lvl = asyncio.run(
        run_benchmark(
            _cfg(url, "chat", endpoint="chat", output_len=4, num_requests=3, max_concurrency=3), progress=False
        )
    )
    assert lvl.metrics.completed == 3 and lvl.metrics.total_output_tokens == 12
    assert all(r.text == "tok " * 4 for r in lvl.results)


def test_bounded_count_and_concurrency_cap(fake: tuple[str, FastAPI]) -> None:
    url, app = fake
    cfg = _cfg(url, "cap", output_len=3, num_requests=10, max_concurrency=3, extra={"fake_ttft": 0.05})
    lvl = asyncio.run(run_benchmark(cfg, progress=False))
    assert lvl.num_requests_sent == 10 and app.state.count["cap"] == 10
    assert app.state.max_inflight["cap"] == 3
    m = lvl.metrics
    assert m.completed == 10 and m.failed == 0 and m.total_output_tokens == 30
    assert m.duration_s >= 4 * 0.05  # 10 requests through 3 slots take at least 4 rounds
    assert m.request_throughput == pytest.approx(10 / m.duration_s)


def test_bounded_time_cancels_what_is_left(fake: tuple[str, FastAPI]) -> None:
    url, app = fake
    cfg = _cfg(
        url,
        "slow",
        output_len=50,
        num_requests=100,
        max_concurrency=2,
        max_seconds=0.3,
        drain_seconds=0.3,
        extra={"fake_itl": 0.2},
    )  # each request would take ~10 s
    t0 = time.perf_counter()
    lvl = asyncio.run(run_benchmark(cfg, progress=False))
    assert time.perf_counter() - t0 < 5.0
    assert lvl.num_requests_sent == 2 and lvl.metrics.cancelled == 2 and lvl.metrics.completed == 0
    assert lvl.metrics.failed == 0 and app.state.count["slow"] == 2


def test_poisson_level_is_bounded_by_time(fake: tuple[str, FastAPI]) -> None:
    url, _ = fake
    cfg = _cfg(url, "rate", output_len=2, num_requests=1000, request_rate=20.0, max_seconds=0.5, drain_seconds=2)
    lvl = asyncio.run(run_benchmark(cfg, progress=False))
    assert 1 <= lvl.num_requests_sent < 100
    assert lvl.metrics.completed == lvl.num_requests_sent


def test_http_errors_are_recorded_not_raised(fake: tuple[str, FastAPI]) -> None:
    url, _ = fake
    lvl = asyncio.run(run_benchmark(_cfg(url, "err", num_requests=2, extra={"fake_status": 503}), progress=False))
    assert lvl.metrics.failed == 2 and lvl.metrics.completed == 0
    assert "503" in lvl.first_error and "overloaded" in lvl.first_error


# --- model facts over HTTP: GET /v1/models and POST /tokenize -----------------------------------------------------


def test_model_facts_come_from_the_server() -> None:
    """The benchmarks learn the model from the server (they never load it): its /v1/models entry, and token
    counts from /tokenize (each distinct prompt asked once)."""
    app = FastAPI()
    asked: list[str] = []

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {"id": "m", "object": "model", "max_model_len": 2048, "dtype": "bfloat16", "kernels": "avx2"}
        return {"object": "list", "data": [entry]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        prompt = (await request.json())["prompt"]
        asked.append(prompt)
        return {"tokens": list(range(len(prompt.split()))), "count": len(prompt.split()), "max_model_len": 2048}

    with _ThreadServer(app) as srv:
        assert server_facts(srv.url) == {
            "id": "m",
            "object": "model",
            "max_model_len": 2048,
            "dtype": "bfloat16",
            "kernels": "avx2",
        }
        assert count_tokens(srv.url, ["a b c", "a", "a b c"]) == [3, 1, 3]
    assert asked == ["a b c", "a"]
    assert server_facts(srv.url) == {}  # gone: nothing known, not an error
    assert ctx_per_slot([3, 1, 3], 128) == 256 and ctx_per_slot([200], 128) == 512


# --- prompts, reporting, process control --------------------------------------------------------------------------


def test_prompt_sets_are_fixed_and_distinct() -> None:
    for name in PROMPT_SETS:
        ps = make_prompts(name, 300)
        assert ps == make_prompts(name, 300) and len(set(ps)) == 300
        assert all(p.endswith("<|im_start|>assistant\n") for p in ps)
    assert len(make_prompts("long_prompt", 1)[0]) > 4 * len(make_prompts("short_chat", 1)[0])
    shared = make_prompts("shared_system", 2)
    assert shared[0].split("<|im_start|>user")[0] == shared[1].split("<|im_start|>user")[0]
    with pytest.raises(ValueError):
        make_prompts("nope", 1)


def test_grounded_prompts_copy_more_than_the_benchmarks_output() -> None:
    """Each `grounded` request shows a file or passage longer than 128 output tokens (the shipped model's
    tokenizer), so that its answer can copy for as long as it runs; the material is in the prompt verbatim."""
    tok = Tokenizer.from_gguf(find_default_model())
    ps = make_prompts("grounded", 64)
    for i in range(32):
        code, old, new = code_file(i)
        assert code in ps[2 * i] and f"`{old}` renamed to `{new}`" in ps[2 * i] and f"def {old}(" in code
        assert passage(i) in ps[2 * i + 1]
        assert min(len(tok.encode(code)), len(tok.encode(passage(i)))) > 128


def _lv(c: int, tok_s: float, ttft: float, tpot: float) -> dict[str, Any]:
    return {
        "max_concurrency": c,
        "request_rate": None,
        "completed": 8,
        "output_throughput": tok_s,
        "median_ttft_ms": ttft,
        "median_tpot_ms": tpot,
        "decode_tok_s": 1000 / tpot,
    }


def test_targets_and_roofline_fractions() -> None:
    run: dict[str, Any] = {
        "systems": {
            "ours": {"levels": [_lv(1, 90, 50, 10.0), _lv(16, 600, 400, 20.0)]},
            "llama": {"levels": [_lv(1, 100, 40, 12.5), _lv(16, 250, 500, 50.0)]},
        },
        "roofline": {"read_bandwidth_gb_s": 50.0, "matmul_gflop_s_bf16": 800.0, "matmul_gflop_s_fp32": 200.0},
        "model_bytes": {
            "params": 100_000_000,
            "dense_bytes": 200_000_000,
            "stored_bytes": 60_000_000,
            "dtype": "bfloat16",
        },
    }
    t = {x["target"].split(",")[0]: x for x in targets(run)}
    assert t["single-stream decode tok/s (1/TPOT p50"]["value"] == pytest.approx(100 / 80)
    assert t["output throughput at c=16"]["value"] == pytest.approx(2.4) and t["output throughput at c=16"]["met"]
    assert t["TTFT p50 at c=16"]["value"] == pytest.approx(0.8) and t["TTFT p50 at c=16"]["met"]
    f = roofline_fractions(run)
    assert f["ours"]["batch1_bandwidth_fraction"] == pytest.approx(100 * 200e6 / 50e9)
    assert f["llama"]["batch1_bandwidth_fraction"] == pytest.approx(80 * 60e6 / 50e9)  # quantized bytes
    assert f["ours"]["max_conc_flop_fraction"] == pytest.approx(2 * 100e6 * 600 / 800e9)
    run["systems"].pop("llama")
    assert all(x["met"] is None for x in targets(run))


def test_stop_process_kills_what_ignores_sigterm() -> None:
    code = (
        "import signal,sys,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
    t0 = time.perf_counter()
    stop_process(proc, timeout=0.5)
    assert proc.returncode is not None and proc.returncode < 0 and time.perf_counter() - t0 < 10


# --- the HF baseline server ---------------------------------------------------------------------------------------


class _CharTokenizer:
    """A stand-in tokenizer: one id per character, enough for the baseline's plumbing."""

    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [1 + ord(c) % 60 for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids if not (skip_special_tokens and i == 0))


def test_hf_baseline_streams_greedy_tokens() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.hf_server import create_app

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            eos_token_id=0,
            bos_token_id=1,
        )
    ).eval()
    tok = _CharTokenizer()
    ids = torch.tensor([tok("hello")["input_ids"]])
    with torch.no_grad():
        ref = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
        )[0, ids.shape[1] :].tolist()
    with _ThreadServer(create_app(model, tok, "tiny")) as srv:
        facts = server_facts(srv.url)
        cfg = BenchConfig(
            base_url=srv.url, model="tiny", prompts=("hello",), output_len=12, num_requests=2, max_concurrency=2
        )
        lvl = asyncio.run(run_benchmark(cfg, progress=False))
    assert lvl.metrics.completed == 2, lvl.first_error
    assert all(r.output_tokens == 12 for r in lvl.results)  # ignore_eos: exactly max_tokens tokens
    assert all(r.text == tok.decode(ref) for r in lvl.results)  # greedy: the same text as generate()
    assert facts["id"] == "tiny" and facts["dtype"] == "float32"  # what it runs in, for the results' labels


# --- --quantize: llama-quantize, cached --------------------------------------------------------------------------


def _fake_quantize(tmp_path: Path, fail: bool = False) -> tuple[Path, Path]:
    """A stand-in llama-quantize: logs its arguments (one JSON list per call) and writes 'Q' + the source + the
    type to its output path; or, with `fail`, says why on stderr and exits 1."""
    log_path = tmp_path / "calls.jsonl"
    body = f"import json, sys\nopen({str(log_path)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n" + (
        "sys.stderr.write('unknown type'); sys.exit(1)\n"
        if fail
        else "src, out, qtype = sys.argv[2:5]\nopen(out, 'wb').write(b'Q' + open(src, 'rb').read() + qtype.encode())\n"
    )
    exe = tmp_path / "llama-quantize"
    exe.write_text(f"#!{sys.executable}\n{body}")
    exe.chmod(0o755)
    return exe, log_path


def _calls(log_path: Path) -> list[list[str]]:
    return [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []


def test_quantize_makes_the_file_once_per_source_and_type(tmp_path: Path) -> None:
    exe, log_path = _fake_quantize(tmp_path)
    src = tmp_path / "models" / "m.Q4_1.gguf"
    src.parent.mkdir()
    src.write_bytes(b"GGUF-src")
    cache = tmp_path / "cache"
    argv = ["--model", str(src), "--llama-quantize", str(exe), "--quant-cache", str(cache)]

    gguf, made = model_file(parse_args([*argv, "--quantize", "q4_k_m"]))
    out = Path(gguf)
    assert out.name == "m.Q4_1.Q4_K_M.gguf" and out.parent.parent == cache
    assert out.read_bytes() == b"QGGUF-srcQ4_K_M"
    (call,) = _calls(log_path)
    assert call[0] == "--allow-requantize" and call[1] == str(src) and call[3] == "Q4_K_M" and len(call) == 4
    assert Path(call[2]).parent == out.parent and call[2] != gguf  # written under a temporary name, then renamed
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    assert made == {
        "quantized_from": str(src),
        "quantize": "Q4_K_M",
        "quantize_command": [str(exe), *call],
        "quantize_reused": False,
    }

    again, made = model_file(parse_args([*argv, "--quantize", "Q4_K_M"]))
    assert again == gguf and made["quantize_reused"] and made["quantize_command"] is None
    assert len(_calls(log_path)) == 1  # reused, not made again

    def not_looked_for() -> str:
        raise AssertionError("llama-quantize looked for while the file is cached")

    assert quantize_gguf(str(src), "Q4_K_M", not_looked_for, cache) == (gguf, None)

    q8, _ = model_file(parse_args([*argv, "--quantize", "Q8_0"]))
    assert Path(q8).parent == out.parent and Path(q8).name == "m.Q4_1.Q8_0.gguf" and len(_calls(log_path)) == 2

    other = tmp_path / "elsewhere" / "m.Q4_1.gguf"  # the same name, another file: its own folder
    other.parent.mkdir()
    other.write_bytes(b"GGUF-other")
    theirs, _ = quantize_gguf(str(other), "Q4_K_M", str(exe), cache)
    assert Path(theirs).parent != out.parent and Path(theirs).read_bytes() == b"QGGUF-otherQ4_K_M"

    st = src.stat()
    src.write_bytes(b"GGUF-new")  # the source changed: made again
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed, _ = model_file(parse_args([*argv, "--quantize", "Q4_K_M"]))
    assert changed != gguf and Path(changed).read_bytes() == b"QGGUF-newQ4_K_M" and len(_calls(log_path)) == 4

    assert model_file(parse_args(argv)) == (str(src), {})  # without --quantize: the model as given


def test_quantize_failure_leaves_nothing_in_the_cache(tmp_path: Path) -> None:
    exe, log_path = _fake_quantize(tmp_path, fail=True)
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="unknown type"):
        quantize_gguf(str(src), "Q9_X", str(exe), cache)
    assert len(_calls(log_path)) == 1
    assert [p for p in cache.rglob("*") if p.is_file()] == []
    with pytest.raises(ValueError, match="Q4_K_M"):
        quantize_gguf(str(src), "Q4_K_M; rm", str(exe), cache)  # not a type name: never run
    assert len(_calls(log_path)) == 1


def test_llama_quantize_is_found_like_llama_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--llama-quantize, else $LLAMA_QUANTIZE, else the path the peer script llama-tools.sh prints (%q-quoted)."""
    script = tmp_path / "llama-tools.sh"
    script.write_text(
        "#!/usr/bin/env bash\n"
        "printf 'LLAMA_SERVER=%q\\nLLAMA_QUANTIZE=%q\\n' /opt/llama/llama-server '/opt/llama cpp/llama-quantize'\n"
    )
    monkeypatch.setattr(bench_run, "LLAMA_TOOLS_SCRIPT", script)
    monkeypatch.delenv("LLAMA_QUANTIZE", raising=False)
    assert llama_quantize_binary(None) == "/opt/llama cpp/llama-quantize"
    monkeypatch.setenv("LLAMA_QUANTIZE", "/env/llama-quantize")
    assert llama_quantize_binary(None) == "/env/llama-quantize"
    assert llama_quantize_binary("/flag/llama-quantize") == "/flag/llama-quantize"
    monkeypatch.delenv("LLAMA_QUANTIZE")
    script.write_text("#!/usr/bin/env bash\necho 'build failed' >&2; exit 1\n")
    with pytest.raises(RuntimeError, match="build failed"):
        llama_quantize_binary(None)


def test_spec_report_states_the_ratios() -> None:
    from benchmarks.spec import markdown

    def level(c: int, dec: float, out: float) -> dict[str, Any]:
        lv = {"max_concurrency": c, "completed": 4, "decode_tok_s": dec, "output_throughput": out}
        return {**lv, "median_ttft_ms": 50}

    def system(name: str, dec: float, out: float) -> dict[str, Any]:
        return {"system": name, "workloads": {"grounded": [level(1, dec, dec), level(16, dec, out)]}}

    run = {
        "cpu": "cpu",
        "threads": 2,
        "model": "m.gguf",
        "output_len": 128,
        "num_prompts": 4,
        "prompt_sets": ["grounded"],
        "concurrency": [1, 16],
        "systems": [system("ours", 100, 300), system("ours-ngram", 250, 290), system("llama", 80, 150)],
    }
    report = markdown(run)
    assert "| grounded | 1 | 100.0 / 100.0 / 50 ms | 250.0 / 250.0 / 50 ms | 80.0 / 80.0 / 50 ms |" in report
    assert "grounded, c=1, decode tok/s: ours ngram / ours off 2.50x" in report
    assert "grounded, c=16, output tok/s: ours ngram / ours off 0.97x" in report
    assert "grounded, c=1, decode tok/s: ours ngram / llama-server's best 3.12x" in report


def test_multi_model_writes_adapters_the_server_reads(tmp_path: Path) -> None:
    """benchmarks.multi_model's random adapters are PEFT folders the server's loader takes for the model's shapes."""
    import torch

    from benchmarks.default_model import default_gguf
    from benchmarks.multi_model import write_adapter
    from model_core.weights.loader import load_lm
    from model_core.weights.lora import load_lora

    gguf = default_gguf()
    lm = load_lm(gguf, torch.float32, native_decode=False, pack=False)
    adapter = load_lora(write_adapter(gguf, tmp_path / "lora", rank=4, seed=0), lm.config, name="x")
    assert adapter.name == "x"
