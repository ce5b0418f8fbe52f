"""Prefix caching: the block pool's states, the scheduler sharing cached blocks (checked by a fake paged
model that reads back every position's content), the engine's outputs equal with and without the cache,
and the API's `cached_tokens`, metrics and reset route (in-process)."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from model_core.generate import generate
from model_core.lm import CausalLM
from model_core.sampling import SamplingParams
from model_core.tokenizer import Tokenizer
from service.config import Settings, parse_settings
from service.engine.block_pool import BlockPool, hash_block, root_hash
from service.engine.scheduler import Sequence
from tests.service.engine.engine_utils import make_engine, run_all
from tests.service.engine.scheduler_utils import Sim, make, reference
from tests.service.http_checks import assert_error, sse_events
from tests.service.server_utils import TINY_MODEL_NAME, InProcessServer, serve_tiny_in_process


def H(i: int) -> bytes:
    return hash_block(root_hash("test"), [i])


# ---- the block pool ----------------------------------------------------------------------------


def test_released_cached_blocks_stay_findable_until_evicted_oldest_first() -> None:
    pool = BlockPool(4, enable_caching=True)
    a, b, c, d = pool.allocate(4)
    for blk, h in ((a, H(1)), (b, H(2)), (c, H(3))):
        assert pool.register(blk, h)
    pool.free([c])  # released first: evicted first
    pool.free([a, b])
    pool.free([d])  # never cached: plainly free
    assert pool.num_free == 4 and pool.num_used == 0 and pool.num_cached == 3
    assert pool.lookup([H(1), H(2), H(3)]) == [a, b, c]
    assert pool.allocate(1) == [d]  # a free block before any cached one
    assert pool.allocate(1) == [c] and pool.num_evictions == 1  # then the least recently released
    assert pool.lookup([H(1), H(2), H(3)]) == [a, b]  # c's content is gone
    assert pool.lookup([H(2)]) == [b] and pool.lookup([H(9), H(2)]) == []  # only runs from the first hash


def test_share_revives_an_evictable_block_and_counts_references() -> None:
    pool = BlockPool(3, enable_caching=True)
    (a,) = pool.allocate(1)
    pool.register(a, H(1))
    pool.free([a])
    assert pool.num_free == 3
    pool.share([a])
    pool.share([a])
    assert pool.ref_count(a) == 2 and pool.num_free == 2
    assert sorted(pool.allocate(2)) == sorted({0, 1, 2} - {a})  # the shared block is never handed out
    pool.free([a])
    assert pool.ref_count(a) == 1 and pool.num_free == 0
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    with pytest.raises(ValueError):
        pool.share([next(b for b in range(3) if b != a)])  # not cached


def test_register_refuses_duplicates_and_does_nothing_when_caching_is_off() -> None:
    pool = BlockPool(3, enable_caching=True)
    a, b = pool.allocate(2)
    assert pool.register(a, H(1)) and not pool.register(b, H(1))  # same content computed twice at once
    assert pool.block_hash(b) is None
    pool.free([a, b])
    assert pool.allocate(1) != [a]  # b (uncached) went back free; a stays cached
    off = BlockPool(2)
    (x,) = off.allocate(1)
    assert not off.register(x, H(1)) and off.lookup([H(1)]) == []


def test_reset_forgets_everything_but_keeps_blocks_in_use() -> None:
    pool = BlockPool(4, enable_caching=True)
    a, b = pool.allocate(2)
    pool.register(a, H(1))
    pool.register(b, H(2))
    pool.free([b])
    assert pool.reset() == 2
    assert pool.num_cached == 0 and pool.lookup([H(1)]) == [] and pool.ref_count(a) == 1
    pool.free([a])
    assert pool.num_free == 4 and pool.num_cached == 0


class PoolMachine(RuleBasedStateMachine):
    """Random interleavings of allocate / share / register / free / evict / reset against a model of who holds
    what: reference counts are exact, nothing leaks or is freed twice, and no block in use is handed out."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(8, enable_caching=True)
        self.held: dict[int, list[int]] = {}  # owner -> blocks it holds
        self.contents: dict[int, bytes] = {}  # block -> the hash it was registered under
        self.next_owner = 0

    def in_use(self) -> set[int]:
        return {b for bl in self.held.values() for b in bl}

    @rule(n=st.integers(0, 4))
    def allocate(self, n: int) -> None:
        before = self.in_use()
        if n > self.pool.num_free:
            with pytest.raises(RuntimeError):
                self.pool.allocate(n)
            return
        got = self.pool.allocate(n)
        assert not set(got) & before, "a block in use was handed out"
        for b in got:
            self.contents.pop(b, None)  # evicted or free: its old content is gone
        self.held[self.next_owner] = got
        self.next_owner += 1

    @precondition(lambda self: self.held)
    @rule(data=st.data(), h=st.integers(0, 5))
    def register(self, data: st.DataObject, h: int) -> None:
        owner = data.draw(st.sampled_from(sorted(self.held)))
        if not self.held[owner]:
            return
        b = data.draw(st.sampled_from(self.held[owner]))
        if self.pool.register(b, H(h)):
            self.contents[b] = H(h)

    @rule(hs=st.lists(st.integers(0, 5), max_size=4, unique=True))  # chained hashes never repeat in a sequence
    def share(self, hs: list[int]) -> None:
        found = self.pool.lookup([H(h) for h in hs])
        for b, h in zip(found, hs, strict=False):
            assert self.contents.get(b) == H(h), "lookup returned a block that does not hold that content"
        self.pool.share(found)
        self.held[self.next_owner] = found
        self.next_owner += 1

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(sorted(self.held)))
        self.pool.free(reversed(self.held.pop(owner)))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def double_free_is_refused(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(sorted(self.held)))
        blocks = self.held[owner]
        if blocks and self.pool.ref_count(blocks[0]) == 1:
            with pytest.raises(ValueError):
                self.pool.free([blocks[0], blocks[0]])

    @rule()
    def reset(self) -> None:
        self.pool.reset()
        self.contents.clear()

    @invariant()
    def counts_are_exact(self) -> None:
        holders: dict[int, int] = {}
        for bl in self.held.values():
            for b in bl:
                holders[b] = holders.get(b, 0) + 1
        for b in range(self.pool.num_blocks):
            assert self.pool.ref_count(b) == holders.get(b, 0)
        assert self.pool.num_used == len(holders) and self.pool.num_free == self.pool.num_blocks - len(holders)
        for b, h in self.contents.items():
            assert self.pool.block_hash(b) == h and self.pool.lookup([h]) == [b]
        assert self.pool.num_cached == len(self.contents)


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ---- the scheduler -----------------------------------------------------------------------------


def prompt_seq(rid: str, ids: list[int], max_tokens: int, t: float = 0.0) -> Sequence:
    return Sequence(rid, list(ids), max_tokens, t)


def test_a_shared_prefix_is_computed_once() -> None:
    s = make(enable_prefix_caching=True, num_blocks=32, max_num_batched_tokens=64, max_model_len=96)
    sim = Sim.of(s)
    system = [random.Random(0).randint(1, 900) for _ in range(30)]
    a = prompt_seq("a", system + [1, 2, 3], 5)
    s.add(a)
    sim.run()
    b = prompt_seq("b", system + [7, 8], 5, t=1.0)
    s.add(b)
    out = sim.step()
    (ch,) = out.prefills
    assert (ch.start, ch.num_tokens, ch.sample) == (28, 4, True)  # 7 full blocks of the system prompt shared
    assert out.num_batched_tokens == 4 and b.num_cached_tokens == 28
    sim.run()
    assert a.output_ids == reference(a.prompt_ids, 5) and b.output_ids == reference(b.prompt_ids, 5)
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (33 + 32, 28)


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    s = make(enable_prefix_caching=True)
    sim = Sim.of(s)
    ids = list(range(1, 9))  # exactly two blocks
    s.add(prompt_seq("a", ids, 3))
    sim.run()
    b = prompt_seq("b", ids, 3, t=1.0)
    s.add(b)
    (ch,) = sim.step().prefills
    assert (ch.start, ch.num_tokens, ch.sample) == (4, 4, True)  # the block holding the last token is not shared
    c = prompt_seq("c", ids + [5], 3, t=2.0)
    s.add(c)
    sim.run()
    assert c.num_cached_tokens == 8
    assert b.output_ids == reference(ids, 3) and c.output_ids == reference(ids + [5], 3)


def test_generated_tokens_are_cached_too_so_the_next_turn_hits_them() -> None:
    s = make(enable_prefix_caching=True, max_model_len=64)
    sim = Sim.of(s)
    turn1 = prompt_seq("t1", list(range(1, 11)), 10)
    s.add(turn1)
    sim.run()
    history = turn1.prompt_ids + turn1.output_ids  # 20 tokens, whose KV (but the last one's) was computed
    turn2 = prompt_seq("t2", history + [42, 43], 4, t=1.0)
    s.add(turn2)
    sim.run()
    assert turn2.num_cached_tokens == 16 and turn2.output_ids == reference(turn2.prompt_ids, 4)


def test_a_conversation_extends_the_cache_turn_after_turn() -> None:
    """Each turn hits everything the turns before it computed, including the blocks a turn that itself
    started from the cache computed and registered."""
    s = make(enable_prefix_caching=True, num_blocks=64, max_model_len=200)
    sim = Sim.of(s)
    history = list(range(1, 12))
    for turn in range(6):
        q = prompt_seq(f"t{turn}", history + [100 + turn] * 5, 6, t=float(turn))
        s.add(q)
        sim.run()
        assert q.output_ids == reference(q.prompt_ids, 6)
        computed = len(history) - 1 if turn else 0  # the last token of the turn before had no KV computed
        assert q.num_cached_tokens == computed // 4 * 4, turn  # every full block of it
        history = q.prompt_ids + q.output_ids  # the next turn resends all of it


def test_lookup_prefix_false_computes_every_position() -> None:
    s = make(enable_prefix_caching=True)
    sim = Sim.of(s)
    ids = list(range(1, 20))
    s.add(prompt_seq("a", ids, 2))
    sim.run()
    b = prompt_seq("b", ids, 2, t=1.0)
    b.lookup_prefix = False
    s.add(b)
    (ch,) = sim.step().prefills
    assert ch.start == 0 and b.num_cached_tokens == 0


def test_a_preempted_sequence_finds_its_own_blocks_again() -> None:
    s = make(
        enable_prefix_caching=True,
        num_blocks=6,
        block_size=4,
        max_num_seqs=2,
        max_num_batched_tokens=32,
        max_model_len=24,
    )
    sim = Sim.of(s)
    a, b = prompt_seq("a", list(range(1, 9)), 8), prompt_seq("b", list(range(20, 30)), 8, t=1.0)
    s.add(a)
    s.add(b)
    while not b.num_preemptions:
        sim.step()
    while b.status.value != "running":
        sim.step()
    readmit = sim.outputs[-1].prefills[-1]
    assert readmit.seq is b and readmit.start > 0, "the recompute reused b's released blocks"
    sim.run()
    assert a.output_ids == reference(a.prompt_ids, 8) and b.output_ids == reference(b.prompt_ids, 8)


def test_many_shared_prompts_under_memory_pressure_match_the_reference() -> None:
    """200 requests from 5 system prompts (and repeats of earlier conversations) in a pool that holds a few:
    hits, evictions and preemptions all happen, and every output equals the reference."""
    rng = random.Random(3)
    s = make(
        enable_prefix_caching=True,
        num_blocks=24,
        block_size=4,
        max_num_seqs=6,
        max_num_batched_tokens=24,
        max_model_len=64,
    )
    sim = Sim.of(s)
    systems = [[rng.randint(1, 900) for _ in range(rng.randint(8, 30))] for _ in range(5)]
    done: list[Sequence] = []
    for i in range(200):
        if done and rng.random() < 0.3:  # a next turn: an earlier conversation resent with its reply
            prev = rng.choice(done)
            ids = (prev.prompt_ids + prev.output_ids)[:50] + [rng.randint(1, 900)]
        else:
            ids = rng.choice(systems) + [rng.randint(1, 900) for _ in range(rng.randint(1, 6))]
        q = prompt_seq(f"r{i}", ids, rng.randint(1, min(12, 64 - len(ids))), t=float(sim.step_no))
        s.add(q)
        sim.step()
        done = [f for f in sim.finished]
    sim.run()
    assert len(sim.finished) == 200
    for q in sim.finished:
        assert q.output_ids == reference(q.prompt_ids, q.max_tokens)
    assert s.prefix_cache_hits > 0.3 * s.prefix_cache_queries
    assert s.block_pool.num_evictions > 0 and sum(q.num_preemptions for q in sim.finished) > 0
    assert s.block_pool.num_used == 0 and s.kv_usage == 0.0


def test_counters_and_reset() -> None:
    s = make(enable_prefix_caching=True)
    sim = Sim.of(s)
    ids = list(range(1, 14))
    for i in range(3):
        s.add(prompt_seq(f"r{i}", ids, 2, t=float(i)))
        sim.run()
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (39, 24)
    assert s.reset_prefix_cache() > 0 and s.block_pool.num_cached == 0
    last = prompt_seq("after", ids, 2, t=9.0)
    s.add(last)
    sim.run()
    assert last.num_cached_tokens == 0


def test_caching_off_by_default_in_the_scheduler() -> None:
    s = make()
    sim = Sim.of(s)
    for i in range(2):
        s.add(prompt_seq(f"r{i}", list(range(1, 30)), 2, t=float(i)))
        sim.run()
    assert s.prefix_cache_hits == 0 and s.block_pool.num_cached == 0


# ---- the engine: outputs with the cache equal those without --------------------------------------


def _ref(model: CausalLM, tok: Tokenizer, prompt: list[int], params: SamplingParams) -> list[int]:
    return [x.token_id for x in generate(model, prompt, params, tokenizer=tok, eos_token_ids=tok.eos_token_ids)]


def test_engine_outputs_equal_with_and_without_the_cache(tiny_model: CausalLM, smol_tokenizer: Tokenizer) -> None:
    """Greedy and seeded requests sharing long prefixes, run cold, warm, after churn by other prompts and after
    evictions: the tokens equal those of an engine without the cache and of the reference generate()."""
    rng = random.Random(7)
    system = [rng.randrange(3, 49152) for _ in range(70)]
    prompts = [system + [rng.randrange(3, 49152) for _ in range(rng.randint(1, 20))] for _ in range(6)]
    params = [
        SamplingParams(max_tokens=12, temperature=0.0)
        if i % 2 == 0
        else SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=50 + i)
        for i in range(6)
    ]
    jobs = list(zip(prompts, params, strict=True))
    off = make_engine(tiny_model, smol_tokenizer, prefix_caching=False, max_num_batched_tokens=64)
    try:
        baseline = [[e.token_id for e in evs] for evs in run_all(off, jobs)]
    finally:
        off.stop()
    for p, sp, toks in zip(prompts, params, baseline, strict=True):
        assert toks == _ref(tiny_model, smol_tokenizer, p, sp)
    # 20 blocks x 16 tokens: room for one 256-token sequence and a few more; churn forces evictions
    on = make_engine(tiny_model, smol_tokenizer, num_blocks=20, max_num_batched_tokens=64)
    try:
        cold = run_all(on, jobs[:1])
        warm = run_all(on, jobs)
        churn = [[rng.randrange(3, 49152) for _ in range(120)] for _ in range(4)]
        run_all(on, [(c, SamplingParams(max_tokens=4, temperature=0.0)) for c in churn])
        after = run_all(on, jobs)
        again = run_all(on, jobs)
        pool = on.scheduler.block_pool
        assert pool.num_evictions > 0 and pool.num_used == 0
    finally:
        on.stop()
    assert [e.token_id for e in cold[0]] == baseline[0]
    for name, run in (("warm", warm), ("after churn", after), ("again", again)):
        assert [[e.token_id for e in evs] for evs in run] == baseline, name
    assert all(evs[-1].cached_tokens >= 64 for evs in warm[1:]), "the shared system prompt was not reused"
    assert all(evs[-1].cached_tokens >= 64 for evs in again)
    assert cold[0][-1].cached_tokens == 0


# ---- the API -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_model: CausalLM, smol_tokenizer: Tokenizer) -> Iterator[InProcessServer]:
    with serve_tiny_in_process(tiny_model, smol_tokenizer, settings=Settings(enable_gan=False, api_keys=["k"])) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: InProcessServer) -> Iterator[httpx.Client]:
    with server.client(timeout=60.0, headers={"Authorization": "Bearer k"}) as c:
        yield c


def _metric(http: httpx.Client, name: str) -> float:
    text = http.get("/metrics").text
    m = re.search(rf'^{name}{{model="{TINY_MODEL_NAME}"}} ([0-9.e+]+)$', text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def _body(prompt: Any, **extra: Any) -> dict[str, Any]:
    return {"model": TINY_MODEL_NAME, "prompt": prompt, "max_tokens": 3, "temperature": 0, **extra}


def test_usage_reports_cached_tokens(http: httpx.Client) -> None:
    assert http.post("/reset_prefix_cache").json()["enabled"] is True
    ids = [random.Random(11).randrange(3, 49000) for _ in range(50)]
    q0, h0 = _metric(http, "aigc_prefix_cache_queries_total"), _metric(http, "aigc_prefix_cache_hits_total")
    first = http.post("/v1/completions", json=_body(ids)).json()
    second = http.post("/v1/completions", json=_body(ids)).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 48}  # 3 full blocks of 16
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert _metric(http, "aigc_prefix_cache_queries_total") - q0 == 100
    assert _metric(http, "aigc_prefix_cache_hits_total") - h0 == 48
    r = http.post("/v1/completions", json=_body(ids, stream=True, stream_options={"include_usage": True}))
    usage = [e for e in sse_events(r.content) if isinstance(e, dict) and e.get("usage")][-1]["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 48} and usage["prompt_tokens"] == 50
    two = http.post("/v1/completions", json=_body([ids, ids[:20]], n=2)).json()
    assert two["usage"]["prompt_tokens"] == 70 and two["usage"]["prompt_tokens_details"]["cached_tokens"] == 48 + 16


def test_chat_and_responses_report_cached_tokens(http: httpx.Client) -> None:
    system = "You are a careful assistant. " * 12
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Hi there"}]
    chat = {"model": TINY_MODEL_NAME, "messages": msgs, "max_tokens": 2}
    http.post("/v1/chat/completions", json=chat)
    out = http.post("/v1/chat/completions", json={**chat, "messages": [*msgs[:1], {"role": "user", "content": "Yo"}]})
    cached = out.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 64 and cached % 16 == 0
    resp = http.post(
        "/v1/responses", json={"model": TINY_MODEL_NAME, "instructions": system, "input": "Hey", "max_output_tokens": 2}
    ).json()
    assert resp["usage"]["input_tokens_details"]["cached_tokens"] >= 64


def test_reset_route_forgets_the_cache_and_needs_the_key(http: httpx.Client, server: InProcessServer) -> None:
    ids = [random.Random(12).randrange(3, 49000) for _ in range(40)]
    http.post("/v1/completions", json=_body(ids))
    r = http.post("/reset_prefix_cache")
    assert r.status_code == 200 and r.json()["blocks_forgotten"] >= 2
    again = http.post("/v1/completions", json=_body(ids)).json()
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    with server.client() as anonymous:
        assert_error(anonymous.post("/reset_prefix_cache"), 401)


def test_scored_prompts_are_computed_whole(http: httpx.Client) -> None:
    """prompt_logprobs needs every position's logits: such a request never reuses cached blocks."""
    ids = [random.Random(13).randrange(3, 49000) for _ in range(40)]
    http.post("/v1/completions", json=_body(ids))
    out = http.post("/v1/completions", json=_body(ids, prompt_logprobs=1)).json()
    assert out["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert all(x is not None for x in out["choices"][0]["prompt_logprobs"][1:])


def test_caching_can_be_switched_off(tiny_model: CausalLM, smol_tokenizer: Tokenizer) -> None:
    assert parse_settings(["--no-enable-prefix-caching"]).enable_prefix_caching is False
    assert parse_settings([]).enable_prefix_caching is True
    ids = [random.Random(14).randrange(3, 49000) for _ in range(40)]
    with (
        serve_tiny_in_process(tiny_model, smol_tokenizer, prefix_caching=False) as live,
        live.client(timeout=60) as c,
    ):
        for _ in range(2):
            out = c.post("/v1/completions", json=_body(ids)).json()
            assert out["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        assert c.post("/reset_prefix_cache").json() == {
            "object": "prefix_cache.reset",
            "enabled": False,
            "blocks_forgotten": 0,
        }
