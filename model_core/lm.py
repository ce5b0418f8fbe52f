"""A decoder-only causal LM: pre-norm residual blocks of grouped-query attention and a feed-forward network, with
the block options of its family (`LMConfig`; model_core.models reads them from a file): RoPE or learned positions,
RMSNorm or LayerNorm, SwiGLU / GELU-tanh gate / GELU, biases, QK-norm, post-norms, soft-capping, per-layer sliding
windows and RoPE bases.

`forward(tokens, cache, step, output)`: state is passed in. Without a cache the chunk attends
causally to itself (positions 0..T-1); with a `PagedKVCache`, the step it prepared for this forward
(a `StepAttention`: positions, mask, the cache's tables) says which keys each query sees. `output` (an
`Output`) says what the forward returns: every position's logits, one position's per row, or the
hidden states.

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

import torch
from torch import nn

from model_core.attention import MultiHeadAttention
from model_core.kv_cache import PagedKVCache
from model_core.lora import LoRABatch, applied
from model_core.native import Kernels
from model_core.norms import make_norm
from model_core.positional import LearnedPositionalEmbedding, RotaryEmbedding
from model_core.qmatmul import QuantLinear, exact_products
from model_core.step_attention import StepAttention
from model_core.transformer import FeedForward

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")


@dataclass(frozen=True)
class LMConfig:
    """The model's sizes and its family's block options (model_core.models reads them from a file; the defaults
    are a llama's). `arch` names the family."""

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
    # block options
    norm: str = "rmsnorm"  # NORMS
    activation: str = "swiglu"  # model_core.transformer.ACTIVATIONS
    positions: str = "rope"  # POSITIONS: rotary in attention, or a learned table added to the embeddings
    qkv_bias: bool = False
    out_bias: bool = False
    ffn_bias: bool = False
    qk_norm: bool = False  # an RMSNorm over each query and key head before RoPE (Qwen 3, Gemma 3)
    post_norms: bool = False  # each sublayer's output normed before its residual add (Gemma 2, 3)
    embed_scale: float | None = None  # embeddings multiplied by this (Gemma: sqrt(d_model))
    attn_scale: float | None = None  # attention scores' scale (None: 1/sqrt(head size))
    attn_softcap: float | None = None  # scores s -> cap * tanh(s / cap) (Gemma 2)
    final_softcap: float | None = None  # logits likewise (Gemma 2)
    windows: tuple[int, ...] = ()  # per layer, the positions it attends to (0: all); () = every layer global
    rope_local_theta: float | None = None  # windowed layers' rotary base, where it differs (Gemma 3)
    rope_freq_factors: tuple[float, ...] = ()  # global layers' per-frequency divisors (Llama 3 rope scaling)
    rope_linear: float = 1.0  # global layers' positions divided by this (linear rope scaling)

    def __post_init__(self) -> None:
        from model_core.transformer import ACTIVATIONS

        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        for name, value, allowed in (
            ("norm", self.norm, NORMS),
            ("positions", self.positions, POSITIONS),
            ("activation", self.activation, ACTIVATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; supported: {', '.join(allowed)}")
        if self.windows and (len(self.windows) != self.n_layers or min(self.windows) < 0):
            raise ValueError(f"windows {self.windows} do not give one size >= 0 for each of {self.n_layers} layers")

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def window(self, layer: int) -> int:
        """The positions layer `layer` attends to (its own and the window - 1 before it), 0 for all."""
        return self.windows[layer] if self.windows else 0


@dataclass(frozen=True, eq=False)
class Output:
    """What `CausalLM.forward` returns for tokens (B, T): `Output.LOGITS` every position's logits (B, T, V);
    `Output.LAST` each row's last position's logits (B, V); `Output.at(index)` the logits of position index[b]
    of row b (B, V) (rows of different lengths); `Output.HIDDEN` the final-normed hidden states (B, T, C) of
    every position, which `CausalLM.project` turns into logits for the rows the caller picks (so that scoring a
    prompt never needs (T, V) logits at once)."""

    kind: Literal["logits", "last", "at", "hidden"]
    index: torch.Tensor | None = None  # (B,) with "at": the position whose logits each row returns

    LOGITS: ClassVar[Output]
    LAST: ClassVar[Output]
    HIDDEN: ClassVar[Output]

    def __post_init__(self) -> None:
        if (self.kind == "at") != (self.index is not None):
            raise ValueError(f"Output {self.kind!r} takes {'an' if self.kind == 'at' else 'no'} index")

    @staticmethod
    def at(index: torch.Tensor) -> Output:
        """The logits of position index[b] of each row b: index (B,)."""
        return Output("at", index)


Output.LOGITS, Output.LAST, Output.HIDDEN = Output("logits"), Output("last"), Output("hidden")


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)); with post_norms (Gemma)
    x + post_norm(attn(norm(x))) and likewise for the FFN."""

    def __init__(self, cfg: LMConfig, layer: int) -> None:
        super().__init__()
        C, eps = cfg.d_model, cfg.norm_eps
        self.attn_norm = make_norm(cfg.norm, C, eps)
        self.attn = MultiHeadAttention(
            C,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.hd,
            bias=cfg.qkv_bias,
            out_bias=cfg.out_bias,
            scale=cfg.attn_scale,
            softcap=cfg.attn_softcap,
            qk_norm_eps=eps if cfg.qk_norm else None,
            window=cfg.window(layer),
        )
        self.ffn_norm = make_norm(cfg.norm, C, eps)
        self.ffn = FeedForward(C, cfg.d_ff, cfg.activation, bias=cfg.ffn_bias)
        self.post_attn_norm = make_norm(cfg.norm, C, eps) if cfg.post_norms else None
        self.post_ffn_norm = make_norm(cfg.norm, C, eps) if cfg.post_norms else None

    def forward(
        self,
        x: torch.Tensor,
        layer: int,
        mask: torch.Tensor | None,
        is_causal: bool,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: PagedKVCache | None,
        step: StepAttention | None,
    ) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), mask=mask, is_causal=is_causal, rope=rope, cache=cache, layer=layer, step=step)
        x = x + (h if self.post_attn_norm is None else self.post_attn_norm(h))
        h = self.ffn(self.ffn_norm(x))
        return x + (h if self.post_ffn_norm is None else self.post_ffn_norm(h))


class DecoderFastPath(Protocol):
    """Runs all decoder layers of some decode steps another way (model_core.fused_decode)."""

    def applies(self, step: StepAttention, cache: PagedKVCache) -> bool: ...

    def run(self, x: torch.Tensor, step: StepAttention, cache: PagedKVCache) -> torch.Tensor: ...

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The model's final norm of what `run` returned."""
        ...


class CausalLM(nn.Module):
    decoder_fast_path: DecoderFastPath | None = None  # set by the loader where one applies
    batch_invariant: bool = False  # set by the loader where it holds (see the module's docstring)
    kernels: Kernels | None = None  # set by the loader: the native build of its backend (None: PyTorch only)

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed: nn.Module = nn.Embedding(cfg.vocab_size, cfg.d_model)  # (or a QuantEmbedding: the loader's)
        rope = cfg.positions == "rope"
        self.pos_embed = None if rope else LearnedPositionalEmbedding(cfg.max_seq_len, cfg.d_model)
        self.rotary: RotaryEmbedding | None = None
        self.rotary_local: RotaryEmbedding | None = None
        if rope:
            self.rotary, self.rotary_local = self.rotary_tables(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def new_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        """A paged KV cache of `num_blocks` blocks of `block_size` tokens for this model: its layers' shapes, dtype
        and device; decode attention reads it in place with the model's kernels, and in batch-invariant mode prompts
        attend in place too."""
        cfg = self.cfg
        return PagedKVCache(
            cfg.n_layers,
            num_blocks,
            block_size,
            cfg.n_kv_heads,
            cfg.hd,
            self.dtype,
            self.device,
            max_positions=cfg.max_seq_len,
            kernels=self.kernels,
            in_place_prefill=self.batch_invariant,
        )

    @property
    def dtype(self) -> torch.dtype:
        """The model's weights' and activations' dtype (its final norm's: every layer's, the embedding may hold
        none: model_core.quant_embedding)."""
        w = self.norm.weight
        assert isinstance(w, torch.Tensor)
        return w.dtype

    @property
    def device(self) -> torch.device:
        w = self.norm.weight
        assert isinstance(w, torch.Tensor)
        return w.device

    @staticmethod
    def rotary_tables(cfg: LMConfig) -> tuple[RotaryEmbedding, RotaryEmbedding | None]:
        """The global layers' rotary tables, and the windowed layers' where they differ (else None)."""
        rotary = RotaryEmbedding(cfg.hd, cfg.max_seq_len, cfg.rope_theta, cfg.rope_freq_factors, cfg.rope_linear)
        local = None
        if cfg.rope_local_theta is not None and any(cfg.windows):
            local = RotaryEmbedding(cfg.hd, cfg.max_seq_len, cfg.rope_local_theta)
        return rotary, local

    def forward(
        self,
        tokens: torch.Tensor,
        cache: PagedKVCache | None = None,
        step: StepAttention | None = None,
        output: Output = Output.LOGITS,
        lora: LoRABatch | None = None,
    ) -> torch.Tensor:
        """tokens: (B, T) ids, at positions 0..T-1 without a cache, or at step.positions (B, T) with `step`, what
        `cache.prepare()` returned for this forward. Returns what `output` says: logits (B, T, V), (B, V) of one
        position per row, or the final-normed hidden states (B, T, C). Prompt chunks and hidden states are
        computed with exact products (see the module's docstring for the batch-invariant mode). lora: each row's
        LoRA adapter (model_core.lora; None: every row the base model), applied without merging: a row without
        one gets the logits it would get with no adapters at all."""
        B, T = tokens.shape
        if (cache is None) != (step is None):
            raise ValueError("a forward on a cache takes the step cache.prepare() made for it, and only then")
        if step is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"{T} tokens exceed the context length {self.cfg.max_seq_len}")
            positions = torch.arange(T, device=tokens.device).expand(B, T)  # (B, T)
        else:  # (the cache checked the positions against the context length)
            positions = step.positions
        if (T > 1 or output.kind == "hidden") and not self.batch_invariant:
            # a prompt chunk: exact products, so that prompt logits do not depend on the decode kernels
            with exact_products():
                return self._forward(tokens, positions, cache, step, output, lora)
        return self._forward(tokens, positions, cache, step, output, lora)

    def project(self, h: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """Logits (..., V) of final-normed hidden states (..., C) from `forward(..., output=Output.HIDDEN)`; exact: with
        exact products (as `exact_hidden`) even in batch-invariant mode."""
        if self.batch_invariant and not exact:  # the same products as every other forward
            return self._logits(h)
        with exact_products():
            return self._logits(h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (..., C) -> logits (..., V), soft-capped where the family does; float32 from a
        head on the kernels' integer products (QuantLinear.forward_fp32), else in h's dtype."""
        head = self.lm_head
        logits = head.forward_fp32(h) if isinstance(head, QuantLinear) else head(h)
        cap = self.cfg.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def exact_hidden(self, tokens: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, C) of tokens (B, T) from position 0, without a cache, with exact
        products (dense layers where the kernels round activations to int8): how a batch-invariant model scores
        prompts (their logprobs), so that scoring keeps the serving dtype's precision. lora: as forward's."""
        with exact_products():
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)  # (B, T)
            return self._forward(tokens, positions, None, None, Output.HIDDEN, lora)

    def _forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache | None,
        step: StepAttention | None,
        output: Output,
        lora: LoRABatch | None = None,
    ) -> torch.Tensor:
        B, T = tokens.shape
        x = self.embed(tokens)  # (B, T, C)
        if self.cfg.embed_scale is not None:
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)  # (rounded to the activations' dtype)
        fast = self.decoder_fast_path
        real = step.index if step is not None and step.in_place else None  # (N,) the real tokens among B*T, or None
        norm: Callable[[torch.Tensor], torch.Tensor] = self.norm
        with applied(self, lora, B, T, real):
            if fast is not None and cache is not None and step is not None and fast.applies(step, cache):
                x = fast.run(x, step, cache)  # (B, T, C)
                norm = fast.norm
            else:
                x = self._decoder_layers(x, positions, cache, step)
        if output.kind == "hidden":
            return norm(x)  # (B, T, C)
        if output.index is not None:
            x = x[torch.arange(B, device=x.device), output.index]  # (B, C)
        elif output.kind == "last":
            x = x[:, -1]  # (B, C)
        return self._logits(norm(x))

    def _decoder_layers(
        self, x: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache | None, step: StepAttention | None
    ) -> torch.Tensor:
        rope = rope_local = None
        if self.rotary is not None:
            rope = self.rotary(positions, x.dtype)
            rope_local = rope if self.rotary_local is None else self.rotary_local(positions, x.dtype)
        else:
            assert self.pos_embed is not None
            x = x + self.pos_embed(positions).to(x.dtype)
        mask, causal = (step.mask, step.is_causal) if step is not None else (None, True)
        masks = {0: (mask, causal)}  # window -> (mask, is_causal)
        in_place = step is not None and step.in_place  # (the cache's kernel takes the window)
        for w in set(self.cfg.windows) - {0}:
            masks[w] = (mask, causal) if in_place else (window_mask(positions, step, w), False)
        for i, block in enumerate(self.blocks):
            w = self.cfg.window(i)
            x = block(x, i, *masks[w], rope_local if w else rope, cache, step)
        return x


def window_mask(positions: torch.Tensor, step: StepAttention | None, window: int) -> torch.Tensor:
    """(B, 1, T, Tk) bool, True = attend: each query at positions (B, T) sees the keys at its own position and the
    window - 1 before it; the keys are the step's positions 0..Tk-1 on its cache, or without one the queries' own."""
    if step is not None:
        keys = torch.arange(step.num_keys, device=positions.device).view(1, 1, -1)  # (1, 1, Tk)
    else:
        keys = positions.unsqueeze(1)  # (B, 1, T)
    q = positions.unsqueeze(-1)  # (B, T, 1)
    return ((keys <= q) & (keys > q - window)).unsqueeze(1)  # (B, 1, T, Tk)
