"""GET /v1/models and GET /v1/models/{id}: every served model with its kind (service.api.model_table)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from service.api.errors import error_responses
from service.api.generation import get_text_model
from service.api.json_route import OffLoopJSONRoute
from service.api.model_table import model_not_found, model_table
from service.api.state import server_state
from service.api.text_model import TextModel

router = APIRouter(route_class=OffLoopJSONRoute, responses=error_responses(400, 401, 404, 413, 500, 503))


def _entries(request: Request, tm: TextModel) -> list[dict[str, Any]]:
    """Every ready model, the LM first, each with its kind."""
    return [m.entry(tm.created) for m in model_table(server_state(request)) if m.ready]


@router.get("/v1/models")
async def list_models(request: Request, tm: Annotated[TextModel, Depends(get_text_model)]) -> dict[str, Any]:
    return {"object": "list", "data": _entries(request, tm)}


@router.get("/v1/models/{model_id}")
async def get_model(
    model_id: str, request: Request, tm: Annotated[TextModel, Depends(get_text_model)]
) -> dict[str, Any]:
    entries = _entries(request, tm)
    for entry in entries:
        if entry["id"] == model_id:
            return entry
    raise model_not_found(model_id, [e["id"] for e in entries])


for _path, _endpoint in (("/v1/models", list_models), ("/v1/models/{model_id}", get_model)):
    router.add_api_route(_path, _endpoint, methods=["HEAD"], include_in_schema=False)
