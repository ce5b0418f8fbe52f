"""GET /health (liveness: the process serves) and GET /ready (readiness: model loaded, engine alive)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> Any:
    state = request.app.state
    problems = []
    tm = getattr(state, "text_model", None)
    if getattr(state, "load_error", None):
        problems.append(f"model failed to load: {state.load_error}")
    elif tm is None:
        problems.append("model is loading")
    elif not tm.engine.is_alive:
        problems.append("engine loop is not running")
    if getattr(state, "draining", False):
        problems.append("server is shutting down")
    if problems or tm is None:
        return JSONResponse({"status": "unavailable", "reasons": problems}, status_code=503)
    return {"status": "ready", "model": tm.name}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)
