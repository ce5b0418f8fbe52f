"""What a JSON-schema constraint costs in decode speed: TPOT of constrained vs unconstrained chat streams
against our server, at each concurrency, measured in the same run (the same server, rounds alternated).

    python -m benchmarks.structured [--concurrency 1,16] [--rounds 3] [--max-tokens 128]

Starts the server on the default model (or `--base-url` of a running one), then for each concurrency and
round runs c constrained streams, then c unconstrained ones. TPOT per request = (last token time - first
token time) / (tokens - 1), tokens counted by the server's usage. The constrained requests ask for a list
of records under a schema long enough that the grammar never ends them early; the unconstrained ones ask
the same with `ignore_eos`, so both decode `--max-tokens` tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import httpx

from benchmarks.run import ours_launch, running, served_model_id

RECORDS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 200,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "age": {"type": "integer"},
                    "city": {"type": "string"},
                    "role": {"enum": ["admin", "user", "guest"]},
                },
                "required": ["name", "age", "city", "role"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}
PROMPT = "List the people in the staff directory as JSON records with name, age, city and role."


async def one(c: httpx.AsyncClient, model: str, max_tokens: int, constrained: bool, seed: int) -> float | None:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": seed,
        "stream_options": {"include_usage": True},
    }
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "records", "schema": RECORDS}}
    else:
        body["ignore_eos"] = True
    first = last = None
    tokens = 0
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(ch["delta"].get("content") for ch in chunk.get("choices", [])):
                now = time.perf_counter()
                first = first or now
                last = now
    if first is None or last is None or tokens < 2:
        return None
    return (last - first) / (tokens - 1)


async def level(base_url: str, model: str, conc: int, rounds: int, max_tokens: int) -> dict[str, Any]:
    tpot: dict[str, list[float]] = {"json_schema": [], "none": []}
    async with httpx.AsyncClient(base_url=base_url, timeout=600.0) as c:
        await one(c, model, 8, True, 0)  # compiles (and caches) the grammar outside the measurement
        for r in range(rounds):
            for kind in ("json_schema", "none"):
                got = await asyncio.gather(
                    *(one(c, model, max_tokens, kind == "json_schema", 1000 * r + i) for i in range(conc))
                )
                tpot[kind] += [t for t in got if t is not None]
    js, free = statistics.median(tpot["json_schema"]), statistics.median(tpot["none"])
    return {
        "concurrency": conc,
        "tpot_ms_json_schema": round(1e3 * js, 2),
        "tpot_ms_unconstrained": round(1e3 * free, 2),
        "ratio": round(js / free, 3),
        "requests": {k: len(v) for k, v in tpot.items()},
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.structured", description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", help="a running server; default: start ours on the default model")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return ap.parse_args(argv)


async def run(base_url: str, a: argparse.Namespace) -> list[dict[str, Any]]:
    model = served_model_id(base_url, "default")
    out = []
    for conc in (int(x) for x in a.concurrency.split(",")):
        res = await level(base_url, model, conc, a.rounds, a.max_tokens)
        print(json.dumps(res), flush=True)
        out.append(res)
    return out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    a = parse_args(argv)
    if a.base_url:
        return asyncio.run(run(a.base_url, a))
    launch = ours_launch("ours", None, a.threads, "--no-enable-gan")
    with tempfile.TemporaryDirectory() as logs, running(launch, logs, 300.0):
        return asyncio.run(run(launch.base_url, a))


if __name__ == "__main__":
    main()
