"""GET /v1/models, POST /tokenize and POST /detokenize."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from service.api.chat import render_chat
from service.api.errors import APIError, error_responses
from service.api.generation import TextModel, check_model, get_text_model
from service.api.schemas import DetokenizeRequest, TokenizeRequest

router = APIRouter(responses=error_responses(400, 401, 404, 413, 422, 500, 503))


@router.get("/v1/models")
async def list_models(tm: Annotated[TextModel, Depends(get_text_model)]) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": tm.name, "object": "model", "created": tm.created,
                                        "owned_by": "aigc", "max_model_len": tm.max_model_len}]}


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, tm: Annotated[TextModel, Depends(get_text_model)]) -> dict[str, Any]:
    check_model(tm, model_id)
    return {"id": tm.name, "object": "model", "created": tm.created, "owned_by": "aigc",
            "max_model_len": tm.max_model_len}


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, tm: Annotated[TextModel, Depends(get_text_model)]) -> dict[str, Any]:
    check_model(tm, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError("give exactly one of prompt or messages", param="prompt")
    if req.messages is not None:
        if not req.messages:
            raise APIError("messages must not be empty", param="messages")
        ids = render_chat(tm, req.messages, req.add_generation_prompt)
    else:
        ids = tm.tokenizer.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": tm.max_model_len}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, tm: Annotated[TextModel, Depends(get_text_model)]) -> dict[str, Any]:
    check_model(tm, req.model)
    bad = [t for t in req.tokens if not 0 <= t < tm.vocab_size]
    if bad:
        raise APIError(f"token ids must be in [0, {tm.vocab_size}); got {bad[:5]}", param="tokens")
    return {"prompt": tm.tokenizer.decode(req.tokens, skip_special_tokens=False)}
