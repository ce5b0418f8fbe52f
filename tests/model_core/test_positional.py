"""Positional encodings: sinusoidal table values, RoPE's relative-position property and layout."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_core.positional import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    apply_rotary,
    sinusoidal_table,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sinusoidal_table_known_values() -> None:
    d = 16
    pe = sinusoidal_table(50, d)
    assert pe.shape == (50, d)
    torch.testing.assert_close(pe[0, 0::2], torch.zeros(d // 2))  # sin(0)
    torch.testing.assert_close(pe[0, 1::2], torch.ones(d // 2))  # cos(0)
    assert math.isclose(pe[1, 0].item(), math.sin(1.0), abs_tol=1e-6)
    assert math.isclose(pe[1, 1].item(), math.cos(1.0), abs_tol=1e-6)
    for p, i in [(7, 1), (13, 3), (49, 7), (25, 5)]:
        angle = p / 10000 ** (2 * i / d)
        assert math.isclose(pe[p, 2 * i].item(), math.sin(angle), abs_tol=1e-5)
        assert math.isclose(pe[p, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-5)


def test_sinusoidal_odd_width_and_module() -> None:
    pe = sinusoidal_table(10, 7)
    assert pe.shape == (10, 7)
    assert math.isclose(pe[3, 6].item(), math.sin(3 / 10000 ** (6 / 7)), abs_tol=1e-6)
    assert math.isclose(pe[3, 5].item(), math.cos(3 / 10000 ** (4 / 7)), abs_tol=1e-6)
    enc = SinusoidalPositionalEncoding(8, max_len=32)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(enc(x), x + sinusoidal_table(32, 8)[:5])
    positions = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 3, 4]])
    torch.testing.assert_close(enc(x, positions), x + sinusoidal_table(32, 8)[positions])


def test_learned_positional_embedding_gathers_rows() -> None:
    emb = LearnedPositionalEmbedding(12, 6)
    positions = torch.tensor([[0, 5, 11]])
    torch.testing.assert_close(emb(positions), emb.weight[[0, 5, 11]].unsqueeze(0))


def rope_complex_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Half-split RoPE as complex rotation: (x_i + i x_{i+hs/2}) * exp(i p theta^(-2i/hs))."""
    hs = x.shape[-1]
    inv = theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)  # (hs/2,)
    ang = positions.to(torch.float64)[..., None] * inv  # (B, T, hs/2)
    z = torch.complex(x[..., : hs // 2].double(), x[..., hs // 2 :].double())  # (B, nh, T, hs/2)
    z = z * torch.polar(torch.ones_like(ang), ang).unsqueeze(1)
    return torch.cat([z.real, z.imag], dim=-1).float()


def test_rope_matches_complex_rotation() -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, max_len=64, theta=500.0)
    positions = torch.tensor([[0, 1, 2, 40], [63, 5, 9, 17]])
    x = torch.randn(2, 3, 4, 16)
    torch.testing.assert_close(
        apply_rotary(x, rope(positions)), rope_complex_reference(x, positions, 500.0), atol=1e-5, rtol=0
    )
    # position 0 is the identity
    torch.testing.assert_close(apply_rotary(x[:, :, :1], rope(positions[:1, :1])), x[:, :, :1])


@settings(max_examples=50, deadline=None)
@given(
    m=st.integers(0, 200),
    n=st.integers(0, 200),
    shift=st.integers(0, 300),
    hs=st.sampled_from([2, 8, 32, 64]),
    seed=st.integers(0, 2**16),
)
def test_rope_dot_product_depends_only_on_relative_position(m: int, n: int, shift: int, hs: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rope = RotaryEmbedding(hs, max_len=512)
    q = torch.randn(1, 1, 1, hs, generator=gen, dtype=torch.float32)
    k = torch.randn(1, 1, 1, hs, generator=gen, dtype=torch.float32)

    def score(pq: int, pk: int) -> float:
        rq = apply_rotary(q, rope(torch.tensor([[pq]])))
        rk = apply_rotary(k, rope(torch.tensor([[pk]])))
        return float((rq * rk).sum())

    base = score(m, n)
    assert math.isclose(base, score(m + shift, n + shift), rel_tol=1e-4, abs_tol=1e-4)
    # rotation preserves norms
    rq = apply_rotary(q, rope(torch.tensor([[m + shift]])))
    assert math.isclose(float(rq.norm()), float(q.norm()), rel_tol=1e-5)
