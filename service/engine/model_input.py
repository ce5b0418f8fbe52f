"""What the engine hands the model runner for one step: typed records, nothing opaque.

The scheduler decides which tokens of which sequences are computed (`SchedulerOutput`); the engine turns
that into a `ModelInput` of `ChunkInput`s, each carrying everything the runner reads: the tokens and where
they start, the block table, the sequence's tokens so far (for penalties) and the request's
`SamplingState`. The runner never sees the scheduler's sequences or the engine's per-request state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model_core.grammar import GrammarMatcher
from model_core.lora import LoRAAdapter
from model_core.sampling import SamplingParams, TokenScore


@dataclass
class SamplingState:
    """One request's sampling state, made when it arrives and kept by the engine until it ends."""

    params: SamplingParams
    generator: torch.Generator
    matcher: GrammarMatcher | None = None  # constrained decoding: the grammar's state after the tokens so far
    # with params.prompt_logprobs: per prompt position i, how the model scored prompt token i given the ones
    # before it; filled by the runner during the prefill (index 0 stays None: nothing precedes it)
    prompt_scores: list[TokenScore | None] | None = None


@dataclass(frozen=True)
class ChunkInput:
    """Compute `token_ids` at positions start .. start + len(token_ids) - 1 of one sequence; sample after the
    last one when `sample`. A decode with a `draft` (its last tokens) is sampled after each of its tokens, to
    verify the draft (service.engine.runner)."""

    request_id: str
    token_ids: list[int]
    start: int
    block_table: list[int]  # the sequence's KV blocks (covering every position computed)
    prompt_ids: list[int]
    output_ids: list[int]  # generated so far
    sample: bool
    sampling: SamplingState
    draft: list[int] = field(default_factory=list)  # proposed tokens ending token_ids, to verify (decodes only)
    lora: LoRAAdapter | None = None  # the request's LoRA adapter (None: the base model)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(frozen=True)
class ModelInput:
    decodes: list[ChunkInput] = field(default_factory=list)  # one token each (+ a draft), one batched forward
    prefills: list[ChunkInput] = field(default_factory=list)  # whole or partial prompts, grouped by length
