"""SIGTERM on a real server process: in-flight streams finish, new requests get 503, exit code 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(smol_path: str, drain_timeout_s: float) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {**os.environ, "AIGC_DRAIN_TIMEOUT_S": str(drain_timeout_s), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "--port",
            str(port),
            "--model",
            smol_path,
            "--enable-gan",
            "false",
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "server exited"
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.2)


def test_sigterm_drains_in_flight_streams_then_exits_zero(smol_path: str) -> None:
    proc, base = _start(smol_path, 30)
    try:
        chunks: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {
                "prompt": "Once upon a time",
                "max_tokens": 48,
                "ignore_eos": True,
                "temperature": 0,
                "stream": True,
            }
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        chunks.append(line)
                        started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60), "the stream never started"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "draining"
        assert httpx.get(f"{base}/ready", timeout=10).status_code == 503
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        t.join(60)
        assert chunks[-1] == "data: [DONE]"
        assert sum('"text"' in c for c in chunks) >= 48 - 1  # every token arrived
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_drain_timeout_ends_open_streams_with_an_error_and_done_then_exits_zero(smol_path: str) -> None:
    """Streams still running when the drain times out get an error event and [DONE]; the engine is stopped
    before the interpreter exits, so the process never dies inside torch (SIGABRT, exit 134)."""
    for attempt in range(2):
        proc, base = _start(smol_path, 1.0)
        try:
            streams: list[list[str]] = [[], []]
            started = threading.Barrier(3)

            def stream(out: list[str], base: str = base, started: threading.Barrier = started) -> None:
                body = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True}
                with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
                    lines = r.iter_lines()
                    out.append(next(lines))
                    started.wait()
                    out.extend(line for line in lines if line)

            threads = [threading.Thread(target=stream, args=(out,)) for out in streams]
            for t in threads:
                t.start()
            started.wait(60)
            time.sleep(0.2 * attempt)  # a different point of the step loop each time
            proc.send_signal(signal.SIGTERM)
            for t in threads:
                t.join(60)
            code = proc.wait(timeout=60)
            stderr = proc.stderr.read().decode() if proc.stderr else ""
            assert code == 0 and "terminate called" not in stderr, (code, stderr[-2000:])
            for out in streams:
                assert out[-1] == "data: [DONE]", out[-3:]
                err = json.loads(out[-2][len("data: ") :])["error"]
                assert err["code"] == "engine_dead" and "shutting down" in err["message"], err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
