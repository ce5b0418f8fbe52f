"""The server's state, typed: one ServerState on `app.state.server`, set up by `service.main.create_app` and
read by the routes through `server_state` (a FastAPI dependency, or called with the request)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from service.api.middleware import InFlight
from service.api.text_model import TextModel
from service.config import Settings
from service.engine.images import ImageBatcher
from service.engine.seq2seq import Seq2SeqBatcher
from service.metrics import Metrics


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    inflight: InFlight = field(default_factory=InFlight)  # requests being served, for the SIGTERM drain
    draining: bool = False  # SIGTERM received: /ready and new requests get 503
    text_model: TextModel | None = None  # the LM, once loaded
    load_error: str | None = None  # why the LM failed to load
    image_batcher: ImageBatcher | None = None  # the GAN (--enable-gan)
    g2p_batcher: Seq2SeqBatcher | None = None  # the G2P model (--enable-g2p)
    stop_server: Callable[[], None] | None = None  # set by `python -m service`: stops uvicorn (a failed load)


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state
