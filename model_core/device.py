"""Device and dtype selection: CUDA when present, else CPU; bf16 where the hardware does it well."""

from __future__ import annotations

import functools
import logging

import torch

from model_core import native
from model_core.backend import TORCH, DecodeBackend
from model_core.packing import mkldnn_bf16_supported

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AVX-512 BF16 where oneDNN runs bf16 matmuls natively (bf16 weights are half the bytes of
    fp32 ones, which decides PyTorch's decode steps; prompts are faster in bf16 with AMX only)."""
    return bool(native.cpu_features() & native.CPU_AVX512BF16) and mkldnn_bf16_supported()


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ValueError(f"unknown device {name!r}; expected auto, cpu or cuda[:N]")
    return torch.device(name)


def select_dtype(name: str, device: torch.device, backend: DecodeBackend = TORCH) -> torch.dtype:
    """auto: on a GPU bf16 (fp16 without it); on a CPU bf16 where it computes natively (AVX512-BF16: its
    kernels and oneDNN's matmuls), else float32 (AVX2, NEON: the kernels read the quantized weights
    either way, and prefill runs on the BLAS's fp32 matmul rather than an emulated bf16 one)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if backend.kernels is not None:
            fast = backend.isa == "avx512bf16"
            why = f"the {backend.isa} kernels" + ("" if fast else " have no native bf16 arithmetic")
        else:
            fast = cpu_has_fast_bf16()
            why = "oneDNN " + ("runs bf16 natively here" if fast else "has no native bf16 here")
        dtype = torch.bfloat16 if fast else torch.float32
        log.info("dtype auto: %s (%s)", str(dtype).removeprefix("torch."), why)
        return dtype
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected auto, float32 or bfloat16") from None
