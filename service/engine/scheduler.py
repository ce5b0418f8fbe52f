"""Continuous-batching scheduler over a paged KV cache. Pure Python: no torch, no numpy.

One engine step is ``out = schedule()`` -> the runner computes ``out.decodes`` and ``out.prefills``
-> ``update(out, sampled)`` -> the engine calls ``finish()`` on sequences that hit EOS, a stop string
or ``max_tokens``. The scheduler is not thread-safe: call it from the engine's step thread only.

Policy of one step (budget = ``max_num_batched_tokens`` tokens; "order" is FCFS, i.e.
``(arrival_time, order of add())``):

1. Decodes: running sequences with exactly one token left to compute, in order, 1 token each.
   One whose next position starts a new block while no block is free preempts the youngest
   running sequence (recompute: its blocks are freed, ``num_computed = 0``, back to waiting),
   repeating until its block fits or it was itself the youngest (then it and all younger wait).
   ``max_num_batched_tokens >= max_num_seqs`` is enforced, so decodes always fit the budget.
2. Running partial prefills (chunked prefill), in order: chunk = min(tokens left, budget, room in
   the blocks they hold plus the free blocks). They never preempt anyone.
3. Waiting sequences, in order, only if nothing was preempted this step (a just-preempted
   sequence is not re-admitted in the same step: no thrashing). Admitted while a running slot is
   free, budget is left and free blocks cover the whole chunk; admission stops at the first one
   that does not fit (strict FCFS, no skipping ahead). Preempted sequences arrived before every
   never-run one, so keeping waiting sorted puts them at its front.

Prefix caching (``enable_prefix_caching``; `block_pool` has the block states): a block full of
computed tokens is registered under the hash of its tokens and of all before it. A sequence being
admitted shares the cached blocks of its longest full-block prefix, stopping short of its last
token (that one's logits are needed, and a shared block is never written), starts with
``num_computed`` at their end, and computes only the rest: the budget and the chunk sizes count
uncached tokens only. A preempted sequence finds its own released blocks again while they are not
evicted. ``lookup_prefix = False`` (prompt logprobs: every position must be computed) skips the
lookup. "Free blocks" below and above counts evictable cached ones, which an allocation evicts
least recently released first.

Chunk sizes: with ``chunked_prefill`` a prefill takes min(tokens left, budget left); without it
the whole remainder must fit the budget left, except that a remainder longer than
``max_num_batched_tokens`` itself runs as the only prefill of its step (that step's token count
then exceeds the budget; it is the only case that does).

Speculative decoding: ``schedule(drafts)`` takes proposed tokens for some running sequences. A decode
whose sequence has a draft becomes a chunk of 1 + k tokens (the last sampled token and the k proposed
ones, `ScheduledChunk.draft`), verified in the same forward: once every decode has its token and block,
k is cut to the budget and the blocks left (a draft never preempts anyone; prefills get what remains). ``update`` then
takes the tokens the runner kept (the accepted prefix of the draft and one more): only those advance
``num_computed``, so the KV written at rejected positions is never read (it lies at or past the
sequence's next position, which is written again before any query reaches it) and never registered in
the prefix cache; the blocks holding only rejected positions are freed at once.

Blocks: a prefill chunk allocates blocks for exactly the positions it computes; a decode
allocates one block when its position crosses a block boundary. No watermark is kept: the oldest
running sequence always makes progress (it is never a victim unless it runs alone, and alone it
fits, since ``__init__`` demands the pool hold ``max_model_len`` tokens), so there is no livelock.
"""

import bisect
import enum
import time
from collections.abc import Callable, Mapping
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass, field

from service.engine.block_pool import BlockHash, BlockPool, hash_block, root_hash


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it; identity equality."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    arrival_time: float  # monotonic seconds; FCFS order
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0  # tokens (prompt + output) whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    seq_no: int = -1  # set by Scheduler.add(); breaks ties of arrival_time
    lookup_prefix: bool = True  # may reuse cached prefix blocks (False when every prompt position must be computed)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first scheduled
    block_hashes: list[BlockHash] = field(default_factory=list)  # of its full blocks so far, first to last
    num_registered: int = 0  # leading blocks of block_table already offered to the prefix cache
    cache_key: str = ""  # what besides the engine's cache salt changes its KV (its LoRA adapter): in its root hash

    @property
    def all_ids(self) -> list[int]:
        """Prompt followed by output (a new list)."""
        return self.prompt_ids + self.output_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens whose KV is not in the cache yet; >= 1 for an unfinished sequence."""
        return self.num_tokens - self.num_computed

    @property
    def is_decode(self) -> bool:
        """Exactly one token left to compute (the last sampled one, or a 1-token prefill tail)."""
        return self.num_remaining == 1

    @property
    def is_prefill(self) -> bool:
        """More than one token left to compute: ``num_computed < num_tokens - 1``."""
        return self.num_remaining > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def order_key(self) -> tuple[float, int]:
        return (self.arrival_time, self.seq_no)

    def token_ids(self, start: int, stop: int) -> list[int]:
        """``all_ids[start:stop]`` without concatenating the whole sequence."""
        p = len(self.prompt_ids)
        if stop <= p:
            return self.prompt_ids[start:stop]
        if start >= p:
            return self.output_ids[start - p : stop - p]
        return self.prompt_ids[start:] + self.output_ids[: stop - p]


@dataclass
class ScheduledChunk:
    """Compute ``seq.all_ids[start:start + num_tokens]``; sample after the last one if ``sample``. A decode with a
    draft computes its one token and then the draft's (``num_tokens == 1 + len(draft)``), each to be verified."""

    seq: Sequence
    start: int  # == seq.num_computed at schedule time
    num_tokens: int
    sample: bool  # the chunk reaches the end of all_ids
    draft: list[int] = field(default_factory=list)  # proposed tokens after the sequence's last one (decodes only)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids(self.start, self.end - len(self.draft)) + self.draft


@dataclass
class SchedulerOutput:
    decodes: list[ScheduledChunk] = field(default_factory=list)  # num_tokens == 1 each
    prefills: list[ScheduledChunk] = field(default_factory=list)  # whole or partial (chunked) prefills
    preempted: list[Sequence] = field(default_factory=list)  # blocks freed; back at the front of waiting
    num_batched_tokens: int = 0

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return self.decodes + self.prefills

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    """Waiting/running queues, token budget, block allocation and preemption (see module docstring)."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        chunked_prefill: bool = True,
        clock: Callable[[], float] = time.monotonic,
        enable_prefix_caching: bool = False,
        cache_salt: str = "",
    ) -> None:
        for name, value in [
            ("block_size", block_size),
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_model_len", max_model_len),
        ]:
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs ({max_num_seqs})"
            )
        self.block_pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self._cache_salt = cache_salt
        self._root_hash = root_hash(cache_salt)
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache (first schedule of each)
        self.prefix_cache_hits = 0  # of which found cached
        self.preemptions = 0  # running sequences sent back to waiting for want of blocks, in all
        self.block_size = block_size
        if self.blocks_for(max_model_len) > num_blocks:
            raise ValueError(
                f"KV pool of {num_blocks} blocks x {block_size} tokens cannot hold one sequence of "
                f"max_model_len={max_model_len} tokens"
            )
        self.num_blocks = num_blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.chunked_prefill = chunked_prefill
        self.clock = clock
        self._waiting: list[Sequence] = []  # sorted by order_key
        self._running: list[Sequence] = []  # sorted by order_key
        self._seqs: dict[str, Sequence] = {}  # waiting + running
        self._next_seq_no = 0

    # ---- queries ---------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use."""
        return self.block_pool.num_used / self.num_blocks

    @property
    def waiting(self) -> tuple[Sequence, ...]:
        return tuple(self._waiting)

    @property
    def running(self) -> tuple[Sequence, ...]:
        return tuple(self._running)

    def get(self, request_id: str) -> Sequence | None:
        return self._seqs.get(request_id)

    # ---- lifecycle -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. Its request was checked where it arrived (the API: a prompt, room for it in the
        context; the engine: a new id); here those are assertions."""
        n = len(seq.prompt_ids)
        assert n > 0, "prompt is empty"
        assert seq.max_tokens >= 0, f"max_tokens must be >= 0, got {seq.max_tokens}"
        assert n + seq.max_tokens <= self.max_model_len, (
            f"prompt ({n} tokens) + max_tokens ({seq.max_tokens}) exceeds max_model_len ({self.max_model_len})"
        )
        assert seq.request_id not in self._seqs, f"duplicate request id {seq.request_id!r}"
        assert seq.status is SeqStatus.WAITING and not seq.num_computed and not seq.block_table, (
            f"sequence {seq.request_id!r} is not fresh"
        )
        seq.seq_no = self._next_seq_no
        self._next_seq_no += 1
        self._seqs[seq.request_id] = seq
        bisect.insort(self._waiting, seq, key=_order)

    def finish(self, request_id: str, reason: FinishReason) -> None:
        """Mark finished and free its blocks at once; unknown (already finished) ids are ignored."""
        self._remove(request_id, reason)

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a waiting or running sequence, freeing its blocks at once; None if unknown."""
        return self._remove(request_id, FinishReason.ABORT)

    def _remove(self, request_id: str, reason: FinishReason) -> Sequence | None:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        if seq.status is SeqStatus.RUNNING:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        return seq

    def _release(self, seq: Sequence) -> None:
        self.block_pool.free(reversed(seq.block_table))  # last first: the prefix stays cached longest
        seq.block_table = []
        seq.num_registered = 0

    def reset_prefix_cache(self) -> int:
        """Forget every cached block (blocks in use stay with their sequences); returns how many."""
        return self.block_pool.reset()

    # ---- prefix cache ----------------------------------------------------------------------
    def _hashes(self, seq: Sequence, num_blocks: int) -> list[BlockHash]:
        """The hashes of seq's first num_blocks full blocks (computed once per sequence, then kept)."""
        hashes, bs = seq.block_hashes, self.block_size
        for i in range(len(hashes), num_blocks):
            hashes.append(hash_block(hashes[-1] if hashes else self._root(seq), seq.token_ids(i * bs, (i + 1) * bs)))
        return hashes[:num_blocks]

    def _root(self, seq: Sequence) -> BlockHash:
        """The parent hash of seq's first block: the cache salt's, and its own key's where it has one (a LoRA
        adapter's: a base request never shares an adapter's blocks, nor one adapter another's)."""
        return root_hash(f"{self._cache_salt}\x00{seq.cache_key}") if seq.cache_key else self._root_hash

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's longest prefix of full blocks, short of its last token (whose logits
        must be computed, and whose block is written)."""
        if not self.block_pool.enable_caching or not seq.lookup_prefix:
            return []
        return self.block_pool.lookup(self._hashes(seq, (seq.num_tokens - 1) // self.block_size))

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Offer seq's blocks that are full of computed tokens to the prefix cache."""
        full = seq.num_computed // self.block_size
        if full <= seq.num_registered:
            return
        hashes = self._hashes(seq, full)
        for i in range(seq.num_registered, full):
            self.block_pool.register(seq.block_table[i], hashes[i])
        seq.num_registered = full

    def _preempt_youngest(self) -> Sequence:
        seq = self._running.pop()
        self._release(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.preemptions += 1
        bisect.insort(self._waiting, seq, key=_order)
        return seq

    # ---- one step --------------------------------------------------------------------------
    def schedule(self, drafts: Mapping[str, Sequence_[int]] | None = None) -> SchedulerOutput:
        """The next step's work; `drafts`: proposed tokens to verify after some running sequences' last ones
        (cut to what the budget and the free blocks allow; see the module's docstring)."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        # 1. decodes, oldest first; block shortage preempts the youngest running sequence
        for seq in list(self._running):
            if seq.status is not SeqStatus.RUNNING or seq.num_remaining != 1:
                continue
            need = self.blocks_for(seq.num_computed + 1) - len(seq.block_table)
            while need > self.block_pool.num_free:
                victim = self._preempt_youngest()
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break  # seq was the youngest left: every younger one is preempted too
            if need > 0:
                seq.block_table.extend(self.block_pool.allocate(need))
            out.decodes.append(ScheduledChunk(seq, seq.num_computed, 1, True))
            budget -= 1

        # 1b. drafts to verify after the decodes' tokens, oldest first, from the blocks the decodes left free
        if drafts:
            for c in out.decodes:
                draft = self._fit_draft(c.seq, drafts.get(c.seq.request_id, ()), budget)
                c.draft, c.num_tokens = draft, 1 + len(draft)
                budget -= len(draft)

        # 2. running partial prefills, limited by the blocks they hold plus the free ones
        for seq in self._running:
            if budget <= 0:
                break
            if seq.num_remaining <= 1:
                continue
            room = len(seq.block_table) * self.block_size - seq.num_computed
            room += self.block_pool.num_free * self.block_size
            n = self._chunk_len(seq.num_remaining, budget, first=not out.prefills)
            n = min(n, room) if self.chunked_prefill else (n if n <= room else 0)
            if n <= 0:
                continue
            need = self.blocks_for(seq.num_computed + n) - len(seq.block_table)
            if need > 0:
                seq.block_table.extend(self.block_pool.allocate(need))
            out.prefills.append(ScheduledChunk(seq, seq.num_computed, n, n == seq.num_remaining))
            budget -= n

        # 3. admit waiting sequences, strict FCFS, unless this step had to preempt; a cached prefix is
        #    shared, not computed, and costs no budget
        pool = self.block_pool
        while not out.preempted and self._waiting and budget > 0 and len(self._running) < self.max_num_seqs:
            seq = self._waiting[0]
            hit = self._cached_prefix(seq)
            cached = len(hit) * self.block_size
            n = self._chunk_len(seq.num_tokens - cached, budget, first=not out.prefills)
            if n <= 0:
                break
            need = self.blocks_for(cached + n) - len(hit)
            if need > pool.num_free - pool.num_evictable_in(hit):
                break
            self._waiting.pop(0)
            pool.share(hit)
            seq.block_table = hit + pool.allocate(need)
            seq.num_computed, seq.num_registered = cached, len(hit)
            seq.status = SeqStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = self.clock()
                seq.num_cached_tokens = min(cached, seq.num_prompt_tokens)
                if pool.enable_caching and seq.lookup_prefix:
                    self.prefix_cache_queries += seq.num_prompt_tokens
                    self.prefix_cache_hits += seq.num_cached_tokens
            bisect.insort(self._running, seq, key=_order)
            out.prefills.append(ScheduledChunk(seq, cached, n, n == seq.num_tokens - cached))
            budget -= n

        out.num_batched_tokens = sum(c.num_tokens for c in out.decodes) + sum(c.num_tokens for c in out.prefills)
        return out

    def _fit_draft(self, seq: Sequence, draft: Sequence_[int], budget: int) -> list[int]:
        """The part of a draft this step verifies: within the budget left, the sequence's max_tokens (the draft
        and the token after it) and the blocks free now, whose allocation it takes (never preempting anyone)."""
        k = min(len(draft), budget, seq.max_tokens - len(seq.output_ids) - 1)
        if k <= 0:
            return []
        have = len(seq.block_table)
        k = min(k, (have + self.block_pool.num_free) * self.block_size - seq.num_computed - 1)
        if k <= 0:
            return []
        need = self.blocks_for(seq.num_computed + 1 + k) - have
        if need > 0:
            seq.block_table.extend(self.block_pool.allocate(need))
        return [int(t) for t in draft[:k]]

    def _chunk_len(self, remaining: int, budget: int, first: bool) -> int:
        """Tokens of a prefill to run now given the budget left; 0 if it must wait."""
        if self.chunked_prefill:
            return min(remaining, budget)
        if remaining <= budget or (first and remaining > self.max_num_batched_tokens):
            return remaining
        return 0

    def update(self, out: SchedulerOutput, sampled: Mapping[str, int | Sequence_[int]]) -> list[Sequence]:
        """Advance computed counts and append sampled tokens; returns sequences that got a token, and
        prompt-only sequences (``max_tokens == 0``: scoring) whose prefill just ended, which get no token
        (nothing is sampled for them; the engine finishes them at once).

        A chunk with a draft takes a list: the accepted prefix of its draft and the token after it (1 to
        len(draft) + 1 tokens); its sequence advances by that many positions and the blocks past its next
        position (holding rejected positions only) are freed.

        Chunks of sequences no longer running (aborted or finished since ``schedule``) are ignored,
        and so is a sampling chunk whose request id is missing from ``sampled``: it is recomputed
        in a later step.
        """
        new: list[Sequence] = []
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.status is not SeqStatus.RUNNING:
                continue
            if chunk.start != seq.num_computed:
                raise RuntimeError(f"stale SchedulerOutput for {seq.request_id!r}")
            if chunk.sample and seq.max_tokens == 0:
                seq.num_computed += chunk.num_tokens
                new.append(seq)
            elif chunk.sample:
                got = sampled.get(seq.request_id)
                if got is None:
                    continue
                tokens = [int(got)] if isinstance(got, int) else [int(t) for t in got]
                assert 1 <= len(tokens) <= 1 + len(chunk.draft), f"{len(tokens)} tokens for a draft of {chunk.draft}"
                assert tokens[:-1] == chunk.draft[: len(tokens) - 1], "kept tokens must be a prefix of the draft"
                seq.num_computed += chunk.num_tokens - len(chunk.draft) - 1 + len(tokens)
                seq.output_ids.extend(tokens)
                if chunk.draft:
                    self._free_past(seq, self.blocks_for(seq.num_computed + 1))
                new.append(seq)
            else:
                seq.num_computed += chunk.num_tokens
            if self.block_pool.enable_caching:
                self._register_full_blocks(seq)
        return new

    def _free_past(self, seq: Sequence, keep: int) -> None:
        """Free seq's blocks after its first `keep` (they hold no computed position; never registered)."""
        if len(seq.block_table) > keep:
            self.block_pool.free(reversed(seq.block_table[keep:]))
            del seq.block_table[keep:]


def _order(seq: Sequence) -> tuple[float, int]:
    return seq.order_key
