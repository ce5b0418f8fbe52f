"""The paged KV cache: padded multi-sequence prefill and mixed-length decode equal full forwards."""

from __future__ import annotations

import pytest
import torch

from model_core.kv_cache import PagedKVCache
from model_core.lm import CausalLM, LMConfig, Output


@pytest.fixture(scope="module")
def model() -> CausalLM:
    torch.manual_seed(0)
    cfg = LMConfig("llama", 97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    return CausalLM(cfg).eval()


def _cache(m: CausalLM, num_blocks: int = 16, block_size: int = 4) -> PagedKVCache:
    c = m.cfg
    return PagedKVCache(c.n_layers, num_blocks, block_size, c.n_kv_heads, c.hd, max_positions=c.max_seq_len)


@torch.inference_mode()
def test_padded_prefill_then_mixed_decode_equals_full_forward(model: CausalLM) -> None:
    g = torch.Generator().manual_seed(1)
    lens = [3, 9, 6]
    seqs = [torch.randint(0, 97, (n + 4,), generator=g) for n in lens]
    tables = [[7, 2, 12, 4], [0, 9, 1, 15], [3, 5, 11, 6]]  # shuffled, disjoint blocks
    cache = _cache(model)
    T = max(lens)
    tokens = torch.stack([torch.cat([s[:n], torch.zeros(T - n, dtype=torch.long)]) for s, n in zip(seqs, lens)])
    step = cache.prepare(tables, [0, 0, 0], lens)
    got = model(tokens, cache, step, Output.at(torch.tensor([n - 1 for n in lens])))  # (3, V)
    for b, (s, n) in enumerate(zip(seqs, lens)):
        ref = model(s[:n].unsqueeze(0))[0, -1]
        assert torch.allclose(got[b], ref, atol=1e-5)
    # then decode 4 tokens for all three rows at once (different lengths -> masked attention)
    for i in range(4):
        tok = torch.stack([s[n + i] for s, n in zip(seqs, lens)]).unsqueeze(1)  # (3, 1)
        step = cache.prepare(tables, [n + i for n in lens], 1)
        got = model(tok, cache, step, Output.LAST)
        for b, (s, n) in enumerate(zip(seqs, lens)):
            ref = model(s[: n + i + 1].unsqueeze(0))[0, -1]
            assert torch.allclose(got[b], ref, atol=1e-5)


@torch.inference_mode()
def test_padding_writes_only_the_scratch_row(model: CausalLM) -> None:
    cache = _cache(model)
    before = cache.kv.clone()
    step = cache.prepare([[1, 2], [3]], [0, 0], [5, 2])
    model(torch.randint(0, 97, (2, 5)), cache, step, Output.at(torch.tensor([4, 1])))
    changed = (cache.kv != before).any(dim=(0, 2, 3)).nonzero().flatten().tolist()  # rows written
    bs = cache.block_size
    expected = [1 * bs + i for i in range(4)] + [2 * bs] + [3 * bs, 3 * bs + 1] + [cache.scratch_row]
    assert sorted(changed) == sorted(expected)


def test_positions_past_the_context_are_rejected(model: CausalLM) -> None:
    cache = _cache(model, num_blocks=20)  # (a request's room was checked where it arrived: an assertion here)
    with pytest.raises(AssertionError, match="context length"):
        cache.prepare([list(range(17))], [63], 2)
