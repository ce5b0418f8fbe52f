"""GET /health (liveness: the process serves) and GET /ready (readiness: the --preload models loaded, the loaded
models' engines alive)."""

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
    loaded = state.models.loaded()
    if state.load_error:
        problems.append(f"model failed to load: {state.load_error}")
    elif state.preloading:
        problems.append("model is loading")
    problems += [f"engine loop of model {tm.name} is not running" for tm in loaded if not tm.engine.is_alive]
    if state.draining:
        problems.append("server is shutting down")
    if problems:
        return JSONResponse({"status": "unavailable", "reasons": problems}, status_code=503)
    names = state.models.names
    return {"status": "ready", "model": names[0]} | ({"models": names} if len(names) > 1 else {})


# HEAD answers like GET without a body (probes and monitors use it); kept out of the OpenAPI schema
for _path, _endpoint in (("/health", health), ("/ready", ready)):
    router.add_api_route(_path, _endpoint, methods=["HEAD"], include_in_schema=False)
