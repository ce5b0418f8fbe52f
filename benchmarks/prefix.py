"""Prefix caching: time to first token on workloads that resend a prompt prefix, for our server with the
cache, without it (`--no-enable-prefix-caching`) and llama.cpp's `llama-server` (slot prompt cache with
`--cache-reuse`), each started in turn on the same GGUF and threads, measured in the same run.

- `shared_system`: one long system prompt (about 1,600 tokens) shared by many short questions.
- `multi_turn`: conversations whose every turn resends the whole history (a document, then questions and
  fixed assistant replies, so that every system gets the same prompts); TTFT counted on turns >= 2.

Requests are streamed completions on ChatML text, temperature 0, `--output-len` tokens (ignore_eos);
`--concurrency` requests (or conversations) at once.

    python -m benchmarks.prefix [--systems ours,ours-nocache,llama] [--concurrency 4] [--questions 32]
                                [--conversations 8] [--turns 6] [--output-len 16] [--threads 2]
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.default_model import default_gguf
from benchmarks.prompts import chatml, document, question, shared_system_prompt
from benchmarks.run import (
    RESULTS,
    Launch,
    _cpu_name,
    llama_launch,
    llama_server_binary,
    log,
    ours_launch,
    running,
    save_report,
    served_model_id,
)
from benchmarks.serve import BenchConfig, RequestResult, send_request

SYSTEMS = ("ours", "ours-nocache", "llama")
LABELS = {
    "ours": "ours (prefix cache)",
    "ours-nocache": "ours (--no-enable-prefix-caching)",
    "llama": "llama-server (--cache-reuse 256)",
}


def conversation_prompts(conv: int, turns: int) -> list[str]:
    """The prompt of each turn of conversation `conv`: the history so far (fixed replies), then a question."""
    user = f"Here is a report to discuss.\n\n{document(conv, 30)}\n\n{question(conv)}"
    history = f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
    prompts = []
    for t in range(turns):
        prompts.append(history + "<|im_start|>assistant\n")
        reply = document(10_000 + conv * 100 + t, 3)  # a fixed ~60-token assistant reply
        history += (
            f"<|im_start|>assistant\n{reply}<|im_end|>\n<|im_start|>user\n{question(conv + 7 * (t + 1))}<|im_end|>\n"
        )
    return prompts


@dataclass
class WorkloadResult:
    name: str
    ttft: list[float] = field(default_factory=list)  # seconds, of the requests that count
    prompt_tokens: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        ok = bool(self.ttft)
        return {
            "workload": self.name,
            "requests": len(self.ttft),
            "errors": len(self.errors),
            "first_errors": self.errors[:3],
            "seconds": round(self.seconds, 2),
            "ttft_p50_ms": round(1000 * statistics.median(self.ttft), 1) if ok else None,
            "ttft_p90_ms": round(1000 * sorted(self.ttft)[int(0.9 * (len(self.ttft) - 1))], 1) if ok else None,
            "mean_prompt_tokens": round(statistics.mean(self.prompt_tokens), 1) if self.prompt_tokens else None,
        }


def _count(res: RequestResult, out: WorkloadResult) -> None:
    if res.ok:
        out.ttft.append(res.ttft)
        out.prompt_tokens.append(res.prompt_tokens)
    else:
        out.errors.append(res.error)


async def shared_system(cfg: BenchConfig, questions: int, concurrency: int) -> WorkloadResult:
    system = shared_system_prompt(long=True)
    prompts = [chatml(question(i), system=system) for i in range(questions)]
    out = WorkloadResult("shared_system")
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=cfg.request_timeout) as client:

        async def one(p: str) -> None:
            async with sem:
                _count(await send_request(client, cfg, p), out)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        out.seconds = time.perf_counter() - t0
    return out


async def multi_turn(cfg: BenchConfig, conversations: int, turns: int, concurrency: int) -> WorkloadResult:
    out = WorkloadResult("multi_turn")
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=cfg.request_timeout) as client:

        async def conversation(c: int) -> None:
            async with sem:
                for t, p in enumerate(conversation_prompts(c, turns)):
                    res = await send_request(client, cfg, p)
                    if t >= 1:
                        _count(res, out)
                    elif not res.ok:
                        out.errors.append(res.error)

        t0 = time.perf_counter()
        await asyncio.gather(*(conversation(c) for c in range(conversations)))
        out.seconds = time.perf_counter() - t0
    return out


def make_launch(system: str, a: argparse.Namespace, gguf: str) -> Launch:
    if system in ("ours", "ours-nocache"):
        cache = "--enable-prefix-caching" if system == "ours" else "--no-enable-prefix-caching"
        return ours_launch(system, gguf, a.threads, "--no-enable-gan", "--no-ui", cache, "--drain-timeout-s", "5")
    if system == "llama":
        binary = llama_server_binary(a.llama_server)
        return llama_launch(binary, gguf, a.threads, a.concurrency, 4096, "--cache-reuse", "256")
    raise ValueError(f"unknown system {system!r}; expected one of {', '.join(SYSTEMS)}")


def bench_system(system: str, a: argparse.Namespace, gguf: str, log_dir: str) -> dict[str, Any]:
    launch = make_launch(system, a, gguf)
    with running(launch, log_dir, a.ready_timeout):
        model = served_model_id(launch.base_url, Path(gguf).name)
        cfg = BenchConfig(
            base_url=launch.base_url, model=model, prompts=(), output_len=a.output_len, ignore_eos=True, temperature=0.0
        )
        # warm-up, unrelated to the workloads: a short prompt, then a long one (a server's first long prefill
        # can pay one-time costs)
        asyncio.run(send_one(cfg, chatml("Say hello.")))
        asyncio.run(send_one(cfg, chatml(f"Summarise this.\n\n{document(99_999, 60)}")))
        results = [
            asyncio.run(shared_system(cfg, a.questions, a.concurrency)),
            asyncio.run(multi_turn(cfg, a.conversations, a.turns, a.concurrency)),
        ]
    return {"system": system, "label": LABELS[system], "workloads": [r.summary() for r in results]}


async def send_one(cfg: BenchConfig, prompt: str) -> None:
    async with httpx.AsyncClient(timeout=cfg.request_timeout) as client:
        res = await send_request(client, cfg, prompt)
    if not res.ok:
        raise RuntimeError(f"warm-up failed: {res.error}")


def markdown(run: dict[str, Any]) -> str:
    rows = [
        "| workload | system | TTFT p50 (ms) | TTFT p90 (ms) | mean prompt tokens | requests | errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    by: dict[tuple[str, str], dict[str, Any]] = {}
    for s in run["systems"]:
        for w in s["workloads"]:
            by[(w["workload"], s["system"])] = w
            rows.append(
                f"| {w['workload']} | {s['label']} | {w['ttft_p50_ms']} | {w['ttft_p90_ms']} | "
                f"{w['mean_prompt_tokens']} | {w['requests']} | {w['errors']} |"
            )
    lines = ["\n".join(rows), ""]
    for wl in ("shared_system", "multi_turn"):
        ours = by.get((wl, "ours"), {}).get("ttft_p50_ms")
        for peer in ("ours-nocache", "llama"):
            other = by.get((wl, peer), {}).get("ttft_p50_ms")
            if ours and other:
                lines.append(f"- {wl}: TTFT p50 with the cache / {LABELS[peer]}: {ours / other:.2f}x")
    return "\n".join(lines)


def plot(run: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = ["shared_system", "multi_turn"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    width = 0.8 / max(1, len(run["systems"]))
    for k, s in enumerate(run["systems"]):
        vals = {w["workload"]: w["ttft_p50_ms"] or 0 for w in s["workloads"]}
        xs = [i + k * width for i in range(len(workloads))]
        ax.bar(xs, [vals.get(w, 0) for w in workloads], width, label=s["label"])
    ax.set_xticks([i + width * (len(run["systems"]) - 1) / 2 for i in range(len(workloads))], workloads)
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_title(f"Prefix reuse, concurrency {run['concurrency']} ({run['cpu']}, {run['threads']} threads)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.prefix", description=__doc__.split("\n")[0])
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--questions", type=int, default=32, help="shared_system requests")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--model", default=None, help="GGUF file; default: the SmolLM2 GGUF")
    ap.add_argument("--llama-server", default=None, help="llama-server binary (default: built by the peer script)")
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    a = ap.parse_args(argv)
    if a.model is None:
        a.model = default_gguf()
    run: dict[str, Any] = {
        "cpu": _cpu_name(),
        "threads": a.threads,
        "concurrency": a.concurrency,
        "questions": a.questions,
        "conversations": a.conversations,
        "turns": a.turns,
        "output_len": a.output_len,
        "model": Path(a.model).name,
        "systems": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as log_dir:
        for system in [s for s in a.systems.split(",") if s]:
            run["systems"].append(bench_system(system, a, a.model, log_dir))
            log(json.dumps(run["systems"][-1]))
    out = save_report(RESULTS / "prefix", "prefix", run, markdown(run))
    plot(run, out / "ttft.png")
    return run


if __name__ == "__main__":
    main()
