"""Compile isolation: each new grammar is tried in a worker process before the server compiles it (issue #31).

The grammar bounds (`grammar_bounds`) stop every grammar known to crash llguidance's native compiler, but a crash
they do not foresee would still end the whole server. `llguidance.LLMatcher.validate_grammar` needs no tokenizer
and runs the same compilation (it crashes at the same points: Lark chains of 40,000 rules, `$defs` chains of
20,000 objects on a 64 MiB stack), so a grammar is validated first in a probe worker, a small process that
imports llguidance only, with the work limits and the thread stack of the in-process compile:

    probe = GrammarProbe(workers=2)
    probe.check(grammar_json, limits, timeout_s=5.0)   # None; CompilerCrash or CompileTimeout

A worker that dies while it holds a grammar (a signal: SIGSEGV, SIGABRT) makes `check` raise `CompilerCrash`, and
the pool starts another worker; one that takes longer than the timeout is killed and `check` raises
`CompileTimeout`. Verdicts are cached by the grammar's SHA-256 (a grammar seen before costs a dict lookup;
crashes are remembered, timeouts are not: they depend on load), and invalid grammars pass: the in-process compile
gives their error as before. Workers are started with `subprocess` (fork and exec of a fresh interpreter: nothing
of the threaded server is inherited), lazily, up to `workers` at a time, and reused; each exits when its stdin
closes, so none outlives the server. If workers cannot start at all, `check` raises `ProbeUnavailable`.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

WORKER_STACK_BYTES = 64 * 2**20  # the compile threads' stack (grammar.COMPILE_STACK_BYTES): the same crash points
READY_TIMEOUT_S = 60.0  # a worker's start-up: an interpreter and llguidance (about 0.1 s unloaded)
CACHE_SIZE = 4096  # verdicts remembered (a digest and a flag each)
_READY = b"ready"
_TEST_ABORT_ENV = "AIGC_TEST_GRAMMAR_PROBE_ABORT"  # tests: a grammar holding this text makes the worker abort


class ProbeError(Exception):
    pass


class CompilerCrash(ProbeError):
    """The grammar crashed the native compiler in a probe worker (the signal's name in the message)."""


class CompileTimeout(ProbeError):
    """The probe did not finish within the timeout (the worker was killed)."""


class ProbeUnavailable(ProbeError):
    """No probe worker could be started."""


def limits_dict(limits: Any) -> dict[str, Any]:
    """An `llguidance.LLParserLimits` as JSON-able keyword arguments."""
    names = (
        "max_items_in_row",
        "initial_lexer_fuel",
        "step_lexer_fuel",
        "step_max_items",
        "max_lexer_states",
        "max_grammar_size",
        "precompute_large_lexemes",
        "verbose_errors",
    )
    return {n: getattr(limits, n) for n in names if hasattr(limits, n)}


def _signal_name(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


class _Worker:
    """One probe process: requests and answers are JSON lines on its stdin and stdout."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[1])  # where `model_core` is importable from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from model_core.grammar_probe import worker_main; worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in: IO[bytes] = self.proc.stdin
        self._out = self.proc.stdout.fileno()
        self._buf = b""
        self._poll = select.poll()
        self._poll.register(self._out, select.POLLIN)
        self.ready = False

    def read_line(self, deadline: float) -> bytes | None:
        """The next line from the worker; None at EOF (it died); TimeoutError past the deadline."""
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if not self._poll.poll(left * 1000):  # poll, not select: descriptors may be past FD_SETSIZE
                continue
            chunk = os.read(self._out, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def send(self, request: dict[str, Any]) -> None:
        self._in.write(json.dumps(request).encode() + b"\n")
        self._in.flush()

    def dead_status(self) -> str:
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()
        return _signal_name(self.proc.returncode)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.close_pipes()

    def close(self) -> None:
        """Ask it to exit (EOF on its stdin)."""
        self.close_pipes()
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.kill()

    def close_pipes(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass


class GrammarProbe:
    """A pool of up to `workers` probe processes and a cache of verdicts. Thread-safe."""

    def __init__(self, workers: int = 2, cache_size: int = CACHE_SIZE) -> None:
        if workers < 1:
            raise ValueError("a probe needs at least one worker")
        self.workers = workers
        self.cache_size = cache_size
        self._idle: list[_Worker] = []
        self._started = 0  # workers alive, idle or busy
        self._cond = threading.Condition()
        self._verdicts: collections.OrderedDict[bytes, str] = collections.OrderedDict()  # digest -> "" | crash
        self._closed = False
        self.crashes = 0  # workers lost to grammars
        self.probes = 0  # grammars sent to a worker

    def warm(self) -> None:
        """Start a worker now, if none is (it gets ready in the background)."""
        with self._cond:
            if self._started == 0 and not self._closed:
                self._idle.append(self._spawn())

    def check(self, grammar: str, limits: dict[str, Any] | None = None, timeout_s: float = 5.0) -> None:
        """Return if `grammar` (llguidance's JSON grammar) compiles without crashing (valid or not); raise
        CompilerCrash if it crashed a worker, CompileTimeout past `timeout_s`, ProbeUnavailable if no worker
        starts."""
        digest = hashlib.sha256(json.dumps([grammar, limits or {}]).encode("utf-8", "surrogatepass")).digest()
        with self._cond:
            verdict = self._verdicts.get(digest)
            if verdict is not None:
                self._verdicts.move_to_end(digest)
        if verdict is None:
            verdict = self._probe(grammar, limits or {}, time.monotonic() + timeout_s, timeout_s)
            with self._cond:
                self._verdicts[digest] = verdict
                self._verdicts.move_to_end(digest)
                while len(self._verdicts) > self.cache_size:
                    self._verdicts.popitem(last=False)
        if verdict:
            raise CompilerCrash(verdict)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._started -= len(idle)
            self._cond.notify_all()
        for w in idle:
            w.close()

    def alive(self) -> int:
        """Workers started and not lost (idle or busy)."""
        with self._cond:
            return self._started

    def _spawn(self) -> _Worker:  # under self._cond
        try:
            w = _Worker()
        except OSError as e:
            raise ProbeUnavailable(f"cannot start a grammar probe worker: {e}") from e
        self._started += 1
        return w

    def _acquire(self, deadline: float) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise ProbeUnavailable("the grammar probe is closed")
                if self._idle:
                    return self._idle.pop()
                if self._started < self.workers:
                    return self._spawn()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self._cond.wait(left)

    def _release(self, w: _Worker | None, replace: bool = False) -> None:
        """Give `w` back (None: it is gone); `replace`: start another at once, ready for the next grammar."""
        with self._cond:
            if w is None:
                self._started -= 1
                if replace and not self._closed and self._started < self.workers:
                    try:
                        self._idle.append(self._spawn())
                    except ProbeUnavailable:
                        pass
            elif self._closed:
                self._started -= 1
            else:
                self._idle.append(w)
            self._cond.notify()
        if w is not None and self._closed:
            w.close()

    def _probe(self, grammar: str, limits: dict[str, Any], deadline: float, timeout_s: float) -> str:
        """ "" if the grammar compiled (or was refused) in a worker; the crash's description if it killed one."""
        for _attempt in range(3):  # a worker found dead before it got the grammar is not the grammar's fault
            try:
                w = self._acquire(deadline)
            except TimeoutError:
                raise CompileTimeout(f"waited {timeout_s:g}s for a grammar probe worker") from None
            try:
                if not w.ready:
                    line = w.read_line(max(deadline, time.monotonic() + READY_TIMEOUT_S))
                    if line != _READY:
                        status = w.dead_status()
                        self._release(None)
                        raise ProbeUnavailable(f"a grammar probe worker did not start ({status})")
                    w.ready = True
                try:
                    w.send({"grammar": grammar, "limits": limits})
                except OSError:  # it was dead already
                    w.kill()
                    self._release(None, replace=True)
                    continue
                self.probes += 1
                line = w.read_line(deadline)
            except TimeoutError:
                w.kill()
                self._release(None, replace=True)
                raise CompileTimeout(f"compiling took longer than {timeout_s:g}s") from None
            if line is None:
                status = w.dead_status()
                w.close_pipes()
                self._release(None, replace=True)
                with self._cond:
                    self.crashes += 1
                log.warning("a grammar crashed the grammar compiler in a probe worker (%s); refused", status)
                return f"the grammar crashed the grammar compiler ({status} in a probe process)"
            self._release(w)
            return ""
        raise ProbeUnavailable("grammar probe workers keep dying before they get a grammar")


def worker_main() -> None:
    """A probe worker: for each request line, validate its grammar on a thread with the compile threads' stack
    and answer one line (its error, empty if none). Exits at EOF on stdin."""
    import llguidance

    out = os.fdopen(os.dup(1), "wb")  # answers go here; anything the library prints goes to stderr
    os.dup2(2, 1)
    abort_marker = os.environ.get(_TEST_ABORT_ENV)

    def serve() -> None:
        out.write(_READY + b"\n")
        out.flush()
        for raw in sys.stdin.buffer:
            request = json.loads(raw)
            grammar: str = request["grammar"]
            if abort_marker and abort_marker in grammar:
                os.abort()
            try:
                limits = llguidance.LLParserLimits(**request["limits"])
                error = llguidance.LLMatcher.validate_grammar(grammar, limits=limits)
            except Exception as e:  # a refused grammar: the in-process compile says why
                error = f"{type(e).__name__}: {e}"
            out.write(json.dumps({"error": error}).encode() + b"\n")
            out.flush()

    threading.stack_size(WORKER_STACK_BYTES)
    t = threading.Thread(target=serve, name="grammar-probe")
    t.start()
    t.join()


_shared_lock = threading.Lock()
_shared: GrammarProbe | None = None
_shared_workers = 2


def configure_shared_probe(workers: int) -> None:
    """The process's probe: `workers` processes at most (0: no probe). Changing it closes the one in use."""
    global _shared, _shared_workers
    with _shared_lock:
        if workers == _shared_workers:
            return
        old, _shared, _shared_workers = _shared, None, workers
    if old is not None:
        old.close()


def shared_probe() -> GrammarProbe | None:
    """The process's probe (made on first use), or None if it is configured off."""
    global _shared
    with _shared_lock:
        if _shared is None and _shared_workers > 0:
            _shared = GrammarProbe(_shared_workers)
        return _shared
