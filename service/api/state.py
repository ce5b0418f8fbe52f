"""The server's state, typed: one ServerState on `app.state.server`, set up by `service.main.create_app` and
read by the routes through `server_state` (a FastAPI dependency, or called with the request)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from service.api.middleware import InFlight
from service.api.model_registry import Budget, ModelRegistry
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
    models: ModelRegistry = field(default_factory=lambda: ModelRegistry([], Budget(), lambda tm, why: None))  # LMs
    preloading: bool = False  # the --preload models are loading (/ready waits for them)
    load_error: str | None = None  # why a --preload model failed to load
    created: int = field(default_factory=lambda: int(time.time()))  # the /v1/models entries' `created`
    image_batcher: ImageBatcher | None = None  # the GAN (--enable-gan)
    g2p_batcher: Seq2SeqBatcher | None = None  # the G2P model (--enable-g2p)
    stop_server: Callable[[], None] | None = None  # set by `python -m service`: stops uvicorn (a failed load)


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state
