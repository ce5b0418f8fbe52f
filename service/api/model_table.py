"""Which model answers a request: one table of the models this server serves, each with its kind, the endpoints it
answers and its GET /v1/models entry. Every route that takes a `model` field resolves it with `route()` (404 naming
the models that endpoint has, 503 while the one asked for is not ready), and /v1/models lists the ready ones.

A new kind of model is a row here and a handler in the routes that serve it (e.g. `completions._HANDLERS`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from service.api.errors import APIError
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
    ready: bool  # loaded and running: requests for it are served, /v1/models lists it
    not_ready: str  # the 503's message while it is not
    lm: TextModel | None = None  # what serves it: one of these, by kind
    seq2seq: Seq2SeqBatcher | None = None
    images: ImageBatcher | None = None
    info: dict[str, Any] = field(default_factory=dict)  # its /v1/models entry's fields beyond id, object, created

    def entry(self, created: int) -> dict[str, Any]:
        """Its GET /v1/models entry."""
        return {"id": self.id, "object": "model", "created": created, "owned_by": "aigc", **self.info}


def model_table(state: ServerState) -> list[ServedModel]:
    """The models this server serves, the LM first (clients take data[0]); the LM once it has loaded, the G2P model
    where it was enabled; the image model always (its requests get a 503 while it is not running)."""
    table = []
    tm = state.text_model
    if tm is not None:
        table.append(
            ServedModel(
                tm.name,
                Kind.TEXT,
                _TEXT_ENDPOINTS,
                True,
                "",
                lm=tm,
                info={
                    "kind": Kind.TEXT.value,
                    "max_model_len": tm.max_model_len,
                    "dtype": tm.dtype,
                    "kernels": tm.kernels,
                    "batch_invariant": tm.batch_invariant,
                },
            )
        )
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


def route(request: Request, endpoint: Endpoint, requested: str | None) -> ServedModel:
    """The model that answers `requested` (None: the endpoint's first, the LM for the text endpoints) at `endpoint`:
    404 naming the endpoint's models when none has that id, 503 when it is not ready (the LM while it loads, which
    is also the answer for any id but another model's while the LM's own name is not known yet)."""
    state = server_state(request)
    served = [m for m in model_table(state) if endpoint in m.endpoints]
    lm_loading = state.text_model is None and endpoint in _TEXT_ENDPOINTS
    if requested is None:
        found = served[0] if served and not lm_loading else None
    else:
        found = next((m for m in served if m.id == requested), None)
    if found is None:
        if lm_loading:
            raise APIError("the text model is not loaded yet", status_code=503, code="model_not_ready")
        raise model_not_found(requested, [m.id for m in served], _FOR.get(endpoint, ""))
    if not found.ready:
        raise APIError(found.not_ready, status_code=503, code="model_not_ready")
    return found


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


def text_model(request: Request, endpoint: Endpoint, requested: str | None) -> TextModel:
    """The LM, for an endpoint only an LM serves (chat, responses, tokenize), after `route()`'s checks."""
    lm = route(request, endpoint, requested).lm
    assert lm is not None, f"{endpoint.value} is served by LMs only"
    return lm
