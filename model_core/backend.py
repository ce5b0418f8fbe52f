"""The decode backend: decided once, at load time, and handed to everything that runs decode steps.

`select_backend(choice)` returns a `DecodeBackend`: either native kernels for one instruction set
(model_core.native: "avx512bf16", "avx512vnni", "avx2", "neon-dotprod", "neon", or the plain-C "reference") or the
PyTorch path ("torch"). "auto" takes the best SIMD build this CPU runs (avx512bf16 only where AMX makes its bf16 matmuls
fast, else the int8 builds first); a named ISA must be one this CPU executes (so an AVX-512 machine also
tests its AVX2 build). The loader attaches the backend's kernels to the
model's quantized layers and fused decoder; the runner gives them to the KV cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from model_core import native

log = logging.getLogger(__name__)

CHOICES = ("auto", "torch", *native.ISAS)
# Without AVX-512 the BLAS's fp32 matmul runs on AVX2 too, and the int8 kernel beat it at every size measured
# (32 to 256 rows; MKL, oneDNN and ATen capped at AVX2): there decode batches of any size run on the kernel.
AVX2_ONLY_MAX_ROWS = 512
# The avx512bf16 build's exact bf16 matmuls take AMX tiles from 8 rows; without AMX its vector path beat oneDNN's
# dense bf16 matmuls up to about 6 rows (SmolLM2 decode steps; with AMX: 16 rows, 8-bit weights 4).
NO_AMX_MAX_ROWS = 6
# Without dense copies of the weights (the loader's dense_weights) a batch above the kernels' rows dequantizes each
# layer's weights for the call; AMX tiles beat that up to about 64 rows (Qwen3-1.7B-shaped Q4_K_M on the AMX VM: a
# 64-token prompt 379 ms on the tiles, 464 dequantized; 128 tokens 680 against 572).
AMX_LEAN_MAX_ROWS = 64


@dataclass(frozen=True)
class DecodeBackend:
    kernels: native.Kernels | None  # None: PyTorch only
    reason: str  # why this one

    @property
    def name(self) -> str:
        return "torch" if self.kernels is None else f"native-{self.kernels.name}"

    @property
    def isa(self) -> str | None:
        return None if self.kernels is None else self.kernels.name

    @property
    def quant_max_rows(self) -> int:
        """Matmuls of up to this many rows (decode batches, short prompt chunks) run on the quantized weights unless
        told otherwise (0: never)."""
        if self.kernels is None:
            return 0
        if self.kernels.name == "avx2" and not native.cpu_features() & native.CPU_AVX512F:
            return AVX2_ONLY_MAX_ROWS
        if self.kernels.name == "avx512bf16" and not native.cpu_features() & native.CPU_AMX_BF16:
            return NO_AMX_MAX_ROWS
        return self.kernels.isa.max_rows

    @property
    def lean_max_rows(self) -> int:
        """quant_max_rows for a model without dense copies of its quantized layers (the alternative then is to
        dequantize the weights for the call, not a dense matmul on a copy)."""
        if (
            self.kernels is not None
            and self.kernels.name == "avx512bf16"
            and native.cpu_features() & native.CPU_AMX_BF16
        ):
            return max(self.quant_max_rows, AMX_LEAN_MAX_ROWS)
        return self.quant_max_rows

    def describe(self, dtype: torch.dtype, threads: int, products: str | None = None) -> str:
        """One line naming the backend, ISA, products (default: the build's own mode), dtype and threads."""
        dt = str(dtype).removeprefix("torch.")
        if products is None and self.kernels is not None:
            products = "int8 activations" if self.kernels.isa.int8 else "exact products"
        act = f", {products}" if products else ""
        isa = self.isa or "none"
        return f"decode backend {self.name} (isa {isa}{act}, {self.reason}), dtype {dt}, threads {threads}"


TORCH = DecodeBackend(None, "PyTorch only")


def select_backend(choice: str = "auto", device: torch.device | str = "cpu") -> DecodeBackend:
    """auto: the best native build this CPU runs (PyTorch where none does, or on a GPU): avx512bf16 (bf16) where
    AMX runs the bf16 matmuls, else the int8 builds (avx512vnni, avx2, neon-dotprod) before the exact ones; torch:
    PyTorch only; an ISA name: that build, or ValueError if this CPU cannot run it or it does not build."""
    if choice not in CHOICES:
        raise ValueError(f"unknown kernels {choice!r}; expected one of {', '.join(CHOICES)}")
    if choice == "torch":
        return DecodeBackend(None, "asked for")
    if torch.device(device).type != "cpu":
        if choice != "auto":
            raise ValueError(f"kernels {choice!r} run on the CPU, not on {device}")
        return DecodeBackend(None, f"the native kernels are for the CPU, the model is on {device}")
    if choice != "auto":
        try:
            return DecodeBackend(native.load(choice), "asked for")
        except native.KernelsUnavailable as e:
            raise ValueError(f"kernels {choice!r}: {e}") from None
    reasons = []
    amx = bool(native.cpu_features() & native.CPU_AMX_BF16)
    for name in native.runnable():
        if name == "reference":
            continue  # plain C: for tests, and when asked for
        if name == "avx512bf16" and not amx:
            # measured on an AVX512-BF16 machine without AMX: oneDNN's bf16 matmuls ran at half its fp32 rate, and
            # the avx2 build's int8 decode (fp32 activations) beat the bf16 kernels at every batch size (avx512vnni,
            # next, is avx2's with 512-bit integer products)
            continue
        try:
            why = "the best this CPU runs" + (" (AMX: bf16 matmuls run natively)" if name == "avx512bf16" else "")
            return DecodeBackend(native.load(name), why)
        except native.KernelsUnavailable as e:
            reasons.append(str(e))
    why = "; ".join(reasons) or "no native build for this CPU (needs AVX2, AVX512-BF16 or NEON)"
    log.warning("native kernels off, PyTorch only: %s", why)
    return DecodeBackend(None, why)
