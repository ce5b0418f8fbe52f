"""Scheduler tests: a fake paged "model" checks every KV read against what the sequence wrote."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.engine.block_pool import BlockPool
from service.engine.scheduler import FinishReason, Scheduler, SeqStatus
from tests.service.engine.scheduler_utils import (
    FakeClock,
    FakePagedModel,
    Sim,
    check_blocks,
    check_invariants,
    make,
    reference,
    seq,
)

# ---- allocator and validation ------------------------------------------------------------------


def test_block_allocator() -> None:
    a = BlockPool(5)
    x = a.allocate(3)
    assert len(set(x)) == 3 and a.num_free == 2 and a.num_used == 3
    with pytest.raises(RuntimeError):
        a.allocate(3)
    y = a.allocate(2)
    assert set(x) | set(y) == set(range(5)) and a.num_free == 0
    a.free(x)
    assert a.num_free == 3 and all(a.is_free(b) for b in x)
    with pytest.raises(ValueError):
        a.free([x[0]])  # double free
    with pytest.raises(ValueError):
        a.free([y[0], y[0]])
    assert a.num_free == 3  # a rejected free changes nothing
    with pytest.raises(ValueError):
        BlockPool(0)


def test_validation() -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        make(num_blocks=3, block_size=4, max_model_len=13)  # needs 4 blocks
    with pytest.raises(ValueError, match="max_num_seqs"):
        make(max_num_seqs=8, max_num_batched_tokens=4)
    s = make(max_model_len=20)  # a sequence's request was checked before it gets here: assertions guard it
    with pytest.raises(AssertionError, match="empty"):
        s.add(seq("a", 0, 5))
    with pytest.raises(AssertionError, match="max_model_len"):
        s.add(seq("a", 15, 6))
    with pytest.raises(AssertionError):
        s.add(seq("a", 5, -1))  # max_tokens 0 is a prompt-only (scoring) request
    s.add(seq("a", 15, 5))
    with pytest.raises(AssertionError, match="duplicate"):
        s.add(seq("a", 3, 3))
    assert s.num_waiting == 1 and s.get("a") is not None and s.get("b") is None


# ---- budget and chunked prefill ----------------------------------------------------------------


def test_chunked_prefill_splits_and_decodes_never_stall() -> None:
    s = make(num_blocks=64, max_num_batched_tokens=16, max_model_len=200)
    sim = Sim.of(s)
    a = seq("a", 4, 40)
    s.add(a)
    sim.step()  # a prefills its whole prompt and samples
    assert a.num_output_tokens == 1
    b = seq("b", 100, 3, t=1.0, base=7)
    s.add(b)
    chunks = []
    while b.num_output_tokens == 0:
        out = sim.step()
        assert [c.seq for c in out.decodes] == [a], "the running decode must run every step"
        assert out.num_batched_tokens <= 16
        (ch,) = out.prefills
        chunks.append((ch.start, ch.num_tokens, ch.sample))
    assert chunks == [(15 * i, 15, False) for i in range(6)] + [(90, 10, True)]
    sim.run()
    assert a.output_ids == reference(a.prompt_ids, 40) and b.output_ids == reference(b.prompt_ids, 3)
    assert s.block_pool.num_free == s.num_blocks


def test_budget_respected_under_load() -> None:
    rng = random.Random(0)
    s = make(num_blocks=40, block_size=4, max_num_seqs=6, max_num_batched_tokens=24, max_model_len=80)
    sim = Sim.of(s)
    reqs = [seq(f"r{i}", rng.randint(1, 60), rng.randint(1, 20), t=float(i), base=i) for i in range(30)]
    for r in reqs:
        s.add(r)
    sim.run()  # check_invariants asserts the budget each step
    assert max(o.num_batched_tokens for o in sim.outputs) == 24  # the budget is actually used up
    assert any(0 < c.num_tokens < c.seq.num_prompt_tokens for o in sim.outputs for c in o.prefills)
    for r in reqs:
        assert r.output_ids == reference(r.prompt_ids, r.max_tokens)


def test_no_chunking_whole_prompts_and_oversized_alone() -> None:
    s = make(num_blocks=32, max_num_batched_tokens=16, max_model_len=64, chunked_prefill=False)
    sim = Sim.of(s)
    s.add(seq("a", 10, 5, t=0.0))
    s.add(seq("b", 10, 5, t=1.0))
    out = sim.step()
    assert [(c.seq.request_id, c.num_tokens) for c in out.prefills] == [("a", 10)]  # b does not fit in 6
    out = sim.step()
    assert [c.seq.request_id for c in out.decodes] == ["a"]
    assert [(c.seq.request_id, c.num_tokens, c.sample) for c in out.prefills] == [("b", 10, True)]
    s.add(seq("big", 40, 2, t=2.0))
    s.add(seq("small", 3, 2, t=3.0))
    out = sim.step()
    assert [c.seq.request_id for c in out.decodes] == ["a", "b"]
    assert [(c.seq.request_id, c.num_tokens, c.sample) for c in out.prefills] == [("big", 40, True)]
    assert out.num_batched_tokens == 42
    out = sim.step()
    assert [c.seq.request_id for c in out.prefills] == ["small"]
    sim.run()
    for q in sim.finished:
        assert q.output_ids == reference(q.prompt_ids, q.max_tokens)


# ---- admission, preemption, abort --------------------------------------------------------------


def test_admission_waits_for_free_blocks_strict_fcfs() -> None:
    s = make(num_blocks=8, block_size=4, max_num_batched_tokens=64, max_model_len=32)
    sim = Sim.of(s)
    a, b, c = seq("a", 20, 4, 0.0), seq("b", 16, 2, 1.0), seq("c", 2, 2, 2.0)
    for q in (a, b, c):
        s.add(q)
    out = sim.step()
    assert [q.seq for q in out.prefills] == [a] and len(a.block_table) == 5
    while not a.is_finished:
        sim.step()
        # b needs 4 blocks, at most 3 are free; c would fit but may not overtake b
        assert b.status is SeqStatus.WAITING and c.status is SeqStatus.WAITING
    assert s.block_pool.num_free == 8
    out = sim.step()
    assert [q.seq for q in out.prefills] == [b, c]
    sim.run()
    assert [q.request_id for q in sim.finished] == ["a", "b", "c"]


def test_preemption_of_youngest_and_recompute() -> None:
    s = make(num_blocks=4, block_size=4, max_num_seqs=2, max_num_batched_tokens=32, max_model_len=16)
    sim = Sim.of(s)
    a, b, c = seq("a", 8, 8, 0.0), seq("b", 6, 8, 1.0, base=3), seq("c", 2, 2, 2.0, base=5)
    for q in (a, b, c):
        s.add(q)
    out = sim.step()
    assert [ch.seq for ch in out.prefills] == [a, b] and s.block_pool.num_free == 0
    out = sim.step()  # a's position 8 opens block 3: b, the youngest, is preempted
    assert out.preempted == [b] and [ch.seq for ch in out.decodes] == [a] and not out.prefills
    assert b.status is SeqStatus.WAITING and b.num_computed == 0 and b.num_preemptions == 1
    assert s.waiting == (b, c), "the preempted sequence goes to the front of waiting"
    assert b.output_ids == reference(b.prompt_ids, 1)
    readmit = None
    while readmit is None:
        out = sim.step()
        # c would fit in the free block but may not overtake b, which needs two
        assert c.status is SeqStatus.WAITING or b.status is SeqStatus.RUNNING
        readmit = next((ch for ch in out.prefills if ch.seq is b), None)
    assert a.is_finished  # b had to wait for a's blocks
    assert (readmit.start, readmit.num_tokens, readmit.sample) == (0, 7, True)  # prompt + kept output
    assert [ch.seq for ch in out.prefills] == [b, c]
    sim.run()
    for q in (a, b, c):
        assert q.output_ids == reference(q.prompt_ids, q.max_tokens)
    assert s.block_pool.num_free == 4


def test_decode_preempts_itself_when_youngest() -> None:
    s = make(num_blocks=3, block_size=4, max_num_batched_tokens=32, max_model_len=12)
    sim = Sim.of(s)
    a, b = seq("a", 4, 8, 0.0), seq("b", 4, 8, 1.0, base=9)
    s.add(a)
    s.add(b)
    sim.step()
    out = sim.step()  # both cross into block 2 with one block free: a (older) gets it
    assert out.preempted == [b] and [c.seq for c in out.decodes] == [a]
    assert len(a.block_table) == 2 and s.block_pool.num_free == 1
    sim.run()
    assert [q.request_id for q in sim.finished] == ["a", "b"]
    assert b.output_ids == reference(b.prompt_ids, 8) and b.num_preemptions == 1


def test_abort_frees_blocks_at_once() -> None:
    s = make(num_blocks=8, block_size=4, max_num_batched_tokens=64, max_model_len=32)
    sim = Sim.of(s)
    a, b, c = seq("a", 20, 8, 0.0), seq("b", 16, 4, 1.0), seq("c", 4, 4, 2.0)
    for q in (a, b, c):
        s.add(q)
    sim.step()
    assert s.block_pool.num_free == 3 and b.status is SeqStatus.WAITING
    assert s.abort("b") is b  # from waiting
    assert b.status is SeqStatus.FINISHED and b.finish_reason is FinishReason.ABORT
    assert s.num_waiting == 1 and s.block_pool.num_free == 3 and s.get("b") is None
    out = sim.step()  # c now fits behind a
    assert [q.seq for q in out.prefills] == [c]
    used_by_a = len(a.block_table)
    free_before = s.block_pool.num_free
    assert s.abort("a") is a  # from running
    assert s.block_pool.num_free == free_before + used_by_a and not a.block_table
    assert s.abort("a") is None and s.abort("nope") is None
    # abort between schedule and update: the chunk is ignored, blocks are back at once
    out = s.schedule()
    assert [q.seq for q in out.decodes] == [c]
    sampled = sim.model.run(out)
    s.abort("c")
    assert s.block_pool.num_free == 8 and not s.has_work
    assert s.update(out, sampled) == [] and c.num_computed == 4
    assert s.kv_usage == 0.0


def test_missing_sample_is_recomputed() -> None:
    s = make()
    a = seq("a", 6, 3)
    s.add(a)
    out = s.schedule()
    assert s.update(out, {}) == [] and a.num_computed == 0 and a.status is SeqStatus.RUNNING
    out2 = s.schedule()
    assert [(c.seq, c.start, c.num_tokens, c.sample) for c in out2.prefills] == [(a, 0, 6, True)]
    assert s.update(out2, {"a": 7}) == [a] and a.output_ids == [7] and a.num_computed == 6
    with pytest.raises(RuntimeError, match="stale"):
        s.update(out2, {"a": 7})


# ---- fairness ----------------------------------------------------------------------------------


def test_fcfs_completion_order_follows_arrival() -> None:
    s = make(num_blocks=64, max_num_seqs=1, max_num_batched_tokens=16)
    sim = Sim.of(s)
    arrivals = [5.0, 1.0, 4.0, 0.5, 3.0, 2.0]  # added in this order, arrival times shuffled
    for i, t in enumerate(arrivals):
        s.add(seq(f"r{i}", 8, 6, t=t, base=i))
    sim.run()
    assert [q.arrival_time for q in sim.finished] == sorted(arrivals)


def test_steady_stream_no_starvation() -> None:
    """One request arrives per step for 300 steps into a small pool; every one completes."""
    rng = random.Random(1)
    s = make(num_blocks=24, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=64)
    sim = Sim.of(s)
    reqs = []
    for i in range(300):
        q = seq(f"r{i}", rng.randint(1, 40), rng.randint(1, 24), t=float(sim.step_no), base=i)
        reqs.append(q)
        s.add(q)
        sim.step()
    sim.run()
    assert len(sim.finished) == 300 and all(q.finish_reason is FinishReason.LENGTH for q in reqs)
    for q in reqs:
        assert q.output_ids == reference(q.prompt_ids, q.max_tokens)
    first = [q.first_scheduled_time or 0.0 for q in reqs]
    assert all(q.first_scheduled_time is not None for q in reqs)
    assert first == sorted(first)  # admitted in arrival order
    assert sum(q.num_preemptions for q in reqs) > 0  # the pool really was contended
    assert s.block_pool.num_free == s.num_blocks and s.kv_usage == 0.0


# ---- property test -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_workloads_keep_invariants(data: st.DataObject) -> None:
    block_size = data.draw(st.sampled_from([1, 2, 4]), "block_size")
    max_model_len = data.draw(st.integers(2, 24), "max_model_len")
    min_blocks = -(-max_model_len // block_size)
    num_blocks = data.draw(st.integers(min_blocks, min_blocks + 6), "num_blocks")
    max_num_seqs = data.draw(st.integers(1, 5), "max_num_seqs")
    budget = data.draw(st.integers(max_num_seqs, 24), "budget")
    chunked = data.draw(st.booleans(), "chunked")
    caching = data.draw(st.booleans(), "prefix caching")
    s = Scheduler(
        num_blocks, block_size, max_num_seqs, budget, max_model_len, chunked, FakeClock(), enable_prefix_caching=caching
    )
    sim = Sim.of(s)
    n = data.draw(st.integers(1, 12), "num_requests")
    plan = []
    for i in range(n):
        p = data.draw(st.integers(1, max_model_len - 1))
        m = data.draw(st.integers(1, max_model_len - p))
        arrive = data.draw(st.integers(0, 15))
        abort_at = data.draw(st.none() | st.integers(0, 40))
        mid_step = data.draw(st.booleans())  # abort between schedule and update
        q = seq(f"r{i}", p, m, t=float(arrive), base=i)
        if caching:  # prompts share prefixes: a few distinct first tokens, then mostly the same ones
            q.prompt_ids = [data.draw(st.integers(1, 2 if j % 3 else 3)) for j in range(p)]
        plan.append((q, arrive, abort_at, mid_step))
    aborted: set[str] = set()
    while sim.step_no < 16 or s.has_work:
        assert sim.step_no < 2000, "no progress"
        for q, arrive, _, _ in plan:
            if arrive == sim.step_no:
                s.add(q)
        for q, _, abort_at, mid in plan:
            if abort_at == sim.step_no and not mid and s.abort(q.request_id) is not None:
                aborted.add(q.request_id)
                assert not q.block_table
        waiting = {id(q) for q in s.waiting}
        out = s.schedule()
        check_invariants(s, out, waiting)
        sampled = sim.model.run(out)
        for q, _, abort_at, mid in plan:
            if abort_at == sim.step_no and mid and s.abort(q.request_id) is not None:
                aborted.add(q.request_id)
                sampled.pop(q.request_id, None)
        for q in s.update(out, sampled):
            assert q.request_id not in aborted
            if q.num_output_tokens >= q.max_tokens:
                s.finish(q.request_id, FinishReason.LENGTH)
                sim.finished.append(q)
        sim.step_no += 1
    assert s.block_pool.num_free == num_blocks and s.num_running == 0 and s.num_waiting == 0
    for q, _, _, _ in plan:
        assert q.is_finished
        if q.request_id in aborted:
            assert q.finish_reason is FinishReason.ABORT and len(q.output_ids) <= q.max_tokens
        else:
            assert q.finish_reason is FinishReason.LENGTH
            assert q.output_ids == reference(q.prompt_ids, q.max_tokens)


# ---- speculative decoding: drafts verified in the step -------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_drafts_roll_back_and_keep_outputs(data: st.DataObject) -> None:
    """Each step, decoding sequences get drafts of random length that are right up to a random point (then wrong):
    the fake model verifies them as the runner does (the agreeing prefix and one more token). Rejected positions
    are never read back (the fake model checks every slot a chunk reads holds that position's true context), no
    draft writes into a shared or cached block, blocks holding only rejected positions are freed at once, and every
    output equals the reference."""
    block_size = data.draw(st.sampled_from([1, 2, 4]), "block_size")
    max_model_len = data.draw(st.integers(4, 32), "max_model_len")
    min_blocks = -(-max_model_len // block_size)
    num_blocks = data.draw(st.integers(min_blocks, min_blocks + 8), "num_blocks")
    max_num_seqs = data.draw(st.integers(1, 4), "max_num_seqs")
    budget = data.draw(st.integers(max_num_seqs, 24), "budget")
    caching = data.draw(st.booleans(), "prefix caching")
    s = Scheduler(
        num_blocks, block_size, max_num_seqs, budget, max_model_len, True, FakeClock(), enable_prefix_caching=caching
    )
    model = FakePagedModel(s)
    reqs = []
    for i in range(data.draw(st.integers(1, 8), "num_requests")):
        p = data.draw(st.integers(1, max_model_len - 1))
        q = seq(f"r{i}", p, data.draw(st.integers(1, max_model_len - p)), t=float(i), base=i % 2)
        reqs.append(q)
        s.add(q)
    for _ in range(2000):
        if not s.has_work:
            break
        drafts: dict[str, list[int]] = {}
        for q in s.running:
            if q.num_remaining == 1 and data.draw(st.booleans()):
                truth = reference(q.prompt_ids, q.max_tokens)[len(q.output_ids) :]
                k, wrong_at = data.draw(st.integers(1, 6)), data.draw(st.integers(0, 6))
                drafts[q.request_id] = [t if j < wrong_at else t + 1 for j, t in enumerate((truth + [7] * k)[:k])]
        out = s.schedule(drafts)
        check_invariants(s, out)
        for c in out.decodes:
            assert c.draft == drafts.get(c.seq.request_id, [])[: len(c.draft)]
        for q in s.update(out, model.run(out)):
            assert len(q.block_table) <= s.blocks_for(q.num_computed + 1), "blocks of rejected positions kept"
            if q.num_output_tokens >= q.max_tokens:
                s.finish(q.request_id, FinishReason.LENGTH)
        check_blocks(s)
    assert not s.has_work and s.block_pool.num_free == num_blocks
    for q in reqs:
        assert q.output_ids == reference(q.prompt_ids, q.max_tokens)


def test_a_draft_takes_only_spare_budget_and_free_blocks() -> None:
    s = make(num_blocks=6, block_size=4, max_num_batched_tokens=8, max_model_len=24)
    a, b = seq("a", 3, 10), seq("b", 3, 10)
    s.add(a)
    s.add(b)
    out = s.schedule()
    s.update(out, {"a": 1, "b": 2})  # both decode next, each holding one block (positions 0..3)
    out = s.schedule({"a": [5, 6, 7, 8, 9, 10, 11], "b": [3, 4, 5, 6, 7, 8]})
    a_chunk, b_chunk = out.decodes
    assert (a_chunk.num_tokens, b_chunk.num_tokens) == (7, 1)  # budget 8: a's token, b's, then a's draft takes 6
    assert a_chunk.token_ids == [1, 5, 6, 7, 8, 9, 10] and len(a.block_table) == 3
    s.update(out, {"a": [5, 6, 0], "b": [4]})  # a kept 2 of its draft and got 0; its third block held rejects only
    assert a.output_ids == [1, 5, 6, 0] and a.num_computed == 6 and len(a.block_table) == 2
    assert b.output_ids == [2, 4] and len(b.block_table) == 1 and s.block_pool.num_free == 3
