"""Per-request plumbing as one ASGI middleware: request id, body size and time limits, the JSON content
type, in-flight count for graceful drain, what runs when a response has ended (`on_response_end`: a streamed one
included), and one structured log line per request with its timing (never the prompt)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_body

log = logging.getLogger("service.access")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
UNTRACKED = frozenset({"/health", "/ready", "/metrics"})


class InFlight:
    """Counts requests being served (probes excluded), for the SIGTERM drain."""

    def __init__(self) -> None:
        self.count = 0


def on_response_end(request: Request, fn: Callable[[], None]) -> None:
    """Call `fn` once this request's response has ended: sent (a stream: its last chunk), failed or cut by the
    client (the model a request holds is given back so)."""
    request.scope["state"][_RESPONSE_END].append(fn)


_RESPONSE_END = "response_end"


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def _conflicting_lengths(scope: Scope) -> bool:
    lengths = {v.strip() for k, v in scope.get("headers", ()) if k == b"content-length"}
    return len(lengths) > 1


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        inflight: InFlight,
        body_timeout_s: float = 30.0,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.inflight = inflight
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        ends: list[Callable[[], None]] = []
        scope["state"][_RESPONSE_END] = ends
        t0 = time.perf_counter()
        status = 0
        tracked = scope["path"] not in UNTRACKED

        if b"transfer-encoding" in headers and b"content-length" in headers or _conflicting_lengths(scope):
            # RFC 9112 6.3: a proxy and this server could each frame the body differently (request smuggling)
            await self._send_error(
                send,
                rid,
                400,
                "the request has both Content-Length and Transfer-Encoding (or conflicting Content-Lengths): "
                "send one framing of the body",
                "invalid_request_error",
                "conflicting_framing",
                close=True,
            )
            self._log(scope, rid, 400, t0)
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._send_body_error(send, rid, self._too_large())
            self._log(scope, rid, 413, t0)
            return
        content_type = headers.get(b"content-type")
        if scope["method"] == "POST" and content_type is not None and not _is_json(content_type):
            await self._send_error(
                send,
                rid,
                415,
                f"Content-Type {content_type.decode('latin-1')[:64]!r} is not "
                "supported: send the body as JSON with 'Content-Type: application/json'",
                "invalid_request_error",
                "unsupported_media_type",
            )
            self._log(scope, rid, 415, t0)
            return

        received = 0
        replaced = body_done = False
        body_error: _BodyError | None = None
        body_deadline = time.monotonic() + self.body_timeout_s

        async def limited_receive() -> Message:
            nonlocal received, body_done, body_error
            if body_done:  # after the body only the disconnect is left to wait for: no limit
                return await receive()
            try:
                msg = await self._receive_body(receive, body_deadline)
                if msg["type"] == "http.request":
                    received += len(msg.get("body", b""))
                    body_done = not msg.get("more_body", False)
                    if received > self.max_body_bytes:
                        raise self._too_large()
            except _BodyError as e:
                body_error = e
                raise
            return msg

        async def send_with_id(msg: Message) -> None:
            nonlocal status, replaced
            if replaced:
                return
            if body_error is not None and status == 0 and msg["type"] == "http.response.start":
                # the app answered a body it could not read (FastAPI turns the error into a 400): the
                # client gets the real reason instead
                replaced, status = True, body_error.status
                await self._send_body_error(send, rid, body_error)
                return
            if msg["type"] == "http.response.start":
                status = msg["status"]
                msg.setdefault("headers", [])
                msg["headers"] = [*msg["headers"], (b"x-request-id", rid.encode())]
            await send(msg)

        if tracked:
            self.inflight.count += 1
        try:
            await self.app(scope, limited_receive, send_with_id)
        except _BodyError as e:
            if status == 0:
                await self._send_body_error(send, rid, e)
            status = e.status
        except Exception:
            if status != 0:  # a response (a stream) is under way: the server can only cut the connection
                raise
            # answered here, not by Starlette's ServerErrorMiddleware: that one re-raises, and the server
            # then closes the keep-alive connection under the client's feet; this keeps the request id too
            log.exception("unhandled error", extra={"fields": {"request_id": rid}})
            status = 500
            await self._send_error(send, rid, 500, "internal server error", "internal_server_error", "internal_error")
        finally:
            for end in ends:
                end()
            if tracked:
                self.inflight.count -= 1
            self._log(scope, rid, status, t0)

    def _too_large(self) -> _BodyError:
        return _BodyError(
            413, f"request body exceeds {self.max_body_bytes} bytes", "invalid_request_error", "body_too_large"
        )

    async def _send_body_error(self, send: Send, rid: str, e: _BodyError) -> None:
        # the rest of the body may still come: the connection cannot carry another request
        await self._send_error(send, rid, e.status, e.message, e.type, e.code, close=e.status != 413)

    async def _receive_body(self, receive: Receive, deadline: float) -> Message:
        """The next body message, waited for in short slices: a client that sends its body too slowly (or
        announced more than it sends) gets a 408, and one still sending when a drain starts a 503."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _BodyError(
                    408,
                    f"the request body was not received within {self.body_timeout_s:g} s",
                    "timeout_error",
                    "request_body_timeout",
                )
            if self.draining():
                raise _BodyError(503, "the server is shutting down", "service_unavailable", "draining")
            try:
                return await asyncio.wait_for(receive(), timeout=min(left, 0.5))
            except TimeoutError:
                continue

    @staticmethod
    async def _send_error(
        send: Send, rid: str, status: int, message: str, type: str, code: str, close: bool = False
    ) -> None:
        body = json.dumps(error_body(message, type, None, code)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", rid.encode()),
        ]
        if close:
            headers.append((b"connection", b"close"))
        if status == 503:
            headers.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _log(scope: Scope, rid: str, status: int, t0: float) -> None:
        if scope["path"] in UNTRACKED and status < 400:
            return
        fields = {
            "request_id": rid,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "duration_ms": round((time.perf_counter() - t0) * 1000, 2),
        }
        model = scope.get("state", {}).get("model")  # the LM that served it (set by the route)
        log.info("request", extra={"fields": fields | ({"model": model} if model else {})})


class _BodyError(Exception):
    """The body could not be taken: too large, too slow, or cut by a drain."""

    def __init__(self, status: int, message: str, type: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code
