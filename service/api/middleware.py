"""Per-request plumbing as one ASGI middleware: request id, body size limit, in-flight count for
graceful drain, and one structured log line per request with its timing (never the prompt)."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_body

log = logging.getLogger("service.access")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
UNTRACKED = frozenset({"/health", "/ready", "/metrics"})


class InFlight:
    """Counts requests being served (probes excluded), for the SIGTERM drain."""

    def __init__(self) -> None:
        self.count = 0


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, inflight: InFlight) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.inflight = inflight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        status = 0
        tracked = scope["path"] not in UNTRACKED

        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(send, rid)
            self._log(scope, rid, 413, t0)
            return

        received = 0
        too_large = replaced = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_body_bytes:
                    too_large = True
                    raise _BodyTooLarge()
            return msg

        async def send_with_id(msg: Message) -> None:
            nonlocal status, replaced
            if replaced:
                return
            if too_large and status == 0 and msg["type"] == "http.response.start":
                # the app answered a body it could not read (FastAPI turns the error into a 400): the
                # client gets the 413 instead
                replaced, status = True, 413
                await self._too_large(send, rid)
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
        except _BodyTooLarge:
            if status == 0:
                await self._too_large(send, rid)
            status = 413
        except Exception:
            if status != 0:  # a response (a stream) is under way: the server can only cut the connection
                raise
            # answered here, not by Starlette's ServerErrorMiddleware: that one re-raises, and the server
            # then closes the keep-alive connection under the client's feet; this keeps the request id too
            log.exception("unhandled error", extra={"fields": {"request_id": rid}})
            status = 500
            await self._send_error(send, rid, 500, "internal server error", "internal_server_error",
                                   "internal_error")
        finally:
            if tracked:
                self.inflight.count -= 1
            self._log(scope, rid, status, t0)

    async def _too_large(self, send: Send, rid: str) -> None:
        await self._send_error(send, rid, 413, f"request body exceeds {self.max_body_bytes} bytes",
                               "invalid_request_error", "body_too_large")

    @staticmethod
    async def _send_error(send: Send, rid: str, status: int, message: str, type: str, code: str) -> None:
        body = json.dumps(error_body(message, type, None, code)).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"x-request-id", rid.encode())]})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _log(scope: Scope, rid: str, status: int, t0: float) -> None:
        if scope["path"] in UNTRACKED and status < 400:
            return
        log.info("request", extra={"fields": {
            "request_id": rid, "method": scope["method"], "path": scope["path"], "status": status,
            "duration_ms": round((time.perf_counter() - t0) * 1000, 2)}})


class _BodyTooLarge(Exception):
    pass
