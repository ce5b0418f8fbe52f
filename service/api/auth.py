"""Optional API keys: `Authorization: Bearer <key>` compared in constant time against every key.

An ASGI middleware so that it guards every route (including ones added later) in one place; paths in
`public_paths` (by default /health, /ready, /metrics) stay open. Missing or wrong keys get a 401 in
OpenAI's error shape.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import error_body


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: Iterable[str], public_paths: Iterable[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys if k]
        self.public = frozenset(public_paths)

    def _authorized(self, scope: Scope) -> bool:
        header = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        ok = False
        for key in self.keys:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(token.strip(), key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.public or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        if self._authorized(scope):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            error_body(
                "Invalid or missing API key. Send 'Authorization: Bearer <key>'.",
                "authentication_error",
                None,
                "invalid_api_key",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
