"""Speculative decoding: decode speed and throughput with and without it, for our server (`--speculative-method
ngram`, or `draft` with `--draft`) and llama.cpp's `llama-server` (`--spec-type ngram-simple`, or the same draft
model), each started in turn on the same GGUF and threads, measured in the same run.

Two workloads (benchmarks/prompts.py): `grounded` (repeat a given Python file with a function renamed, or copy a
given passage: outputs that copy from the prompt, where n-gram drafts are accepted) and `short_chat` (open-ended
answers). Streamed completions on ChatML text, temperature 0, `--output-len` tokens (ignore_eos), at each
`--concurrency` level.

    python -m benchmarks.spec [--systems ours,ours-ngram,llama,llama-ngram] [--prompt-sets grounded,short_chat]
                              [--concurrency 1,16] [--num-prompts 16] [--output-len 128] [--threads 2]
                              [--model F.gguf | --quantize Q8_0] [--llama-spec-args '...'] [--draft D.gguf]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.default_model import default_gguf
from benchmarks.run import (
    QUANT_CACHE,
    RESULTS,
    Launch,
    _cpu_name,
    llama_launch,
    llama_quantize_binary,
    llama_server_binary,
    log,
    ours_launch,
    quantize_gguf,
    running,
    save_report,
    served_model_id,
    sweep_prompt_set,
)

SYSTEMS = ("ours", "ours-ngram", "ours-draft", "llama", "llama-ngram", "llama-draft")
WORKLOADS = ("grounded", "short_chat")


def make_launch(system: str, a: argparse.Namespace, gguf: str) -> Launch:
    slots = max(a.concurrency)
    if system in ("ours", "ours-ngram", "ours-draft"):
        flags = ["--no-enable-gan", "--no-ui", "--drain-timeout-s", "5", "--max-num-seqs", str(max(32, slots))]
        if system == "ours-ngram":
            flags += ["--speculative-method", "ngram", *shlex.split(a.ours_spec_args)]
        if system == "ours-draft":
            flags += ["--speculative-method", "draft", "--speculative-model", _draft(a), *shlex.split(a.ours_spec_args)]
        return ours_launch(system, gguf, a.threads, *flags)
    binary = llama_server_binary(a.llama_server)
    if system == "llama":
        return llama_launch(binary, gguf, a.threads, slots, a.ctx)
    if system == "llama-ngram":
        return llama_launch(binary, gguf, a.threads, slots, a.ctx, *shlex.split(a.llama_spec_args))
    if system == "llama-draft":
        flags = ["--spec-type", "draft-simple", "-md", _draft(a), *shlex.split(a.llama_draft_args)]
        return llama_launch(binary, gguf, a.threads, slots, a.ctx, *flags)
    raise ValueError(f"unknown system {system!r}; expected one of {', '.join(SYSTEMS)}")


def _draft(a: argparse.Namespace) -> str:
    if not a.draft:
        raise SystemExit("ours-draft and llama-draft need --draft DRAFT.gguf")
    return str(a.draft)


def bench_system(system: str, a: argparse.Namespace, gguf: str, log_dir: str) -> dict[str, Any]:
    launch = make_launch(system, a, gguf)
    out: dict[str, Any] = {"system": system, "command": list(launch.cmd), "workloads": {}}
    with running(launch, log_dir, a.ready_timeout):
        model = served_model_id(launch.base_url, Path(gguf).name)
        for workload in a.prompt_sets:
            levels = sweep_prompt_set(launch.base_url, model, workload, a, label=f"{system} {workload}")
            out["workloads"][workload] = [lv.to_json() for lv in levels]
    return out


def _level(run: dict[str, Any], system: str, workload: str, c: int) -> dict[str, Any] | None:
    for s in run["systems"]:
        if s["system"] == system:
            return next((lv for lv in s["workloads"].get(workload, []) if lv["max_concurrency"] == c), None)
    return None


def markdown(run: dict[str, Any]) -> str:
    """Per workload and concurrency: each system's decode tok/s (1 / TPOT p50), output tok/s and TTFT p50, and the
    ratios the README quotes."""
    systems = [s["system"] for s in run["systems"]]
    lines = [
        f"{run['cpu']}, {run['threads']} threads, {run['model']}, {run['output_len']} output tokens "
        f"(ignore_eos, temperature 0), {run['num_prompts']} requests a level",
        "",
        "| workload | c | " + " | ".join(systems) + " |",
        "|---|---:|" + "---:|" * len(systems),
    ]
    for wl in run["prompt_sets"]:
        for c in run["concurrency"]:
            cells = []
            for s in systems:
                lv = _level(run, s, wl, c)
                if lv is None or not lv.get("completed"):
                    cells.append("-")
                    continue
                dec = lv.get("decode_tok_s")
                dec_s = f"{dec:.1f}" if dec is not None else "-"
                cells.append(f"{dec_s} / {lv['output_throughput']:.1f} / {lv['median_ttft_ms'] or 0:.0f} ms")
            lines.append(f"| {wl} | {c} | " + " | ".join(cells) + " |")
    lines += ["", "cells: decode tok/s (1 / TPOT p50) / output tok/s / TTFT p50", ""]
    for wl in run["prompt_sets"]:
        for c in run["concurrency"]:
            key = "decode_tok_s" if c == 1 else "output_throughput"
            what = "decode tok/s" if c == 1 else "output tok/s"

            def value(system: str, wl: str = wl, c: int = c, key: str = key) -> float | None:
                lv = _level(run, system, wl, c)
                return lv.get(key) if lv else None

            on, off = value("ours-ngram"), value("ours")
            peers = [v for v in (value("llama"), value("llama-ngram"), value("llama-draft")) if v]
            if on and off:
                lines.append(f"- {wl}, c={c}, {what}: ours ngram / ours off {on / off:.2f}x")
            draft = value("ours-draft")
            if draft and off:
                lines.append(f"- {wl}, c={c}, {what}: ours draft / ours off {draft / off:.2f}x")
            if on and peers:
                lines.append(f"- {wl}, c={c}, {what}: ours ngram / llama-server's best {on / max(peers):.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.spec", description=__doc__.split("\n")[0])
    ap.add_argument("--systems", default="ours,ours-ngram,llama,llama-ngram", help=f"from {','.join(SYSTEMS)}")
    ap.add_argument("--prompt-sets", default=",".join(WORKLOADS))
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--ctx", type=int, default=1024, help="llama-server's context per slot")
    ap.add_argument("--model", default=None, help="GGUF file; default: the SmolLM2 GGUF")
    ap.add_argument("--quantize", default=None, metavar="TYPE", help="the model requantized by llama-quantize")
    ap.add_argument("--ours-spec-args", default="", help="more flags for ours-ngram, e.g. '--num-speculative-tokens 8'")
    ap.add_argument(
        "--llama-spec-args",
        default="--spec-type ngram-simple --spec-ngram-simple-size-n 3 --spec-ngram-simple-size-m 8",
        help="llama-server's flags for llama-ngram",
    )
    ap.add_argument("--draft", default=None, help="draft GGUF of ours-draft and llama-draft (llama-server -md)")
    ap.add_argument("--llama-draft-args", default="--spec-draft-n-max 4", help="more flags for llama-draft")
    ap.add_argument("--llama-server", default=None, help="llama-server binary (default: built by the peer script)")
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    ap.add_argument("--out-dir", default=str(RESULTS / "spec"))
    a = ap.parse_args(argv)
    a.concurrency = [int(c) for c in a.concurrency.split(",") if c.strip()]
    a.prompt_sets = [w for w in a.prompt_sets.split(",") if w]
    gguf = os.path.abspath(a.model or default_gguf())
    if a.quantize:
        gguf, _ = quantize_gguf(gguf, a.quantize, lambda: llama_quantize_binary(None), QUANT_CACHE)
    run: dict[str, Any] = {
        "cpu": _cpu_name(),
        "threads": a.threads,
        "concurrency": a.concurrency,
        "prompt_sets": a.prompt_sets,
        "num_prompts": a.num_prompts,
        "output_len": a.output_len,
        "model": Path(gguf).name,
        "llama_spec_args": a.llama_spec_args,
        "systems": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-spec-") as log_dir:
        for system in [s for s in a.systems.split(",") if s]:
            run["systems"].append(bench_system(system, a, gguf, log_dir))
            log(json.dumps({"system": system, "done": True}))
    save_report(a.out_dir, "spec", run, markdown(run))
    return run


if __name__ == "__main__":
    main()
