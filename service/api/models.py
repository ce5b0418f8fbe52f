"""GET /v1/models and GET /v1/models/{id}: every served model with its kind."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from service.api.errors import APIError, error_responses
from service.api.g2p import get_g2p_batcher
from service.api.g2p import model_entry as g2p_model_entry
from service.api.generation import get_text_model
from service.api.images import IMAGE_MODEL
from service.api.json_route import OffLoopJSONRoute
from service.api.state import server_state
from service.api.text_model import TextModel

router = APIRouter(route_class=OffLoopJSONRoute, responses=error_responses(400, 401, 404, 413, 500, 503))


def _entries(request: Request, tm: TextModel) -> list[dict[str, Any]]:
    """Every served model, the LM first, each with its kind."""
    data = [
        {
            "id": tm.name,
            "object": "model",
            "created": tm.created,
            "owned_by": "aigc",
            "kind": "text-generation",
            "max_model_len": tm.max_model_len,
            "dtype": tm.dtype,
            "kernels": tm.kernels,
            "batch_invariant": tm.batch_invariant,
        }
    ]
    g2p = get_g2p_batcher(request)
    if g2p is not None and g2p.running:
        data.append(g2p_model_entry(g2p, tm.created))
    images = server_state(request).image_batcher
    if images is not None and images.running:
        data.append(
            {
                "id": IMAGE_MODEL,
                "object": "model",
                "created": tm.created,
                "owned_by": "aigc",
                "kind": "image-generation",
            }
        )
    return data


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
    available = ", ".join(f"'{e['id']}'" for e in entries)
    raise APIError(
        f"The model '{model_id}' does not exist; available: {available}",
        status_code=404,
        param="model",
        code="model_not_found",
    )


for _path, _endpoint in (("/v1/models", list_models), ("/v1/models/{model_id}", get_model)):
    router.add_api_route(_path, _endpoint, methods=["HEAD"], include_in_schema=False)
