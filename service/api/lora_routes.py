"""LoRA adapters at run time: POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes, behind the API
key like every non-public path).

An adapter is served as a model of its own over its base LM (`service.api.model_table`: its row's `lm` is the base's
slot). Loading one loads its base first (as a request would), reads the adapter for it and serves it from then on,
and keeps it in the base's slot so that every later load of the base serves it again; unloading one stops serving
it (requests already running with it finish with it)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from service.api.errors import APIError, error_responses
from service.api.model_table import Kind, model_not_found, model_table
from service.api.schemas import LoadLoraRequest, UnloadLoraRequest
from service.api.state import server_state

router = APIRouter(responses=error_responses(400, 401, 404, 500, 503))


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(req: LoadLoraRequest, request: Request) -> dict[str, Any]:
    state = server_state(request)
    table = model_table(state)
    if any(m.id == req.lora_name for m in table):
        raise APIError(f"the id {req.lora_name!r} is taken by a served model", param="lora_name", code="model_exists")
    lms = [m for m in table if m.kind is Kind.TEXT and m.lora is None]
    base = next((m for m in lms if m.id == req.base_model_name), None) if req.base_model_name else lms[0]
    if base is None or base.lm is None:
        raise model_not_found(req.base_model_name, [m.id for m in lms])
    slot, registry = base.lm, state.models
    tm, _ = await registry.acquire(slot.name, state.settings.queue_timeout_s)
    try:  # (held: the base is not unloaded meanwhile; its next loads serve the adapter too)
        await asyncio.to_thread(tm.engine.load_lora, req.lora_name, req.lora_path)
        slot.adapters[req.lora_name] = req.lora_path
    except (OSError, ValueError) as e:
        message = f"cannot load LoRA adapter {req.lora_name!r} from {req.lora_path}: {e}"
        raise APIError(message, param="lora_path", code="invalid_lora") from e
    finally:
        registry.release(slot.name)
    return {"success": True, "lora_name": req.lora_name, "base_model_name": slot.name}


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(req: UnloadLoraRequest, request: Request) -> dict[str, Any]:
    state = server_state(request)
    found = next((m for m in model_table(state) if m.lora == req.lora_name), None)
    if found is None or found.lm is None:
        adapters = [m.id for m in model_table(state) if m.lora is not None]
        raise model_not_found(req.lora_name, adapters, " among the LoRA adapters")
    slot = found.lm
    slot.adapters.pop(req.lora_name, None)
    tm = slot.model
    if tm is not None and req.lora_name in tm.engine.loras:
        tm.engine.remove_lora(req.lora_name)
    return {"success": True, "lora_name": req.lora_name, "base_model_name": slot.name}
