"""Exact admission control for the LLM engine.

A request counts against the server's capacity (`max_num_seqs` running + `max_waiting` queued) from the
moment the API admits it until it leaves the engine, so requests that arrive together cannot all pass a
check that looked at a queue none of them had reached yet. The decision and the count change happen
under one lock.
"""

from __future__ import annotations

import threading

from service.engine.errors import EngineOverloadedError


class AdmissionControl:
    """Counts the requests the engine holds or has promised to take (`active`)."""

    def __init__(self, max_num_seqs: int, max_waiting: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._active = 0

    @property
    def capacity(self) -> int:
        return self.max_num_seqs + self.max_waiting

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        """Requests admitted beyond the decode slots: those that must queue (never above max_waiting)."""
        return max(0, self._active - self.max_num_seqs)

    def admit(self, n: int) -> Admission:
        """Reserve room for n requests at once, or raise EngineOverloadedError and reserve nothing."""
        with self._lock:
            if self._active + n > self.capacity:
                raise EngineOverloadedError(
                    f"server is at capacity ({self._active} requests running or queued; it holds "
                    f"{self.max_num_seqs} running and {self.max_waiting} queued)"
                )
            self._active += n
        return Admission(self, n)

    def enter(self) -> None:
        """Count a request that was not admitted through `admit` (direct engine use), without a limit."""
        with self._lock:
            self._active += 1

    def leave(self, n: int = 1) -> None:
        with self._lock:
            self._active -= n
            assert self._active >= 0, "admission count went negative"


class Admission:
    """Room for n admitted requests. Each `generate()` call takes one; `release()` returns what was not
    taken (also done when the ticket is garbage-collected, e.g. a stream whose body never started)."""

    def __init__(self, control: AdmissionControl, n: int) -> None:
        self._control = control
        self._left = n
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self._left < 1:
                raise RuntimeError("this admission has no request left to take")
            self._left -= 1

    def release(self) -> None:
        with self._lock:
            left, self._left = self._left, 0
        if left:
            self._control.leave(left)

    def __del__(self) -> None:
        self.release()
