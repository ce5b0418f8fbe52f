"""Test helper: serve `create_app(...)` with a real uvicorn server on 127.0.0.1 in a background thread.

`tiny_text_model(model, tokenizer)` wraps a (tiny, random) LM and a real tokenizer in a started-later
engine; `serve(app)` binds a free port, runs uvicorn until the `with` block ends, and yields a
`LiveServer` with the port and base URL. The app's lifespan starts and stops the engine.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from model_core.lm import CausalLM
from model_core.tokenizer import Tokenizer
from service.api.generation import TextModel
from service.config import Settings
from service.main import create_app
from tests.service.engine_utils import make_engine

TINY_MODEL_NAME = "tiny-llama"


@dataclass(frozen=True)
class LiveServer:
    app: FastAPI
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def text_model(self) -> TextModel:
        tm: TextModel | None = self.app.state.text_model
        assert tm is not None, "the text model is not loaded"
        return tm


def tiny_text_model(model: CausalLM, tokenizer: Tokenizer, *, name: str = TINY_MODEL_NAME, **engine: Any) -> TextModel:
    """A TextModel over `model` whose engine is not started yet (the app's lifespan starts it); `engine`: the
    arguments of `make_engine` (num_blocks, max_num_seqs, max_waiting, timeouts, prefix_caching...)."""
    return TextModel(
        engine=make_engine(model, tokenizer, start=False, **engine),
        tokenizer=tokenizer,
        name=name,
        max_model_len=model.cfg.max_seq_len,
        vocab_size=model.cfg.vocab_size,
        created=int(time.time()),
    )


def text_model(model: CausalLM, tokenizer: Tokenizer, **engine: Any) -> TextModel:
    """`tiny_text_model` with a KV cache of twice the model's context (room for long requests)."""
    return tiny_text_model(model, tokenizer, num_blocks=2 * model.cfg.max_seq_len // 16 + 16, **engine)


@contextmanager
def serve_model(tm: TextModel, **settings: Any) -> Iterator[LiveServer]:
    """Serve `tm` with `create_app(Settings(**settings))` (the GAN off unless asked for)."""
    with serve(create_app(Settings(**{"enable_gan": False, **settings}), text_model=tm)) as live:
        yield live


def _free_socket() -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio then sets TCP_NODELAY (no 40 ms delayed-ACK stalls)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serve(app: FastAPI, startup_timeout: float = 30.0) -> Iterator[LiveServer]:
    """Run `app` with uvicorn on a free port of 127.0.0.1 until the block exits."""
    sock = _free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError(f"uvicorn did not start within {startup_timeout} s")
            time.sleep(0.01)
        live = LiveServer(app, port)
        with httpx.Client(base_url=live.base_url, timeout=5.0) as c:  # the socket really answers
            assert c.get("/health").status_code == 200
        yield live
    finally:
        server.should_exit = True
        thread.join(15.0)
        sock.close()


@contextmanager
def serve_tiny(
    model: CausalLM,
    tokenizer: Tokenizer,
    *,
    num_blocks: int = 256,
    max_num_seqs: int = 32,
    max_num_batched_tokens: int = 256,
    prefix_caching: bool = True,
    settings: Settings | None = None,
) -> Iterator[LiveServer]:
    """`create_app(settings or Settings(enable_gan=False), text_model=tiny_text_model(...))` on a free port."""
    tm = tiny_text_model(
        model,
        tokenizer,
        num_blocks=num_blocks,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        prefix_caching=prefix_caching,
    )
    with serve(create_app(settings or Settings(enable_gan=False), text_model=tm)) as live:
        yield live
