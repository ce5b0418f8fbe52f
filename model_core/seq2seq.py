"""The encoder-decoder Transformer of Vaswani et al. (2017), with batched greedy decoding.

Token embeddings (one table shared by source and target, or two) are scaled by sqrt(d_model) and
summed with sinusoidal positions; an `Encoder` turns the source into memory, a `Decoder` attends
to it causally, and a linear projection (optionally tied to the target embedding) gives logits.
Padding masks follow torch's convention: (B, T) bool, True = padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from model_core.attention import KVStore
from model_core.positional import SinusoidalPositionalEncoding
from model_core.step_attention import StepAttention
from model_core.transformer import Decoder, Encoder


@dataclass(frozen=True)
class Seq2SeqConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    dropout: float = 0.1
    activation: str = "relu"
    norm_first: bool = False  # False: post-norm, as in the paper
    norm: str = "layernorm"
    eps: float = 1e-5
    bias: bool = True
    final_norm: bool = True  # a norm after each stack, as torch.nn.Transformer has
    max_len: int = 1024  # longest source or target sequence (sinusoidal table size)
    share_embeddings: bool = False  # one table for source and target (equal vocab sizes)
    tie_output: bool = True  # the output projection reuses the target embedding matrix
    pad_id: int = 0  # fills greedy_decode's output after a row's EOS

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError("share_embeddings needs src_vocab_size == tgt_vocab_size")


class DecoderCache(KVStore):
    """Grows the decoder self-attention K/V per layer, one step at a time (implements `KVStore`), and
    holds the cross-attention K/V of the encoder memory, computed once on the first decoding step."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.memory_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer, (B, nh, S, hs) each

    def select(self, index: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) batch rows: index (B',) of rows -> every tensor (B', ...).
        Beam search reorders hypotheses with it; a batch drops its finished rows."""
        for layer in self.k:
            self.k[layer] = self.k[layer].index_select(0, index)
            self.v[layer] = self.v[layer].index_select(0, index)
        if self.memory_kv is not None:
            self.memory_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.memory_kv]

    @property
    def seq_len(self) -> int:
        """Positions already stored (those of layer 0)."""
        return self.k[0].shape[2] if 0 in self.k else 0

    def update(self, layer: int, kv: torch.Tensor, step: StepAttention | None) -> tuple[torch.Tensor, torch.Tensor]:
        """kv: (B, T, 2*nkv, hs) = [K heads | V heads] -> all stored k, v (B, nkv, Tk, hs). Its forwards have no
        step (it attends what it grows)."""
        nkv = kv.shape[2] // 2
        k = kv[:, :, :nkv].transpose(1, 2)  # (B, nkv, T, hs)
        v = kv[:, :, nkv:].transpose(1, 2)  # (B, nkv, T, hs)
        if layer in self.k:
            k = torch.cat([self.k[layer], k], dim=2)  # (B, nkv, Tk, hs)
            v = torch.cat([self.v[layer], v], dim=2)  # (B, nkv, Tk, hs)
        self.k[layer], self.v[layer] = k, v
        return k, v


class Seq2SeqTransformer(nn.Module):
    """Embeddings + sinusoidal positions, Encoder, Decoder and output projection."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        c = self.config = config
        self.src_embed = nn.Embedding(c.src_vocab_size, c.d_model)
        self.tgt_embed = self.src_embed if c.share_embeddings else nn.Embedding(c.tgt_vocab_size, c.d_model)
        self.pos = SinusoidalPositionalEncoding(c.d_model, c.max_len, c.dropout)
        self.encoder = Encoder(
            c.d_model,
            c.n_heads,
            c.d_ff,
            c.dropout,
            c.activation,
            c.norm_first,
            c.norm,
            c.eps,
            c.bias,
            n_layers=c.n_encoder_layers,
            final_norm=c.final_norm,
        )
        self.decoder = Decoder(
            c.d_model,
            c.n_heads,
            c.d_ff,
            c.dropout,
            c.activation,
            c.norm_first,
            c.norm,
            c.eps,
            c.bias,
            n_layers=c.n_decoder_layers,
            final_norm=c.final_norm,
        )
        self.lm_head = nn.Linear(c.d_model, c.tgt_vocab_size, bias=False)
        self.embed_scale = math.sqrt(c.d_model)
        self._init_weights()
        if c.tie_output:
            self.lm_head.weight = self.tgt_embed.weight

    def _init_weights(self) -> None:
        """Xavier-uniform matrices in the stacks (as torch.nn.Transformer), N(0, d^-1/2) embeddings."""
        for stack in (self.encoder, self.decoder):
            for p in stack.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        tables = [self.tgt_embed] if self.tgt_embed is self.src_embed else [self.tgt_embed, self.src_embed]
        for emb in tables:  # a fixed order (not a set's): a seed must give the same weights in every run
            nn.init.normal_(emb.weight, std=self.config.d_model**-0.5)
        nn.init.xavier_uniform_(self.lm_head.weight)

    def _embed(self, table: nn.Embedding, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        T = tokens.shape[1]
        if start_pos + T > self.config.max_len:
            raise ValueError(f"positions up to {start_pos + T} exceed max_len {self.config.max_len}")
        positions = torch.arange(start_pos, start_pos + T, device=tokens.device).unsqueeze(0)  # (1, T)
        return self.pos(table(tokens) * self.embed_scale, positions)  # (B, T, C)

    def embed_src(self, src: torch.Tensor) -> torch.Tensor:
        """src: (B, S) token ids -> (B, S, C)."""
        return self._embed(self.src_embed, src)

    def embed_tgt(self, tgt: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """tgt: (B, T) token ids at positions start_pos.. -> (B, T, C)."""
        return self._embed(self.tgt_embed, tgt, start_pos)

    def encode(self, src: torch.Tensor, src_pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src: (B, S) ids; src_pad_mask: (B, S) True = pad -> memory (B, S, C)."""
        return self.encoder(self.embed_src(src), src_key_padding_mask=src_pad_mask)

    def decode(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        tgt_pad_mask: torch.Tensor | None = None,
        memory_pad_mask: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> torch.Tensor:
        """tgt: (B, T) ids; memory: (B, S, C) -> logits (B, T, V).

        With a cache, tgt holds only the new tokens (positions continue after the cached ones) and
        tgt_pad_mask, if given, covers cached and new positions: (B, cache.seq_len + T). The cache
        also keeps the cross-attention K/V of `memory` from its first call: later calls reuse them
        and do not read `memory`.
        """
        start = 0 if cache is None else cache.seq_len
        memory_kv = None
        if cache is not None:
            if cache.memory_kv is None:
                cache.memory_kv = self.decoder.project_memory(memory)
            memory_kv = cache.memory_kv
        h = self.decoder(
            self.embed_tgt(tgt, start),
            memory,
            tgt_key_padding_mask=tgt_pad_mask,
            memory_key_padding_mask=memory_pad_mask,
            causal=True,
            cache=cache,
            memory_kv=memory_kv,
        )  # (B, T, C)
        return self.lm_head(h)

    def forward(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        src_pad_mask: torch.Tensor | None = None,
        tgt_pad_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """src: (B, S), tgt: (B, T) ids (teacher forcing) -> logits (B, T, V)."""
        memory = self.encode(src, src_pad_mask)
        return self.decode(tgt, memory, tgt_pad_mask=tgt_pad_mask, memory_pad_mask=src_pad_mask)

    @torch.no_grad()
    def greedy_decode(
        self,
        src: torch.Tensor,
        bos_id: int,
        eos_id: int,
        max_len: int,
        src_pad_mask: torch.Tensor | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Batched argmax decoding; call in eval mode.

        Returns (B, n) generated ids without BOS, n <= max_len; each row ends at its first EOS and
        is filled with config.pad_id after it. Decoding stops once every row has emitted EOS.
        use_cache=False recomputes the whole prefix each step (the reference path).
        """
        B = src.shape[0]
        memory = self.encode(src, src_pad_mask)  # (B, S, C)
        ys = torch.full((B, 1), bos_id, dtype=torch.long, device=src.device)  # (B, 1 + steps)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        cache = DecoderCache() if use_cache else None
        for _ in range(max_len):
            inp = ys[:, -1:] if cache is not None else ys
            logits = self.decode(inp, memory, memory_pad_mask=src_pad_mask, cache=cache)  # (B, T, V)
            nxt = logits[:, -1].argmax(dim=-1)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, self.config.pad_id), nxt)
            ys = torch.cat([ys, nxt.unsqueeze(1)], dim=1)
            done = done | (nxt == eos_id)
            if bool(done.all()):
                break
        return ys[:, 1:]
