"""The one boundary between the engine's two parts: what the engine core sends a request after a step.

The engine core (service.engine.engine_core, on the step thread) works in token ids only. For each request a
step advanced or ended it makes one `EngineOutput`, frozen, and hands it to the request's sink; the request side
(service.engine.output_processor, on the event loop) reads it and never writes it. Text, stop strings and the
API's `TokenEvent` are the request side's alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from model_core.sampling import TokenScore
from service.engine.errors import EngineError
from service.engine.scheduler import FinishReason


@dataclass(frozen=True)
class EngineOutput:
    """One step's result for one request, written by the engine core only."""

    request_id: str
    token_id: int | None  # the sampled token; None for a scored prompt (max_tokens 0) or an error
    # the engine core's decision: STOP (EOS, a stop token id, the grammar complete), LENGTH (max_tokens, or the
    # prompt scored), ERROR (with `error`); None while the request goes on. Stop strings are the request side's.
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    num_output_tokens: int  # tokens the request has generated so far (this one included)
    time: float  # monotonic time the core made it
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), most likely first
    # on the request's first output, when params.prompt_logprobs is set: per prompt position i, how the model
    # scored prompt token i given the tokens before it (index 0 is None: nothing precedes it)
    prompt_logprobs: list[TokenScore | None] | None = None
    queue_time: float | None = None  # on the first token: seconds from arrival to the first schedule
    error: EngineError | None = None  # with finish_reason ERROR
