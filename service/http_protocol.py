"""uvicorn's HTTP/1.1 protocol with a header-read timeout and a cap on open connections (issue #31).

uvicorn (h11) has neither: a connection that sends nothing, or sends its request head one byte a second, stays
open for ever, and enough of them exhaust the process's file descriptors. `guarded_h11_protocol(...)` makes the
protocol class `service.main` hands uvicorn (`uvicorn.Config(http=...)`):

- Header timeout: a timer starts when a connection opens and again after each response while the connection
  stays open; if the next request's head (request line and headers) is not complete within `header_timeout_s`,
  the connection is closed, with a 408 in the error shape if part of a head had arrived. Bodies have their own
  limit (`--request-body-timeout-s`, in the request middleware), idle keep-alive connections uvicorn's 5 s.
- Connection cap: a connection opened while `max_connections` are open is answered at once with a 503
  (`too_many_connections`, `Retry-After: 1`) and closed; the connections already open are served as usual.
  A refused connection waits up to `REFUSED_LINGER_S` for the client to close first (its request unread, so
  that it reads the 503 rather than a reset), at most `MAX_LINGERING` of them at a time.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.api.errors import error_body

REFUSED_LINGER_S = 1.0
MAX_LINGERING = 64


def _raw_response(status: str, message: str, type_: str, code: str, extra: str = "") -> bytes:
    body = json.dumps(error_body(message, type_, None, code)).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"{extra}connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with the header timeout and connection cap of `guarded_h11_protocol`'s subclass of it."""

    header_timeout_s: ClassVar[float] = 30.0
    max_connections: ClassVar[int | None] = None
    lingering: ClassVar[set[asyncio.Transport]]  # refused connections waiting for their client to close

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # bytes received since the timer started (0: the connection is idle)
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self._refuse()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.lingering.discard(self.transport)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the request of a refused connection is not read
        if self._head_timer is not None:
            self._head_bytes += len(data)
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request's head is complete: its cycle has started
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request's cycle
        if self.transport.is_closing():
            self._disarm()
        elif self.cycle is None or self.cycle.response_complete:
            self._arm()  # waiting for the next request's head

    def _arm(self) -> None:
        self._disarm()
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes and self.conn.our_state is h11.IDLE:
            self.transport.write(
                _raw_response(
                    "408 Request Timeout",
                    f"the request line and headers were not received within {self.header_timeout_s:g} s",
                    "timeout_error",
                    "request_header_timeout",
                )
            )
        self.transport.close()

    def _refuse(self) -> None:
        self._refused = True
        self.connections.discard(self)  # not counted: it is closing
        self.transport.write(
            _raw_response(
                "503 Service Unavailable",
                f"the server has {self.max_connections} connections open, its limit: retry later",
                "service_unavailable",
                "too_many_connections",
                "retry-after: 1\r\n",
            )
        )
        if len(self.lingering) >= MAX_LINGERING or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()  # the 503, then FIN; closed when the client closes (EOF), or after the linger
        self.lingering.add(self.transport)
        self.loop.call_later(REFUSED_LINGER_S, self.transport.close)


def guarded_h11_protocol(header_timeout_s: float, max_connections: int | None) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol class for one server (its own count of lingering refused connections)."""
    return type(
        "ServerH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout_s": header_timeout_s, "max_connections": max_connections, "lingering": set()},
    )
