"""CausalLM: cached incremental decoding through a PagedKVCache (chunked prefill, token-by-token
decode, shuffled non-contiguous block tables, a batch of sequences of different lengths) equals a
full forward pass; GQA equals MHA with repeated K/V heads; the context length is enforced."""

from __future__ import annotations

import random

import pytest
import torch

from model_core import models
from model_core.generate import generate
from model_core.kv_cache import PagedKVCache
from model_core.lm import CausalLM, LMConfig, Output
from model_core.sampling import SamplingParams

VOCAB = 300
TOL = 1e-5
BLOCK = 4


def tiny_lm(arch: str, n_heads: int = 4, n_kv_heads: int = 2, max_seq_len: int = 64, seed: int = 0) -> CausalLM:
    cfg = models.family(arch).config(
        vocab_size=VOCAB,
        d_model=64,
        n_layers=2,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads if arch == "llama" else n_heads,
        d_ff=128,
        max_seq_len=max_seq_len,
    )
    torch.manual_seed(seed)
    model = CausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "embed.weight":  # tied head: keep the logits moderate (std ~0.8)
                p.normal_(0.0, 0.1)
            elif p.dim() > 1:
                p.normal_(0.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(1.0, 0.1)
    return model.eval()


def new_cache(model: CausalLM, num_blocks: int) -> PagedKVCache:
    c = model.cfg
    return PagedKVCache(c.n_layers, num_blocks, BLOCK, c.n_kv_heads, c.hd)


def full_logits(model: CausalLM, tokens: list[int]) -> torch.Tensor:
    """(T, V) logits of one sequence, no cache."""
    with torch.inference_mode():
        return model(torch.tensor([tokens]))[0]


def step(
    model: CausalLM, cache: PagedKVCache, tables: list[list[int]], starts: list[int], chunk: list[list[int]]
) -> torch.Tensor:
    """One cached forward of B sequences each computing len(chunk[b]) new tokens -> (B, T, V)."""
    prepared = cache.prepare(tables, starts, len(chunk[0]))
    with torch.inference_mode():
        return model(torch.tensor(chunk), cache, prepared)


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("layout", ["shuffled", "contiguous"])
def test_chunked_prefill_and_decode_equal_full_forward(arch: str, layout: str) -> None:
    model = tiny_lm(arch)
    rng = random.Random(1)
    tokens = [rng.randrange(VOCAB) for _ in range(41)]
    ref = full_logits(model, tokens)
    cache = new_cache(model, num_blocks=16)
    table = list(range(16))
    if layout == "shuffled":
        rng.shuffle(table)
        assert any(b - a != 1 for a, b in zip(table, table[1:], strict=False))
    table = table[:11]  # covers 44 positions
    start, worst = 0, 0.0
    for size in [5, 1, 9, 3, 7]:  # chunked prefill, chunk sizes not aligned to the block size
        out = step(model, cache, [table], [start], [tokens[start : start + size]])[0]
        worst = max(worst, diff(out, ref[start : start + size]))
        start += size
    while start < len(tokens):  # token-by-token decode
        prepared = cache.prepare([table], [start], 1)
        with torch.inference_mode():
            last = model(torch.tensor([[tokens[start]]]), cache, prepared, Output.LAST)  # (1, V)
        worst = max(worst, diff(last[0], ref[start]))
        start += 1
    print(f"{arch}: worst abs diff cached vs full {worst:.2e}")
    assert worst <= TOL, worst


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batch_of_different_lengths_decodes_together(arch: str) -> None:
    model = tiny_lm(arch, seed=2)
    rng = random.Random(2)
    lengths = [7, 13, 3]  # prompt lengths
    # then a batched step of 2 tokens each, a padded step of 3/1/2 tokens, 6 batched decode steps
    steps_multi, counts, steps_single = 2, [3, 1, 2], 6
    total = [n + steps_multi + c + steps_single for n, c in zip(lengths, counts, strict=True)]
    seqs = [[rng.randrange(VOCAB) for _ in range(n)] for n in total]
    refs = [full_logits(model, s) for s in seqs]
    pool = list(range(24))
    rng.shuffle(pool)  # each sequence gets scattered blocks from one shared pool
    need = [-(-n // BLOCK) for n in total]
    tables = [pool[: need[0]], pool[need[0] : need[0] + need[1]], pool[need[0] + need[1] : sum(need)]]
    cache = new_cache(model, num_blocks=24)
    worst = 0.0
    for b, n in enumerate(lengths):  # prefill each prompt alone, in two chunks
        half = max(1, n // 2)
        for s, e in [(0, half), (half, n)]:
            if e > s:
                out = step(model, cache, [tables[b]], [s], [seqs[b][s:e]])[0]
                worst = max(worst, diff(out, refs[b][s:e]))
    starts = list(lengths)
    chunk = [seqs[b][starts[b] : starts[b] + steps_multi] for b in range(3)]
    out = step(model, cache, tables, starts, chunk)  # (3, 2, V), different start per row
    for b in range(3):
        worst = max(worst, diff(out[b], refs[b][starts[b] : starts[b] + steps_multi]))
    starts = [s + steps_multi for s in starts]
    # a padded step: each row computes its own number of tokens from its own start
    padded = [seqs[b][starts[b] : starts[b] + n] + [0] * (3 - n) for b, n in enumerate(counts)]
    prepared = cache.prepare(tables, starts, counts)
    with torch.inference_mode():
        out = model(torch.tensor(padded), cache, prepared)  # (3, 3, V); padding rows ignored
    for b, n in enumerate(counts):
        worst = max(worst, diff(out[b, :n], refs[b][starts[b] : starts[b] + n]))
    starts = [s + n for s, n in zip(starts, counts, strict=True)]
    for _ in range(steps_single):
        out = step(model, cache, tables, starts, [[seqs[b][starts[b]]] for b in range(3)])  # (3, 1, V)
        for b in range(3):
            worst = max(worst, diff(out[b, 0], refs[b][starts[b]]))
        starts = [s + 1 for s in starts]
    assert starts == total
    print(f"{arch}: worst abs diff cached vs full {worst:.2e}")
    assert worst <= TOL, worst


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_equal_length_batch_prefill_and_decode(arch: str) -> None:
    """Three prompts of equal length in one batched prefill, then decoded together (every key visible)."""
    model = tiny_lm(arch, seed=3)
    g = torch.Generator().manual_seed(3)
    full = torch.randint(0, VOCAB, (3, 14), generator=g)
    with torch.inference_mode():
        ref = model(full)  # (3, 14, V)
    tables = [[8, 2, 5, 10], [0, 7, 1, 11], [4, 6, 3, 9]]
    cache = new_cache(model, num_blocks=12)
    out = step(model, cache, tables, [0, 0, 0], full[:, :10].tolist())
    worst = diff(out, ref[:, :10])
    for t in range(10, 14):
        out = step(model, cache, tables, [t, t, t], full[:, t : t + 1].tolist())  # (3, 1, V)
        worst = max(worst, diff(out[:, 0], ref[:, t]))
    assert worst <= TOL, worst


def test_output_modes_return_the_positions_asked_for() -> None:
    """One forward's outputs: every position's logits, each row's last, the given position of each row, and the
    hidden states the head turns into the same logits; a cache without its step (or a step without its cache), and
    an index where the mode takes none (or none where it takes one), are refused."""
    model = tiny_lm("llama", seed=6)
    tokens = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(6))
    index = torch.tensor([6, 0, 3])
    with torch.inference_mode():
        logits = model(tokens)  # (3, 7, V)
        assert torch.equal(model(tokens, output=Output.LOGITS), logits)
        assert diff(model(tokens, output=Output.LAST), logits[:, -1]) <= TOL  # (3, V)
        assert diff(model(tokens, output=Output.at(index)), logits[torch.arange(3), index]) <= TOL  # (3, V)
        hidden = model(tokens, output=Output.HIDDEN)
        assert hidden.shape == (3, 7, model.cfg.d_model)
        assert diff(model.project(hidden), logits) <= TOL
        cache = new_cache(model, num_blocks=8)
        prepared = cache.prepare([[0, 1], [2, 3], [4, 5]], [0, 0, 0], 7)
        with pytest.raises(ValueError, match="step"):
            model(tokens, cache)
        with pytest.raises(ValueError, match="step"):
            model(tokens, step=prepared)
    with pytest.raises(ValueError, match="index"):
        Output("at")
    with pytest.raises(ValueError, match="index"):
        Output("last", index)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_greedy_equals_recomputing_argmax(arch: str) -> None:
    """The reference generate() (prefill + cached decode) picks the argmax of a full forward each step."""
    model = tiny_lm(arch, seed=4)
    prompt = [5, 17, 200, 42, 9]
    got = [s.token_id for s in generate(model, prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))]
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(full_logits(model, seq)[-1].argmax()))
    assert got == seq[len(prompt) :]


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_heads(n_kv_heads: int) -> None:
    gqa = tiny_lm("llama", n_heads=4, n_kv_heads=n_kv_heads, seed=5)
    mha = tiny_lm("llama", n_heads=4, n_kv_heads=4, seed=5)
    group, hd, q_rows = 4 // n_kv_heads, gqa.cfg.hd, 4 * gqa.cfg.hd
    sd = gqa.state_dict()
    for i in range(gqa.cfg.n_layers):
        w = sd[f"blocks.{i}.attn.qkv.weight"]
        k, v = w[q_rows : q_rows + n_kv_heads * hd], w[q_rows + n_kv_heads * hd :]

        def repeat(x: torch.Tensor) -> torch.Tensor:
            return x.view(n_kv_heads, 1, hd, -1).expand(n_kv_heads, group, hd, x.shape[-1]).reshape(4 * hd, -1)

        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([w[:q_rows], repeat(k), repeat(v)])
    sd.pop("lm_head.weight")
    mha.load_state_dict(sd, strict=False)
    mha.lm_head.weight = mha.embed.weight
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        assert diff(gqa(tokens), mha(tokens)) <= TOL
    # the cache holds only the KV heads: K and V of n_kv_heads per layer and token
    assert PagedKVCache.bytes_per_token(2, n_kv_heads, hd, torch.float32) == 2 * 2 * n_kv_heads * hd * 4


def test_head_counts_must_divide() -> None:
    with pytest.raises(ValueError, match="multiple"):
        LMConfig("llama", VOCAB, d_model=64, n_layers=1, n_heads=4, n_kv_heads=3, d_ff=128, max_seq_len=16)
    with pytest.raises(ValueError, match="mamba"):
        models.family("mamba")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_positions_beyond_context_raise(arch: str) -> None:
    model = tiny_lm(arch, max_seq_len=16)
    with torch.inference_mode():
        assert model(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 16, VOCAB)  # exactly full: fine
        with pytest.raises(ValueError, match="17 tokens exceed the context length 16"):
            model(torch.zeros(1, 17, dtype=torch.long))
    c = model.cfg
    cache = PagedKVCache(c.n_layers, 8, BLOCK, c.n_kv_heads, c.hd, max_positions=c.max_seq_len)
    cache.prepare([[0, 1, 2, 3]], [15], 1)  # the last position: fine
    with pytest.raises(AssertionError, match="position 16 exceeds the context length 16"):
        cache.prepare([[0, 1, 2, 3, 4]], [16], 1)
    with pytest.raises(AssertionError, match="position 17 exceeds the context length 16"):
        cache.prepare([[0, 1, 2, 3, 4], [5, 6]], [3, 14], 4)
    with pytest.raises(ValueError, match="context length"):
        next(generate(model, list(range(16)), SamplingParams(max_tokens=1, temperature=0.0)))
    # generation stops at the context length
    out = list(generate(model, list(range(12)), SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)))
    assert len(out) == 4 and out[-1].finish_reason == "length"


def test_block_table_too_short_raises() -> None:
    model = tiny_lm("llama")
    cache = new_cache(model, num_blocks=4)
    with pytest.raises(ValueError, match="covers 8 tokens, needs 9"):
        cache.prepare([[3, 1]], [6], 3)
