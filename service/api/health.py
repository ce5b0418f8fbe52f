"""GET /health (liveness: the process serves) and GET /ready (readiness: model loaded, engine alive)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from service.api.errors import error_responses
from service.api.state import server_state

router = APIRouter()


class NotReady(BaseModel):
    status: str
    reasons: list[str]


@router.get("/health", responses=error_responses(401, 500))
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    responses={**error_responses(401, 500), 503: {"model": NotReady, "description": "Not ready, with the reasons"}},
)
async def ready(request: Request) -> Any:
    state = server_state(request)
    problems = []
    tm = state.text_model
    if state.load_error:
        problems.append(f"model failed to load: {state.load_error}")
    elif tm is None:
        problems.append("model is loading")
    elif not tm.engine.is_alive:
        problems.append("engine loop is not running")
    if state.draining:
        problems.append("server is shutting down")
    if problems or tm is None:
        return JSONResponse({"status": "unavailable", "reasons": problems}, status_code=503)
    return {"status": "ready", "model": tm.name}


# HEAD answers like GET without a body (probes and monitors use it); kept out of the OpenAPI schema
for _path, _endpoint in (("/health", health), ("/ready", ready)):
    router.add_api_route(_path, _endpoint, methods=["HEAD"], include_in_schema=False)
