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
from collections.abc import AsyncIterator, Sequence

from model_core.grammar import CompiledGrammar
from model_core.lm import CausalLM
from model_core.sampling import SamplingParams
from model_core.tokenizer import Tokenizer
from service.engine.admission import Admission, AdmissionControl
from service.engine.draft_proposer import DraftModelProposer
from service.engine.engine_core import EngineConfig, EngineCore, EngineStats, SpecConfig
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
        """LoRA adapters, as state keys `LORA_RUNNING/<name>`, `LORA_WAITING/<name>` (1.0) and `LORA_MAX`.
        The hook for LoRA serving to fill; until then no adapters and room for none."""
        return {LORA_MAX: 0.0}

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

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        timeout_s: float | None = None,
        admission: Admission | None = None,
        grammar: CompiledGrammar | None = None,
        arrival: float | None = None,
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
        Raises EngineError (kind INVALID_REQUEST) for a request the engine cannot take (empty prompt, no room
        in the context, a grammar for another vocabulary), EngineDeadError when the loop is down."""
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
                )
            ) as events:
                async for ev in events:
                    yield ev
        finally:
            self.admission.leave()

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)
