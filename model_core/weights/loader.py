"""One entry point: a path (GGUF file or Hugging Face directory) -> model, tokenizer and config."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model_core import native
from model_core.fused_decode import FusedLlamaDecoder
from model_core.lm import CausalLM, LMConfig
from model_core.packing import pack_linears, packing_available
from model_core.qmatmul import attach_quantized
from model_core.tokenizer import Tokenizer
from model_core.weights.build import build_lm

log = logging.getLogger(__name__)


@dataclass
class LoadedLM:
    model: CausalLM
    tokenizer: Tokenizer
    config: LMConfig
    path: str
    name: str
    load_seconds: float


def load_lm(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu", pack: bool = True, quantized_max_rows: int = 0,
            native_decode: bool = True) -> LoadedLM:
    """pack: on CPUs in bf16, pre-pack linear weights for oneDNN (same results, faster matmuls).
    quantized_max_rows: for a GGUF file on the CPU, keep its Q4_0/Q4_1/Q8_0 weights quantized as well and run
    matmuls of up to this many rows (decode steps) on them (0 = off; see model_core.qmatmul).
    native_decode: run decode steps of bf16 llama models on the CPU with native kernels between the
    matmuls (model_core.fused_decode), where the kernels build."""
    from gguf import GGUFReader

    from model_core.weights.gguf import load_gguf, load_gguf_blocks
    from model_core.weights.safetensors import load_safetensors_dir

    t0 = time.perf_counter()
    p = Path(path)
    reader = None
    if p.is_dir():
        cfg, sd, _ = load_safetensors_dir(p)
        tok = Tokenizer.from_pretrained_dir(p)
        name = p.name
    elif p.is_file():
        reader = GGUFReader(os.fspath(p))  # read by both the dense and the quantized loaders
        cfg, sd, meta = load_gguf(p, reader)
        tok = Tokenizer.from_gguf(p, meta)
        name = p.name[: -len(".gguf")] if p.name.endswith(".gguf") else p.name
    else:
        raise FileNotFoundError(f"model path {str(p)!r} does not exist")
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {cfg.vocab_size}")
    model = build_lm(cfg, sd, dtype=dtype, device=device)
    if pack and packing_available(dtype, torch.device(device)):
        log.info("packed %d linear layers for oneDNN", pack_linears(model))
    on_cpu = torch.device(device).type == "cpu"
    if quantized_max_rows > 0 and reader is not None and on_cpu and native.load_library() is not None:
        n = attach_quantized(model, load_gguf_blocks(p, cfg, reader), quantized_max_rows)
        log.info("%d linear layers also run on their quantized weights for up to %d rows", n, quantized_max_rows)
    if native_decode and on_cpu:
        model.decoder_fast_path = FusedLlamaDecoder.build(model)
        if model.decoder_fast_path is not None:
            log.info("decode steps run with native kernels between matmuls (one call per layer up to %d rows)",
                     model.decoder_fast_path.max_rows)
    dt = time.perf_counter() - t0
    log.info("loaded %s (%s, %d layers, d=%d) as %s on %s in %.1fs", name, cfg.arch, cfg.n_layers,
             cfg.d_model, dtype, device, dt)
    return LoadedLM(model, tok, cfg, str(p), name, dt)
