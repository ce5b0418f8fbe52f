"""A load client for any OpenAI-compatible streaming server, with vLLM `bench serve`'s metrics.

Definitions (per request unless said otherwise; all measured with `time.perf_counter()`):
- TTFT: request sent -> first chunk that carries content (non-empty `text` / `delta.content`).
- ITL: the gaps between successive content chunks (pooled over all requests).
- TPOT: (e2e - TTFT) / (output tokens - 1), for requests with more than one output token.
- E2E latency: request sent -> end of the stream.
- Request throughput: completed requests / benchmark duration; output throughput: output tokens
  / duration (duration: first request sent -> last request done).
Output tokens come from the stream's `usage` chunk when the server sends one, else one per content
chunk. Each level is bounded: at most `num_requests` requests, none started after `max_seconds`,
and requests still running `drain_seconds` later are cancelled (counted, not measured).

    python -m benchmarks.serve --base-url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct.Q4_1 \
        --concurrency 1,4,16 --num-prompts 64 --output-len 128
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import httpx
import numpy as np
from tqdm import tqdm

from benchmarks.prompts import PROMPT_SETS, make_prompts


@dataclass(frozen=True)
class BenchConfig:
    """One measured level: where to send, what to send, and how much load."""

    base_url: str
    model: str
    prompts: tuple[str, ...]
    output_len: int = 128
    ignore_eos: bool = True
    temperature: float = 0.0
    max_concurrency: int | None = None  # None: no cap (pure arrival-rate mode)
    request_rate: float = math.inf  # requests/s of a Poisson process; inf: all at once
    num_requests: int = 64
    max_seconds: float = 120.0  # no request starts after this
    drain_seconds: float = 60.0  # then in-flight requests get this long before being cancelled
    request_timeout: float = 600.0
    endpoint: Literal["completions", "chat"] = "completions"
    extra_body: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    seed: int = 0


@dataclass
class RequestResult:
    """What the client saw of one request; latencies in seconds."""

    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    chunks: int = 0
    text: str = ""
    cancelled: bool = False


@dataclass(frozen=True)
class Metrics:
    """vLLM `bench serve`'s summary; latencies in milliseconds, throughputs per second."""

    completed: int
    failed: int
    cancelled: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    mean_ttft_ms: float | None
    median_ttft_ms: float | None
    p99_ttft_ms: float | None
    mean_tpot_ms: float | None
    median_tpot_ms: float | None
    p99_tpot_ms: float | None
    mean_itl_ms: float | None
    median_itl_ms: float | None
    p99_itl_ms: float | None
    mean_e2el_ms: float | None
    median_e2el_ms: float | None
    p99_e2el_ms: float | None

    @property
    def decode_tok_s(self) -> float | None:
        """Per-stream decode speed, 1 / median TPOT."""
        return 1000.0 / self.median_tpot_ms if self.median_tpot_ms else None


class SSEDecoder:
    """Incremental server-sent-events parser: feed bytes as they arrive, get complete `data` payloads."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += self._utf8.decode(chunk)
        out: list[str] = []
        while True:
            nl = self._buf.find("\n")
            if nl < 0:
                return out
            line, self._buf = self._buf[:nl].rstrip("\r"), self._buf[nl + 1 :]
            if not line:  # a blank line ends the event
                if self._data:
                    out.append("\n".join(self._data))
                    self._data = []
            elif line.startswith("data:"):
                v = line[5:]
                self._data.append(v[1:] if v.startswith(" ") else v)
            # comments (":...") and other fields (event:, id:, retry:) carry nothing we measure


def parse_chunk(obj: Any) -> tuple[str, dict[str, Any] | None, str | None]:
    """(content, usage, error) of one streamed JSON chunk of a completions or chat completions stream."""
    if not isinstance(obj, dict):
        return "", None, f"unexpected chunk {json.dumps(obj)[:100]}"
    if isinstance(obj.get("error"), dict | str):
        err = obj["error"]
        return "", None, err.get("message", json.dumps(err)) if isinstance(err, dict) else err
    content = ""
    for ch in obj.get("choices") or []:
        if isinstance(ch.get("text"), str):
            content += ch["text"]
        delta = ch.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            content += delta["content"]
    usage = obj.get("usage")
    return content, usage if isinstance(usage, dict) else None, None


def build_payload(cfg: BenchConfig, prompt: str, output_len: int | None = None) -> dict[str, Any]:
    n = cfg.output_len if output_len is None else output_len
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": n,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    return body


def endpoint_url(cfg: BenchConfig) -> str:
    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    return cfg.base_url.rstrip("/") + path


async def send_request(
    client: httpx.AsyncClient, cfg: BenchConfig, prompt: str, output_len: int | None = None
) -> RequestResult:
    """Send one streaming request and time its chunks."""
    res = RequestResult()
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    usage: dict[str, Any] | None = None
    st = time.perf_counter()
    last = st
    try:
        async with client.stream(
            "POST",
            endpoint_url(cfg),
            json=build_payload(cfg, prompt, output_len),
            headers=headers,
            timeout=cfg.request_timeout,
        ) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                res.error = f"HTTP {resp.status_code}: {body[:300]}"
                return res
            dec = SSEDecoder()
            done = False
            async for raw in resp.aiter_bytes():
                now = time.perf_counter()
                for data in dec.feed(raw):
                    if data.strip() == "[DONE]":
                        done = True
                        break
                    content, u, err = parse_chunk(json.loads(data))
                    if err is not None:
                        res.error = f"stream error: {err}"
                        return res
                    usage = u or usage
                    if content:
                        if res.chunks == 0:
                            res.ttft = now - st
                        else:
                            res.itl.append(now - last)
                        last = now
                        res.chunks += 1
                        res.text += content
                if done:
                    break
        res.e2e = time.perf_counter() - st
    except asyncio.CancelledError:
        res.cancelled, res.error = True, "cancelled at the level's time bound"
        raise
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    if res.chunks == 0:
        res.error = "no content chunks"
        return res
    res.output_tokens = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") else res.chunks
    res.prompt_tokens = int(usage.get("prompt_tokens") or 0) if usage else 0
    res.ok = True
    return res


def arrival_delays(n: int, rate: float, seed: int = 0) -> list[float]:
    """Gaps before each of `n` requests: exponential (Poisson arrivals) at `rate`/s; zeros when rate is inf."""
    if rate <= 0:
        raise ValueError("request rate must be > 0")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(n)]


def _stats(xs: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    if not xs:
        return None, None, None
    a = np.asarray(xs, dtype=np.float64) * 1000.0
    return float(a.mean()), float(np.median(a)), float(np.percentile(a, 99))


def compute_metrics(results: Sequence[RequestResult], duration_s: float) -> Metrics:
    """Summarise a level exactly as vLLM's `bench serve` does (percentiles by linear interpolation)."""
    ok = [r for r in results if r.ok]
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [g for r in ok for g in r.itl]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    d = max(duration_s, 1e-9)
    ttft, tpot, itl, e2e = _stats([r.ttft for r in ok]), _stats(tpots), _stats(itls), _stats([r.e2e for r in ok])
    return Metrics(
        completed=len(ok),
        failed=sum(1 for r in results if not r.ok and not r.cancelled),
        cancelled=sum(1 for r in results if r.cancelled),
        duration_s=duration_s,
        total_input_tokens=in_tokens,
        total_output_tokens=out_tokens,
        request_throughput=len(ok) / d,
        output_throughput=out_tokens / d,
        total_token_throughput=(in_tokens + out_tokens) / d,
        mean_ttft_ms=ttft[0],
        median_ttft_ms=ttft[1],
        p99_ttft_ms=ttft[2],
        mean_tpot_ms=tpot[0],
        median_tpot_ms=tpot[1],
        p99_tpot_ms=tpot[2],
        mean_itl_ms=itl[0],
        median_itl_ms=itl[1],
        p99_itl_ms=itl[2],
        mean_e2el_ms=e2e[0],
        median_e2el_ms=e2e[1],
        p99_e2el_ms=e2e[2],
    )


@dataclass(frozen=True)
class LevelResult:
    """A measured level: its load settings, the summary, and the first error seen (if any)."""

    max_concurrency: int | None
    request_rate: float
    num_requests_sent: int
    metrics: Metrics
    first_error: str = ""
    results: tuple[RequestResult, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "max_concurrency": self.max_concurrency,
            "request_rate": None if math.isinf(self.request_rate) else self.request_rate,
            "num_requests_sent": self.num_requests_sent,
            "first_error": self.first_error,
            "decode_tok_s": self.metrics.decode_tok_s,
            **asdict(self.metrics),
        }


async def run_benchmark(
    cfg: BenchConfig, progress: bool = True, desc: str = "", client: httpx.AsyncClient | None = None
) -> LevelResult:
    """Send up to `cfg.num_requests` requests (prompts cycled) under the configured load; summarise them."""
    if not cfg.prompts:
        raise ValueError("no prompts")
    limits = httpx.Limits(
        max_connections=max(cfg.max_concurrency or cfg.num_requests, 1) + 4,
        max_keepalive_connections=max(cfg.max_concurrency or cfg.num_requests, 1) + 4,
    )
    own = client is None
    cl = client or httpx.AsyncClient(limits=limits, timeout=cfg.request_timeout)
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    bar = tqdm(
        total=cfg.num_requests, desc=desc or "requests", unit="req", file=sys.stderr, disable=not progress, leave=False
    )
    tasks: list[asyncio.Task[RequestResult]] = []

    async def one(prompt: str) -> RequestResult:
        try:
            return await send_request(cl, cfg, prompt)
        except Exception as e:  # a malformed stream must not end the level
            return RequestResult(error=f"{type(e).__name__}: {e}")
        finally:
            if sem is not None:
                sem.release()
            bar.update(1)

    t0 = time.perf_counter()
    start_deadline = t0 + cfg.max_seconds
    try:
        for i, gap in enumerate(arrival_delays(cfg.num_requests, cfg.request_rate, cfg.seed)):
            if gap > 0:
                if time.perf_counter() + gap >= start_deadline:
                    break
                await asyncio.sleep(gap)
            if sem is not None:
                try:
                    await asyncio.wait_for(sem.acquire(), timeout=max(start_deadline - time.perf_counter(), 0.0))
                except TimeoutError:
                    break
            if time.perf_counter() >= start_deadline:
                if sem is not None:
                    sem.release()
                break
            tasks.append(asyncio.create_task(one(cfg.prompts[i % len(cfg.prompts)])))
        results: list[RequestResult] = []
        if tasks:
            hard_deadline = max(start_deadline, time.perf_counter()) + cfg.drain_seconds
            done, pending = await asyncio.wait(tasks, timeout=max(hard_deadline - time.perf_counter(), 0.0))
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            duration = time.perf_counter() - t0
            for t in tasks:
                results.append(
                    t.result()
                    if t in done
                    else RequestResult(cancelled=True, error="cancelled at the level's time bound")
                )
        else:
            duration = time.perf_counter() - t0
    finally:
        bar.close()
        if own:
            await cl.aclose()
    first_error = next((r.error for r in results if not r.ok and not r.cancelled), "")
    return LevelResult(
        cfg.max_concurrency,
        cfg.request_rate,
        len(tasks),
        compute_metrics(results, duration),
        first_error,
        tuple(results),
    )


async def warm_up(cfg: BenchConfig, n: int, output_len: int = 16) -> None:
    """Send `n` concurrent unmeasured requests (same shape, shorter output); raise if all of them fail."""
    wcfg = replace(
        cfg,
        num_requests=n,
        max_concurrency=n,
        request_rate=math.inf,
        output_len=min(output_len, cfg.output_len),
        max_seconds=max(cfg.max_seconds, 60.0),
    )
    lvl = await run_benchmark(wcfg, progress=False)
    if lvl.metrics.completed == 0:
        raise RuntimeError(f"warm-up failed against {cfg.base_url}: {lvl.first_error or 'no request completed'}")


def _fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def level_label(max_concurrency: int | None, request_rate: float) -> str:
    """'16' for a concurrency level, 'rate 2/s' (', max 16' when capped) for a Poisson level."""
    if math.isinf(request_rate):
        return str(max_concurrency) if max_concurrency else "inf"
    cap = f", max {max_concurrency}" if max_concurrency else ""
    return f"rate {request_rate:g}/s{cap}"


TABLE_HEADER = (
    "| system | concurrency | req/s | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) "
    "| TPOT p50 (ms) | done/sent |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def table_row(system: str, lvl: LevelResult) -> str:
    m, label = lvl.metrics, level_label(lvl.max_concurrency, lvl.request_rate)
    return (
        f"| {system} | {label} | {m.request_throughput:.2f} | {m.output_throughput:.1f} | "
        f"{_fmt(m.median_ttft_ms)} | {_fmt(m.p99_ttft_ms)} | {_fmt(m.median_itl_ms)} | "
        f"{_fmt(m.median_tpot_ms)} | {m.completed}/{lvl.num_requests_sent} |"
    )


def markdown_table(rows: Sequence[tuple[str, LevelResult]]) -> str:
    return "\n".join([TABLE_HEADER, *(table_row(s, lvl) for s, lvl in rows)])


async def sweep(
    base: BenchConfig,
    concurrencies: Sequence[int],
    rates: Sequence[float] = (),
    prompts_for: Callable[[int], tuple[str, ...]] | None = None,
    warmup: bool = True,
    progress: bool = True,
    label: str = "",
) -> list[LevelResult]:
    """Measure each concurrency level (rate inf), then each Poisson rate; fresh prompts per level when given."""
    levels: list[LevelResult] = []
    plan: list[tuple[int | None, float]] = [(c, math.inf) for c in concurrencies]
    plan += [(base.max_concurrency, r) for r in rates]
    for c, r in plan:
        n = base.num_requests if c is None else max(base.num_requests, 2 * c)
        cfg = replace(base, max_concurrency=c, request_rate=r, num_requests=n)
        if prompts_for is not None:
            cfg = replace(cfg, prompts=prompts_for(n))
        if warmup:
            await warm_up(
                replace(cfg, prompts=prompts_for(max(c or 1, 1)) if prompts_for else cfg.prompts), max(c or 1, 1)
            )
        lvl = await run_benchmark(cfg, progress=progress, desc=f"{label} {level_label(c, r)}".strip())
        levels.append(lvl)
    return levels


class PromptPool:
    """Hands out fresh prompts of one set, in a fixed order, so no request repeats an earlier prompt."""

    def __init__(self, prompt_set: str, size: int = 4096) -> None:
        self._prompts = make_prompts(prompt_set, size)
        self._next = 0

    def take(self, n: int) -> tuple[str, ...]:
        out = tuple(self._prompts[(self._next + i) % len(self._prompts)] for i in range(n))
        self._next += n
        return out


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    ap.add_argument("--prompt-set", choices=PROMPT_SETS, default="short_chat")
    ap.add_argument("--concurrency", default="1,4,16,32", help="comma-separated levels ('' for none)")
    ap.add_argument("--request-rate", default="", help="comma-separated Poisson rates (req/s)")
    ap.add_argument("--num-prompts", type=int, default=64, help="requests per level (at least 2x its concurrency)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--no-ignore-eos", action="store_true", help="let generation stop at EOS")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="no request starts later than this per level")
    ap.add_argument("--drain-seconds", type=float, default=60.0)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--out", default=None, help="write the levels as JSON here")
    a = ap.parse_args(argv)
    pool = PromptPool(a.prompt_set)
    base = BenchConfig(
        base_url=a.base_url,
        model=a.model,
        prompts=pool.take(1),
        output_len=a.output_len,
        ignore_eos=not a.no_ignore_eos,
        num_requests=a.num_prompts,
        max_seconds=a.max_seconds,
        drain_seconds=a.drain_seconds,
        endpoint=a.endpoint,
        api_key=a.api_key,
    )
    levels = asyncio.run(
        sweep(
            base,
            [int(x) for x in _floats(a.concurrency)],
            _floats(a.request_rate),
            prompts_for=pool.take,
            label=a.base_url,
        )
    )
    print(markdown_table([(a.model, lvl) for lvl in levels]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump([lvl.to_json() for lvl in levels], f, indent=2)


if __name__ == "__main__":
    main()
