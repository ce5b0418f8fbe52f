"""Which model answers a request: one table of the models this server serves, each with its kind, the endpoints it
answers and its GET /v1/models entry. Every route that takes a `model` field resolves it with `route()` (404 naming
the models that endpoint has, 400 when it names none and several LMs could answer, 503 while a model that is not an
LM is not ready); an LM's row then gives its loaded `TextModel` through `lm_for()`, which loads it on first use
(`service.api.model_registry`) and holds it until the response has ended. /v1/models lists every LM, loaded or not,
with its status, and the other models that are ready.

A new kind of model is a row here and a handler in the routes that serve it (e.g. `completions._HANDLERS`)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from service.api.errors import APIError
from service.api.middleware import on_response_end
from service.api.model_registry import LMSlot, Status
from service.api.state import ServerState, server_state
from service.api.text_model import TextModel
from service.engine.images import ImageBatcher
from service.engine.seq2seq import Seq2SeqBatcher

G2P_MODEL = "cmudict-g2p"  # the encoder-decoder model (--enable-g2p): words in, phones out
IMAGE_MODEL = "gan-digits"  # the GAN (--enable-gan)


class Endpoint(enum.Enum):
    COMPLETIONS = "completions"
    CHAT = "chat"
    RESPONSES = "responses"
    TOKENIZE = "tokenize"  # /tokenize, /detokenize
    IMAGES = "images"


class Kind(enum.Enum):
    """A model's kind, as /v1/models names it."""

    TEXT = "text-generation"
    SEQ2SEQ = "seq2seq"
    IMAGE = "image-generation"


_TEXT_ENDPOINTS = frozenset((Endpoint.COMPLETIONS, Endpoint.CHAT, Endpoint.RESPONSES, Endpoint.TOKENIZE))


@dataclass(frozen=True)
class ServedModel:
    id: str
    kind: Kind
    endpoints: frozenset[Endpoint]
    ready: bool  # requests for it are served (an LM: always, loaded on first use), /v1/models lists it
    not_ready: str  # the 503's message while it is not
    lm: LMSlot | None = None  # what serves it: one of these, by kind (a LoRA adapter: its base LM's slot)
    lora: str | None = None  # a LoRA adapter served over `lm`: its id
    seq2seq: Seq2SeqBatcher | None = None
    images: ImageBatcher | None = None
    info: dict[str, Any] = field(default_factory=dict)  # its /v1/models entry's fields beyond id, object, created

    def entry(self, created: int) -> dict[str, Any]:
        """Its GET /v1/models entry."""
        return {"id": self.id, "object": "model", "created": created, "owned_by": "aigc", **self.info}


def model_table(state: ServerState) -> list[ServedModel]:
    """The models this server serves, the LMs first in the order given (clients take data[0]); the G2P model where
    it was enabled; the image model always (its requests get a 503 while it is not running)."""
    table = [row for slot in state.models.slots for row in (_lm_row(slot), *_adapter_rows(slot))]
    g2p = state.g2p_batcher
    if g2p is not None:
        cfg = g2p.g2p.config
        table.append(
            ServedModel(
                G2P_MODEL,
                Kind.SEQ2SEQ,
                frozenset((Endpoint.COMPLETIONS,)),
                g2p.running,
                f"the {G2P_MODEL} model is not running",
                seq2seq=g2p,
                info={
                    "kind": Kind.SEQ2SEQ.value,
                    "max_model_len": cfg.max_word_len,
                    "max_output_tokens": cfg.max_phones,
                    "description": "grapheme-to-phoneme: a word in, CMUdict ARPAbet phones with stress out",
                },
            )
        )
    images = state.image_batcher
    table.append(
        ServedModel(
            IMAGE_MODEL,
            Kind.IMAGE,
            frozenset((Endpoint.IMAGES,)),
            images is not None and images.running,
            "the image model is not loaded",
            images=images,
            info={"kind": Kind.IMAGE.value},
        )
    )
    return table


def _lm_row(slot: LMSlot) -> ServedModel:
    """An LM's row: its entry says whether it is loaded (llama-server's router mode's `status`) and, once it is,
    its context, dtype and kernels."""
    status: dict[str, Any] = {"value": slot.status.value}
    if slot.error is not None:
        status |= {"failed": True, "error": slot.error}
    info: dict[str, Any] = {"kind": Kind.TEXT.value, "status": status, "loaded": slot.status is Status.LOADED}
    tm = slot.model
    if tm is not None:
        info |= {
            "max_model_len": tm.max_model_len,
            "dtype": tm.dtype,
            "kernels": tm.kernels,
            "batch_invariant": tm.batch_invariant,
        }
    return ServedModel(slot.name, Kind.TEXT, _TEXT_ENDPOINTS, True, "", lm=slot, info=info)


def _adapter_rows(slot: LMSlot) -> list[ServedModel]:
    """The rows of the LoRA adapters served over an LM: vLLM's entries (`parent` the base model, `root` the
    adapter's path), with the base's status (an adapter is loaded with its base)."""
    base = _lm_row(slot)
    return [
        ServedModel(
            name,
            Kind.TEXT,
            _TEXT_ENDPOINTS,
            True,
            "",
            lm=slot,
            lora=name,
            info={**base.info, "parent": slot.name, "root": path, "lora": True},
        )
        for name, path in list(slot.adapters.items())
    ]


def route(request: Request, endpoint: Endpoint, requested: str | None) -> ServedModel:
    """The model that answers `requested` at `endpoint` (None: the endpoint's only model of its kind, the LM for
    the text endpoints): 404 naming the endpoint's models when none has that id, 400 naming the LMs when none is
    named and there are several, 503 when a model that is not an LM is not ready."""
    served = [m for m in model_table(server_state(request)) if endpoint in m.endpoints]
    if requested is None:
        lms = [m.id for m in served if m.kind is Kind.TEXT]
        if len(lms) > 1:
            raise APIError(
                f"this server serves several models: name one in `model` ({', '.join(repr(i) for i in lms)})",
                param="model",
                code="model_required",
            )
        found = served[0] if served else None
    else:
        found = next((m for m in served if m.id == requested), None)
    if found is None:
        raise model_not_found(requested, [m.id for m in served], _FOR.get(endpoint, ""))
    if not found.ready:
        raise APIError(found.not_ready, status_code=503, code="model_not_ready")
    return found


async def lm_for(request: Request, endpoint: Endpoint, model: ServedModel) -> TextModel:
    """The loaded LM of an LM's row, held by this request until its response has ended (loaded first, on first
    use: the request waits, and its queue time counts from here); for a LoRA adapter's row, its base LM as the
    adapter serves it (`TextModel.for_adapter`)."""
    state = server_state(request)
    arrival = time.monotonic()
    assert model.lm is not None
    base = model.lm.name
    try:
        tm, waited = await state.models.acquire(base, state.settings.queue_timeout_s)
    except APIError as e:
        state.metrics.rejected.labels(endpoint.value, e.code or "error", model.id).inc()
        raise
    models = state.models
    on_response_end(request, lambda: models.release(base))
    request.state.model = model.id  # the access log's `model`
    if waited:
        request.state.arrival = arrival  # the engine counts its queue time (and deadlines) from here
    return tm.for_adapter(model.lora) if model.lora is not None else tm


_FOR = {Endpoint.IMAGES: " for images"}  # the 404's wording where the endpoint has models of one kind only


def model_not_found(requested: str | None, ids: list[str], where: str = "") -> APIError:
    """The 404 for a model id no served model has, naming those there are."""
    available = ", ".join(f"'{i}'" for i in ids)
    return APIError(
        f"The model '{requested}' does not exist; available{where}: {available}",
        status_code=404,
        param="model",
        code="model_not_found",
    )


async def text_model(request: Request, endpoint: Endpoint, requested: str | None) -> TextModel:
    """The LM a request names, for an endpoint only LMs serve (chat, responses, tokenize), after `route()`'s
    checks, loaded and held (`lm_for`)."""
    model = route(request, endpoint, requested)
    assert model.kind is Kind.TEXT, f"{endpoint.value} is served by LMs only"
    return await lm_for(request, endpoint, model)
