"""Shared fixtures: the shipped default model's path and tokenizer, and tiny random LMs."""

from __future__ import annotations

import functools

import pytest
import torch

from model_core import native
from model_core.backend import select_backend
from model_core.default_model import find_default_model
from model_core.lm import CausalLM, LMConfig
from model_core.native import Kernels
from model_core.tokenizer import Tokenizer


def pytest_report_header() -> list[str]:
    """Which decode backends this run exercises: every native build this CPU executes, and PyTorch."""
    auto = select_backend("auto")
    return [
        f"decode backends: auto = {auto.name} ({auto.reason}); native builds tested here: "
        f"{', '.join(native.runnable()) or 'none'}; plus torch"
    ]


@functools.cache
def kernels_for(isa: str) -> Kernels:
    return native.load(isa)


def native_isas(reference: bool = True) -> list[str]:
    """The native builds this CPU runs (each test parametrized over them runs them all)."""
    return [isa for isa in native.runnable() if reference or isa != "reference"]


@pytest.fixture(scope="session")
def smol_path() -> str:
    return find_default_model()


@pytest.fixture(scope="session")
def smol_tokenizer(smol_path: str) -> Tokenizer:
    return Tokenizer.from_gguf(smol_path)


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


@pytest.fixture(scope="session")
def tiny_model() -> CausalLM:
    return tiny_llama()


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
