"""Operator routes: POST /reset_prefix_cache (behind the API key like every non-public path)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request

from service.api.errors import error_responses
from service.api.model_table import Endpoint, route
from service.api.state import server_state

router = APIRouter(responses=error_responses(401, 404, 500, 503))


@router.post("/reset_prefix_cache")
async def reset_prefix_cache(request: Request, model: str | None = Query(None)) -> dict[str, Any]:
    """Forget every cached prompt prefix (after changing what the cache should hold, or to measure cold
    prompts) of every loaded LM, or of the one `?model=` names (an unloaded one has none). Requests running keep
    their blocks; later ones compute their prompts again."""
    registry = server_state(request).models
    slot = route(request, Endpoint.COMPLETIONS, model).lm if model is not None else None  # (an adapter: its base's)
    names = [slot.name] if slot is not None else registry.names if model is None else []
    loaded = [slot.model for slot in map(registry.get, names) if slot is not None and slot.model is not None]
    engines = [tm.engine for tm in loaded if tm.engine.config.enable_prefix_caching]
    forgotten = sum([await asyncio.to_thread(e.reset_prefix_cache) for e in engines])
    enabled = bool(engines) or not loaded and server_state(request).settings.enable_prefix_caching
    return {"object": "prefix_cache.reset", "enabled": enabled, "blocks_forgotten": forgotten}
