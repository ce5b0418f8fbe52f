"""The app factory and the `python -m service` entry point.

`create_app(settings, text_model=None)` builds the FastAPI app; without an injected text model the LMs are the
configured ones (`--model`, `--models-dir`: `service.api.model_specs`), each loaded on first use by the model
registry (`service.api.model_registry`) on a thread of its own with `build_text_model`; the lifespan loads the
`--preload` models (default: the first) in the background, so /health answers at once and /ready turns 200 when
they are loaded.

A preloaded model that cannot be served (a missing or corrupt file, an architecture or tokenizer the loaders do not
support, a KV cache too small for one sequence) is fatal under `python -m service`: the loader thread logs one
error line naming the model and the reason, asks uvicorn to stop, and the process exits with status 1, so a
supervisor (systemd, Docker, Kubernetes) sees the failure and restarts or reports it, as llama-server does. An
app built by `create_app` alone (tests, embedding) keeps running with /ready 503 and the reason. A model loaded on
first use that fails answers its requests with the reason (500 `model_load_failed`); the server serves the others.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from types import FrameType
from typing import TYPE_CHECKING

from fastapi import FastAPI

from model_core.g2p import Hypothesis
from model_core.grammar_probe import configure_shared_probe
from service.api import admin, chat, completions, health, images, lora_routes, models, responses, tokenize, ui
from service.api import metrics as metrics_route
from service.api.auth import APIKeyMiddleware
from service.api.cors import CORS
from service.api.errors import APIError, install_error_handlers
from service.api.middleware import RequestContextMiddleware
from service.api.model_registry import Budget, LMSlot, ModelLoadError, ModelRegistry, Status, attach_adapters
from service.api.model_specs import ModelSpec, lora_specs, model_specs, preload_names
from service.api.model_table import G2P_MODEL, IMAGE_MODEL
from service.api.state import ServerState
from service.api.text_model import TextModel
from service.config import Settings, parse_settings
from service.engine.engine import EngineObserver, SpecConfig
from service.engine.images import ImageBatcher
from service.engine.own_thread import run_in_own_thread
from service.engine.seq2seq import Seq2SeqBatcher, Seq2SeqRequest
from service.logs import setup_logging
from service.metrics import Metrics

if TYPE_CHECKING:
    import uvicorn

    from model_core.weights.loader import LoadedLM

log = logging.getLogger("service")

EXIT_STARTUP_FAILURE = 1  # the exit status when a model the server must serve cannot start


class StartupError(ValueError):
    """A model the server must serve cannot start, for an expected reason (bad path, file, format or setting):
    the message is one line naming the model and why. Logged without a traceback."""


def _lm_specs(settings: Settings) -> list[ModelSpec]:
    """The configured LMs (StartupError: two with one id, an empty --models-dir...)."""
    try:
        return model_specs(settings.model, settings.models_dir, settings.served_model_name)
    except ValueError as e:
        raise StartupError(str(e)) from e


def settings_for(settings: Settings, spec: ModelSpec) -> Settings:
    """The settings of one LM: the server's, with only that model, by its id."""
    return settings.model_copy(
        update={"model": [spec.path] if spec.path else [], "models_dir": None, "served_model_name": spec.name}
    )


def _reason(e: BaseException) -> str:
    """An exception's message on one line (its type where it has none)."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _expected_load_errors() -> tuple[type[BaseException], ...]:
    """What loaders raise for a bad model or setting (ValueError, OSError: a missing, unreadable, corrupt or
    unsupported file) or a model too big for memory; anything else is a bug and keeps its traceback."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None)
    return (ValueError, OSError, MemoryError) + ((oom,) if isinstance(oom, type) else ())


# Without --max-model-len, a model whose context does not fit the KV budget is served with the context that fits,
# if that is at least this many tokens (below it the budget is a mistake: start-up fails, saying what it needs)
MIN_AUTO_MODEL_LEN = 2048


def spec_config(settings: Settings) -> SpecConfig | None:
    """The engine's speculative decoding settings (None: off)."""
    if settings.speculative_method == "off":
        return None
    return SpecConfig(
        method=settings.speculative_method,
        num_tokens=settings.num_speculative_tokens,
        ngram_min=settings.ngram_prompt_lookup_min,
        ngram_max=settings.ngram_prompt_lookup_max,
        disable_by_batch_size=settings.speculative_disable_by_batch_size,
    )


def _load_lm_file(settings: Settings, path: str, label: str) -> LoadedLM:
    """An LM loaded as the settings say (device, dtype, kernels, batch invariance, dense copies); StartupError naming
    `label` for a file that cannot be served."""
    from model_core.weights.loader import load_for_inference

    try:
        return load_for_inference(
            path,
            settings.device,
            settings.dtype,
            settings.kernels,
            settings.quant_max_rows,
            settings.batch_invariant,
            {"auto": None, "keep": True, "drop": False}[settings.dense_weights],
        )
    except _expected_load_errors() as e:
        raise StartupError(f"cannot load {label}: {_reason(e)}") from e


def load_draft_model(settings: Settings, target: LoadedLM) -> LoadedLM:
    """The draft model of --speculative-method draft, loaded as the target is (device, dtype, kernels); its vocabulary
    must be the target's, token for token."""
    path = settings.speculative_model
    assert path is not None
    draft = _load_lm_file(settings, path, f"the draft model {path}")
    tv, dv = target.tokenizer, draft.tokenizer
    if tv.vocab_size != dv.vocab_size or any(tv.id_to_token(i) != dv.id_to_token(i) for i in range(tv.vocab_size)):
        raise StartupError(
            f"the draft model {path} has another vocabulary than {target.name} "
            f"({dv.vocab_size} against {tv.vocab_size} tokens, or other tokens): speculative decoding needs the same"
        )
    return draft


def build_text_model(settings: Settings, observer: EngineObserver | None = None) -> TextModel:
    """Load the (first configured) LM and its tokenizer, size the KV cache from the memory budget, build its engine
    (not started)."""
    from model_core.default_model import find_default_model
    from model_core.kv_cache import PagedKVCache
    from service.engine.engine import EngineConfig, build_engine

    spec = _lm_specs(settings)[0]
    try:
        path = spec.path or find_default_model()
    except _expected_load_errors() as e:
        raise StartupError(f"cannot load {spec.label}: {_reason(e)}") from e
    lm = _load_lm_file(settings, path, spec.label)
    cfg, dtype = lm.config, lm.model.dtype
    max_len = min(cfg.max_seq_len, settings.max_model_len or cfg.max_seq_len)
    per_block = PagedKVCache.bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.hd, dtype) * settings.block_size
    num_blocks = int(settings.kv_cache_memory_gb * 2**30) // per_block
    holds = num_blocks * settings.block_size
    if holds < max_len and settings.max_model_len is None and holds >= MIN_AUTO_MODEL_LEN:
        # the model's own context (Llama 3.2: 131072 tokens) does not fit the budget: serve what fits, as llama.cpp's
        # and Ollama's default contexts do, and say so (an explicit --max-model-len that does not fit is an error)
        log.warning(
            "max_model_len %d: the most that kv_cache_memory_gb=%g holds for %s (its context is %d tokens; "
            "raise kv_cache_memory_gb for more, or set max_model_len)",
            holds,
            settings.kv_cache_memory_gb,
            spec.name,
            max_len,
        )
        max_len = holds
    if holds < max_len:
        needed_gb = math.ceil(-(-max_len // settings.block_size) * per_block / 2**30 * 1000) / 1000  # rounded up
        raise StartupError(
            f"KV cache too small for model {spec.name}: "
            f"kv_cache_memory_gb={settings.kv_cache_memory_gb} holds {num_blocks * settings.block_size} tokens, "
            f"fewer than one sequence of max_model_len={max_len} (that needs kv_cache_memory_gb >= {needed_gb:g} "
            f"in {str(dtype).removeprefix('torch.')} with block_size={settings.block_size}); "
            "raise kv_cache_memory_gb or lower max_model_len"
        )
    draft = load_draft_model(settings, lm) if settings.speculative_model else None
    engine = build_engine(
        lm.model,
        lm.tokenizer,
        EngineConfig(
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            block_size=settings.block_size,
            num_blocks=num_blocks,
            max_model_len=max_len,
            max_waiting=settings.max_waiting,
            request_timeout_s=settings.request_timeout_s,
            queue_timeout_s=settings.queue_timeout_s,
            enable_prefix_caching=settings.enable_prefix_caching,
            cache_salt=f"{lm.name}:{dtype}",
            speculative=spec_config(settings),
        ),
        observer,
        draft_model=draft.model if draft is not None else None,
    )
    log.info(
        "%s: KV cache %d blocks x %d tokens (%.2f GiB), max_model_len %d",
        spec.name,
        num_blocks,
        settings.block_size,
        num_blocks * per_block / 2**30,
        max_len,
        extra={"fields": {"model": spec.name}},
    )
    return TextModel(
        engine=engine,
        tokenizer=lm.tokenizer,
        name=spec.name,
        max_model_len=max_len,
        vocab_size=cfg.vocab_size,
        created=int(time.time()),
        load_seconds=lm.load_seconds,
        dtype=str(dtype).removeprefix("torch."),
        kernels=lm.backend.isa or "torch",
        batch_invariant=lm.batch_invariant,
    )


async def start_image_batcher(settings: Settings, metrics: Metrics) -> ImageBatcher | None:
    """Load the GAN (fast: a small checkpoint) and start its micro-batcher; None if it cannot load."""
    from model_core.gan import load_gan

    try:
        gen = await run_in_own_thread(load_gan, settings.gan_path, name="gan-loader")
    except Exception:
        log.exception("GAN failed to load; /v1/images/generations will answer 503")
        return None
    model = IMAGE_MODEL

    def on_batch(images: int, requests: int, seconds: float) -> None:
        metrics.image_requests.labels(model).inc(requests)
        metrics.on_image_batch(model, images)

    batcher = ImageBatcher(gen, settings.image_max_batch, settings.image_max_wait_ms, on_batch=on_batch)
    await batcher.start()
    return batcher


async def start_g2p_batcher(settings: Settings, metrics: Metrics) -> Seq2SeqBatcher | None:
    """Load the grapheme-to-phoneme model (a small checkpoint) and start its micro-batcher; None if it
    cannot load (requests for it then get 404, as for any model not served)."""
    from model_core.g2p import load_g2p

    try:
        g2p = await run_in_own_thread(load_g2p, settings.g2p_path, name="g2p-loader")
    except Exception:
        log.exception("the G2P model failed to load; %s is not served", G2P_MODEL)
        return None
    model = G2P_MODEL

    def on_batch(rows: int, requests: int, seconds: float) -> None:
        metrics.seq2seq_batch.labels(model).observe(rows)

    def on_finish(rq: Seq2SeqRequest, choices: list[Hypothesis], seconds: float) -> None:
        metrics.prompt_tokens.labels(model).inc(sum(len(w) for w in rq.words))
        metrics.generation_tokens.labels(model).inc(sum(len(h.phones) for h in choices))
        for h in choices:
            metrics.success.labels(model, "stop" if h.finished else "length").inc()
        metrics.e2e.labels(model).observe(seconds)

    batcher = Seq2SeqBatcher(
        g2p, settings.g2p_max_batch, settings.g2p_max_wait_ms, on_batch=on_batch, on_finish=on_finish
    )
    await batcher.start()
    return batcher


def _load_lm(
    settings: Settings, spec: ModelSpec, metrics: Metrics, adapters: dict[str, str]
) -> Callable[[], TextModel]:
    """What loads one LM (on the registry's loader thread): build it, attach its LoRA `adapters` (the slot's: what
    they are at each load), start its engine, export its metrics; a failure logs one error line (a traceback only for
    a bug) and raises ModelLoadError with that line."""

    def load() -> TextModel:
        try:
            tm = build_text_model(settings_for(settings, spec), observer=metrics.observer(spec.name))
            attach_adapters(tm, adapters, spec.name)
            _start_lm(tm, spec.name, metrics)
        except Exception as e:
            metrics.loads.labels(spec.name, "error").inc()
            if isinstance(e, (StartupError, ModelLoadError)):  # expected: one line says it all
                log.error("%s", e, extra={"fields": {"model": spec.name}})
                raise ModelLoadError(str(e)) from e
            message = f"cannot start {spec.label}: {type(e).__name__}: {_reason(e)}"  # a bug: keep the traceback
            log.error("%s", message, exc_info=e, extra={"fields": {"model": spec.name}})
            raise ModelLoadError(message) from e
        metrics.loads.labels(spec.name, "ok").inc()
        return tm

    return load


def _start_lm(tm: TextModel, name: str, metrics: Metrics) -> None:
    """Start a built LM's engine (if it is not running) under its id, its metrics labelled so."""
    tm.name = name
    if tm.engine.observer is None:
        tm.engine.observer = metrics.observer(name)
    metrics.bind_engine(name, tm.engine.state)
    metrics.load_seconds.labels(name).set(tm.load_seconds)
    if not tm.engine.started:
        tm.engine.start()


def _stop_lm(metrics: Metrics) -> Callable[[TextModel, str], None]:
    """What unloads one LM (on a worker thread): stop its engine (requests still on it end with an error saying
    why), drop its metrics' gauges, free its memory."""

    def stop(tm: TextModel, reason: str) -> None:
        shutdown = reason == "shutdown"
        tm.engine.stop(message="the server is shutting down" if shutdown else f"model {tm.name} was unloaded")
        metrics.unbind_engine(tm.name)
        if not shutdown:
            metrics.unloads.labels(tm.name, reason).inc()
            gc.collect()  # the model's tensors go with its last references (the caller drops its own)
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # hand the freed blocks back to the device, not only to torch's cache

    return stop


def _budget(settings: Settings) -> Budget:
    return Budget(settings.max_loaded_models, settings.max_loaded_memory, int(settings.kv_cache_memory_gb * 2**30))


def create_app(settings: Settings | None = None, text_model: TextModel | None = None) -> FastAPI:
    """The app serving `settings`' models, or `text_model` (built, engine not started: tests, embedding) as its
    only LM. StartupError for models that cannot be served together (see `service.api.model_specs`)."""
    settings = settings or Settings()
    configure_shared_probe(settings.grammar_probe_workers)  # grammars are compiled in a worker first
    specs = [ModelSpec(text_model.name, None, f"model {text_model.name}", 0)] if text_model else _lm_specs(settings)
    budget = _budget(settings)
    try:
        preload = [text_model.name] if text_model else preload_names(settings.preload, [s.name for s in specs])
        budget.check(specs, [s for s in specs if s.name in preload])
        loras = lora_specs(settings.lora_modules, [s.name for s in specs])
    except ValueError as e:
        raise StartupError(str(e)) from e

    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.load_error = None
        state.draining = False
        metrics = state.metrics

        def on_change(slot: LMSlot) -> None:
            metrics.loaded.labels(slot.name).set(1 if slot.status is Status.LOADED else 0)

        adapters: dict[str, dict[str, str]] = {s.name: {} for s in specs}  # each LM's LoRA adapters: id -> path
        for lora in loras:
            adapters[lora.base][lora.name] = lora.path
        slots = []
        for s in specs:
            build = None if text_model else _load_lm(settings, s, metrics, adapters[s.name])
            slots.append(LMSlot(s, build, adapters=adapters[s.name]))
        state.models = registry = ModelRegistry(slots, budget, _stop_lm(metrics), on_change)
        for slot in slots:
            on_change(slot)
        if text_model is not None:  # given built: started here, before the first request
            try:
                attach_adapters(text_model, adapters[text_model.name], text_model.name)
                _start_lm(text_model, text_model.name, metrics)
            except Exception as e:
                state.load_error = f"cannot start model {text_model.name}: {type(e).__name__}: {_reason(e)}"
                log.error("%s", state.load_error, exc_info=e)
            else:
                slots[0].model, slots[0].status, slots[0].last_used = text_model, Status.LOADED, time.monotonic()
                on_change(slots[0])
        state.preloading = text_model is None and bool(preload)
        preloading = asyncio.create_task(_preload(state, preload)) if state.preloading else None
        state.image_batcher = await start_image_batcher(settings, metrics) if settings.enable_gan else None
        state.g2p_batcher = await start_g2p_batcher(settings, metrics) if settings.enable_g2p else None
        try:
            yield
        finally:
            if preloading is not None:
                preloading.cancel()
            if state.image_batcher is not None:
                await state.image_batcher.stop()
            if state.g2p_batcher is not None:
                await state.g2p_batcher.stop()
            await registry.close()

    app = FastAPI(title="AIGC inference service", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    for r in (
        health.router,
        metrics_route.router,
        models.router,
        tokenize.router,
        completions.router,
        chat.router,
        responses.router,
        images.router,
        admin.router,
        lora_routes.router,
    ):
        app.include_router(r)
    public_paths = list(settings.public_paths)
    if settings.ui:  # the playground's page and assets are public; the API calls it makes are not
        app.include_router(ui.router)
        public_paths += ui.PUBLIC_PATHS
    # outermost last: request context (ids, size limit) -> CORS -> API keys -> routes
    app.add_middleware(APIKeyMiddleware, keys=settings.all_api_keys(), public_paths=public_paths)
    if settings.cors_origins:
        app.add_middleware(CORS, origins=settings.cors_origins)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.request_body_timeout_s,
        inflight=state.inflight,
        draining=lambda: state.draining,
    )
    return app


async def _preload(state: ServerState, names: Sequence[str]) -> None:
    """Load the --preload models in turn; the first that fails is the server's load error (under `python -m
    service`: the process stops, status 1)."""
    try:
        for name in names:
            try:
                await state.models.load(name, None)
            except APIError as e:
                state.load_error = e.message
                if state.stop_server is not None:
                    state.stop_server()
                return
    finally:
        state.preloading = False


def _drain_server(app: FastAPI, settings: Settings) -> type:
    """A uvicorn Server whose first SIGTERM/SIGINT drains: /ready and new requests get 503 while
    in-flight requests finish (up to drain_timeout_s). Requests still running then are ended by stopping
    the engine (streams get an error event and [DONE]) before the server exits. A second signal exits at
    once."""
    import uvicorn

    state: ServerState = app.state.server

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if state.draining or sig not in (signal.SIGTERM, signal.SIGINT):
                super().handle_exit(sig, frame)
                return
            state.draining = True
            log.info("draining: %d requests in flight, timeout %.0fs", state.inflight.count, settings.drain_timeout_s)

            def wait_then_exit() -> None:
                inflight = state.inflight
                deadline = time.monotonic() + settings.drain_timeout_s
                while inflight.count > 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                if inflight.count > 0:
                    log.info("drain timeout: ending %d requests in flight", inflight.count)
                    for tm in state.models.loaded():
                        tm.engine.stop(message="the server is shutting down")
                    deadline = time.monotonic() + 2.0  # time for the streams to send their error and [DONE]
                    while inflight.count > 0 and time.monotonic() < deadline:
                        time.sleep(0.02)
                log.info("drained (%d requests left); shutting down", inflight.count)
                self.should_exit = True

            threading.Thread(target=wait_then_exit, name="drain", daemon=True).start()

    return DrainingServer


def server_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """uvicorn's configuration: HTTP/1.1 (h11) with the header timeout and connection cap of the settings
    (`service.http_protocol`)."""
    import uvicorn

    from service.http_protocol import guarded_h11_protocol

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_h11_protocol(settings.header_timeout_s, settings.max_connections),
        log_level=settings.log_level,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=5,
    )


FD_HEADROOM = 256  # descriptors beyond the client connections: model files, refused connections lingering, pipes


def raise_fd_limit(max_connections: int) -> None:
    """Raise the soft limit on open files towards the hard one if `max_connections` would not fit under it (a
    server that runs out of descriptors cannot even accept the connection it would refuse); warn if it cannot."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    want = max_connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ValueError, OSError):
        new = soft
    if new < want:
        log.warning(
            "max_connections %d needs about %d open files; the limit is %d: lower max_connections or raise ulimit -n",
            max_connections,
            want,
            new,
        )


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    setup_logging(settings.log_level, settings.log_format)
    import torch

    # Before any thread starts: threads inherit the mode. Subnormal floats otherwise take a slow path on x86
    # (the engine thread sets it again for engines started elsewhere).
    torch.set_flush_denormal(True)
    try:
        app = create_app(settings)
    except StartupError as e:
        log.error("%s", e)
        return EXIT_STARTUP_FAILURE
    raise_fd_limit(settings.max_connections)
    server = _drain_server(app, settings)(server_config(app, settings))

    def stop_server() -> None:  # the model failed to load: stop serving (uvicorn checks every 0.1 s), exit 1
        server.should_exit = True

    app.state.server.stop_server = stop_server
    server.run()
    return _exit_code_after_stop(app)


def _exit_code_after_stop(app: FastAPI) -> int:
    """The process's exit status: 1 if the model failed to load, else 0. Stop the engine before the interpreter
    exits: a thread still inside torch at exit aborts the process (SIGABRT). If one is still busy (a model still
    loading, a step that will not end), leave at once."""
    state: ServerState = app.state.server
    code = EXIT_STARTUP_FAILURE if state.load_error else 0
    for tm in state.models.loaded():
        tm.engine.stop(message="the server is shutting down")
    busy = [t.name for t in threading.enumerate() if t.name in ("llm-engine", "model-loader") and t.is_alive()]
    if busy:
        log.warning("exiting while %s still run", ", ".join(busy))
        logging.shutdown()
        os._exit(code)
    return code
