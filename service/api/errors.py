"""Every error the API returns, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Routes raise `APIError`; the engines' one error type, `EngineError`, becomes one through `from_engine` (its
kind's status is in `ENGINE_STATUS`, the only table of them). `install_error_handlers(app)` maps both,
FastAPI's validation errors (422) and anything unexpected (500, without a stack trace) to that shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine.errors import EngineError, ErrorKind

log = logging.getLogger("service.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


_DESCRIPTIONS = {
    400: "Invalid value: the error names the field (`param`) and the limit",
    401: "Missing or wrong API key",
    404: "Unknown model or route",
    413: "Request body larger than the server accepts",
    422: "Malformed body or a field of the wrong type",
    500: "Internal error (no details are exposed)",
    503: "Overloaded (with Retry-After), draining, model not loaded or engine down",
    504: "The request ran past its timeout",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, the body of every error response."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` documenting these error statuses with the error shape (for a router or route)."""
    return {s: {"model": ErrorResponse, "description": _DESCRIPTIONS[s]} for s in statuses}


class APIError(Exception):
    """An error the client should see, with its HTTP status."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status_code, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


# the HTTP status of each kind of engine error
ENGINE_STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_REQUEST: 400,
    ErrorKind.OVERLOADED: 503,
    ErrorKind.QUEUE_TIMEOUT: 503,
    ErrorKind.TIMEOUT: 504,
    ErrorKind.ENGINE_DEAD: 503,
    ErrorKind.INTERNAL: 500,
}


def from_engine(error: EngineError) -> APIError:
    """The APIError for an engine error (its status and type also label SSE error chunks); a 503 says when
    to retry."""
    status = ENGINE_STATUS[error.kind]
    return APIError(
        error.message,
        status_code=status,
        param=error.param,
        code=error.kind.value,
        type="timeout_error" if status == 504 else None,
        headers={"Retry-After": "1"} if status == 503 else None,
    )


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status_code: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(message, _TYPES.get(status_code, "invalid_request_error"), param, code)
    return JSONResponse(body, status_code=status_code, headers=headers)


def _loc_to_param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError) -> JSONResponse:
        err = from_engine(exc)
        return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":  # not JSON at all: OpenAI's 400, not a field error
            detail = (first.get("ctx") or {}).get("error", "")
            return error_response(
                400,
                f"We could not parse the JSON body of your request ({detail}). The body "
                "must be a JSON object; send it with 'Content-Type: application/json'.",
                code="invalid_json",
            )
        if first.get("type") == "lone_surrogate":
            param = (first.get("ctx") or {}).get("param")
            return error_response(400, str(first.get("msg")), param=param, code="invalid_unicode")
        param = _loc_to_param(first.get("loc", ()))
        msg = "; ".join(f"{_loc_to_param(e.get('loc', ())) or 'body'}: {e.get('msg', 'invalid')}" for e in errors[:5])
        return error_response(422, msg or "invalid request body", param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal server error", code="internal_error")
