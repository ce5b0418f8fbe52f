"""Test helpers: run `create_app(...)` for HTTP tests, in-process or on a real socket.

`tiny_text_model(model, tokenizer)` wraps a (tiny, random) LM and a real tokenizer in a started-later
engine; the app's lifespan starts and stops it. Two ways to serve an app, with the same shape (`app`,
`text_model`, `base_url`, `client()`, `http_client()`), so a test module switches by changing one call:

- In-process (the default for API tests): `serve_in_process(app)` / `serve_tiny_in_process(...)` /
  `serve_model_in_process(tm)` run the app and its lifespan on an event loop in a background thread and
  hand each request to `httpx.ASGITransport` there; no socket, no uvicorn. `client()` is an `httpx.Client`
  on that transport (also what `openai.OpenAI(base_url=live.base_url + "/v1", http_client=live.http_client())`
  takes), `async_client()` an `httpx.AsyncClient` for code that runs its own event loop. Use it for tests
  that send requests and read whole responses, streamed ones included: ASGITransport collects a streamed
  body before it returns, so the test still sees every SSE event, just not as they arrive.
- Live uvicorn on 127.0.0.1: `serve(app)` / `serve_tiny(...)` / `serve_model(tm)`. Use it when the socket
  is the point: a client that disconnects or times out mid-request (the server must notice and abort), a
  stream read partially, slow or oversized bodies sent as they are written, raw sockets, signals and
  draining, load and soak, third-party clients that cannot take an `http_client`, and the browser.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from model_core.lm import CausalLM
from model_core.tokenizer import Tokenizer
from service.api.text_model import TextModel
from service.config import Settings
from service.http_protocol import guarded_h11_protocol
from service.main import create_app
from tests.service.engine.engine_utils import make_engine

TINY_MODEL_NAME = "tiny-llama"


def loaded_lm(app: FastAPI, name: str | None = None) -> TextModel:
    """An app's LM `name` (default: its first), which must be loaded."""
    registry = app.state.server.models
    slot = registry.get(name or registry.names[0])
    assert slot is not None and slot.model is not None, f"the text model {name or ''} is not loaded"
    tm: TextModel = slot.model
    return tm


@dataclass(frozen=True)
class LiveServer:
    """A uvicorn server on 127.0.0.1:`port`."""

    app: FastAPI
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def text_model(self) -> TextModel:
        """The first LM (the only one, in most tests), loaded."""
        return loaded_lm(self.app)

    def lm(self, name: str) -> TextModel:
        """The LM `name`, loaded."""
        return loaded_lm(self.app, name)

    def client(self, timeout: float | httpx.Timeout = 60.0, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout, **kw)

    def http_client(self, timeout: float | httpx.Timeout = 60.0, **kw: Any) -> httpx.Client:
        """A client without a base URL, for `openai.OpenAI(http_client=...)`."""
        return httpx.Client(timeout=timeout, **kw)

    def async_client(self, timeout: float | httpx.Timeout = 60.0, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=timeout, **kw)


class _LoopTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Hands each request to `httpx.ASGITransport(app)` on the app's event loop (another thread) and returns
    the whole response: sync for `httpx.Client`, async (any other loop) for `httpx.AsyncClient`. The app's
    exceptions become 500 responses, as under uvicorn."""

    def __init__(self, app: FastAPI, loop: asyncio.AbstractEventLoop) -> None:
        self._asgi = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        self._loop = loop

    async def _send(self, request: httpx.Request) -> httpx.Response:
        response = await self._asgi.handle_async_request(request)
        body = b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]
        return httpx.Response(response.status_code, headers=response.headers, stream=httpx.ByteStream(body))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        read_timeout = request.extensions.get("timeout", {}).get("read")
        # the body read here, so the request the app's loop gets holds plain bytes
        request = httpx.Request(request.method, request.url, headers=request.headers, content=request.read())
        future = asyncio.run_coroutine_threadsafe(self._send(request), self._loop)
        try:
            return future.result(read_timeout)
        except TimeoutError as e:
            future.cancel()
            raise httpx.ReadTimeout("the in-process app did not answer in time", request=request) from e

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        content = await request.aread()  # on the caller's loop: the stream may belong to it
        request = httpx.Request(request.method, request.url, headers=request.headers, content=content)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._send(request), self._loop))


@dataclass(frozen=True)
class InProcessServer:
    """An app run in-process (its lifespan on an event loop in a background thread) behind `httpx.ASGITransport`."""

    app: FastAPI
    transport: _LoopTransport
    base_url: str = "http://testserver"

    @property
    def text_model(self) -> TextModel:
        """The first LM (the only one, in most tests), loaded."""
        return loaded_lm(self.app)

    def lm(self, name: str) -> TextModel:
        """The LM `name`, loaded."""
        return loaded_lm(self.app, name)

    def client(self, timeout: float | httpx.Timeout = 60.0, **kw: Any) -> httpx.Client:
        return httpx.Client(transport=self.transport, base_url=self.base_url, timeout=timeout, **kw)

    def http_client(self, timeout: float | httpx.Timeout = 60.0, **kw: Any) -> httpx.Client:
        """A client without a base URL, for `openai.OpenAI(base_url=f"{base_url}/v1", http_client=...)`."""
        return httpx.Client(transport=self.transport, timeout=timeout, **kw)

    def async_client(self, timeout: float | httpx.Timeout = 60.0, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transport, base_url=self.base_url, timeout=timeout, **kw)


@contextmanager
def serve_in_process(app: FastAPI, startup_timeout: float = 30.0) -> Iterator[InProcessServer]:
    """Run `app`'s lifespan on an event loop in a background thread until the block exits; requests go to
    `httpx.ASGITransport(app)` on that loop (see the module docstring for when to use `serve` instead)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="asgi-app-loop", daemon=True)
    thread.start()
    started: Future[None] = Future()
    stop: Future[None] = Future()

    async def run() -> None:
        try:
            async with app.router.lifespan_context(app):
                started.set_result(None)
                await asyncio.wrap_future(stop)
        except BaseException as e:
            if not started.done():
                started.set_exception(e)
            raise

    running = asyncio.run_coroutine_threadsafe(run(), loop)
    try:
        started.result(startup_timeout)
        yield InProcessServer(app, _LoopTransport(app, loop))
    finally:
        stop.set_result(None)
        try:
            running.result(15.0)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(15.0)
            if not thread.is_alive():
                loop.close()


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
def serve_model(tm: TextModel, *, http_guards: bool = False, **settings: Any) -> Iterator[LiveServer]:
    """Serve `tm` with `create_app(Settings(**settings))` (the GAN off unless asked for); `http_guards`: see `serve`."""
    with serve(
        create_app(Settings(**{"enable_gan": False, **settings}), text_model=tm), http_guards=http_guards
    ) as live:
        yield live


@contextmanager
def serve_model_in_process(tm: TextModel, **settings: Any) -> Iterator[InProcessServer]:
    """`serve_model`, in-process."""
    with serve_in_process(create_app(Settings(**{"enable_gan": False, **settings}), text_model=tm)) as live:
        yield live


def _free_socket() -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio then sets TCP_NODELAY (no 40 ms delayed-ACK stalls)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serve(app: FastAPI, startup_timeout: float = 30.0, *, http_guards: bool = False) -> Iterator[LiveServer]:
    """Run `app` with uvicorn on a free port of 127.0.0.1 until the block exits. `http_guards`: with the protocol
    `python -m service` runs (`service.main.server_config`), the header timeout and connection cap of the app's
    settings; without, uvicorn's own h11 protocol."""
    sock = _free_socket()
    port = sock.getsockname()[1]
    protocol: dict[str, Any] = {}
    if http_guards:
        settings: Settings = app.state.server.settings
        protocol["http"] = guarded_h11_protocol(settings.header_timeout_s, settings.max_connections)
    config = uvicorn.Config(
        app,
        **protocol,
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


def tiny_app(model: CausalLM, tokenizer: Tokenizer, settings: Settings | None = None, **engine: Any) -> FastAPI:
    """`create_app(settings or Settings(enable_gan=False))` serving `tiny_text_model(model, tokenizer, **engine)`."""
    tm = tiny_text_model(model, tokenizer, **engine)
    return create_app(settings or Settings(enable_gan=False), text_model=tm)


@contextmanager
def serve_tiny(
    model: CausalLM, tokenizer: Tokenizer, *, settings: Settings | None = None, **engine: Any
) -> Iterator[LiveServer]:
    """`tiny_app(...)` on a free port (`engine`: num_blocks, max_num_seqs, prefix_caching, ...)."""
    with serve(tiny_app(model, tokenizer, settings, **engine)) as live:
        yield live


@contextmanager
def serve_tiny_in_process(
    model: CausalLM, tokenizer: Tokenizer, *, settings: Settings | None = None, **engine: Any
) -> Iterator[InProcessServer]:
    """`serve_tiny`, in-process."""
    with serve_in_process(tiny_app(model, tokenizer, settings, **engine)) as live:
        yield live
