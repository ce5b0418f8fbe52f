"""Positional encodings: sinusoidal (Vaswani et al. 2017), learned, and rotary (RoPE).

RoPE here uses the "half split" form (rotate the first half of each head against the second half),
the layout Hugging Face llama checkpoints use; GGUF files store Q/K rows permuted for the
interleaved form and the GGUF loader undoes that permutation.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_table(max_len: int, d_model: int) -> torch.Tensor:
    """(max_len, d_model): PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)  # (L, 1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: d_model // 2])
    return pe


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal table to token embeddings (optionally after dropout)."""

    def __init__(self, d_model: int, max_len: int = 4096, dropout: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("pe", sinusoidal_table(max_len, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C); positions: (B, T) or None for 0..T-1."""
        table: torch.Tensor = self.pe  # type: ignore[assignment]
        pe = table[: x.shape[1]] if positions is None else table[positions]  # (T, C) or (B, T, C)
        return self.dropout(x + pe.to(x.dtype))


class LearnedPositionalEmbedding(nn.Module):
    """A trained table of position vectors (GPT-2's wpe)."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_len, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions: (B, T) -> (B, T, C)."""
        return self.weight[positions]


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE; `forward(positions)` returns the (cos, sin) pair attention takes."""

    def __init__(
        self,
        head_dim: int,
        max_len: int = 8192,
        theta: float = 10000.0,
        freq_factors: tuple[float, ...] = (),
        linear: float = 1.0,
    ) -> None:
        """freq_factors: per frequency (hs/2 of them), a divisor of that frequency (Llama 3's rope scaling, GGUF's
        rope_freqs); linear: positions are divided by this (linear rope scaling)."""
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # (hs/2,)
        if freq_factors:
            if len(freq_factors) != head_dim // 2:
                raise ValueError(f"{len(freq_factors)} rope frequency factors for a head size of {head_dim}")
            inv_freq = inv_freq / torch.tensor(freq_factors, dtype=torch.float64)
        t = torch.arange(max_len, dtype=torch.float64) / linear
        freqs = torch.outer(t, inv_freq)  # (L, hs/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (L, hs)
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (B, T) -> cos, sin each (B, T, hs)."""
        cos: torch.Tensor = self.cos  # type: ignore[assignment]
        sin: torch.Tensor = self.sin  # type: ignore[assignment]
        return cos[positions].to(dtype), sin[positions].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x: (B, nh, T, hs); cos, sin: (B, T, hs) -> rotated x, same shape."""
    cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)  # (B, 1, T, hs)
    return x * cos + rotate_half(x) * sin


def apply_rotary_bthd(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x: (B, T, H, hs) (heads after time, as they come out of a fused projection); cos, sin: (B, T, hs)."""
    cos, sin = rope[0].unsqueeze(2), rope[1].unsqueeze(2)  # (B, T, 1, hs)
    return x * cos + rotate_half(x) * sin
