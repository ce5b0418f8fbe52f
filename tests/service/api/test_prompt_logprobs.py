"""Prompt log-probabilities (echo + logprobs, max_tokens 0, vLLM's prompt_logprobs) and GET /tokenizer_info.

The oracle is a plain full forward of the same model without a cache, `log_softmax` in fp32: the server
computes the same numbers from its chunked, cached prefill (a small `max_num_batched_tokens` splits the prompts
into several chunks, a small SCORE_ROWS splits the scoring of a chunk).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

import service.engine.runner as runner_mod
from model_core.lm import CausalLM, Output
from model_core.tokenizer import Tokenizer
from tests.service.server_utils import TINY_MODEL_NAME, InProcessServer, serve_tiny_in_process

BUDGET = 16  # max_num_batched_tokens: prompts longer than this are prefilled in several chunks
TOL = 1e-4


@pytest.fixture(scope="module")
def server(tiny_model: CausalLM, smol_tokenizer: Tokenizer) -> Iterator[InProcessServer]:
    with serve_tiny_in_process(tiny_model, smol_tokenizer, max_num_seqs=4, max_num_batched_tokens=BUDGET) as live:
        yield live


@pytest.fixture
def client(server: InProcessServer) -> Iterator[httpx.Client]:
    with server.client(timeout=60) as c:
        yield c


@pytest.fixture(autouse=True)
def small_score_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_mod, "SCORE_ROWS", 5)


@torch.no_grad()
def reference(model: CausalLM, ids: list[int]) -> torch.Tensor:
    """(T, V) fp32 log_softmax of a full forward without cache: row i predicts token i + 1."""
    return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def check_echo(tm: Any, model: CausalLM, ids: list[int], lp: dict[str, Any], k: int) -> tuple[float, int]:
    """The prompt entries of an echo+logprobs reply equal the reference; returns (max abs diff, entries)."""
    ref = reference(model, ids)
    n = len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["tokens"][:n] == [tm.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert lp["text_offset"][0] == 0
    assert lp["text_offset"][:n] == sorted(lp["text_offset"][:n])
    diff = 0.0
    for i in range(1, n):
        want = float(ref[i - 1, ids[i]])
        diff = max(diff, abs(lp["token_logprobs"][i] - want))
        top = lp["top_logprobs"][i]
        vals, idx = ref[i - 1].topk(k)
        for t, v in zip(idx.tolist(), vals.tolist(), strict=True):
            s = tm.tokenizer.decode([t], skip_special_tokens=False)
            assert abs(top[s] - v) < TOL
        assert abs(top[lp["tokens"][i]] - want) < TOL  # the prompt token itself is always there (vLLM)
        assert len(top) <= k + 1
    assert diff < TOL
    return diff, n


def post(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post(path, json={"model": TINY_MODEL_NAME, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_echo_logprobs_text_prompt(server: InProcessServer, client: httpx.Client, tiny_model: CausalLM) -> None:
    tm = server.text_model
    prompt = "The quick brown fox jumps over the lazy dog, and then it runs away into the deep dark forest again"
    ids = tm.tokenizer.encode(prompt)
    assert len(ids) > BUDGET  # several prefill chunks
    out = post(client, "/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 1})
    ch = out["choices"][0]
    lp = ch["logprobs"]
    check_echo(tm, tiny_model, ids, lp, 2)
    assert len(lp["tokens"]) == len(ids) + 1  # the prompt's entries, then the generated token's
    ref = reference(tiny_model, ids)
    gen = int(ref[-1].argmax())
    assert abs(lp["token_logprobs"][-1] - float(ref[-1, gen])) < TOL
    assert ch["text"] == tm.tokenizer.decode(ids, False) + tm.tokenizer.decode([gen], False)
    assert lp["text_offset"][-1] == len(tm.tokenizer.decode(ids, False))
    assert out["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 1,
        "total_tokens": len(ids) + 1,
        "prompt_tokens_details": {"cached_tokens": 0},
    }  # scored prompts are always computed


def test_echo_logprobs_token_ids_and_batches(
    server: InProcessServer, client: httpx.Client, tiny_model: CausalLM
) -> None:
    tm = server.text_model
    g = torch.Generator().manual_seed(0)
    long_ids = torch.randint(0, tm.vocab_size, (100,), generator=g).tolist()  # 7 chunks of <= 16 tokens
    out = post(client, "/v1/completions", {"prompt": long_ids, "echo": True, "logprobs": 3, "max_tokens": 2})
    check_echo(tm, tiny_model, long_ids, out["choices"][0]["logprobs"], 3)
    assert len(out["choices"][0]["logprobs"]["tokens"]) == len(long_ids) + 2
    # a batch of prompts of mixed lengths: their chunks share steps and padded forwards
    batch = [torch.randint(0, tm.vocab_size, (n,), generator=g).tolist() for n in (1, 2, 9, 13, 40, 23)]
    out = post(client, "/v1/completions", {"prompt": batch, "echo": True, "logprobs": 1, "max_tokens": 1})
    assert len(out["choices"]) == len(batch)
    for ids, ch in zip(batch, out["choices"], strict=True):
        check_echo(tm, tiny_model, ids, ch["logprobs"], 1)
    texts = ["Hello there, how are you today?", "One two three four five six seven eight nine ten eleven"]
    out = post(client, "/v1/completions", {"prompt": texts, "echo": True, "logprobs": 0, "max_tokens": 1, "n": 2})
    assert len(out["choices"]) == 4
    for i, ch in enumerate(out["choices"]):
        check_echo(tm, tiny_model, tm.tokenizer.encode(texts[i // 2]), ch["logprobs"], 0)


def test_max_tokens_zero_scores_only(server: InProcessServer, client: httpx.Client, tiny_model: CausalLM) -> None:
    tm = server.text_model
    prompt = "Scoring a prompt generates nothing at all, whatever its length is."
    ids = tm.tokenizer.encode(prompt)
    out = post(client, "/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0})
    ch = out["choices"][0]
    assert ch["finish_reason"] == "length" and ch["text"] == tm.tokenizer.decode(ids, False)
    assert len(ch["logprobs"]["tokens"]) == len(ids)
    check_echo(tm, tiny_model, ids, ch["logprobs"], 1)
    assert out["usage"]["completion_tokens"] == 0
    out = post(client, "/v1/completions", {"prompt": prompt, "prompt_logprobs": 0, "max_tokens": 0})
    assert out["choices"][0]["text"] == "" and out["choices"][0]["finish_reason"] == "length"
    # the whole context may be scored
    full = list(range(1, tm.max_model_len + 1))
    out = post(client, "/v1/completions", {"prompt": full, "prompt_logprobs": 0, "max_tokens": 0})
    plp = out["choices"][0]["prompt_logprobs"]
    ref = reference(tiny_model, full)
    assert len(plp) == len(full)
    assert max(abs(plp[i][str(full[i])]["logprob"] - float(ref[i - 1, full[i]])) for i in range(1, len(full))) < TOL
    # without echo or prompt_logprobs, max_tokens 0 is still refused
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    sched = tm.engine.scheduler
    assert sched.block_pool.num_free == sched.num_blocks and not sched.has_work  # every block came back


def check_vllm_prompt_logprobs(model: CausalLM, ids: list[int], plp: list[Any], k: int) -> None:
    ref = reference(model, ids)
    assert len(plp) == len(ids) and plp[0] is None
    for i in range(1, len(ids)):
        row = ref[i - 1]
        entry = plp[i]
        got = entry[str(ids[i])]
        assert abs(got["logprob"] - float(row[ids[i]])) < TOL
        assert got["rank"] == int((row > row[ids[i]]).sum()) + 1
        vals, idx = row.topk(k)
        for r, (t, v) in enumerate(zip(idx.tolist(), vals.tolist(), strict=True), start=1):
            assert abs(entry[str(t)]["logprob"] - v) < TOL and entry[str(t)]["rank"] == r
        assert set(entry) <= {str(ids[i]), *map(str, idx.tolist())}
        assert all(isinstance(e["decoded_token"], str) for e in entry.values())


def test_prompt_logprobs_completions_and_chat(
    server: InProcessServer, client: httpx.Client, tiny_model: CausalLM
) -> None:
    tm = server.text_model
    prompt = "Prompt logprobs are a vLLM extension that lm-eval and others use."
    ids = tm.tokenizer.encode(prompt)
    out = post(client, "/v1/completions", {"prompt": prompt, "prompt_logprobs": 3, "max_tokens": 2})
    ch = out["choices"][0]
    assert ch["logprobs"] is None and len(ch["text"]) > 0
    check_vllm_prompt_logprobs(tiny_model, ids, ch["prompt_logprobs"], 3)
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    chat_ids = client.post("/tokenize", json={"messages": msgs}).json()["tokens"]
    out = post(client, "/v1/chat/completions", {"messages": msgs, "prompt_logprobs": 2, "max_tokens": 2})
    check_vllm_prompt_logprobs(tiny_model, chat_ids, out["prompt_logprobs"], 2)
    # streamed: the scores come first, in a chunk of their own
    with client.stream(
        "POST", "/v1/chat/completions", json={"messages": msgs, "prompt_logprobs": 1, "max_tokens": 2, "stream": True}
    ) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    scored = [c for c in chunks if "prompt_logprobs" in c]
    assert len(scored) == 1
    check_vllm_prompt_logprobs(tiny_model, chat_ids, scored[0]["prompt_logprobs"], 1)
    r = client.post("/v1/completions", json={"prompt": prompt, "prompt_logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


def test_streamed_echo_logprobs(server: InProcessServer, client: httpx.Client, tiny_model: CausalLM) -> None:
    tm = server.text_model
    prompt = "Streaming an echo with logprobs sends the prompt's entries first."
    ids = tm.tokenizer.encode(prompt)
    body = {
        "model": TINY_MODEL_NAME,
        "prompt": prompt,
        "echo": True,
        "logprobs": 1,
        "max_tokens": 3,
        "temperature": 0,
        "stream": True,
    }
    with client.stream("POST", "/v1/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    first = chunks[0]["choices"][0]
    assert first["text"] == tm.tokenizer.decode(ids, False)
    check_echo(tm, tiny_model, ids, first["logprobs"], 1)
    later = [c["choices"][0]["logprobs"] for c in chunks[1:] if c["choices"][0]["logprobs"]]
    assert sum(len(lp["tokens"]) for lp in later) == 3


def test_requests_without_scores_pay_nothing(
    server: InProcessServer, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = server.text_model.engine.runner
    hidden_calls: list[int] = []
    scored_rows: list[int] = []
    forward, score = runner.model.forward, runner._score_prompt

    def spy_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("output") is Output.HIDDEN:
            hidden_calls.append(args[0].shape[1])
        return forward(*args, **kwargs)

    def spy_score(chunk: Any, h: torch.Tensor) -> None:
        scored_rows.append(h.shape[0])
        score(chunk, h)

    monkeypatch.setattr(runner.model, "forward", spy_forward)
    monkeypatch.setattr(runner, "_score_prompt", spy_score)
    prompt = "A prompt long enough to be prefilled in more than one chunk of sixteen tokens, surely."
    post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 3})
    post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 3, "logprobs": 5})  # output logprobs only
    post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 3, "echo": True})
    post(
        client,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": prompt}], "max_tokens": 3, "logprobs": True, "top_logprobs": 2},
    )
    assert hidden_calls == [] and scored_rows == []
    n = len(server.text_model.tokenizer.encode(prompt))
    post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 0})
    assert hidden_calls and max(hidden_calls) <= BUDGET
    assert sum(scored_rows) == n  # the chunks of this prompt, each once


def test_tokenizer_info(server: InProcessServer, client: httpx.Client) -> None:
    tok = server.text_model.tokenizer
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.id_to_token(tok.eos_token_id) and info["chat_template"] == tok.chat_template
    assert info["model_max_length"] == server.text_model.max_model_len
    for key in ("bos_token", "pad_token", "tokenizer_class"):
        assert key in info
    ids = client.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
    assert ids == [tok.eos_token_id]
    assert client.post("/detokenize", json={"tokens": ids}).json()["prompt"] == info["eos_token"]
    assert client.head("/tokenizer_info").status_code == 200


def test_scheduler_prompt_only_sequences_keep_invariants() -> None:
    """max_tokens 0 (scoring) mixed with generating requests in a contended pool: chunked, preempted and
    recomputed like the others, they end right after their prefill with no token, and every block comes back."""
    import random

    from service.engine.scheduler import FinishReason
    from tests.service.engine.scheduler_utils import Sim, make, reference, seq

    rng = random.Random(2)
    s = make(num_blocks=24, block_size=4, max_num_seqs=8, max_num_batched_tokens=16, max_model_len=64)
    sim = Sim.of(s)  # finishes a sequence once it has max_tokens outputs: a prompt-only one right away
    reqs = []
    for i in range(200):
        q = seq(f"r{i}", rng.randint(1, 40), 0 if i % 3 == 0 else rng.randint(1, 24), t=float(sim.step_no), base=i)
        reqs.append(q)
        s.add(q)
        sim.step()
    sim.run()  # check_invariants asserts the budget and the block accounting every step
    assert len(sim.finished) == 200 and all(q.finish_reason is FinishReason.LENGTH for q in reqs)
    scoring = [q for q in reqs if q.max_tokens == 0]
    assert all(q.output_ids == [] and q.num_computed == q.num_prompt_tokens for q in scoring)
    assert any(q.num_preemptions for q in scoring) and any(q.num_prompt_tokens > 16 for q in scoring)
    for q in reqs:
        assert q.output_ids == reference(q.prompt_ids, q.max_tokens)
    assert s.block_pool.num_free == s.num_blocks


def test_preempted_requests_keep_exact_prompt_logprobs(
    tiny_model: CausalLM, smol_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KV pool too small for every request at once: sequences are preempted and recomputed, and their prompt
    scores (kept from the first prefill) still equal the reference."""
    from concurrent.futures import ThreadPoolExecutor

    from service.engine.scheduler import Scheduler

    preempted: list[str] = []
    real = Scheduler._preempt_youngest

    def spy(self: Scheduler) -> Any:
        seq = real(self)
        preempted.append(seq.request_id)
        return seq

    monkeypatch.setattr(Scheduler, "_preempt_youngest", spy)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (70, 60, 50, 40)]
    with (
        serve_tiny_in_process(
            tiny_model, smol_tokenizer, num_blocks=17, max_num_seqs=4, max_num_batched_tokens=32
        ) as live,
        live.client(timeout=120) as c,
    ):

        def one(ids: list[int]) -> dict[str, Any]:
            return post(
                c, "/v1/completions", {"prompt": ids, "echo": True, "logprobs": 2, "max_tokens": 60, "ignore_eos": True}
            )

        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(one, prompts))
        sched = live.text_model.engine.scheduler
        assert sched.block_pool.num_free == sched.num_blocks
    assert preempted  # the pool really was contended
    for ids, out in zip(prompts, outs, strict=True):
        lp = out["choices"][0]["logprobs"]
        check_echo(live.text_model, tiny_model, ids, lp, 2)
        assert len(lp["tokens"]) == len(ids) + 60
