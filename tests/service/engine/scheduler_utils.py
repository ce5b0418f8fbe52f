"""A fake paged model and an engine-loop simulator for scheduler tests.

The fake model writes what a real one's KV would depend on (the position and every token up to it)
into the paged slots a block table names, and reads the whole context back through it: a block
shared between different prefixes, lost, reused too early, or written while shared shows up.
"""

from dataclasses import dataclass, field

from service.engine.scheduler import FinishReason, Scheduler, SchedulerOutput, SeqStatus, Sequence


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def next_token(context: list[int]) -> int:
    """The fake model's greedy choice: a deterministic function of the whole context."""
    h = len(context)
    for t in context:
        h = (h * 31 + t) % 1009
    return h


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(next_token(ids))
    return ids[len(prompt) :]


class FakePagedModel:
    """Slot content: (position, the context up to and including it, the writer's request id)."""

    def __init__(self, s: Scheduler) -> None:
        self.s = s
        self.bs = s.block_size
        self.slots: list[tuple[int, tuple[int, ...], str] | None] = [None] * (s.num_blocks * s.block_size)
        self.positions_computed = 0

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.bs] * self.bs + pos % self.bs

    def run(self, out: SchedulerOutput) -> dict[str, int | list[int]]:
        """Write every scheduled position, then read each chunk's context back; a chunk with a draft gets the
        draft's prefix the fake model agrees with and its own next token (as the runner's greedy verification)."""
        pool = self.s.block_pool
        for ch in out.chunks:
            context = ch.seq.all_ids + ch.draft
            for p in range(ch.start, ch.end):
                block = ch.seq.block_table[p // self.bs]
                assert pool.ref_count(block) == 1, f"write into block {block} shared by {pool.ref_count(block)}"
                assert pool.block_hash(block) is None, f"write into cached block {block}"
                self.slots[self._slot(ch.seq, p)] = (p, tuple(context[: p + 1]), ch.seq.request_id)
            self.positions_computed += ch.num_tokens
        sampled: dict[str, int | list[int]] = {}
        for ch in out.chunks:  # read after all writes of the step
            seq = ch.seq
            context = (seq.all_ids + ch.draft)[: ch.end]
            for p in range(ch.end):
                got = self.slots[self._slot(seq, p)]
                assert got is not None and got[:2] == (p, tuple(context[: p + 1])), f"{seq.request_id} pos {p}"
                if not pool.enable_caching:
                    assert got[2] == seq.request_id, "a block written by another sequence without caching"
            if ch.sample and ch.draft:
                kept: list[int] = []
                for j in range(len(ch.draft) + 1):
                    kept.append(next_token(context[: ch.end - len(ch.draft) + j]))
                    if j == len(ch.draft) or kept[-1] != ch.draft[j]:
                        break
                sampled[seq.request_id] = kept
            elif ch.sample:
                sampled[seq.request_id] = next_token(context)
        return sampled


def make(**kw: object) -> Scheduler:
    args: dict = dict(
        num_blocks=16,
        block_size=4,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        max_model_len=64,
        clock=FakeClock(),
    )
    args.update(kw)
    return Scheduler(**args)


def seq(rid: str, prompt_len: int, max_tokens: int, t: float = 0.0, base: int = 0) -> Sequence:
    return Sequence(rid, [(base + i) % 50 + 1 for i in range(prompt_len)], max_tokens, t)


def check_blocks(s: Scheduler) -> None:
    """Reference counts equal the block tables holding each block; nothing leaks."""
    pool = s.block_pool
    holders: dict[int, int] = {}
    for q in s.running:
        assert len(q.block_table) == len(set(q.block_table)), "a block twice in one table"
        for b in q.block_table:
            holders[b] = holders.get(b, 0) + 1
    for b in range(s.num_blocks):
        held = holders.get(b, 0)
        assert pool.ref_count(b) == held, f"block {b}: ref count {pool.ref_count(b)}, {held} holders"
    assert len(holders) + pool.num_free == s.num_blocks, "blocks leaked"
    for q in s.running:  # a shared block is a cached full block before the sequence's computed end
        for i, b in enumerate(q.block_table):
            if holders[b] > 1:
                assert pool.block_hash(b) is not None and (i + 1) * s.block_size <= q.num_computed


def check_invariants(s: Scheduler, out: SchedulerOutput, admitted: set[int] | None = None) -> None:
    """admitted: ids of the sequences that were waiting before this step (for the FCFS check)."""
    check_blocks(s)
    assert all(not q.block_table and q.num_computed == 0 for q in s.waiting)
    assert all(q.status is SeqStatus.RUNNING for q in s.running)
    assert all(q.status is SeqStatus.WAITING for q in s.waiting)
    assert s.num_running <= s.max_num_seqs
    for q in s.running:
        assert len(q.block_table) * s.block_size >= q.num_computed
        if s.block_pool.enable_caching:  # every block full of computed tokens was offered to the cache
            assert q.num_registered == q.num_computed // s.block_size, q.request_id
    assert out.num_batched_tokens == sum(c.num_tokens for c in out.chunks)
    if s.chunked_prefill:
        assert out.num_batched_tokens <= s.max_num_batched_tokens
    elif out.num_batched_tokens > s.max_num_batched_tokens:  # only an oversized prefill, alone
        assert len(out.prefills) == 1 and out.prefills[0].num_tokens > s.max_num_batched_tokens
    ids = [id(c.seq) for c in out.chunks]
    assert len(ids) == len(set(ids)), "a sequence scheduled twice in one step"
    for c in out.decodes:
        assert c.num_tokens == 1 + len(c.draft) and c.sample
        assert not c.draft or len(c.seq.output_ids) + len(c.draft) < c.seq.max_tokens, "a draft past max_tokens"
    for c in out.prefills:
        assert not c.draft
    for c in out.chunks:
        q = c.seq
        assert q.status is SeqStatus.RUNNING and c.start == q.num_computed and c.num_tokens >= 1
        end = c.end - len(c.draft)  # the sequence's own tokens; a draft's follow them
        assert end <= q.num_tokens and c.sample == (end == q.num_tokens)
        assert len(q.block_table) * s.block_size >= c.end
        assert len(q.block_table) == s.blocks_for(c.end), "blocks beyond the computed positions"
    for q in out.preempted:
        assert q.status is SeqStatus.WAITING and q.num_computed == 0 and not q.block_table
    keys = [q.order_key for q in s.waiting]
    assert keys == sorted(keys), "waiting is not in arrival order (preempted ones first)"
    for c in out.prefills:
        if (c.start == 0 and admitted is None) or (admitted is not None and id(c.seq) in admitted):
            # admitted this step: strict FCFS, nothing older is left waiting
            assert all(w.order_key > c.seq.order_key for w in s.waiting)


@dataclass
class Sim:
    """The engine loop: schedule -> fake model -> update -> finish at max_tokens."""

    s: Scheduler
    model: FakePagedModel
    finished: list[Sequence] = field(default_factory=list)
    outputs: list[SchedulerOutput] = field(default_factory=list)
    step_no: int = 0

    @classmethod
    def of(cls, s: Scheduler) -> "Sim":
        return cls(s, FakePagedModel(s))

    def step(self) -> SchedulerOutput:
        waiting = {id(q) for q in self.s.waiting}
        out = self.s.schedule()
        check_invariants(self.s, out, waiting)
        sampled = self.model.run(out)
        for q in self.s.update(out, sampled):
            if q.num_output_tokens >= q.max_tokens:
                self.s.finish(q.request_id, FinishReason.LENGTH)
                self.finished.append(q)
        self.outputs.append(out)
        self.step_no += 1
        clock = self.s.clock
        if isinstance(clock, FakeClock):
            clock.t += 1.0
        return out

    def run(self, max_steps: int = 10_000) -> None:
        while self.s.has_work:
            assert self.step_no < max_steps, "no progress"
            self.step()
