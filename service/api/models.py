"""GET /v1/models and GET /v1/models/{id}: every served model with its kind (service.api.model_table), each LM with
whether it is loaded; POST /models/load and /models/unload (llama-server's router mode's routes, behind the API key)
load or unload an LM by name for clients that manage models themselves."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from service.api.errors import APIError, error_responses
from service.api.json_route import OffLoopJSONRoute
from service.api.model_table import Kind, ServedModel, model_not_found, model_table
from service.api.schemas import ModelActionRequest
from service.api.state import server_state

router = APIRouter(route_class=OffLoopJSONRoute, responses=error_responses(400, 401, 404, 413, 500, 503))


def _listed(request: Request) -> list[ServedModel]:
    """Every LM (loaded or not) and every other model that is ready, the LMs first."""
    return [m for m in model_table(server_state(request)) if m.ready]


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    created = server_state(request).created
    return {"object": "list", "data": [m.entry(created) for m in _listed(request)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    listed = _listed(request)
    for m in listed:
        if m.id == model_id:
            return m.entry(server_state(request).created)
    raise model_not_found(model_id, [m.id for m in listed])


def _lm(request: Request, name: str) -> ServedModel:
    """The LM `name` (404 naming the LMs; 400 for a model of another kind: only LMs load and unload)."""
    table = model_table(server_state(request))
    found = next((m for m in table if m.id == name), None)
    lms = [m.id for m in table if m.kind is Kind.TEXT]
    if found is None:
        raise model_not_found(name, lms)
    if found.lora is not None:
        raise APIError(
            f"model {name!r} is a LoRA adapter of {found.lm.name if found.lm else 'a model'}: it is loaded with its "
            "base model; add or remove adapters with POST /v1/load_lora_adapter and /v1/unload_lora_adapter",
            param="model",
            code="model_not_unloadable",
        )
    if found.kind is not Kind.TEXT:
        raise APIError(
            f"model {name!r} is always loaded: only text models (LMs) are loaded and unloaded on demand",
            param="model",
            code="model_not_unloadable",
        )
    return found


@router.post("/models/load")
async def load_model(req: ModelActionRequest, request: Request) -> dict[str, Any]:
    """Load an LM now (as a request for it would: unloading the least recently used idle LM if the limits need
    it), and answer once it is loaded."""
    state = server_state(request)
    model = _lm(request, req.model)
    await state.models.load(model.id, state.settings.queue_timeout_s)
    return {"success": True, **_lm(request, req.model).entry(state.created)}


@router.post("/models/unload")
async def unload_model(req: ModelActionRequest, request: Request) -> dict[str, Any]:
    """Unload an LM: new requests for it wait, those in flight finish, then its memory is freed and the answer
    comes (a later request loads it again). An LM that is not loaded: nothing to do."""
    state = server_state(request)
    model = _lm(request, req.model)
    try:
        await state.models.unload(model.id)
    except ValueError as e:
        raise APIError(str(e), param="model", code="model_not_unloadable") from e
    return {"success": True, **_lm(request, req.model).entry(state.created)}


for _path, _endpoint in (("/v1/models", list_models), ("/v1/models/{model_id:path}", get_model)):
    router.add_api_route(_path, _endpoint, methods=["HEAD"], include_in_schema=False)
