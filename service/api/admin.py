"""Operator routes: POST /reset_prefix_cache (behind the API key like every non-public path)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from service.api.errors import error_responses
from service.api.generation import get_text_model
from service.api.text_model import TextModel

router = APIRouter(responses=error_responses(401, 500, 503))


@router.post("/reset_prefix_cache")
async def reset_prefix_cache(tm: Annotated[TextModel, Depends(get_text_model)]) -> dict[str, Any]:
    """Forget every cached prompt prefix (after changing what the cache should hold, or to measure cold
    prompts). Requests running keep their blocks; later ones compute their prompts again."""
    enabled = tm.engine.config.enable_prefix_caching
    forgotten = await asyncio.to_thread(tm.engine.reset_prefix_cache) if enabled else 0
    return {"object": "prefix_cache.reset", "enabled": enabled, "blocks_forgotten": forgotten}
