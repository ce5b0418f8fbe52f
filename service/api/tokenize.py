"""POST /tokenize, POST /detokenize and GET /tokenizer_info: the LM's tokenizer over HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from service.api.chat import render_chat
from service.api.errors import APIError, error_responses
from service.api.json_route import OffLoopJSONRoute
from service.api.model_table import Endpoint, text_model
from service.api.schemas import DetokenizeRequest, TokenizeRequest

router = APIRouter(route_class=OffLoopJSONRoute, responses=error_responses(400, 401, 404, 413, 500, 503))


def _tokens_json(ids: list[int], max_model_len: int) -> Response:
    """The /tokenize reply, serialised in slices: one C call over a million ids would hold the GIL (and
    so the event loop) for its whole length."""
    step = 1 << 16
    tokens = ",".join(",".join(map(str, ids[i : i + step])) for i in range(0, len(ids), step))
    body = f'{{"tokens":[{tokens}],"count":{len(ids)},"max_model_len":{max_model_len}}}'
    return Response(body.encode(), media_type="application/json")


@router.post("/tokenize", response_model=None)
async def tokenize(req: TokenizeRequest, request: Request) -> Response:
    """Token ids of a prompt or of chat messages as the chat template renders them; a long text is tokenized
    and its reply serialised off the event loop."""
    tm = await text_model(request, Endpoint.TOKENIZE, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError("give exactly one of prompt or messages", param="prompt")
    if req.messages is not None:
        if not req.messages:
            raise APIError("messages must not be empty", param="messages")
        ids = await render_chat(tm, req.messages, req.add_generation_prompt, limit_length=False)
    else:
        ids = await asyncio.to_thread(tm.tokenizer.encode, req.prompt or "", req.add_special_tokens)
    return await asyncio.to_thread(_tokens_json, ids, tm.max_model_len)


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request) -> dict[str, Any]:
    tm = await text_model(request, Endpoint.TOKENIZE, req.model)
    bad = [t for t in req.tokens if not 0 <= t < tm.vocab_size]
    if bad:
        raise APIError(f"token ids must be in [0, {tm.vocab_size}); got {bad[:5]}", param="tokens")
    return {"prompt": await asyncio.to_thread(tm.tokenizer.decode, req.tokens, False)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request, model: str | None = Query(None)) -> dict[str, Any]:
    """The tokenizer's configuration, as vLLM serves it and lm-evaluation-harness's remote tokenizer
    (`tokenizer_backend=remote`) reads it: special tokens as text (which /tokenize turns back into their
    ids), the chat template and the context length; `?model=` names the LM where the server has several."""
    tm = await text_model(request, Endpoint.TOKENIZE, model)
    tok = tm.tokenizer

    def text(i: int | None) -> str | None:
        return None if i is None else tok.id_to_token(i)

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model": tm.name,
        "eos_token": text(tok.eos_token_id),
        "bos_token": text(tok.bos_token_id),
        "pad_token": text(tok.pad_token_id),
        "unk_token": text(tok.unk_token_id),
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.pad_token_id,
        "add_bos_token": tok.add_bos,
        "chat_template": tok.chat_template,
        "model_max_length": tm.max_model_len,
        "vocab_size": tm.vocab_size,
    }


router.add_api_route("/tokenizer_info", tokenizer_info, methods=["HEAD"], include_in_schema=False)
