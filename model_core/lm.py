"""A decoder-only causal LM for the llama family (RoPE, RMSNorm, SwiGLU, GQA) and the GPT-2
family (learned positions, LayerNorm, GELU, biases).

`forward(tokens, positions, cache)`: state is passed in. Without a cache the chunk attends
causally to itself (positions 0..T-1); with a `PagedKVCache` the cache's prepared mask says which
keys each query sees.

Batch-invariant mode (`batch_invariant`, set by the loader where it holds): every token's logits are
computed the same way whatever forward it is in (alone or batched, any chunking of its prompt, a decode
step or a recomputed prompt, keys from a prefix-cache hit or not). The loader sets it only where every
matmul runs on a native kernel whose rows do not depend on each other or on the batch's size (fixed
summation order: model_core.qmatmul, kernels/), every layer runs through the fused decoder on a cache
that attends in place with one query row a token (model_core.fused_decode, model_core.kv_cache), and
norms and softmaxes are per row. Prompt chunks then use the decode kernels' products too (int8
activations where the backend rounds them), instead of exact dense products.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from model_core.attention import MultiHeadAttention
from model_core.kv_cache import PagedKVCache
from model_core.positional import LearnedPositionalEmbedding, RotaryEmbedding
from model_core.qmatmul import exact_products
from model_core.transformer import FeedForward, make_norm

ARCHITECTURES = ("llama", "gpt2")


@dataclass(frozen=True)
class LMConfig:
    arch: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    head_dim: int | None = None
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.arch!r}; supported: {ARCHITECTURES}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def is_llama(self) -> bool:
        return self.arch == "llama"


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        llama = cfg.is_llama
        norm = "rmsnorm" if llama else "layernorm"
        self.attn_norm = make_norm(norm, cfg.d_model, cfg.norm_eps)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.hd, bias=not llama)
        self.ffn_norm = make_norm(norm, cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, "swiglu" if llama else "gelu_tanh", bias=not llama)

    def forward(
        self,
        x: torch.Tensor,
        layer: int,
        mask: torch.Tensor | None,
        is_causal: bool,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: PagedKVCache | None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask=mask, is_causal=is_causal, rope=rope, cache=cache, layer=layer)
        return x + self.ffn(self.ffn_norm(x))


class DecoderFastPath(Protocol):
    """Runs all decoder layers of some decode steps another way (model_core.fused_decode)."""

    def applies(self, batch: int, cache: PagedKVCache | None) -> bool: ...

    def run(self, x: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache) -> torch.Tensor: ...


class CausalLM(nn.Module):
    decoder_fast_path: DecoderFastPath | None = None  # set by the loader where one applies
    batch_invariant: bool = False  # set by the loader where it holds (see the module's docstring)

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = None if cfg.is_llama else LearnedPositionalEmbedding(cfg.max_seq_len, cfg.d_model)
        self.rotary = RotaryEmbedding(cfg.hd, cfg.max_seq_len, cfg.rope_theta) if cfg.is_llama else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm("rmsnorm" if cfg.is_llama else "layernorm", cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: PagedKVCache | None = None,
        last_only: bool = False,
        last_index: torch.Tensor | None = None,
        hidden: bool = False,
    ) -> torch.Tensor:
        """tokens: (B, T) ids; positions: (B, T) (default 0..T-1). Returns logits (B, T, V), or
        (B, V) for the last position of each row when last_only, or for position last_index[b] of row b.
        With hidden: the final-normed hidden states (B, T, C) instead (every position; last_only and
        last_index are ignored), which `project` turns into logits for the rows the caller picks, so
        that scoring a prompt never needs (T, V) logits at once. Computed with exact products."""
        B, T = tokens.shape
        if positions is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"{T} tokens exceed the context length {self.cfg.max_seq_len}")
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        elif cache is None and int(positions.max()) >= self.cfg.max_seq_len:  # (the cache checks its own)
            raise ValueError(f"position {int(positions.max())} exceeds the context length {self.cfg.max_seq_len}")
        if (T > 1 or hidden) and not self.batch_invariant:
            # a prompt chunk: exact products, so that prompt logits do not depend on the decode kernels
            with exact_products():
                return self._forward(tokens, positions, cache, last_only, last_index, hidden)
        return self._forward(tokens, positions, cache, last_only, last_index, hidden)

    def project(self, h: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """Logits (..., V) of final-normed hidden states (..., C) from `forward(..., hidden=True)`; exact: with
        exact products (as `exact_hidden`) even in batch-invariant mode."""
        if self.batch_invariant and not exact:  # the same products as every other forward
            return self.lm_head(h)
        with exact_products():
            return self.lm_head(h)

    def exact_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (B, T, C) of tokens (B, T) from position 0, without a cache, with exact
        products (dense layers where the kernels round activations to int8): how a batch-invariant model scores
        prompts (their logprobs), so that scoring keeps the serving dtype's precision."""
        with exact_products():
            return self._forward(
                tokens,
                torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens),
                None,
                False,
                None,
                hidden=True,
            )

    def _forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache | None,
        last_only: bool,
        last_index: torch.Tensor | None,
        hidden: bool = False,
    ) -> torch.Tensor:
        B = tokens.shape[0]
        x = self.embed(tokens)  # (B, T, C)
        fast = self.decoder_fast_path
        if fast is not None and cache is not None and fast.applies(B, cache):
            x = fast.run(x, positions, cache)  # (B, 1, C)
        else:
            x = self._decoder_layers(x, positions, cache)
        if hidden:
            return self.norm(x)  # (B, T, C)
        if last_index is not None:
            x = x[torch.arange(B, device=x.device), last_index]  # (B, C)
        elif last_only:
            x = x[:, -1]  # (B, C)
        return self.lm_head(self.norm(x))

    def _decoder_layers(self, x: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache | None) -> torch.Tensor:
        rope = None
        if self.rotary is not None:
            rope = self.rotary(positions, x.dtype)
        else:
            assert self.pos_embed is not None
            x = x + self.pos_embed(positions).to(x.dtype)
        mask, causal = (cache.mask, cache.is_causal) if cache is not None else (None, True)
        for i, block in enumerate(self.blocks):
            x = block(x, i, mask, causal, rope, cache)
        return x
