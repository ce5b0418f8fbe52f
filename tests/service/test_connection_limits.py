"""Slow headers and too many connections (issue #31, item 5): `python -m service` runs as a subprocess (the tiny
random llama with the real tokenizer in place of the default model), with `--header-timeout-s 4 --max-connections
8`. Raw sockets that trickle a request head one header line every half second, send nothing, or trickle the next
request on a kept-alive connection are closed once the timeout passes (a 408 in the error shape where part of a
head came), while real requests complete during the trickle; past the cap a new connection gets a 503
(`too_many_connections`) at once and the server stays healthy."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.config import Settings, parse_settings

REPO = Path(__file__).resolve().parents[2]
HEADER_TIMEOUT_S = 4.0
MAX_CONNECTIONS = 8

SERVE = """
import sys
import service.main as m
from model_core.default_model import find_default_model
from model_core.tokenizer import Tokenizer
from tests.service.server_utils import tiny_text_model
from tests.utils import tiny_llama

def tiny(settings, observer=None):
    return tiny_text_model(tiny_llama(), Tokenizer.from_gguf(find_default_model()))

m.build_text_model = tiny
raise SystemExit(m.main(sys.argv[1:]))
"""


class Server:
    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc, self.port = proc, port
        self.base_url = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> httpx.Response:
        """One request on a connection of its own, closed after it (no kept-alive connection counts)."""
        return httpx.get(self.base_url + path, headers={"Connection": "close"}, timeout=30.0)

    def chat(self) -> httpx.Response:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        return httpx.post(
            self.base_url + "/v1/chat/completions", json=body, headers={"Connection": "close"}, timeout=60.0
        )

    def assert_healthy(self) -> None:
        assert self.proc.poll() is None, f"the server died: exit status {self.proc.returncode}"
        assert self.get("/health").status_code == 200
        r = self.chat()
        assert r.status_code == 200, r.text

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10.0)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    args = ["--port", str(port), "--header-timeout-s", str(HEADER_TIMEOUT_S), "--max-connections", str(MAX_CONNECTIONS)]
    args += ["--enable-gan", "false", "--enable-g2p", "false", "--no-ui", "--log-level", "warning"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    live = Server(proc, port)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if live.get("/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.2)
        yield live
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


class Watched:
    """A raw client socket: what it received and when the server closed it."""

    def __init__(self, sock: socket.socket, trickle: list[bytes]) -> None:
        self.sock, self.trickle = sock, trickle
        self.received = b""
        self.closed_after: float | None = None
        sock.setblocking(False)

    def poll(self, t0: float) -> None:
        while self.closed_after is None:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:  # reset
                data = b""
            if not data:
                self.closed_after = time.monotonic() - t0
            self.received += data

    def send_next(self, t0: float) -> None:
        if self.closed_after is None and self.trickle:
            try:
                self.sock.send(self.trickle.pop(0))
            except OSError:
                self.closed_after = time.monotonic() - t0


def _trickle(n: int) -> list[bytes]:
    return [b"POST /v1/chat/completions HTTP/1.1\r\n", b"Host: x\r\n"] + [b"X-Pad-%d: a\r\n" % i for i in range(n)]


def _error(raw: bytes) -> tuple[int, dict[str, object], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"], head.lower()


def test_slow_headers_are_closed_after_the_timeout_while_real_requests_complete(server: Server) -> None:
    t0 = time.monotonic()
    trickling = [Watched(server.connect(), _trickle(100)) for _ in range(4)]
    silent = Watched(server.connect(), [])
    kept = server.connect()  # a kept-alive connection: one request answered, then the next trickled
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    first = b""
    while b"\r\n\r\n" not in first or not first.endswith(b"}"):
        first += kept.recv(65536)
    assert first.startswith(b"HTTP/1.1 200"), first
    t_kept = time.monotonic() - t0
    again = Watched(kept, _trickle(100))
    watched = [*trickling, silent, again]
    served = 0
    while any(w.closed_after is None for w in watched) and time.monotonic() - t0 < HEADER_TIMEOUT_S + 10:
        for w in watched:
            w.send_next(t0)
        r = server.chat() if served % 3 == 0 else server.get("/health")  # real requests during the trickle
        assert r.status_code == 200, r.text
        served += 1
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            select.select([w.sock for w in watched if w.closed_after is None], [], [], max(0.0, end - time.monotonic()))
            for w in watched:
                w.poll(t0)
    for w in watched:
        w.sock.close()
    assert served >= 6
    for w in [*trickling, silent]:
        assert w.closed_after is not None, "a slow head was never closed"
        assert HEADER_TIMEOUT_S - 0.2 <= w.closed_after <= HEADER_TIMEOUT_S + 3, w.closed_after
    assert again.closed_after is not None
    assert HEADER_TIMEOUT_S - 0.2 <= again.closed_after - t_kept <= HEADER_TIMEOUT_S + 3
    for w in [*trickling, again]:  # part of a head came: a 408 in the error shape, then the close
        status, err, head = _error(w.received)
        assert status == 408 and err["code"] == "request_header_timeout", w.received
        assert b"connection: close" in head
    assert silent.received == b""  # nothing came: closed without an answer
    server.assert_healthy()


def test_connections_past_the_cap_get_a_503_and_the_server_stays_healthy(server: Server) -> None:
    socks = [server.connect() for _ in range(MAX_CONNECTIONS + 4)]
    try:
        time.sleep(0.5)  # the refused ones have their 503 by now
        readable, _, _ = select.select(socks, [], [], 0)
        refused = [s for s in socks if s in readable]
        held = [s for s in socks if s not in readable]
        assert len(refused) >= 4 and len(held) <= MAX_CONNECTIONS, (len(refused), len(held))
        assert len(held) >= MAX_CONNECTIONS - 2  # the connections open before were closed
        for s in refused:
            s.settimeout(5.0)
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
            status, err, head = _error(raw)
            assert status == 503 and err["code"] == "too_many_connections", raw
            assert b"retry-after: 1" in head and b"connection: close" in head
        r = server.get("/health")  # a real client, past the cap: the 503, not a reset
        assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_connections", r.text
        assert r.headers["retry-after"] == "1"
        for s in held:  # the connections under the cap are served as usual
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for s in held:
            s.settimeout(10.0)
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
            assert raw.startswith(b"HTTP/1.1 200"), raw
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    while (r := server.get("/health")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.status_code == 200
    server.assert_healthy()


def test_the_header_timeout_and_the_connection_cap_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    default = Settings()
    assert 0 < default.header_timeout_s <= 60 and default.max_connections >= 100
    s = parse_settings(["--header-timeout-s", "2.5", "--max-connections", "16"])
    assert (s.header_timeout_s, s.max_connections) == (2.5, 16)
    monkeypatch.setenv("AIGC_HEADER_TIMEOUT_S", "7")
    monkeypatch.setenv("AIGC_MAX_CONNECTIONS", "9")
    assert (Settings().header_timeout_s, Settings().max_connections) == (7, 9)
    for bad in (["--header-timeout-s", "0"], ["--max-connections", "0"]):
        with pytest.raises(SystemExit):
            parse_settings(bad)
