"""The LLM engine: the engine core (a step loop on its own thread) and each request's side, composed.

`generate()` returns an async iterator of `TokenEvent`s for one request; `abort()` frees the
request's KV blocks before the next step; `check_health()` says whether the loop is alive.

Two parts, one typed boundary (`EngineOutput`, service.engine.engine_output):
- the engine core (service.engine.engine_core) is the step thread: inbox, aborts, scheduler, runner, deadlines
  and failures, in token ids only; after each step it sends every request it advanced or ended one frozen
  `EngineOutput`;
- the request side (service.engine.output_processor) is the request's own coroutine on the event loop: it
  turns those outputs into text (incremental detokenizing, stop strings), usage, the observer's timings and the
  `TokenEvent`s the API consumes.
Each field is written on one side only. This class holds what both sides share: admission, the tokenizer and
the observer.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Sequence

from model_core.grammar import CompiledGrammar
from model_core.lm import CausalLM
from model_core.lora import LoRAAdapter, check_fits
from model_core.sampling import SamplingParams
from model_core.tokenizer import Tokenizer
from model_core.weights.lora import load_lora as read_lora
from service.engine.admission import Admission, AdmissionControl
from service.engine.draft_proposer import DraftModelProposer
from service.engine.engine_core import EngineConfig, EngineCore, EngineStats, SpecConfig
from service.engine.errors import invalid_request
from service.engine.output_processor import EngineObserver, TokenEvent, error_event, stream_request
from service.engine.runner import ModelRunner
from service.engine.scheduler import Scheduler

SPEC_PER_POS = "aigc_spec_decode_num_accepted_tokens_per_pos"
# LoRA adapters in the engine state (the inference gateway's endpoint picker reads them as vLLM's
# `vllm:lora_requests_info`): `LORA_RUNNING/<adapter>` and `LORA_WAITING/<adapter>` (value 1.0) name the adapters
# loaded and serving, and those that waiting requests need; `LORA_MAX` is how many adapters fit in one batch.
LORA_RUNNING = "lora_running_adapters"
LORA_WAITING = "lora_waiting_adapters"
LORA_MAX = "lora_max"
__all__ = ["EngineConfig", "EngineObserver", "LLMEngine", "SpecConfig", "TokenEvent", "build_engine", "error_event"]


def build_engine(
    model: CausalLM,
    tokenizer: Tokenizer,
    config: EngineConfig,
    observer: EngineObserver | None = None,
    draft_model: CausalLM | None = None,
) -> LLMEngine:
    """The engine over a loaded model: its runner (paged KV cache of config.num_blocks blocks), not started.
    `draft_model`: speculative decoding's draft model (config.speculative.method "draft"), with a KV cache of as
    many blocks of its own."""
    runner = ModelRunner(model, config.num_blocks, config.block_size, tuple(tokenizer.eos_token_ids))
    draft = None if draft_model is None else DraftModelProposer(draft_model, config.num_blocks, config.block_size)
    return LLMEngine(runner, tokenizer, config, observer, draft)


class LLMEngine:
    """The engine core (`core`: the step thread) and the request side (`stream_request`, per request) composed."""

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        config: EngineConfig,
        observer: EngineObserver | None = None,
        draft: DraftModelProposer | None = None,
    ) -> None:
        self.core = EngineCore(runner, tuple(tokenizer.eos_token_ids), config, draft)
        self.tokenizer = tokenizer  # read by each new request (its detokenizer)
        self.observer = observer  # read by each new request (its timings)
        self.admission = AdmissionControl(config.max_num_seqs, config.max_waiting)
        self._loras: dict[str, LoRAAdapter] = {}  # the LoRA adapters requests may name, by name
        self._loras_lock = threading.Lock()

    @property
    def runner(self) -> ModelRunner:
        return self.core.runner

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def config(self) -> EngineConfig:
        return self.core.config

    @property
    def stats(self) -> EngineStats:
        return self.core.stats

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.core.eos_token_ids

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.core.start()

    def stop(self, timeout: float = 10.0, message: str | None = None) -> None:
        """Stop the loop after its current step; requests still in flight end with an error event
        carrying `message`. Returns once the thread has exited (or after `timeout`)."""
        self.core.stop(timeout, message)

    def check_health(self) -> None:
        self.core.check_health()

    @property
    def started(self) -> bool:
        return self.core.started

    @property
    def is_alive(self) -> bool:
        return self.core.is_alive

    def step(self) -> int:
        """One engine step (schedule -> run -> update); returns the number of sequences that got a token."""
        return self.core.step()

    # ---- requests --------------------------------------------------------------------------
    def num_pending(self) -> int:
        return self.core.num_pending()

    def admit(self, n: int = 1) -> Admission:
        """Reserve room for n requests (each then passed to `generate`), atomically with the check; raise
        EngineOverloadedError when they would overflow the queue, EngineDeadError when the loop is down."""
        self.check_health()
        return self.admission.admit(n)

    def state(self) -> dict[str, float]:
        scheduler = self.scheduler
        return {
            "aigc_num_requests_running": float(scheduler.num_running),
            "aigc_num_requests_waiting": float(self.admission.waiting),
            "aigc_kv_cache_usage_ratio": float(scheduler.kv_usage),
            "aigc_prefix_cache_queries": float(scheduler.prefix_cache_queries),
            "aigc_prefix_cache_hits": float(scheduler.prefix_cache_hits),
            "kv_cache_blocks": float(scheduler.num_blocks),
            "kv_cache_block_size": float(scheduler.block_size),
            **self.spec_state(),
            **self.lora_state(),
        }

    def lora_state(self) -> dict[str, float]:
        """LoRA adapters, as state keys `LORA_RUNNING/<name>` (every adapter served: all are loaded, a request for
        one runs at once), `LORA_WAITING/<name>` (those waiting requests name) and `LORA_MAX` (how many are
        served: they all fit one batch)."""
        with self._loras_lock:
            served = list(self._loras)
        return {
            **{f"{LORA_RUNNING}/{name}": 1.0 for name in served},
            **{f"{LORA_WAITING}/{name}": 1.0 for name in self.core.waiting_loras()},
            LORA_MAX: float(len(served)),
        }

    def spec_state(self) -> dict[str, float]:
        """Speculative decoding's counts (none when it is off); `..._per_pos/j`: drafts whose token j was kept."""
        if self.config.speculative is None:
            return {}
        s = self.stats
        return {
            "aigc_spec_decode_num_drafts": float(s.spec_drafts),
            "aigc_spec_decode_num_draft_tokens": float(s.spec_draft_tokens),
            "aigc_spec_decode_num_accepted_tokens": float(s.spec_accepted_tokens),
            **{f"{SPEC_PER_POS}/{j}": float(n) for j, n in enumerate(list(s.spec_accepted_at))},
        }

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix block; returns how many were forgotten. Safe at any time: blocks in
        use stay with their sequences (the scheduler lock only waits out a schedule or an update)."""
        return self.core.reset_prefix_cache()

    # ---- LoRA adapters ---------------------------------------------------------------------
    def add_lora(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """Serve `adapter` (model_core.weights.lora.load_lora, read for this engine's model) under its name: requests
        may name it from now on (`generate(..., lora=name)`), and run in the same steps as the base model's and other
        adapters' requests (per-row deltas, never merged into the weights). Safe at any time, from any thread; returns
        the adapter as served (its weights on the model's device). ValueError where the name is taken or the adapter
        does not fit the model (a message naming what)."""
        model = self.runner.model
        check_fits(adapter, model)
        served = adapter.to(model.device)
        with self._loras_lock:
            if adapter.name in self._loras:
                raise ValueError(f"a LoRA adapter named {adapter.name!r} is already served")
            self._loras[adapter.name] = served
        return served

    def load_lora(self, name: str, path: str) -> LoRAAdapter:
        """Read the adapter at `path` (a PEFT folder or a llama.cpp GGUF LoRA) for this engine's model and serve it
        as `name` (`add_lora`). ValueError / FileNotFoundError saying what does not fit."""
        return self.add_lora(read_lora(path, self.runner.model.cfg, name=name))

    def remove_lora(self, name: str) -> LoRAAdapter:
        """Stop serving the adapter `name`: new requests naming it are refused; requests already running with it end
        with it (they hold it), and its prefix-cache blocks are never found again (a reload gets a new key). KeyError
        where no adapter has that name."""
        with self._loras_lock:
            if name not in self._loras:
                raise KeyError(f"no LoRA adapter named {name!r} is served")
            return self._loras.pop(name)

    @property
    def loras(self) -> dict[str, LoRAAdapter]:
        """The adapters served now, by name (a copy)."""
        with self._loras_lock:
            return dict(self._loras)

    def lora(self, name: str) -> LoRAAdapter:
        """The adapter served as `name`; EngineError (INVALID_REQUEST, param "model") where there is none."""
        with self._loras_lock:
            adapter = self._loras.get(name)
        if adapter is None:
            raise invalid_request(f"no LoRA adapter named {name!r} is served", "model")
        return adapter

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        timeout_s: float | None = None,
        admission: Admission | None = None,
        grammar: CompiledGrammar | None = None,
        arrival: float | None = None,
        lora: str | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """Stream events for one request. Closing the iterator early aborts the request.
        timeout_s caps this request's total time (never above the engine's request_timeout_s).
        admission: the ticket from `admit()` this request takes its place from; without one the request
        is counted but not limited (direct use).
        grammar: constrain the output to it (a per-request matcher masks each step's logits); EOS then
        ends the request whenever the grammar allows it (ignore_eos does not apply), and the request
        ends with "stop" as soon as the grammar is complete (even before min_tokens).
        params.max_tokens == 0 scores the prompt only: one event, finish_reason "length", no token (set
        params.prompt_logprobs to get the scores).
        arrival: when the request arrived (time.monotonic()), if before this call (it waited for its model to
        load): its queue time, time to first token, latency and deadlines count from then.
        lora: the name of a served LoRA adapter (`add_lora`) to run with; None: the base model.
        Raises EngineError (kind INVALID_REQUEST) for a request the engine cannot take (empty prompt, no room
        in the context, a grammar for another vocabulary), EngineDeadError when the loop is down."""
        adapter = self.lora(lora) if lora is not None else None  # (before the admission ticket is taken)
        if admission is not None:
            admission.take()
        else:
            self.admission.enter()
        try:
            async with contextlib.aclosing(
                stream_request(
                    self.core,
                    self.abort,
                    self.tokenizer,
                    self.observer,
                    prompt_ids,
                    params,
                    request_id,
                    timeout_s,
                    grammar,
                    arrival,
                    adapter,
                )
            ) as events:
                async for ev in events:
                    yield ev
        finally:
            self.admission.leave()

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)
