"""The engine core: the step loop on its own thread, in front of the scheduler and the model runner.

It reads as schedule -> run -> update and works in token ids only: it takes new requests and aborts from its
inbox, ends a request at EOS / a stop token id, at max_tokens, when its grammar is complete, on a timeout or
an error, and after each step hands every request it advanced or ended one frozen `EngineOutput` (through the
request's sink, which must be safe to call from this thread). It knows nothing of text, stop strings or
asyncio: that is the request side's (service.engine.output_processor).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from model_core.grammar import CompiledGrammar, is_work_limit
from model_core.lora import LoRAAdapter
from model_core.sampling import SamplingParams, make_generator
from service.engine.draft_proposer import DraftModelProposer
from service.engine.engine_output import EngineOutput
from service.engine.errors import (
    EngineDeadError,
    EngineError,
    ErrorKind,
    grammar_limit_error,
    internal_error,
    invalid_request,
)
from service.engine.model_input import ChunkInput, ModelInput, SamplingState
from service.engine.ngram_proposer import NgramProposer
from service.engine.runner import ModelRunner, SampleResult
from service.engine.scheduler import FinishReason, ScheduledChunk, Scheduler, SchedulerOutput
from service.engine.scheduler import Sequence as Seq

log = logging.getLogger(__name__)

OutputSink = Callable[[EngineOutput], None]  # where the core sends a request's outputs; called on the step thread


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    block_size: int = 16
    num_blocks: int = 2048
    max_model_len: int = 8192
    max_waiting: int = 256
    request_timeout_s: float | None = None  # default total time limit of a request
    queue_timeout_s: float | None = None  # how long a request may wait before its first schedule
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes computed before
    cache_salt: str = ""  # what besides the tokens determines the KV (the model), mixed into block hashes
    speculative: SpecConfig | None = None  # speculative decoding (None: off)


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding: up to `num_tokens` proposed tokens a decode, by n-gram lookup
    (service.engine.ngram_proposer) or a draft model (service.engine.draft_proposer, given to the core), verified in
    the step (model_core.speculative). Drafts are proposed only while the step has at most `disable_by_batch_size`
    decodes (above that a step is bound by compute, not by reading the weights, and a draft token costs about as
    much as a row), and a request whose drafts are rejected proposes shorter ones, then pauses (up to `MAX_PAUSE`
    steps)."""

    method: Literal["ngram", "draft"] = "ngram"
    num_tokens: int = 4
    ngram_min: int = 2
    ngram_max: int = 4
    disable_by_batch_size: int = 4

    MAX_PAUSE = 16


@dataclass
class EngineStats:
    steps: int = 0
    decode_rows: int = 0
    decode_steps: int = 0
    max_decode_batch: int = 0
    spec_drafts: int = 0  # drafts verified
    spec_draft_tokens: int = 0  # tokens proposed and verified
    spec_accepted_tokens: int = 0  # of which kept
    spec_accepted_at: list[int] = field(default_factory=list)  # [j]: drafts whose token j (from 0) was kept
    spec_proposed_at: list[int] = field(default_factory=list)  # [j]: drafts that had a token j

    @property
    def mean_decode_batch(self) -> float:
        return self.decode_rows / self.decode_steps if self.decode_steps else 0.0


@dataclass
class RequestState:
    """What the step thread keeps of a request besides its scheduler `Sequence`."""

    seq: Seq
    sampling: SamplingState
    stop_ids: frozenset[int]  # EOS (unless ignore_eos) and params.stop_token_ids: "stop" at once
    sink: OutputSink
    deadline: float | None = None  # monotonic time after which the request is ended with a timeout
    queue_deadline: float | None = None  # monotonic time by which it must have been scheduled
    num_emitted: int = 0  # outputs with a token sent to the sink
    speculate: bool = False  # drafts are proposed for it (speculative decoding is on)
    proposer: NgramProposer | None = None  # n-gram speculation: its index over prompt and output
    draft_len: int = 0  # how many tokens its next draft may have
    pause: int = 0  # steps it proposes nothing, after drafts rejected outright
    pause_next: int = 1  # the pause the next draft rejected outright earns
    lora: LoRAAdapter | None = None  # the adapter its rows run with (None: the base model)


class EngineCore:
    def __init__(
        self,
        runner: ModelRunner,
        eos_token_ids: tuple[int, ...],
        config: EngineConfig,
        draft: DraftModelProposer | None = None,
    ) -> None:
        """`draft`: the draft model's proposer, for speculative decoding with method "draft"."""
        spec = config.speculative
        if (spec is not None and spec.method == "draft") != (draft is not None):
            raise ValueError("a draft model is needed for speculative method 'draft', and only then")
        self.runner = runner
        self.draft = draft
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.scheduler = Scheduler(
            num_blocks=config.num_blocks,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
            cache_salt=config.cache_salt,
        )
        self.stats = EngineStats()
        self._requests: dict[str, RequestState] = {}  # every request not yet ended, by id
        self._inbox: collections.deque[RequestState] = collections.deque()
        self._aborts: collections.deque[str] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # The scheduler is changed by the step thread only; the lock keeps readers on other threads (gauges,
        # reset_prefix_cache) from seeing it halfway through a schedule, an update or a finish.
        self._lock = threading.Lock()
        # New requests and the loop's final `_fail_all` take this lock: nothing is added after the loop ended.
        self._inbox_lock = threading.Lock()
        self._closed = False  # set once the loop has exited: nothing new is accepted after that
        self._stop_message = "the engine was stopped"

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0, message: str | None = None) -> None:
        """Stop the loop after its current step; requests still in flight end with an error output
        carrying `message`. Returns once the thread has exited (or after `timeout`)."""
        if message is not None:
            self._stop_message = message
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def check_health(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine loop died: {self._error!r}")
        if self._thread is None or not self._thread.is_alive():
            raise EngineDeadError("engine loop is not running")

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def is_alive(self) -> bool:
        return self._error is None and self._thread is not None and self._thread.is_alive()

    # ---- requests (called from other threads) ------------------------------------------------
    def num_pending(self) -> int:
        return len(self._inbox) + self.scheduler.num_waiting

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix block; returns how many were forgotten. Safe at any time: blocks in
        use stay with their sequences (the scheduler lock only waits out a schedule or an update)."""
        with self._lock:
            return self.scheduler.reset_prefix_cache()

    def waiting_loras(self) -> set[str]:
        """The LoRA adapters that requests waiting to be scheduled run with (from any thread)."""
        with self._lock:
            waiting = [self._requests.get(seq.request_id) for seq in self.scheduler.waiting]
        return {st.lora.name for st in waiting if st is not None and st.lora is not None}

    def stop_token_ids(self, params: SamplingParams) -> frozenset[int]:
        """The token ids that end a request with "stop" at once: params.stop_token_ids, and EOS unless ignore_eos."""
        return frozenset(params.stop_token_ids) | frozenset(() if params.ignore_eos else self.eos_token_ids)

    def check(self, prompt: list[int], params: SamplingParams, grammar: CompiledGrammar | None) -> int:
        """What only the engine can check of a request (its sampling fields were checked by SamplingParams; its prompt
        and the room it leaves in the context where it arrived: the API, whose 400s name the field; here those are
        assertions); returns how many tokens it may generate."""
        limit = self.config.max_model_len
        assert prompt, "the prompt is empty"
        if params.max_tokens == 0:  # scoring: the prompt may fill the context
            assert len(prompt) <= limit, f"prompt has {len(prompt)} tokens; the context length is {limit}"
            return 0
        assert len(prompt) < limit, f"prompt has {len(prompt)} tokens: no room for a completion in {limit}"
        vocab = self.runner.model.cfg.vocab_size
        if grammar is not None and grammar.vocab_size != vocab:
            raise invalid_request(f"grammar compiled for {grammar.vocab_size} logits; the model has {vocab}")
        return min(params.max_tokens, limit - len(prompt))

    def add_request(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        max_tokens: int,
        arrival: float,
        sink: OutputSink,
        timeout_s: float | None = None,
        grammar: CompiledGrammar | None = None,
        lora: LoRAAdapter | None = None,
    ) -> None:
        """Queue a request `check` accepted (max_tokens: what it returned); its outputs go to `sink`; lora: the
        adapter it runs with (its prefix-cache blocks are its own). Raises EngineDeadError once the loop has exited,
        EngineError (INVALID_REQUEST) for an id in use."""
        sampling = SamplingState(
            params=params,
            generator=make_generator(params.seed, self.runner.device),
            matcher=grammar.matcher() if grammar is not None else None,
            prompt_scores=[None] * len(prompt) if params.prompt_logprobs is not None else None,
        )
        seq = Seq(
            request_id=request_id,
            prompt_ids=prompt,
            max_tokens=max_tokens,
            arrival_time=arrival,
            lookup_prefix=params.prompt_logprobs is None,  # scoring computes every prompt position
            cache_key=lora.key if lora is not None else "",
        )
        state = RequestState(seq, sampling, self.stop_token_ids(params), sink, lora=lora)
        spec = self.config.speculative
        if spec is not None and max_tokens > 1:
            state.speculate, state.draft_len = True, spec.num_tokens
            if spec.method == "ngram":
                state.proposer = NgramProposer(spec.ngram_min, spec.ngram_max, prompt)
        limits = [t for t in (timeout_s, self.config.request_timeout_s) if t is not None]
        if limits:
            state.deadline = arrival + min(limits)
        if self.config.queue_timeout_s is not None:
            state.queue_deadline = arrival + self.config.queue_timeout_s
        with self._inbox_lock:  # a request added after the loop exited would never get an output
            if self._closed:
                raise EngineDeadError("engine loop is not running")
            if request_id in self._requests:
                raise invalid_request(f"duplicate request id {request_id!r}")
            self._requests[request_id] = state
            self._inbox.append(state)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Drop the request before the next step (its KV blocks are freed); it gets no further output."""
        self._aborts.append(request_id)
        self._wake.set()

    # ---- the step thread -------------------------------------------------------------------
    def _emit(
        self,
        st: RequestState,
        finish: FinishReason | None,
        now: float,
        res: SampleResult | None = None,
        error: EngineError | None = None,
        first: bool = False,
        count: int | None = None,
    ) -> None:
        """Send the request one output: a token (`res`), the end of a scored prompt, or an error. `first`: its first
        output, which carries the prompt's scores (and, with a token, the time it waited to be scheduled). `count`:
        the output tokens so far, this one included (default: all the sequence has)."""
        seq = st.seq
        queue_time = (seq.first_scheduled_time or now) - seq.arrival_time if first and res is not None else None
        st.sink(
            EngineOutput(
                request_id=seq.request_id,
                token_id=res.token_id if res is not None else None,
                finish_reason=finish,
                num_prompt_tokens=len(seq.prompt_ids),
                num_cached_tokens=seq.num_cached_tokens,
                num_output_tokens=len(seq.output_ids) if count is None else count,
                time=now,
                logprob=res.logprob if res is not None else None,
                top_logprobs=tuple(res.top_logprobs) if res is not None else (),
                prompt_logprobs=st.sampling.prompt_scores if first else None,
                queue_time=queue_time,
                error=error,
            )
        )

    def _drain_inputs(self) -> None:
        while self._inbox:
            st = self._inbox.popleft()
            try:
                self.scheduler.add(st.seq)
            except AssertionError as e:  # `check` let through what the scheduler refuses: a bug, one request's
                log.exception("request %s refused by the scheduler", st.seq.request_id)
                self._requests.pop(st.seq.request_id, None)
                error = internal_error(f"the scheduler refused the request: {e}")
                self._emit(st, FinishReason.ERROR, time.monotonic(), error=error)
        while self._aborts:
            rid = self._aborts.popleft()
            with self._lock:
                self.scheduler.abort(rid)
            self._requests.pop(rid, None)
            if self.draft is not None:
                self.draft.release(rid)

    def _model_input(self, out: SchedulerOutput) -> ModelInput:
        def chunk(c: ScheduledChunk) -> ChunkInput:
            seq = c.seq
            st = self._requests[seq.request_id]
            return ChunkInput(
                request_id=seq.request_id,
                token_ids=c.token_ids,
                start=c.start,
                block_table=seq.block_table,
                prompt_ids=seq.prompt_ids,
                output_ids=seq.output_ids,
                sample=c.sample and seq.max_tokens > 0,  # a prompt-only request is scored, never sampled
                sampling=st.sampling,
                draft=c.draft,
                lora=st.lora,
            )

        return ModelInput([chunk(c) for c in out.decodes], [chunk(c) for c in out.prefills])

    def step(self) -> int:
        """One engine step (schedule -> run -> update); returns the number of sequences that got a token."""
        self._expire()
        try:
            drafts = self._propose()
        except Exception:  # drafts are a guess: a failing proposer costs this step's, never a request or the loop
            log.exception("proposing drafts failed")
            drafts = {}
        with self._lock:
            out = self.scheduler.schedule(drafts)
        if not out.decodes and not out.prefills:
            return 0
        try:
            results = self.runner.execute(self._model_input(out))
        except Exception as e:  # a failed forward ends the requests in it, not the loop
            log.exception("model step failed")
            for c in [*out.decodes, *out.prefills]:
                self._fail(c.seq.request_id, internal_error(f"model step failed: {e}"))
            return 0
        self.stats.steps += 1
        if out.decodes:
            self.stats.decode_steps += 1
            self.stats.decode_rows += len(out.decodes)
            self.stats.max_decode_batch = max(self.stats.max_decode_batch, len(out.decodes))
        failed = {rid: r[0].error for rid, r in results.items() if r[0].error is not None}
        kept = {rid: self._kept(rid, r) for rid, r in results.items() if rid not in failed}
        for c in out.decodes:
            if c.draft and c.seq.request_id in kept:
                self._count_draft(c.seq.request_id, c.draft, results[c.seq.request_id])
        with self._lock:
            advanced = self.scheduler.update(out, kept)
        for rid, err in failed.items():
            self._fail(rid, err)
        now = time.monotonic()
        for seq in advanced:
            st = self._requests[seq.request_id]
            if seq.max_tokens == 0:
                self._deliver_scored(st, now)
                continue
            tokens = results[seq.request_id][: len(kept[seq.request_id])]
            if st.proposer is not None:
                st.proposer.extend(r.token_id for r in tokens)
            first_count = len(seq.output_ids) - len(tokens) + 1
            for i, res in enumerate(tokens):
                if not self._deliver(st, res, now, first_count + i):
                    break
        return len(advanced)

    def _kept(self, request_id: str, results: list[SampleResult]) -> list[int]:
        """The tokens a request keeps of its step's results: up to and including the first that ends it (a stop
        id; max_tokens was minded when its draft was cut)."""
        stop_ids = self._requests[request_id].stop_ids
        tokens: list[int] = []
        for r in results:
            tokens.append(r.token_id)
            if r.token_id in stop_ids:
                break
        return tokens

    def _propose(self) -> dict[str, list[int]]:
        """Drafts for the requests about to decode (see SpecConfig for when)."""
        spec = self.config.speculative
        if spec is None:
            return {}
        decoding = [s for s in self.scheduler.running if s.num_remaining == 1]
        if not decoding or len(decoding) > spec.disable_by_batch_size:
            return {}
        drafts: dict[str, list[int]] = {}
        wants: list[tuple[str, list[int], int]] = []  # for the draft model: (id, tokens so far, k)
        for seq in decoding:
            st = self._requests.get(seq.request_id)
            if st is None or not st.speculate:
                continue
            if st.pause > 0:
                st.pause -= 1
                continue
            k = min(st.draft_len, seq.max_tokens - len(seq.output_ids) - 1)
            if k <= 0:
                continue
            if st.proposer is not None:
                draft = st.proposer.propose(k)
                if draft:
                    drafts[seq.request_id] = draft
            else:
                wants.append((seq.request_id, seq.all_ids, k))
        if wants and self.draft is not None:
            drafts.update(self.draft.propose(wants))
        return drafts

    def _count_draft(self, request_id: str, draft: list[int], results: list[SampleResult]) -> None:
        """Count a verified draft (metrics) and set the request's next draft length: a fully kept draft doubles it
        (up to num_tokens), a partly kept one makes it one more than what was kept, one rejected outright pauses the
        request's drafts for a while (doubling while they keep being rejected)."""
        spec = self.config.speculative
        st = self._requests.get(request_id)
        if spec is None or st is None:
            return
        accepted = len(results) - 1
        s = self.stats
        s.spec_drafts += 1
        s.spec_draft_tokens += len(draft)
        s.spec_accepted_tokens += accepted
        while len(s.spec_proposed_at) < len(draft):
            s.spec_proposed_at.append(0)
            s.spec_accepted_at.append(0)
        for j in range(len(draft)):
            s.spec_proposed_at[j] += 1
            s.spec_accepted_at[j] += j < accepted
        if accepted == len(draft):
            st.draft_len = min(spec.num_tokens, 2 * st.draft_len)
            st.pause_next = 1
        else:
            st.draft_len = max(1, accepted + 1)
        if accepted == 0:
            st.pause, st.pause_next = st.pause_next, min(SpecConfig.MAX_PAUSE, 2 * st.pause_next)
        elif accepted < len(draft):
            st.pause_next = 1

    def _deliver_scored(self, st: RequestState, now: float) -> None:
        """A prompt-only request (max_tokens 0) whose prefill is done: it ends now, with no token."""
        self._finish(st, FinishReason.LENGTH)
        self._emit(st, FinishReason.LENGTH, now, first=True)

    def _deliver(self, st: RequestState, res: SampleResult, now: float, count: int) -> bool:
        """Send one token (the request's `count`-th output token); False once the request has ended."""
        seq, matcher = st.seq, st.sampling.matcher
        if matcher is not None:
            error = matcher.error  # set while computing the mask: a work limit of the grammar engine
            if error is None and not matcher.accept(res.token_id):
                error = matcher.error or "the grammar refused the token"
                if not is_work_limit(error):  # refused a token its mask allowed: not expected
                    log.error("request %s: grammar rejected token %d: %s", seq.request_id, res.token_id, error)
                    self._fail(seq.request_id, internal_error(f"constrained decoding failed: {error}"))
                    return False
            if error is not None:
                self._fail(seq.request_id, grammar_limit_error(error))
                return False
        first = st.num_emitted == 0
        st.num_emitted += 1
        finish: FinishReason | None = None
        if res.token_id in st.stop_ids or (matcher is not None and matcher.is_terminated):
            finish = FinishReason.STOP  # EOS / a stop id, or the grammar is complete (only EOS could follow)
        elif count >= seq.max_tokens:
            finish = FinishReason.LENGTH
        if finish is not None:
            self._finish(st, finish)
        self._emit(st, finish, now, res=res, first=first, count=count)
        return finish is None

    def _fail(self, request_id: str, error: EngineError) -> None:
        """End one request with an error output and free its blocks."""
        st = self._requests.get(request_id)
        if st is not None:
            self._finish(st, FinishReason.ERROR)
            self._emit(st, FinishReason.ERROR, time.monotonic(), error=error)

    def _expire(self) -> None:
        """Requests past their deadline (total, or waiting in the queue) end with a timeout error."""
        now = time.monotonic()
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            st = self._requests[seq.request_id]
            arrival = seq.arrival_time
            if st.deadline is not None and now > st.deadline:
                self._fail(
                    seq.request_id,
                    EngineError(f"request timed out after {st.deadline - arrival:.1f}s", ErrorKind.TIMEOUT),
                )
            elif st.queue_deadline is not None and seq.first_scheduled_time is None and now > st.queue_deadline:
                self._fail(
                    seq.request_id,
                    EngineError(
                        f"request waited in the queue longer than {st.queue_deadline - arrival:.1f}s",
                        ErrorKind.QUEUE_TIMEOUT,
                    ),
                )

    def _finish(self, st: RequestState, reason: FinishReason) -> None:
        with self._lock:
            self.scheduler.finish(st.seq.request_id, reason)
        self._requests.pop(st.seq.request_id, None)
        if self.draft is not None:
            self.draft.release(st.seq.request_id)

    def _run(self) -> None:
        # Subnormal floats (activations of ~1e-39, e.g. SiLU of a very negative input) take a slow path on x86
        # unless the thread flushes them to zero; the mode is per thread and inherited from whichever thread
        # created this one, so set it here. Measured: a 1,570-token prompt prefilled 5-10x slower without it.
        torch.set_flush_denormal(True)
        try:
            while not self._stop.is_set():
                self._drain_inputs()
                if not self.scheduler.has_work:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self.step()
        except BaseException as e:  # the loop died: fail every request, never hang them
            self._error = e
            log.exception("engine loop died")
            self._fail_all(f"engine failure: {e!r}")
        else:  # stopped: requests still in flight end now rather than wait for a loop that is gone
            self._fail_all(self._stop_message)

    def _fail_all(self, message: str) -> None:
        with self._inbox_lock:
            self._closed = True
            states = list(self._requests.values())
            self._inbox.clear()
            self._requests.clear()
        now = time.monotonic()
        for st in states:
            try:
                self._emit(st, FinishReason.ERROR, now, error=EngineDeadError(message))
            except Exception:  # e.g. the request's event loop is closed already: nobody is waiting
                log.warning("could not notify request %s", st.seq.request_id)
