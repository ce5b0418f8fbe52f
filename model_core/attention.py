"""Scaled dot-product attention and one MultiHeadAttention for encoder, decoder and LM.

`MultiHeadAttention` serves self-attention (optionally causal), cross-attention and grouped-query
attention (n_kv_heads < n_heads). Its Q, K and V projections are one fused matrix laid out as
[q rows | k rows | v rows] (the layout of `torch.nn.MultiheadAttention.in_proj_weight`): self-attention
runs one matmul for all three, cross-attention splits it into a Q matmul on the queries and a
fused K/V matmul on the memory. Rotary embeddings, a KV cache (`KVStore`) and the forward's attention
metadata (model_core.step_attention) are passed in, never hidden.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from model_core.norms import RMSNorm
from model_core.positional import apply_rotary_bthd
from model_core.step_attention import StepAttention


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, with grouped-query heads; with softcap, each score s becomes
    softcap * tanh(s / softcap) before the mask (Gemma 2's logit soft-capping).

    q: (B, nh, Tq, hs); k, v: (B, nkv, Tk, hs) with nh a multiple of nkv.
    mask: boolean (True = attend) or additive float, broadcastable to (B, nh, Tq, Tk).
    is_causal: query i sees keys j <= i + (Tk - Tq) (queries are the last Tq positions).
    Returns (B, nh, Tq, hs).
    """
    B, nh, Tq, hs = q.shape
    nkv, Tk = k.shape[1], k.shape[2]
    if nh % nkv:
        raise ValueError(f"n_heads ({nh}) must be a multiple of n_kv_heads ({nkv})")
    g = nh // nkv
    scale = 1.0 / math.sqrt(hs) if scale is None else scale
    qg = q.reshape(B, nkv, g * Tq, hs)  # (B, nkv, g*Tq, hs): the g query heads sharing one kv head
    att = torch.matmul(qg, k.transpose(-2, -1)) * scale  # (B, nkv, g*Tq, Tk)
    att = att.view(B, nh, Tq, Tk)  # (B, nh, Tq, Tk)
    if softcap is not None:
        att = torch.tanh(att / softcap) * softcap
    if is_causal:
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        att = att.masked_fill(~causal, float("-inf"))
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else att + mask
    att = torch.softmax(att.float(), dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    out = torch.matmul(att.view(B, nkv, g * Tq, Tk), v)  # (B, nkv, g*Tq, hs)
    return out.view(B, nh, Tq, hs)


class KVStore(ABC):
    """What attention calls on a KV cache (model_core.kv_cache.PagedKVCache, model_core.seq2seq.DecoderCache):
    store this forward's keys and values and read back all those to attend to (`update`), or, for a step that
    attends in place (`StepAttention.in_place`: only a cache that does prepares such steps), attend from the
    stored ones directly (`attend`)."""

    @abstractmethod
    def update(self, layer: int, kv: torch.Tensor, step: StepAttention | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store kv (B, T, 2*nkv, hs) = [K heads | V heads] of this forward's tokens for `layer` and return all
        keys and values to attend to, each (B, nkv, Tk, hs). step: the forward's, where the cache prepared one."""

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        kv: torch.Tensor,
        step: StepAttention,
        scale: float | None = None,
        softcap: float | None = None,
        window: int = 0,
    ) -> torch.Tensor:
        """For a step in place: store kv (B, T, 2*nkv, hs) and return the attention of q (B, T, nh, hs) over each
        token's keys, (B, T, nh, hs)."""
        raise ValueError(f"a {type(self).__name__} prepares no steps that attend in place")


class MultiHeadAttention(nn.Module):
    """Multi-head attention with optional grouped-query heads, RoPE and KV cache.

    scale: of the scores (default 1/sqrt(head_dim)); softcap: scores s -> softcap * tanh(s / softcap);
    qk_norm_eps: an RMSNorm over each query and key head (before RoPE; Qwen 3, Gemma 3), with this epsilon;
    window: this layer attends to the last `window` positions only (0: all), where a cache attends in place
    (other paths take the window as part of their mask).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        out_bias: bool | None = None,
        dropout: float = 0.0,
        scale: float | None = None,
        softcap: float | None = None,
        qk_norm_eps: float | None = None,
        window: int = 0,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads
        if n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        self.q_size = n_heads * self.head_dim
        self.kv_size = self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(d_model, self.q_size + 2 * self.kv_size, bias=bias)
        self.out = nn.Linear(self.q_size, d_model, bias=bias if out_bias is None else out_bias)
        self.dropout = dropout
        self.scale, self.softcap, self.window = scale, softcap, window
        self.q_norm = RMSNorm(self.head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(self.head_dim, qk_norm_eps) if qk_norm_eps is not None else None

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory: (B, S, C) -> cross-attention keys and values, each (B, nkv, S, hs)."""
        B, S, _ = memory.shape
        w, b = self.qkv.weight, self.qkv.bias
        kv = F.linear(memory, w[self.q_size :], None if b is None else b[self.q_size :])  # (B, S, 2*nkv*hs)
        kv = kv.view(B, S, 2 * self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, 2*nkv, S, hs)
        return kv[:, : self.n_kv_heads], kv[:, self.n_kv_heads :]

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVStore | None = None,
        layer: int = 0,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        step: StepAttention | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) queries; memory: (B, S, C) for cross-attention (None = self-attention).

        rope: (cos, sin) each (B, T, hs) for the query positions (self-attention only).
        cache: stores this step's K/V for `layer` and returns everything to attend to.
        memory_kv: cross-attention's keys and values from `project_memory`, computed once per source
        and reused every decoding step (memory is then not needed).
        step: the forward's attention metadata where the cache prepared it (model_core.kv_cache.PagedKVCache);
        a step `in_place` is attended by the cache's kernel, straight from its storage.
        """
        B, T, _ = x.shape
        nh, nkv, hs = self.n_heads, self.n_kv_heads, self.head_dim
        if memory is None and memory_kv is None:
            qkv = self.qkv(x).view(B, T, nh + 2 * nkv, hs)  # (B, T, nh + 2*nkv, hs): [q heads | k heads | v heads]
            if self.q_norm is not None and self.k_norm is not None:
                qkv = torch.cat(
                    [self.q_norm(qkv[:, :, :nh]), self.k_norm(qkv[:, :, nh : nh + nkv]), qkv[:, :, nh + nkv :]], 2
                )
            if rope is not None:  # rotate q and k heads together, v untouched
                qkv = torch.cat([apply_rotary_bthd(qkv[:, :, : nh + nkv], rope), qkv[:, :, nh + nkv :]], dim=2)
            if step is not None and step.in_place:  # read straight from a paged cache, one query row a token
                assert cache is not None, "a step is attended on the cache that prepared it"
                y = cache.attend(
                    layer, qkv[:, :, :nh], qkv[:, :, nh:], step, self.scale, self.softcap, self.window
                )  # (B, T, nh, hs)
                return self.out(y.reshape(B, T, self.q_size))
            q = qkv[:, :, :nh].transpose(1, 2)  # (B, nh, T, hs)
            if cache is not None:
                k, v = cache.update(layer, qkv[:, :, nh:], step)  # (B, nkv, Tk, hs) each
            else:
                k = qkv[:, :, nh : nh + nkv].transpose(1, 2)  # (B, nkv, T, hs)
                v = qkv[:, :, nh + nkv :].transpose(1, 2)  # (B, nkv, T, hs)
        else:
            if rope is not None:
                raise ValueError("rotary embeddings apply to self-attention only")
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[: self.q_size], None if b is None else b[: self.q_size])
            q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
            if memory_kv is None:
                assert memory is not None
                memory_kv = self.project_memory(memory)
            k, v = memory_kv  # (B, nkv, S, hs) each
            if cache is not None:
                k, v = cache.update(layer, torch.cat([k, v], dim=1).transpose(1, 2), step)  # kv: (B, S, 2*nkv, hs)
        dropout_p = self.dropout if self.training else 0.0
        if (is_causal and (mask is not None or q.shape[2] != k.shape[2])) or self.softcap is not None:
            # torch's is_causal aligns top-left and excludes a mask; ours aligns the queries to the last keys
            y = scaled_dot_product_attention(
                q, k, v, mask=mask, is_causal=is_causal, dropout_p=dropout_p, scale=self.scale, softcap=self.softcap
            )
        else:  # the same computation as ours (tested equal), in one fused kernel
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=is_causal,
                dropout_p=dropout_p,
                enable_gqa=nkv != nh,
                scale=self.scale,
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.q_size)  # (B, T, nh*hs)
        return self.out(y)
