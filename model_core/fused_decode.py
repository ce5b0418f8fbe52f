"""Decode steps of a float32 or bfloat16 llama model with the work between matmuls done by native kernels.

A decode step runs ~20 small PyTorch ops per layer; at small batches their dispatch costs as much as
the layer's arithmetic. `FusedLlamaDecoder` replaces them with native calls (kernels/layer.c):
 - when all four projections of every layer are `QuantLinear`s (GGUF Q4_0/Q4_1/Q8_0 blocks) and the
   batch is at most their `max_rows`, each layer is one call (norms, projections, RoPE, cache write,
   attention from the paged cache, SwiGLU, residual adds);
 - otherwise each layer is its four projections (PyTorch, dense) with four native calls between them:
   norm, rope + cache write + attention, residual add + next norm, SwiGLU.
It reads the model's parameters and the cache in place. Prompt chunks keep the module path. The kernels
are the model's backend's (model_core.backend), for whatever ISA it chose.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from model_core.kv_cache import PagedKVCache
from model_core.lm import Block, CausalLM
from model_core.native import Kernels
from model_core.qmatmul import ACT, QuantLinear, QuantWeight
from model_core.transformer import RMSNorm


class _Layer:
    def __init__(self, block: Block) -> None:
        attn_norm, ffn_norm = block.attn_norm, block.ffn_norm
        if not (
            isinstance(attn_norm, RMSNorm)
            and isinstance(ffn_norm, RMSNorm)
            and attn_norm.weight.dtype == ffn_norm.weight.dtype
            and attn_norm.weight.dtype in ACT
        ):
            raise ValueError("the fused decoder runs float32 or bf16 llama layers (RMSNorm)")
        self.attn_norm, self.ffn_norm = attn_norm.weight.detach(), ffn_norm.weight.detach()
        self.linears: list[nn.Module] = [block.attn.qkv, block.attn.out, block.ffn.w_in, block.ffn.w_out]
        if any(getattr(lin, "bias", None) is not None for lin in self.linears):
            raise ValueError("the fused decoder runs llama projections (no biases)")
        quant: list[QuantWeight] = [lin.quant for lin in self.linears if isinstance(lin, QuantLinear)]
        self.quant = quant if len(quant) == 4 else None  # keeps the tensors behind `ptrs` alive
        if self.quant is not None and len({w.interleaved for w in self.quant}) > 1:
            raise ValueError("the fused decoder runs a layer's projections in one matmul mode")
        self.i8 = int(self.quant is not None and self.quant[0].interleaved)  # int8 activations (kernels/common.h)
        self.ptrs = (
            None
            if self.quant is None
            else (ctypes.c_void_p * 12)(
                *[None if t is None else t.data_ptr() for w in self.quant for t in (w.qs, w.d, w.m)]
            )
        )
        self.max_rows = min((lin.max_rows for lin in self.linears if isinstance(lin, QuantLinear)), default=0)


class FusedLlamaDecoder:
    """For `CausalLM.decoder_fast_path`: `applies(B, cache)`, then `run(x, positions, cache)`."""

    def __init__(self, model: CausalLM, kernels: Kernels) -> None:
        cfg = model.cfg
        if not cfg.is_llama or cfg.hd % 16 or model.embed.weight.dtype not in ACT:
            raise ValueError("the fused decoder runs float32 or bf16 llama models with a head size multiple of 16")
        self.cfg = cfg
        self.kernels = kernels
        self.act = ACT[model.embed.weight.dtype]
        self.layers = [_Layer(block) for block in model.blocks]  # type: ignore[arg-type]
        self.max_rows = (
            min(layer.max_rows for layer in self.layers) if all(layer.ptrs is not None for layer in self.layers) else 0
        )  # batches the one-call layers serve
        rotary = model.rotary
        assert rotary is not None
        self.cos: torch.Tensor = rotary.cos  # type: ignore[assignment]  # (L, hs)
        self.sin: torch.Tensor = rotary.sin  # type: ignore[assignment]

    @classmethod
    def build(cls, model: CausalLM, kernels: Kernels) -> FusedLlamaDecoder | None:
        """The fused decoder for `model`, or None where it does not apply (not a llama in float32 or bf16)."""
        try:
            return cls(model, kernels)
        except ValueError:
            return None

    def applies(self, batch: int, cache: PagedKVCache | None) -> bool:
        return cache is not None and cache.attends_in_place

    def run(self, x: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache) -> torch.Tensor:
        """x: (B, 1, C) embeddings of this step's tokens; positions (B, 1). Returns the last layer's
        output (B, 1, C)."""
        lib, act = self.kernels.lib, self.act
        cfg = self.cfg
        B, C = x.shape[0], cfg.d_model
        x = x.reshape(B, C).contiguous()  # (B, C), updated in place layer by layer
        pos = positions.reshape(B)
        cos, sin = self.cos[pos].float(), self.sin[pos].float()  # (B, hs) each (the tables follow the model's dtype)
        write, rows, lens, Tk = cache.decode_tables()
        threads = torch.get_num_threads()
        nh, nkv, hs = cfg.n_heads, cfg.n_kv_heads, cfg.hd
        if B <= self.max_rows:
            for i, layer in enumerate(self.layers):
                rc = lib.llama_decode_layer(
                    x.data_ptr(),
                    B,
                    C,
                    layer.attn_norm.data_ptr(),
                    layer.ffn_norm.data_ptr(),
                    cfg.norm_eps,
                    layer.ptrs,
                    cos.data_ptr(),
                    sin.data_ptr(),
                    cache.kv[i].data_ptr(),
                    write.data_ptr(),
                    rows.data_ptr(),
                    lens.data_ptr(),
                    Tk,
                    nh,
                    nkv,
                    hs,
                    cfg.d_ff,
                    act,
                    layer.i8,
                    threads,
                )
                if rc:
                    raise RuntimeError(f"fused decode of layer {i} failed (B={B})")
            return x.view(B, 1, C)
        h = torch.empty_like(x)  # (B, C): the next projection's input
        att = torch.empty(B, nh * hs, dtype=x.dtype)
        g = torch.empty(B, cfg.d_ff, dtype=x.dtype)
        lib.llama_rmsnorm(x.data_ptr(), self.layers[0].attn_norm.data_ptr(), cfg.norm_eps, h.data_ptr(), B, C, act)
        for i, layer in enumerate(self.layers):
            qkv_proj, out_proj, in_proj, down_proj = layer.linears
            qkv = qkv_proj(h).contiguous()  # (B, (nh + 2 nkv) hs)
            if lib.llama_attention(
                qkv.data_ptr(),
                B,
                cos.data_ptr(),
                sin.data_ptr(),
                cache.kv[i].data_ptr(),
                write.data_ptr(),
                rows.data_ptr(),
                lens.data_ptr(),
                att.data_ptr(),
                Tk,
                nh,
                nkv,
                hs,
                act,
                threads,
            ):
                raise RuntimeError(f"decode attention of layer {i} failed (B={B})")
            o = out_proj(att).contiguous()  # (B, C)
            lib.llama_add_rmsnorm(
                x.data_ptr(), o.data_ptr(), layer.ffn_norm.data_ptr(), cfg.norm_eps, h.data_ptr(), B, C, act
            )
            gu = in_proj(h).contiguous()  # (B, 2 F) = [gate | up]
            lib.llama_swiglu(gu.data_ptr(), g.data_ptr(), B, cfg.d_ff, act)
            o = down_proj(g).contiguous()  # (B, C)
            nxt = self.layers[i + 1].attn_norm.data_ptr() if i + 1 < len(self.layers) else None
            lib.llama_add_rmsnorm(x.data_ptr(), o.data_ptr(), nxt, cfg.norm_eps, h.data_ptr(), B, C, act)
        return x.view(B, 1, C)
