"""Several models in one server: the cost of LoRA adapters in the batch, and the first request to an unloaded model.

1. `adapters`: our server with the base model and `--adapters` random LoRA adapters of rank `--rank` on q/k/v/o
   (written as PEFT folders from the GGUF's shapes, B non-zero), `--concurrency` streamed completions at once,
   spread round-robin over the base and the adapters; then the same number of requests for the base alone, on the
   same server, same run. Reported: output tok/s of each and their ratio.
2. `load`: a server serving the model under two ids, the second not preloaded: the first request for it waits for
   its load (TTFT = load + prefill); the second request's TTFT is the prefill alone; `aigc_model_load_seconds`.

    python -m benchmarks.multi_model [--adapters 4] [--rank 8] [--concurrency 16] [--num-prompts 64]
                                     [--output-len 64] [--threads 2] [--model F.gguf]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from gguf import GGUFReader
from safetensors.numpy import save_file

from benchmarks.default_model import default_gguf
from benchmarks.prompts import make_prompts
from benchmarks.run import RESULTS, _cpu_name, log, ours_launch, running, save_report
from benchmarks.serve import BenchConfig, RequestResult, send_request

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _field(reader: GGUFReader, key: str) -> int:
    f = reader.fields[key]
    return int(f.parts[f.data[0]][0])


def write_adapter(gguf: str, out: Path, rank: int, seed: int) -> Path:
    """A random PEFT LoRA adapter (q/k/v/o, A and B ~ N(0, 0.02)) shaped for the llama-family GGUF `gguf`."""
    reader = GGUFReader(gguf)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    layers = _field(reader, f"{arch}.block_count")
    d = _field(reader, f"{arch}.embedding_length")
    heads, kv_heads = _field(reader, f"{arch}.attention.head_count"), _field(reader, f"{arch}.attention.head_count_kv")
    hd = d // heads
    outs = {"q_proj": heads * hd, "k_proj": kv_heads * hd, "v_proj": kv_heads * hd, "o_proj": d}
    ins = {"q_proj": d, "k_proj": d, "v_proj": d, "o_proj": heads * hd}
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(layers):
        for t in TARGETS:
            pre = f"base_model.model.model.layers.{i}.self_attn.{t}"
            tensors[f"{pre}.lora_A.weight"] = (0.02 * rng.standard_normal((rank, ins[t]))).astype(np.float32)
            tensors[f"{pre}.lora_B.weight"] = (0.02 * rng.standard_normal((outs[t], rank))).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS), "bias": "none"}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


async def _run(cfg: BenchConfig, jobs: list[tuple[str, str]], concurrency: int) -> tuple[float, list[RequestResult]]:
    """Send (model, prompt) jobs, `concurrency` at once; (seconds, results)."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=cfg.request_timeout) as client:

        async def one(model: str, prompt: str) -> RequestResult:
            async with sem:
                return await send_request(client, replace(cfg, model=model), prompt)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(m, p) for m, p in jobs))
        return time.perf_counter() - t0, list(results)


def _throughput(seconds: float, results: list[RequestResult]) -> dict[str, Any]:
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed: {failed[0]}")
    tokens = sum(r.output_tokens for r in results)
    return {"seconds": seconds, "output_tokens": tokens, "output_tok_s": tokens / seconds}


def bench_adapters(a: argparse.Namespace, gguf: str, work: Path) -> dict[str, Any]:
    adapters = [f"lora{i}={write_adapter(gguf, work / f'lora{i}', a.rank, seed=i)}" for i in range(a.adapters)]
    flags = ("--no-enable-gan", "--no-ui", "--model", f"base={gguf}", "--lora-modules", *adapters)
    launch = ours_launch("ours", None, a.threads, *flags)  # (None: no --model of its own; the flags name it)
    prompts = make_prompts("short_chat", 2 * a.num_prompts + 2)
    names = ["base", *(f"lora{i}" for i in range(a.adapters))]
    with running(launch, work.as_posix(), a.ready_timeout):
        cfg = BenchConfig(base_url=launch.base_url, model="base", prompts=(), output_len=a.output_len)
        asyncio.run(_run(cfg, [(n, prompts[-1]) for n in names], len(names)))  # warm-up: every adapter once
        spread = [(names[i % len(names)], p) for i, p in enumerate(prompts[: a.num_prompts])]
        mixed = _throughput(*asyncio.run(_run(cfg, spread, a.concurrency)))
        alone = [("base", p) for p in prompts[a.num_prompts : 2 * a.num_prompts]]
        base = _throughput(*asyncio.run(_run(cfg, alone, a.concurrency)))
    ratio = mixed["output_tok_s"] / base["output_tok_s"]
    return {"adapters": a.adapters, "rank": a.rank, "mixed": mixed, "base": base, "ratio": ratio}


def bench_load(a: argparse.Namespace, gguf: str, work: Path) -> dict[str, Any]:
    flags = (
        "--no-enable-gan",
        "--no-ui",
        "--model",
        f"first={gguf}",
        "--model",
        f"second={gguf}",
        "--preload",
        "first",
    )
    launch = ours_launch("ours-load", None, a.threads, *flags)
    with running(launch, work.as_posix(), a.ready_timeout):
        cfg = BenchConfig(base_url=launch.base_url, model="second", prompts=(), output_len=8)
        prompt = make_prompts("short_chat", 1)[0]
        _, (cold,) = asyncio.run(_run(cfg, [("second", prompt)], 1))
        _, (warm,) = asyncio.run(_run(cfg, [("second", prompt)], 1))
        metrics = httpx.get(f"{launch.base_url}/metrics", timeout=30).text
    m = re.search(r'aigc_model_load_seconds\{model="second"\} ([0-9.e+-]+)', metrics)
    return {"cold_ttft_s": cold.ttft, "warm_ttft_s": warm.ttft, "load_seconds": float(m[1]) if m else None}


def markdown(run: dict[str, Any]) -> str:
    ad, ld = run["adapters"], run["load"]
    return "\n".join(
        [
            f"{run['cpu']}, {run['threads']} threads, {run['model']}, c={run['concurrency']}, "
            f"{run['output_len']} output tokens, {run['num_prompts']} requests each",
            "",
            f"- base + {ad['adapters']} rank-{ad['rank']} q/k/v/o adapters, requests spread round-robin: "
            f"{ad['mixed']['output_tok_s']:.1f} output tok/s; the base alone: {ad['base']['output_tok_s']:.1f}; "
            f"ratio {ad['ratio']:.2f}x",
            f"- first request to an unloaded model: TTFT {ld['cold_ttft_s']:.2f} s "
            f"(load {ld['load_seconds'] or 0:.2f} s by aigc_model_load_seconds), "
            f"the next one {ld['warm_ttft_s'] * 1000:.0f} ms",
        ]
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.multi_model", description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--model", default=None, help="a llama-family GGUF; default: the SmolLM2 GGUF")
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    ap.add_argument("--out-dir", default=str(RESULTS / "multi_model"))
    a = ap.parse_args(argv)
    gguf = os.path.abspath(a.model or default_gguf())
    run: dict[str, Any] = {
        "cpu": _cpu_name(),
        "threads": a.threads,
        "model": Path(gguf).name,
        "concurrency": a.concurrency,
        "output_len": a.output_len,
        "num_prompts": a.num_prompts,
    }
    with tempfile.TemporaryDirectory(prefix="bench-multi-") as tmp:
        run["adapters"] = bench_adapters(a, gguf, Path(tmp))
        log(json.dumps(run["adapters"]))
        run["load"] = bench_load(a, gguf, Path(tmp))
    save_report(a.out_dir, "multi-model", run, markdown(run))
    return run


if __name__ == "__main__":
    main()
