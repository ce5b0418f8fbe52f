"""Our attention equals PyTorch's: F.scaled_dot_product_attention and nn.MultiheadAttention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from model_core.attention import MultiHeadAttention, scaled_dot_product_attention

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def lower_right_causal(Tq: int, Tk: int) -> torch.Tensor:
    """(Tq, Tk) bool, True = attend: query i is the (Tk - Tq + i)-th key position."""
    i = torch.arange(Tq).unsqueeze(1)  # (Tq, 1)
    j = torch.arange(Tk).unsqueeze(0)  # (1, Tk)
    return j <= i + (Tk - Tq)


def reference_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """F.scaled_dot_product_attention with grouped kv heads expanded by repeat_interleave."""
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)  # (B, nh, Tk, hs)
    v = v.repeat_interleave(g, dim=1)  # (B, nh, Tk, hs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)  # type: ignore[arg-type]


def random_bool_mask(B: int, Tq: int, Tk: int, gen: torch.Generator) -> torch.Tensor:
    """(B, 1, Tq, Tk) bool with at least one key per query row (no fully masked rows)."""
    m = torch.rand(B, 1, Tq, Tk, generator=gen) > 0.4
    keep = torch.randint(0, Tk, (B, 1, Tq, 1), generator=gen)
    return m.scatter(-1, keep, True)


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3),
    nkv=st.integers(1, 3),
    group=st.integers(1, 3),
    Tq=st.integers(1, 7),
    Tk=st.integers(1, 7),
    hs=st.sampled_from([4, 8, 16]),
    mask_kind=st.sampled_from(["none", "bool", "additive", "causal", "causal+bool"]),
    custom_scale=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sdpa_matches_torch(
    B: int, nkv: int, group: int, Tq: int, Tk: int, hs: int, mask_kind: str, custom_scale: bool, seed: int
) -> None:
    if mask_kind.startswith("causal") and Tk < Tq:
        Tk = Tq  # with fewer keys than queries the first rows would see nothing
    gen = torch.Generator().manual_seed(seed)
    nh = nkv * group
    q = torch.randn(B, nh, Tq, hs, generator=gen)
    k = torch.randn(B, nkv, Tk, hs, generator=gen)
    v = torch.randn(B, nkv, Tk, hs, generator=gen)
    scale = 0.37 if custom_scale else None
    if mask_kind == "none":
        ours = scaled_dot_product_attention(q, k, v, scale=scale)
        ref = reference_sdpa(q, k, v, scale=scale)
    elif mask_kind == "bool":
        mask = random_bool_mask(B, Tq, Tk, gen)
        ours = scaled_dot_product_attention(q, k, v, mask=mask, scale=scale)
        ref = reference_sdpa(q, k, v, attn_mask=mask, scale=scale)
    elif mask_kind == "additive":
        mask = torch.randn(B, nh, Tq, Tk, generator=gen)
        ours = scaled_dot_product_attention(q, k, v, mask=mask, scale=scale)
        ref = reference_sdpa(q, k, v, attn_mask=mask, scale=scale)
    elif mask_kind == "causal":
        ours = scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        ref = reference_sdpa(q, k, v, attn_mask=lower_right_causal(Tq, Tk), scale=scale)
        if Tq == Tk:  # torch's own is_causal (top-left aligned) agrees when square
            torch.testing.assert_close(ours, reference_sdpa(q, k, v, is_causal=True, scale=scale), atol=TOL, rtol=0)
    else:
        mask = random_bool_mask(B, Tq, Tk, gen)
        mask[..., 0] = True  # key 0 is visible to every query under the causal rule (Tk >= Tq)
        ours = scaled_dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=scale)
        ref = reference_sdpa(q, k, v, attn_mask=mask & lower_right_causal(Tq, Tk), scale=scale)
    assert ours.shape == (B, nh, Tq, hs)
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)


def test_sdpa_causal_lower_right_matches_torch_bias() -> None:
    """Tq != Tk: queries are the last Tq positions, like torch's causal_lower_right bias."""
    bias = pytest.importorskip("torch.nn.attention.bias")
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.causal_lower_right(3, 9))
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, is_causal=True), ref, atol=TOL, rtol=0)
    # one query at the end attends to every key: decoding one token with a KV cache
    full = scaled_dot_product_attention(q[:, :, -1:], k, v, is_causal=True)
    torch.testing.assert_close(full, F.scaled_dot_product_attention(q[:, :, -1:], k, v), atol=TOL, rtol=0)


def test_sdpa_rejects_bad_grouping() -> None:
    with pytest.raises(ValueError):
        kv = torch.randn(1, 2, 2, 4)
        scaled_dot_product_attention(torch.randn(1, 3, 2, 4), kv, kv)


def copy_from_torch_mha(ours: MultiHeadAttention, ref: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        ours.qkv.weight.copy_(ref.in_proj_weight)
        ours.qkv.bias.copy_(ref.in_proj_bias)
        ours.out.weight.copy_(ref.out_proj.weight)
        ours.out.bias.copy_(ref.out_proj.bias)


@pytest.mark.parametrize("causal", [False, True])
def test_mha_self_attention_matches_torch(causal: bool) -> None:
    torch.manual_seed(1)
    B, T, C, nh = 3, 6, 32, 4
    ref = nn.MultiheadAttention(C, nh, batch_first=True).eval()
    ours = MultiHeadAttention(C, nh).eval()
    copy_from_torch_mha(ours, ref)
    x = torch.randn(B, T, C)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 4:] = True
    pad[2, 5:] = True
    keep = ~pad[:, None, None, :]  # (B, 1, 1, T), True = attend
    torch_mask = torch.ones(T, T, dtype=torch.bool).triu(1) if causal else None  # True = blocked
    expected, _ = ref(x, x, x, key_padding_mask=pad, attn_mask=torch_mask, need_weights=False)
    got = ours(x, mask=keep, is_causal=causal)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_mha_cross_attention_matches_torch() -> None:
    torch.manual_seed(2)
    B, T, S, C, nh = 2, 5, 7, 24, 3
    ref = nn.MultiheadAttention(C, nh, batch_first=True).eval()
    ours = MultiHeadAttention(C, nh).eval()
    copy_from_torch_mha(ours, ref)
    x, memory = torch.randn(B, T, C), torch.randn(B, S, C)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, 3:] = True
    expected, _ = ref(x, memory, memory, key_padding_mask=pad, need_weights=False)
    got = ours(x, memory=memory, mask=~pad[:, None, None, :])
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def expand_gqa(gqa: MultiHeadAttention) -> MultiHeadAttention:
    """An ordinary MHA whose K/V projections repeat each shared kv head for its query heads."""
    C = gqa.out.out_features
    g = gqa.n_heads // gqa.n_kv_heads
    full = MultiHeadAttention(C, gqa.n_heads, head_dim=gqa.head_dim)
    w, b = gqa.qkv.weight, gqa.qkv.bias
    qw, kw, vw = w.split([gqa.q_size, gqa.kv_size, gqa.kv_size])
    qb, kb, vb = b.split([gqa.q_size, gqa.kv_size, gqa.kv_size])

    def rep(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(gqa.n_kv_heads, gqa.head_dim, *t.shape[1:])  # (nkv, hs, ...)
        return t.repeat_interleave(g, dim=0).reshape(gqa.q_size, *t.shape[2:])  # (nh*hs, ...)

    with torch.no_grad():
        full.qkv.weight.copy_(torch.cat([qw, rep(kw), rep(vw)]))
        full.qkv.bias.copy_(torch.cat([qb, rep(kb), rep(vb)]))
        full.out.load_state_dict(gqa.out.state_dict())
    return full


@pytest.mark.parametrize("cross", [False, True])
def test_gqa_mha_equals_repeated_kv_heads(cross: bool) -> None:
    torch.manual_seed(3)
    B, T, S, C = 2, 5, 6, 48
    gqa = MultiHeadAttention(C, n_heads=6, n_kv_heads=2).eval()
    assert gqa.qkv.out_features == C + 2 * 2 * (C // 6)
    full = expand_gqa(gqa).eval()
    x = torch.randn(B, T, C)
    memory = torch.randn(B, S, C) if cross else None
    Tk = S if cross else T
    keep = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
    keep[1, ..., 3:] = False
    got = gqa(x, memory=memory, mask=keep, is_causal=not cross)
    expected = full(x, memory=memory, mask=keep, is_causal=not cross)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    # and the expanded module is exactly torch's MHA
    ref = nn.MultiheadAttention(C, 6, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(full.qkv.weight)
        ref.in_proj_bias.copy_(full.qkv.bias)
        ref.out_proj.load_state_dict(full.out.state_dict())
    kv = x if memory is None else memory
    torch_mask = None if cross else torch.ones(T, T, dtype=torch.bool).triu(1)
    expected_torch, _ = ref(x, kv, kv, key_padding_mask=~keep[:, 0, 0], attn_mask=torch_mask, need_weights=False)
    torch.testing.assert_close(got, expected_torch, atol=TOL, rtol=0)
