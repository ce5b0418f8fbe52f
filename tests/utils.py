"""Shared test helpers (not fixtures): tiny random LMs, GGML-quantized weights and the native kernel builds this
CPU runs.

Fixtures live in conftest.py files and may call these; test modules import them from here, never from
conftest.py or from another test module.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from model_core import native
from model_core.lm import CausalLM, LMConfig
from model_core.native import Kernels

if TYPE_CHECKING:
    from model_core.qmatmul import QuantWeight


@functools.cache
def kernels_for(isa: str) -> Kernels:
    return native.load(isa)


def native_isas(reference: bool = True) -> list[str]:
    """The native builds this CPU runs (each test parametrized over them runs them all)."""
    return [isa for isa in native.runnable() if reference or isa != "reference"]


def tiny_llama(vocab_size: int = 49152, seed: int = 0, max_seq_len: int = 256) -> CausalLM:
    """A 2-layer llama with GQA and random weights (scaled up so the logits are far from uniform)."""
    torch.manual_seed(seed)
    cfg = LMConfig(
        "llama",
        vocab_size,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=128,
        max_seq_len=max_seq_len,
        rope_theta=10000.0,
    )
    model = CausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model.eval()


def tiny_llama_q4(max_rows: int, kernels: Kernels, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> CausalLM:
    """tiny_llama with its projections stored as GGUF Q4_1 blocks, served the way the loader serves a 4-bit
    GGUF on the CPU (the head too): dense copies for prompts, the 4-bit kernel for batches of at most `max_rows` rows,
    decode steps through the fused decoder."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize, quantize

    from model_core.fused_decode import FusedLlamaDecoder
    from model_core.packing import pack_linears, packing_available
    from model_core.qmatmul import QuantWeight, attach_quantized

    model = tiny_llama(seed=seed)
    q4 = gguf.GGMLQuantizationType.Q4_1
    blocks: dict[str, QuantWeight] = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and (name.startswith("blocks.") or name == "lm_head"):
                raw = quantize(mod.weight.numpy(), q4)
                mod.weight.copy_(torch.from_numpy(np.asarray(dequantize(raw, q4)).reshape(mod.weight.shape)))
                blocks[name] = QuantWeight.from_ggml(int(q4), torch.from_numpy(np.ascontiguousarray(raw)))
    model = model.to(dtype)
    if packing_available(dtype, torch.device("cpu")):
        pack_linears(model)
    attach_quantized(model, blocks, max_rows, kernels)
    model.decoder_fast_path = FusedLlamaDecoder.build(model, kernels)
    return model


def quantized_weight(qtype: int, n: int, k: int, seed: int) -> tuple[QuantWeight, torch.Tensor]:
    """A random (n, k) weight stored as GGML blocks of `qtype` (Q4_0, Q4_1 or Q8_0 of model_core.qmatmul), and what
    GGUF readers dequantize it to (float32)."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize, quantize

    from model_core.qmatmul import Q4_0, Q4_1, Q8_0, QuantWeight

    ggml = {
        Q4_0: gguf.GGMLQuantizationType.Q4_0,
        Q4_1: gguf.GGMLQuantizationType.Q4_1,
        Q8_0: gguf.GGMLQuantizationType.Q8_0,
    }[qtype]
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.2
    raw = quantize(w, ggml)
    ref = torch.from_numpy(np.asarray(dequantize(raw, ggml), dtype=np.float32).reshape(n, k))
    return QuantWeight.from_ggml(qtype, torch.from_numpy(np.ascontiguousarray(raw))), ref
