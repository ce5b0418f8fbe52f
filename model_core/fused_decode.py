"""Decode steps of a 4-bit llama model with each decoder layer in one C call (kernels/llama_decode.c).

A decode step at batch 1 runs ~20 small PyTorch ops per layer; their dispatch costs as much as the
layer's arithmetic. `FusedLlamaDecoder` runs the whole layer (norms, projections on the 4-bit
weights, RoPE, cache write, attention from the paged cache, SwiGLU, residuals) in one call, for the
same batches the 4-bit matmul serves (at most `max_rows` sequences); anything else keeps the module
path. It reads the model's own parameters and cache in place (no copies).
"""

from __future__ import annotations

import ctypes

import torch

from model_core import native
from model_core.kv_cache import PagedKVCache
from model_core.lm import Block, CausalLM
from model_core.qmatmul import QuantLinear, QuantWeight
from model_core.transformer import RMSNorm


class FusedLlamaDecoder:
    """For `CausalLM.decoder_fast_path`: `applies(B, cache)`, then `run(x, positions, cache)`."""

    def __init__(self, model: CausalLM, max_rows: int) -> None:
        cfg = model.cfg
        self.cfg, self.max_rows = cfg, max_rows
        self.layers: list[tuple[torch.Tensor, torch.Tensor, ctypes.Array[ctypes.c_void_p], list[QuantWeight]]] = []
        for block in model.blocks:
            assert isinstance(block, Block)
            quant: list[QuantWeight] = []
            for lin in (block.attn.qkv, block.attn.out, block.ffn.w_in, block.ffn.w_out):
                if not isinstance(lin, QuantLinear) or lin.qbias is not None:
                    raise ValueError("every projection must be a 4-bit QuantLinear without bias")
                quant.append(lin.quant)
            attn_norm, ffn_norm = block.attn_norm, block.ffn_norm
            if not (isinstance(attn_norm, RMSNorm) and isinstance(ffn_norm, RMSNorm)
                    and attn_norm.weight.dtype == ffn_norm.weight.dtype == torch.bfloat16):
                raise ValueError("the fused decoder runs bf16 llama layers (RMSNorm)")
            ptrs = (ctypes.c_void_p * 12)(*[t.data_ptr() for w in quant for t in (w.qs, w.d, w.m)])
            self.layers.append((attn_norm.weight.detach(), ffn_norm.weight.detach(), ptrs, quant))
        rotary = model.rotary
        assert rotary is not None
        self.cos: torch.Tensor = rotary.cos  # type: ignore[assignment]  # (L, hs)
        self.sin: torch.Tensor = rotary.sin  # type: ignore[assignment]

    @classmethod
    def build(cls, model: CausalLM, max_rows: int) -> FusedLlamaDecoder | None:
        """The fused decoder for `model`, or None where it does not apply (not a 4-bit bf16 llama on the CPU,
        or no kernels)."""
        if not model.cfg.is_llama or native.load_library() is None or model.cfg.hd % 16:
            return None
        try:
            return cls(model, max_rows)
        except ValueError:
            return None

    def applies(self, batch: int, cache: PagedKVCache | None) -> bool:
        return cache is not None and cache.attends_in_place and batch <= self.max_rows

    def run(self, x: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache) -> torch.Tensor:
        """x: (B, 1, C) bf16 embeddings of this step's tokens; positions (B, 1). Returns the last layer's
        output (B, 1, C)."""
        lib = native.load_library()
        assert lib is not None
        cfg = self.cfg
        B = x.shape[0]
        x = x.reshape(B, cfg.d_model).contiguous()  # (B, C), updated in place layer by layer
        pos = positions.reshape(B)
        cos, sin = self.cos[pos].float(), self.sin[pos].float()  # (B, hs) each (the tables follow the model's dtype)
        write, rows, lens, Tk = cache.decode_tables()
        threads = torch.get_num_threads()
        for layer, (attn_norm, ffn_norm, ptrs, _) in enumerate(self.layers):
            rc = lib.llama_decode_layer(x.data_ptr(), B, cfg.d_model, attn_norm.data_ptr(), ffn_norm.data_ptr(),
                                        cfg.norm_eps, ptrs, cos.data_ptr(), sin.data_ptr(), cache.kv[layer].data_ptr(),
                                        write.data_ptr(), rows.data_ptr(), lens.data_ptr(), Tk, cfg.n_heads,
                                        cfg.n_kv_heads, cfg.hd, cfg.d_ff, threads)
            if rc:
                raise RuntimeError(f"fused decode of layer {layer} failed (B={B})")
        return x.view(B, 1, cfg.d_model)
