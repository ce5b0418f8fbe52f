"""CORS for browser clients: the configured origins may call every route with any request header (the
official JS SDK sends `x-stainless-*` headers, other clients their own), and a refused preflight answers
in OpenAI's error shape like every other error."""

from __future__ import annotations

import json
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp

from service.api.errors import error_body


class CORS(CORSMiddleware):
    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        super().__init__(
            app,
            allow_origins=list(origins),
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After"],
            max_age=600,
        )

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        refused = bytes(response.body).decode()  # "Disallowed CORS origin, method"
        body = json.dumps(
            error_body(
                f"{refused} (origin {request_headers.get('origin')!r})", "invalid_request_error", None, "cors_refused"
            )
        ).encode()
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return Response(body, status_code=400, headers=headers, media_type="application/json")
