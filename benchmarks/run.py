"""Benchmark our server against llama.cpp's `llama-server` and a plain HF transformers baseline.

Each system is started on 127.0.0.1 in turn (never two at once), warmed up and swept over the
concurrency levels (and Poisson rates, if given) on the same GGUF, the same prompts, the same
output length (`ignore_eos`, temperature 0) and the same thread count; then stopped by its PID.
Results: `benchmarks/results/<timestamp>.json`, `latest.md`, `throughput.png`, `ttft.png`.

    python -m benchmarks.run [--systems ours,llama,hf] [--concurrency 1,4,16,32] [--num-prompts 64]
                             [--output-len 128] [--threads 2] [--quick] [--quantize Q4_K_M]

--quantize TYPE benchmarks a file made from the model with llama.cpp's `llama-quantize --allow-requantize`
(cached: made once per source file and type).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from benchmarks import bandwidth
from benchmarks.default_model import default_gguf
from benchmarks.plot import plot_run
from benchmarks.prompts import PROMPT_SETS
from benchmarks.serve import TABLE_HEADER, BenchConfig, LevelResult, PromptPool, sweep, table_row

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
LLAMA_SCRIPT = REPO.parent / "shared" / "peers" / "llama-server.sh"
LLAMA_TOOLS_SCRIPT = REPO.parent / "shared" / "peers" / "llama-tools.sh"  # prints LLAMA_QUANTIZE=... (and more)
QUANT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aigc-bench" / "quants"
SYSTEMS = ("ours", "llama", "hf")
LABELS = {"ours": "ours", "llama": "llama-server", "hf": "hf-transformers"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Launch:
    """How to start one system: its command, environment additions and readiness path."""

    name: str
    cmd: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    port: int
    ready_path: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Terminate by PID, wait, then kill if it is still there."""
    if proc.poll() is not None:
        return
    log(f"stopping PID {proc.pid}")
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log(f"PID {proc.pid} ignored SIGTERM for {timeout:.0f} s; killing it")
        proc.kill()
        proc.wait(10)


class ServerExited(RuntimeError):
    """The server process ended before it was ready."""

    def __init__(self, msg: str, returncode: int) -> None:
        super().__init__(msg)
        self.returncode = returncode


def wait_ready(launch: Launch, proc: subprocess.Popen[bytes], timeout: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    url = launch.base_url + launch.ready_path
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerExited(
                f"{launch.name} exited with code {proc.returncode} before ready; log: {log_path}", proc.returncode
            )
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{launch.name} not ready after {timeout:.0f} s; log: {log_path}")


@contextmanager
def running(launch: Launch, log_dir: str, ready_timeout: float) -> Iterator[subprocess.Popen[bytes]]:
    """Start the server (own session, so Ctrl-C reaches only us), wait for readiness, always stop it."""
    log_path = os.path.join(log_dir, f"{launch.name}.log")
    log(f"starting {launch.name}: {' '.join(launch.cmd)}  (log: {log_path})")
    with open(log_path, "ab") as logf:  # a retry appends to the same log
        proc = subprocess.Popen(
            list(launch.cmd),
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **dict(launch.env)},
            start_new_session=True,
        )
        try:
            t0 = time.perf_counter()
            wait_ready(launch, proc, ready_timeout, log_path)
            log(f"{launch.name} ready in {time.perf_counter() - t0:.1f} s (PID {proc.pid})")
            yield proc
        finally:
            stop_process(proc)


def server_facts(base_url: str) -> dict[str, Any]:
    """The first entry of the server's GET /v1/models (the LM): `id`, and where the server says them
    `max_model_len`, `dtype`, `kernels`; {} if it cannot say."""
    try:
        data = httpx.get(base_url + "/v1/models", timeout=5.0).json().get("data") or []
        return dict(data[0]) if data and isinstance(data[0], dict) else {}
    except (httpx.HTTPError, ValueError, AttributeError):
        return {}


def served_model_id(base_url: str, fallback: str) -> str:
    return str(server_facts(base_url).get("id") or fallback)


def count_tokens(base_url: str, prompts: Sequence[str]) -> list[int]:
    """Token counts of `prompts` (special tokens included, as a completion request gets them) from the
    server's POST /tokenize; each distinct prompt is asked once."""
    counts: dict[str, int] = {}
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        for p in prompts:
            if p not in counts:
                r = client.post("/tokenize", json={"prompt": p})
                r.raise_for_status()
                counts[p] = int(r.json()["count"])
    return [counts[p] for p in prompts]


def _run_peer_script(script: Path, what: str, minutes: int, flag: str) -> str:
    """The stdout of the shared peer script that builds (once, cached) and locates llama.cpp's `what`."""
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found; pass {flag} PATH")
    log(f"locating {what} (the first llama.cpp build takes ~{minutes} min)")
    out = subprocess.run(["bash", str(script)], cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{what} build failed: {out.stderr.strip()[-500:]}")
    return out.stdout


def llama_server_binary(explicit: str | None) -> str:
    """The llama-server path: --llama-server, $LLAMA_SERVER, or built (cached) by the shared peer script."""
    path = explicit or os.environ.get("LLAMA_SERVER")
    if path:
        return path
    return _run_peer_script(LLAMA_SCRIPT, "llama-server", 8, "--llama-server").strip().splitlines()[-1]


def llama_quantize_binary(explicit: str | None) -> str:
    """The llama-quantize path: --llama-quantize, $LLAMA_QUANTIZE, or built (cached) by the shared peer script
    llama-tools.sh, which prints shell assignments, `LLAMA_QUANTIZE=<path>` among them."""
    path = explicit or os.environ.get("LLAMA_QUANTIZE")
    if path:
        return path
    stdout = _run_peer_script(LLAMA_TOOLS_SCRIPT, "llama-quantize", 10, "--llama-quantize")
    for line in stdout.splitlines():
        if line.startswith("LLAMA_QUANTIZE="):
            return shlex.split(line.split("=", 1)[1])[0]  # printf %q quoting
    raise RuntimeError(f"{LLAMA_TOOLS_SCRIPT} printed no LLAMA_QUANTIZE=: {stdout.strip()[-500:]}")


def quantized_path(src: str, qtype: str, cache_dir: str | os.PathLike[str]) -> Path:
    """Where `src` quantized to `qtype` is cached: `<cache>/<key>/<src stem>.<qtype>.gguf`, the key a digest of the
    source's resolved path, size and modification time (another file of the same name, or this one changed, gets
    its own folder); the file name says what it was made from and how."""
    p = Path(src).resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return Path(cache_dir) / key / f"{p.name.removesuffix('.gguf')}.{qtype}.gguf"


def quantize_gguf(
    src: str, qtype: str, binary: str | Callable[[], str], cache_dir: str | os.PathLike[str]
) -> tuple[str, list[str] | None]:
    """`src` quantized to `qtype` by llama-quantize (`--allow-requantize`: the source may itself be quantized),
    made once into the cache (written under a temporary name, then renamed). `binary`: its path, or a function
    that finds it (called only when the file is to be made). Returns the file and the command that made it (None:
    it was there already)."""
    qtype = qtype.upper()
    if not re.fullmatch(r"[A-Z0-9_]+", qtype):
        raise ValueError(f"--quantize {qtype!r}: expected a llama-quantize type such as Q4_K_M, Q8_0 or F16")
    out = quantized_path(src, qtype, cache_dir)
    if out.is_file():
        log(f"reusing {out}")
        return str(out), None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = [
        binary if isinstance(binary, str) else binary(),
        "--allow-requantize",
        str(Path(src).resolve()),
        str(tmp),
        qtype,
    ]
    log(f"quantizing: {shlex.join(cmd)}")
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not tmp.is_file():
            tail = (done.stderr or done.stdout).strip()[-800:]
            raise RuntimeError(f"llama-quantize to {qtype} failed (exit code {done.returncode}): {tail}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return str(out), cmd


def ctx_per_slot(token_counts: Sequence[int], output_len: int) -> int:
    """Context each llama-server slot needs: longest prompt + output + margin, rounded up to 256."""
    need = max(token_counts) + output_len + 64
    return int(math.ceil(need / 256) * 256)


def thread_env(threads: int) -> tuple[tuple[str, str], ...]:
    return (("OMP_NUM_THREADS", str(threads)), ("MKL_NUM_THREADS", str(threads)))


def ours_launch(name: str, gguf: str | None, threads: int | None, *flags: str) -> Launch:
    """Our server (`python -m service`) on `gguf` (None: its default model), 127.0.0.1 and a free port, `threads`
    threads (None: its default), warnings only, with `flags`; ready when /ready says so."""
    port = free_port()
    cmd = (sys.executable, *f"-m service --host 127.0.0.1 --port {port} --log-level warning".split())
    model = ("--model", gguf) if gguf is not None else ()
    return Launch(name, (*cmd, *model, *flags), thread_env(threads) if threads else (), port, "/ready")


def llama_launch(binary: str, gguf: str, threads: int, slots: int, ctx: int, *flags: str) -> Launch:
    """llama-server on `gguf` with `slots` slots of `ctx` tokens each, continuous batching, `threads` threads."""
    port = free_port()
    opts = f"--host 127.0.0.1 --port {port} -np {slots} -c {slots * ctx} -cb -t {threads} -tb {threads}".split()
    return Launch("llama", (binary, "-m", gguf, *opts, *flags), thread_env(threads), port, "/health")


def tokenizer_launch(gguf: str) -> Launch:
    """Our server on `gguf` with one thread and nothing but the LM: what /tokenize is asked before llama-server
    starts (its slots' context is sized from the prompts' token counts)."""
    return ours_launch("tokenizer", gguf, 1, "--no-enable-gan", "--no-enable-g2p", "--no-ui")


def llama_ctx(gguf: str, prompts: Sequence[str], output_len: int, log_dir: str, ready_timeout: float) -> int:
    """ctx_per_slot of `prompts`, counted by our server's tokenizer (the GGUF's own) over HTTP."""
    launch = tokenizer_launch(gguf)
    with running(launch, log_dir, ready_timeout):
        return ctx_per_slot(count_tokens(launch.base_url, prompts), output_len)


def make_launch(system: str, a: argparse.Namespace, gguf: str, dtype: str, slots: int, ctx: int) -> Launch:
    if system == "ours":
        flags = f"--dtype {dtype} --kernels {a.kernels} --no-enable-gan --drain-timeout-s 5 --max-num-seqs"
        return ours_launch("ours", gguf, a.threads, *flags.split(), str(max(32, slots)), *a.ours_args)
    if system == "hf":
        port = free_port()
        cmd = f"-m benchmarks.hf_server --host 127.0.0.1 --port {port} --dtype {dtype} --threads {a.threads}".split()
        return Launch("hf", (sys.executable, *cmd, "--model", gguf), thread_env(a.threads), port, "/health")
    if system == "llama":
        return llama_launch(llama_server_binary(a.llama_server), gguf, a.threads, slots, ctx, *a.llama_args)
    raise ValueError(f"unknown system {system!r}; expected one of {', '.join(SYSTEMS)}")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _by_conc(levels: Sequence[Mapping[str, Any]], c: int) -> Mapping[str, Any] | None:
    return next(
        (
            lv
            for lv in levels
            if lv.get("request_rate") is None and lv.get("max_concurrency") == c and lv.get("completed")
        ),
        None,
    )


def targets(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against llama-server (reported, never asserted)."""
    ours = run["systems"].get("ours", {}).get("levels", [])
    llama = run["systems"].get("llama", {}).get("levels", [])
    o1, l1, o16, l16 = _by_conc(ours, 1), _by_conc(llama, 1), _by_conc(ours, 16), _by_conc(llama, 16)

    def get(lv: Mapping[str, Any] | None, k: str) -> float | None:
        return None if lv is None else lv.get(k)

    rows = [
        (
            "single-stream decode tok/s (1/TPOT p50, c=1), ours/llama",
            _ratio(get(o1, "decode_tok_s"), get(l1, "decode_tok_s")),
            ">=",
            1.0,
        ),
        (
            "output throughput at c=16, ours/llama",
            _ratio(get(o16, "output_throughput"), get(l16, "output_throughput")),
            ">=",
            2.0,
        ),
        ("TTFT p50 at c=16, ours/llama", _ratio(get(o16, "median_ttft_ms"), get(l16, "median_ttft_ms")), "<=", 1.0),
    ]
    return [
        {"target": t, "value": v, "op": op, "goal": g, "met": None if v is None else (v >= g if op == ">=" else v <= g)}
        for t, v, op, g in rows
    ]


def roofline_fractions(run: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """Batch-1 decode vs the bandwidth bound, largest-concurrency throughput vs the matmul bound, per system."""
    roof, mb = run.get("roofline"), run.get("model_bytes")
    if not roof or not mb:
        return {}
    gflops = roof["matmul_gflop_s_bf16"] if mb["dtype"] == "bfloat16" else roof["matmul_gflop_s_fp32"]
    out: dict[str, dict[str, float | None]] = {}
    for name, s in run["systems"].items():
        levels = [lv for lv in s.get("levels", []) if lv.get("request_rate") is None and lv.get("completed")]
        if not levels:
            continue
        wbytes = {"llama": mb["stored_bytes"], "ours": mb.get("decode_bytes", mb["dense_bytes"])}.get(
            name, mb["dense_bytes"]
        )
        one = _by_conc(levels, 1)
        top = max(levels, key=lambda lv: lv["max_concurrency"])
        d1 = one.get("decode_tok_s") if one else None
        out[name] = {
            "weight_bytes": wbytes,
            "batch1_decode_tok_s": d1,
            "batch1_bandwidth_fraction": bandwidth.bandwidth_fraction(d1, wbytes, roof["read_bandwidth_gb_s"])
            if d1
            else None,
            "max_concurrency": top["max_concurrency"],
            "max_conc_output_tok_s": top["output_throughput"],
            "max_conc_flop_fraction": bandwidth.flop_fraction(top["output_throughput"], mb["params"], gflops),
        }
    return out


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _dtype_note(run: Mapping[str, Any]) -> str:
    """The dtype of ours and HF as the run knows it: asked for, or reported by the servers."""
    dtype = run["meta"]["dtype"]
    if dtype != "auto":
        return f"{dtype} for ours and HF"
    hf = run["systems"].get("hf", {}).get("reported", {}).get("dtype")
    hf_pick = f", HF picked {hf}" if hf else ""
    return f"`--dtype auto` for ours and HF, each picking its own: ours does not report its pick{hf_pick}"


def markdown_report(run: Mapping[str, Any]) -> str:
    """latest.md: setup, the table (with ours/llama ratio rows), targets and roofline fractions."""
    meta = run["meta"]
    lines = [
        f"# Serving benchmark {meta['timestamp']}",
        "",
        f"Model `{os.path.basename(meta['model'])}` ({_dtype_note(run)}; llama-server runs the GGUF "
        f"as stored), prompt set `{meta['prompt_set']}`, {meta['output_len']} output tokens per request "
        f"(`ignore_eos`, temperature 0), {_n(meta['threads'], 'thread')}, up to {meta['num_prompts']} "
        f"requests per level (at least 2x its concurrency), {meta['max_seconds']:.0f} s per level. "
        f"CPU: {meta['cpu']}.{' QUICK run: indicative only.' if meta.get('quick') else ''}"
        + (
            f" The model was made by `llama-quantize --allow-requantize` to {meta['quantize']} from "
            f"`{os.path.basename(meta['quantized_from'])}`."
            if meta.get("quantize")
            else ""
        ),
        "",
    ]
    rows = [TABLE_HEADER]
    for name, s in run["systems"].items():
        for lv in s.get("level_objects", []):
            rows.append(table_row(LABELS.get(name, name), lv))
    ours, llama = run["systems"].get("ours", {}).get("levels", []), run["systems"].get("llama", {}).get("levels", [])
    for lv in ours:
        c = lv.get("max_concurrency")
        other = _by_conc(llama, c) if lv.get("request_rate") is None and c else None
        if other is None or not lv.get("completed"):
            continue
        rows.append(
            f"| ours/llama | {c} | {_x(_ratio(lv['request_throughput'], other['request_throughput']))} | "
            f"{_x(_ratio(lv['output_throughput'], other['output_throughput']))} | "
            f"{_x(_ratio(lv['median_ttft_ms'], other['median_ttft_ms']))} | "
            f"{_x(_ratio(lv['p99_ttft_ms'], other['p99_ttft_ms']))} | "
            f"{_x(_ratio(lv['median_itl_ms'], other['median_itl_ms']))} | "
            f"{_x(_ratio(lv['median_tpot_ms'], other['median_tpot_ms']))} | |"
        )
    lines += rows + [
        "",
        "Ratio rows are ours / llama-server: above 1x is better for req/s and tok/s, below 1x is "
        "better for the latencies.",
        "",
    ]
    errs = [f"- {LABELS.get(n, n)}: {s['error']}" for n, s in run["systems"].items() if s.get("error")]
    if errs:
        lines += ["Errors:", *errs, ""]
    lines += ["## Targets against llama-server", "", "| target | value | goal | met |", "|---|---:|---:|---|"]
    for t in run.get("targets", []):
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"| {t['target']} | {_x(t['value'])} | {t['op']} {t['goal']:.1f}x | {met} |")
    roof, mb = run.get("roofline"), run.get("model_bytes")
    if roof and mb:
        lines += [
            "",
            "## Against this machine's bounds",
            "",
            f"Measured with {_n(roof['threads'], 'thread')}: memory read {roof['read_bandwidth_gb_s']:.1f} GB/s, "
            f"matmul {roof['matmul_gflop_s_fp32']:.0f} GFLOP/s fp32, {roof['matmul_gflop_s_bf16']:.0f} GFLOP/s "
            f"bf16. Model: {mb['params'] / 1e6:.1f} M parameters, {mb['dense_bytes'] / 1e6:.0f} MB in "
            f"{mb['dtype']}, {mb['stored_bytes'] / 1e6:.0f} MB as stored in the GGUF; our decode step reads "
            f"{mb.get('decode_bytes', mb['dense_bytes']) / 1e6:.0f} MB (quantized matrices as stored, the "
            f"rest in {mb['dtype']}).",
            "",
            "| system | weight MB read per token | batch-1 decode tok/s | of bandwidth bound | concurrency | "
            f"output tok/s | of {mb['dtype']} matmul FLOP/s bound |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, f in run.get("roofline_fractions", {}).items():
            b1, bf = f["batch1_decode_tok_s"], f["batch1_bandwidth_fraction"]
            lines.append(
                f"| {LABELS.get(name, name)} | {f['weight_bytes'] / 1e6:.0f} | "
                f"{'-' if b1 is None else f'{b1:.1f}'} | {'-' if bf is None else f'{bf:.1%}'} | "
                f"{f['max_concurrency']} | {f['max_conc_output_tok_s']:.1f} | "
                f"{f['max_conc_flop_fraction']:.1%} |"
            )
    lines += ["", "![output throughput](throughput.png)", "", "![TTFT](ttft.png)", ""]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    ap.add_argument("--systems", default="ours,llama,hf", help=f"comma-separated, from {','.join(SYSTEMS)}")
    ap.add_argument("--concurrency", default=None, help="comma-separated levels (default 1,4,16,32; quick: 1,4)")
    ap.add_argument("--request-rates", default="", help="comma-separated Poisson arrival rates (req/s) to add")
    ap.add_argument("--num-prompts", type=int, default=None, help="requests per level (default 64; quick: 8)")
    ap.add_argument("--output-len", type=int, default=None, help="output tokens per request (default 128; quick: 32)")
    ap.add_argument("--prompt-set", choices=PROMPT_SETS, default="short_chat")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="dtype for ours and HF (auto: what our server picks for its kernels on this CPU, which HF then "
        "gets too where our server reports it in GET /v1/models; else each server picks its own)",
    )
    ap.add_argument(
        "--kernels",
        default="auto",
        help="our server's decode backend (--kernels of python -m service), "
        "e.g. avx2 to measure the AVX2 build on an AVX-512 machine",
    )
    ap.add_argument("--model", default=None, help="GGUF file; default: the SmolLM2 GGUF")
    ap.add_argument(
        "--quantize",
        default=None,
        metavar="TYPE",
        help="benchmark the model quantized to TYPE (e.g. Q4_K_M, Q8_0, F16) by llama-quantize --allow-requantize, "
        "made once into --quant-cache",
    )
    ap.add_argument("--quant-cache", default=str(QUANT_CACHE), help="where --quantize's files are kept")
    ap.add_argument(
        "--llama-quantize", default=None, help="llama-quantize binary (default: $LLAMA_QUANTIZE or the peer script)"
    )
    ap.add_argument("--max-seconds", type=float, default=None, help="no request starts later (default 120; quick 60)")
    ap.add_argument("--drain-seconds", type=float, default=60.0, help="then in-flight requests are cancelled")
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    ap.add_argument("--llama-server", default=None, help="llama-server binary (default: build via the peer script)")
    ap.add_argument("--llama-args", default="", help="extra llama-server flags, one string: --llama-args='--no-repack'")
    ap.add_argument(
        "--ours-args",
        default="",
        help="extra flags for our server, one string: --ours-args='--max-num-batched-tokens 1024'",
    )
    ap.add_argument("--no-roofline", action="store_true", help="skip the bandwidth/FLOP measurement")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--log-dir", default=None, help="server logs (default: a new temp folder)")
    ap.add_argument("--quick", action="store_true", help="small smoke run: concurrency 1,4, 8 prompts, 32 tokens")
    a = ap.parse_args(argv)
    a.concurrency = _ints(a.concurrency or ("1,4" if a.quick else "1,4,16,32"))
    a.num_prompts = a.num_prompts or (8 if a.quick else 64)
    a.output_len = a.output_len or (32 if a.quick else 128)
    a.max_seconds = a.max_seconds or (60.0 if a.quick else 120.0)
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    a.llama_args, a.ours_args = shlex.split(a.llama_args), shlex.split(a.ours_args)
    for s in a.systems:
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r}; expected some of {','.join(SYSTEMS)}")
    return a


def sweep_prompt_set(
    base_url: str,
    model: str,
    prompt_set: str,
    a: argparse.Namespace,
    rates: Sequence[float] = (),
    label: str = "",
) -> list[LevelResult]:
    """Sweep one served model over `a.concurrency` (then `rates`) with fresh prompts of `prompt_set` per level (every
    system sees the same prompts in the same order): `a` gives output_len, num_prompts, max_seconds and, where it
    has one, drain_seconds."""
    pool = PromptPool(prompt_set)
    base = BenchConfig(
        base_url=base_url,
        model=model,
        prompts=pool.take(1),
        output_len=a.output_len,
        num_requests=a.num_prompts,
        max_seconds=a.max_seconds,
        drain_seconds=getattr(a, "drain_seconds", BenchConfig.drain_seconds),
    )
    return asyncio.run(sweep(base, a.concurrency, rates, prompts_for=pool.take, label=label))


def save_report(out_dir: str | os.PathLike[str], stem: str, run: Mapping[str, Any], report: str) -> Path:
    """Write a benchmark's results as `stem-<time>.json` and its report as `latest.md` in `out_dir`; print the
    report; return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(run, indent=2))
    (out / "latest.md").write_text(report + "\n")
    print(report)
    return out


def bench_system(
    launch: Launch, a: argparse.Namespace, rates: Sequence[float], gguf: str, log_dir: str
) -> tuple[list[LevelResult], dict[str, Any]]:
    """Start one system, ask what it serves (GET /v1/models), sweep it (warm-up before each level), stop it."""
    with running(launch, log_dir, a.ready_timeout) as proc:
        facts = server_facts(launch.base_url)
        model = str(facts.get("id") or os.path.splitext(os.path.basename(gguf))[0])
        try:
            levels = sweep_prompt_set(launch.base_url, model, a.prompt_set, a, rates, LABELS[launch.name])
        except RuntimeError:
            if proc.poll() is None:
                raise
            levels = []
        if proc.poll() is not None:  # it crashed under load: its figures are not a measurement
            raise ServerExited(
                f"{launch.name} exited with code {proc.returncode} during the benchmark; "
                f"log: {os.path.join(log_dir, launch.name + '.log')}",
                proc.returncode,
            )
        return levels, facts


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# What a server may say of its LM in its GET /v1/models entry, kept with each system's results.
REPORTED = ("max_model_len", "dtype", "kernels")


def _model_bytes(run: dict[str, Any], gguf: str, dtype: str) -> None:
    if dtype == "auto":
        log(
            "--dtype auto and our server did not report the dtype it picked (no `dtype` in GET /v1/models): "
            "no weight bytes, so no roofline fractions; pass --dtype float32 or bfloat16 for them"
        )
        return
    run["model_bytes"] = asdict(bandwidth.model_bytes(gguf, dtype))


def model_file(a: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The GGUF every system loads: --model (or the default one), or with --quantize the file made from it; and what
    the run records of how it was made."""
    src = os.path.abspath(a.model or default_gguf())
    if not a.quantize:
        return src, {}
    gguf, cmd = quantize_gguf(src, a.quantize, lambda: llama_quantize_binary(a.llama_quantize), a.quant_cache)
    made = {"quantized_from": src, "quantize": a.quantize.upper(), "quantize_command": cmd, "quantize_reused": not cmd}
    return gguf, made


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops servers even if started as a background job
    gguf, made = model_file(a)
    # The dtype ours and HF run in: --dtype; with auto, the one our server reports it picked (it runs first by
    # default; HF then gets the same), else each server picks its own and the results say "auto".
    dtype = a.dtype
    rates = [float(x) for x in a.request_rates.split(",") if x.strip()]
    slots = max([*a.concurrency, 1])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = a.log_dir or tempfile.mkdtemp(prefix=f"bench-logs-{stamp}-")
    os.makedirs(log_dir, exist_ok=True)
    os.makedirs(a.out_dir, exist_ok=True)
    run: dict[str, Any] = {
        "meta": {
            "timestamp": stamp,
            "model": gguf,
            "dtype": dtype,
            "dtype_requested": a.dtype,
            "kernels": a.kernels,
            "prompt_set": a.prompt_set,
            "output_len": a.output_len,
            "num_prompts": a.num_prompts,
            "concurrency": a.concurrency,
            "request_rates": rates,
            "threads": a.threads,
            "max_seconds": a.max_seconds,
            "drain_seconds": a.drain_seconds,
            "quick": a.quick,
            "cpu": _cpu_name(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "log_dir": log_dir,
            **made,
        },
        "systems": {},
    }
    if not a.no_roofline:
        log(f"measuring memory bandwidth and matmul FLOP/s with {a.threads} threads")
        roof = bandwidth.measure(a.threads, (256 << 20) if a.quick else (1 << 30), 3 if a.quick else 5)
        run["roofline"] = asdict(roof)
        log(
            f"read {roof.read_bandwidth_gb_s:.1f} GB/s, matmul {roof.matmul_gflop_s_fp32:.0f} GFLOP/s fp32, "
            f"{roof.matmul_gflop_s_bf16:.0f} GFLOP/s bf16"
        )
    if dtype != "auto":
        _model_bytes(run, gguf, dtype)
    ctx = 0
    try:
        for system in a.systems:
            entry: dict[str, Any] = {"levels": [], "level_objects": [], "error": None}
            run["systems"][system] = entry
            try:
                if system == "llama" and not ctx:
                    probe = PromptPool(a.prompt_set).take(4096)
                    ctx = llama_ctx(gguf, probe, a.output_len, log_dir, a.ready_timeout)
                launch = make_launch(system, a, gguf, dtype, slots, ctx)
                entry["command"] = list(launch.cmd)
                try:
                    levels, facts = bench_system(launch, a, rates, gguf, log_dir)
                except ServerExited as e:
                    # ggml's AMX kernels die with SIGILL on some VMs (tile state not kept for the process);
                    # without weight repacking llama-server does not use them.
                    if system != "llama" or e.returncode != -signal.SIGILL or "--no-repack" in launch.cmd:
                        raise
                    log(
                        "llama-server died of SIGILL (AMX kernels this machine does not allow); retrying "
                        "with --no-repack"
                    )
                    launch = replace(launch, cmd=(*launch.cmd, "--no-repack"))
                    entry["command"] = list(launch.cmd)
                    levels, facts = bench_system(launch, a, rates, gguf, log_dir)
                entry["reported"] = {k: facts[k] for k in REPORTED if k in facts}
                if system == "ours":
                    if dtype == "auto" and facts.get("dtype"):
                        dtype = run["meta"]["dtype"] = str(facts["dtype"])
                        log(f"our server picked {dtype}; HF runs in it too")
                    if facts.get("kernels"):
                        run["meta"]["kernels"] = str(facts["kernels"])
                entry["level_objects"] = levels
                entry["levels"] = [lv.to_json() for lv in levels]
                for lv in levels:
                    m = lv.metrics
                    log(
                        f"{LABELS[system]} c={lv.max_concurrency}: {m.output_throughput:.1f} tok/s, "
                        f"TTFT p50 {m.median_ttft_ms or 0:.0f} ms, {m.completed}/{lv.num_requests_sent} done"
                        + (f", first error: {lv.first_error}" if lv.first_error else "")
                    )
            except (RuntimeError, OSError, ValueError) as e:
                entry["error"] = f"{type(e).__name__}: {e}"
                log(f"{system} failed: {entry['error']}")
    finally:
        if "model_bytes" not in run:
            try:
                _model_bytes(run, gguf, dtype)
            except (OSError, ValueError) as e:
                log(f"counting the GGUF's weight bytes failed: {type(e).__name__}: {e}")
        run["targets"] = targets(run)
        run["roofline_fractions"] = roofline_fractions(run)
        report = markdown_report(run)
        for s in run["systems"].values():
            s.pop("level_objects", None)
        out_json = os.path.join(a.out_dir, f"{stamp}.json")
        with open(out_json, "w") as f:
            json.dump(run, f, indent=2)
        with open(os.path.join(a.out_dir, "latest.md"), "w") as f:
            f.write(report)
        pngs = plot_run(run, a.out_dir)
        log(f"wrote {out_json}, {os.path.join(a.out_dir, 'latest.md')}, {', '.join(pngs)}")
        print(report)
    return run


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        log("interrupted; servers stopped, partial results written")
        sys.exit(130)
