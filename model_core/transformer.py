"""Transformer building blocks: feed-forward networks, norms, encoder and decoder layers and stacks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_core.attention import KVStore, MultiHeadAttention
from model_core.norms import make_norm

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "geglu_tanh")


class FeedForward(nn.Module):
    """Position-wise FFN. Gated kinds (swiglu, geglu, geglu_tanh: Gemma's) hold gate and up projections fused in `w_in`
    as [gate rows | up rows]: act(x W_g) * (x W_u), then `w_out`."""

    def __init__(
        self, d_model: int, d_ff: int, activation: str = "relu", bias: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        self.activation = activation
        self.gated = activation in ("swiglu", "geglu", "geglu_tanh")
        self.d_ff = d_ff
        self.w_in = nn.Linear(d_model, 2 * d_ff if self.gated else d_ff, bias=bias)
        self.w_out = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        a = self.activation
        if a == "relu":
            return F.relu(h)
        if a in ("gelu", "geglu"):
            return F.gelu(h)
        if a in ("gelu_tanh", "geglu_tanh"):
            return F.gelu(h, approximate="tanh")
        return F.silu(h)  # silu, swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)  # (B, T, d_ff) or (B, T, 2*d_ff)
        if self.gated:
            gate, up = h.split(self.d_ff, dim=-1)
            h = self._act(gate) * up
        else:
            h = self._act(h)
        return self.w_out(self.dropout(h))


def _layer_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """make_norm, with LayerNorm's bias dropped when the layer has no biases (like torch's bias=False)."""
    return nn.LayerNorm(dim, eps=eps, bias=bias) if kind == "layernorm" else make_norm(kind, dim, eps)


def merge_masks(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Fold a key padding mask into an attention mask for `scaled_dot_product_attention`.

    attn_mask: bool (True = attend) or additive float, broadcastable to (B, nh, Tq, Tk).
    key_padding_mask: (B, Tk) bool, True = padding (torch's convention).
    Returns bool (True = attend) or additive float, broadcastable to (B, nh, Tq, Tk), or None.
    """
    if key_padding_mask is None:
        return attn_mask
    keep = ~key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk)
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return torch.where(keep, attn_mask, float("-inf"))


class EncoderLayer(nn.Module):
    """Self-attention then FFN, each in a residual branch; post-norm (2017) or pre-norm."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        activation: str = "relu",
        norm_first: bool = False,
        norm: str = "layernorm",
        eps: float = 1e-5,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, bias=bias, dropout=dropout)
        self.ff = FeedForward(d_model, d_ff, activation, bias=bias, dropout=dropout)
        self.norm1 = _layer_norm(norm, d_model, eps, bias)
        self.norm2 = _layer_norm(norm, d_model, eps, bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, S, C); src_key_padding_mask: (B, S) True = pad; attn_mask as in `merge_masks`."""
        mask = merge_masks(attn_mask, src_key_padding_mask)
        if self.norm_first:
            x = x + self.dropout1(self.self_attn(self.norm1(x), mask=mask))
            x = x + self.dropout2(self.ff(self.norm2(x)))
        else:
            x = self.norm1(x + self.dropout1(self.self_attn(x, mask=mask)))
            x = self.norm2(x + self.dropout2(self.ff(x)))
        return x


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder memory, FFN; post- or pre-norm."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        activation: str = "relu",
        norm_first: bool = False,
        norm: str = "layernorm",
        eps: float = 1e-5,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, bias=bias, dropout=dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, bias=bias, dropout=dropout)
        self.ff = FeedForward(d_model, d_ff, activation, bias=bias, dropout=dropout)
        self.norm1 = _layer_norm(norm, d_model, eps, bias)
        self.norm2 = _layer_norm(norm, d_model, eps, bias)
        self.norm3 = _layer_norm(norm, d_model, eps, bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        causal: bool = True,
        self_attn_mask: torch.Tensor | None = None,
        cross_attn_mask: torch.Tensor | None = None,
        cache: KVStore | None = None,
        layer: int = 0,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) targets; memory: (B, S, C).

        tgt_key_padding_mask: (B, Tk) True = pad, Tk counting cached keys; memory_key_padding_mask: (B, S).
        causal: query i sees keys j <= i + (Tk - T), so it also holds for the last T positions of a cache.
        cache: stores this layer's self-attention K/V under index `layer` (incremental decoding).
        memory_kv: this layer's cross-attention K/V from `cross_attn.project_memory(memory)`, if precomputed.
        """
        sa_mask = merge_masks(self_attn_mask, tgt_key_padding_mask)
        ca_mask = merge_masks(cross_attn_mask, memory_key_padding_mask)

        def sa(h: torch.Tensor) -> torch.Tensor:
            return self.dropout1(self.self_attn(h, mask=sa_mask, is_causal=causal, cache=cache, layer=layer))

        def ca(h: torch.Tensor) -> torch.Tensor:
            return self.dropout2(self.cross_attn(h, memory=memory, mask=ca_mask, memory_kv=memory_kv))

        if self.norm_first:
            x = x + sa(self.norm1(x))
            x = x + ca(self.norm2(x))
            x = x + self.dropout3(self.ff(self.norm3(x)))
        else:
            x = self.norm1(x + sa(x))
            x = self.norm2(x + ca(x))
            x = self.norm3(x + self.dropout3(self.ff(x)))
        return x


class Encoder(nn.Module):
    """A stack of `EncoderLayer`s with an optional final norm (needed after pre-norm layers)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        activation: str = "relu",
        norm_first: bool = False,
        norm: str = "layernorm",
        eps: float = 1e-5,
        bias: bool = True,
        n_layers: int = 6,
        final_norm: bool = True,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, n_heads, d_ff, dropout, activation, norm_first, norm, eps, bias)
            for _ in range(n_layers)
        )
        self.norm = _layer_norm(norm, d_model, eps, bias) if final_norm else None

    def forward(
        self, x: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, S, C) embedded source -> memory (B, S, C)."""
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=src_key_padding_mask, attn_mask=attn_mask)
        return x if self.norm is None else self.norm(x)


class Decoder(nn.Module):
    """A stack of `DecoderLayer`s with an optional final norm; layer i uses cache index i."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        activation: str = "relu",
        norm_first: bool = False,
        norm: str = "layernorm",
        eps: float = 1e-5,
        bias: bool = True,
        n_layers: int = 6,
        final_norm: bool = True,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, n_heads, d_ff, dropout, activation, norm_first, norm, eps, bias)
            for _ in range(n_layers)
        )
        self.norm = _layer_norm(norm, d_model, eps, bias) if final_norm else None

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        causal: bool = True,
        self_attn_mask: torch.Tensor | None = None,
        cross_attn_mask: torch.Tensor | None = None,
        cache: KVStore | None = None,
        memory_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) embedded targets; memory: (B, S, C) -> (B, T, C). Masks as in `DecoderLayer`.
        memory_kv: every layer's cross-attention K/V from `project_memory` (then memory is unused)."""
        for i, layer in enumerate(self.layers):
            x = layer(
                x,
                memory,
                tgt_key_padding_mask,
                memory_key_padding_mask,
                causal,
                self_attn_mask,
                cross_attn_mask,
                cache,
                i,
                None if memory_kv is None else memory_kv[i],
            )
        return x if self.norm is None else self.norm(x)

    def project_memory(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """memory: (B, S, C) -> per layer the cross-attention (k, v), each (B, nh, S, hs), to compute once."""
        layers: list[DecoderLayer] = list(self.layers)  # type: ignore[arg-type]
        return [layer.cross_attn.project_memory(memory) for layer in layers]
