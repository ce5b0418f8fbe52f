"""Every error the API returns, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Routes raise `APIError`; the engines' one error type, `EngineError`, becomes one through `from_engine` (its
kind's status is in `ENGINE_STATUS`, the only table of them). `install_error_handlers(app)` maps both,
request validation errors (400 naming the field, as OpenAI answers them: never FastAPI's 422) and anything
unexpected (500, without a stack trace) to that shape; the OpenAPI schema documents no 422 either.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
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
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


_DESCRIPTIONS = {
    400: "Invalid value, a field of the wrong type or a malformed body: the error names the field (`param`)",
    401: "Missing or wrong API key",
    404: "Unknown model or route",
    413: "Request body larger than the server accepts",
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


# what pydantic adds to an error's location for the branch of a union it tried (`stop.str`, `prompt.list[int]`,
# `tool_choice.NamedToolChoice.function`): not field names, so not part of `param`
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "any", "bytes", "tuple", "set"})
_MODEL_TAG = re.compile(r"^[A-Z][A-Za-z0-9]*$")


def _is_union_tag(part: Any, last: bool) -> bool:
    if not isinstance(part, str):
        return False
    return part in _TYPE_TAGS or any(c in part for c in "[]'(),") or (not last and bool(_MODEL_TAG.match(part)))


def _loc_to_param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """The field an error's location names, as OpenAI's `param` (`messages.0.content`); None for the body."""
    parts = [p for p in loc if p not in ("body", "query", "path")]
    kept = [str(p) for i, p in enumerate(parts) if not _is_union_tag(p, i == len(parts) - 1)]
    return ".".join(kept) or None


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """(message, param) of pydantic's validation errors: each field once, with what each union branch
    wanted (`stop: Input should be a valid string, or Input should be a valid list`)."""
    by_param: dict[str | None, list[str]] = {}
    for e in errors:
        msgs = by_param.setdefault(_loc_to_param(e.get("loc", ())), [])
        msg = str(e.get("msg", "invalid"))
        if msg not in msgs:
            msgs.append(msg)
    parts = [f"{param or 'body'}: {', or '.join(msgs)}" for param, msgs in list(by_param.items())[:5]]
    return "; ".join(parts) or "invalid request body", next(iter(by_param), None)


SERVED = "/v1/completions, /v1/chat/completions, /v1/responses, /v1/images/generations and /v1/models"

# OpenAI (and vLLM) routes clients call that this server has no model or storage for: path prefix -> what it is
UNSUPPORTED_ENDPOINTS: dict[str, str] = {
    "/v1/embeddings": "embeddings (it has no embedding model)",
    "/v1/audio/": "audio: speech, transcriptions, translations (it has no audio model)",
    "/v1/moderations": "moderations (it has no moderation model)",
    "/v1/images/edits": "image edits (its GAN only generates)",
    "/v1/images/variations": "image variations (its GAN only generates)",
    "/v1/files": "files (it stores nothing)",
    "/v1/uploads": "uploads (it stores nothing)",
    "/v1/batches": "the Batch API (it stores nothing)",
    "/v1/fine_tuning/": "fine-tuning",
    "/v1/fine-tunes": "fine-tuning",
    "/v1/assistants": "the Assistants API (it stores nothing)",
    "/v1/threads": "the Assistants API (it stores nothing)",
    "/v1/vector_stores": "vector stores (it stores nothing)",
    "/v1/realtime": "the Realtime API",
    "/v1/responses/": "stored responses (it stores none: send the whole conversation as input)",
    "/v1/chat/completions/": "stored chat completions (it stores none)",
    "/v1/rerank": "reranking (it has no scoring model)",
    "/v1/score": "scoring (it has no scoring model)",
    "/rerank": "reranking (it has no scoring model)",
    "/score": "scoring (it has no scoring model)",
    "/pooling": "pooling (it has no embedding model)",
    "/classify": "classification (it has no classification model)",
}


def unsupported_endpoint(path: str) -> str | None:
    """What an unserved path a client may call is (for a 404 that says so), or None for any other path."""
    for prefix, what in UNSUPPORTED_ENDPOINTS.items():
        if path == prefix.rstrip("/") or path.startswith(prefix if prefix.endswith("/") else prefix + "/"):
            return what
    return None


def _without_422(openapi: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """app.openapi without the 422 FastAPI documents on every route with a body or parameters (this app answers
    validation errors with a documented 400)."""

    def schema() -> dict[str, Any]:
        out = openapi()
        for ops in out.get("paths", {}).values():
            for op in ops.values():
                if isinstance(op, dict):
                    op.get("responses", {}).pop("422", None)
        schemas = out.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        return out

    return schema


def install_error_handlers(app: FastAPI) -> None:
    app.openapi = _without_422(app.openapi)  # type: ignore[method-assign]

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
        # a field of the wrong type or value: 400 invalid_request_error naming it, as OpenAI and vLLM answer
        # (the openai client raises BadRequestError, not UnprocessableEntityError)
        msg, param = validation_message(errors)
        return error_response(400, msg, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404 and (what := unsupported_endpoint(request.url.path)) is not None:
            return error_response(
                404,
                f"{request.url.path}: this server does not serve {what}. It serves {SERVED}.",
                code="unsupported_endpoint",
            )
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal server error", code="internal_error")
