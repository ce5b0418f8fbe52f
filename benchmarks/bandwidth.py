"""This machine's roofline: memory read bandwidth and matmul FLOP/s, and a model's weight bytes.

Batch-1 decode reads every weight once per token, so `tok/s x weight bytes / bandwidth` is the
fraction of the memory-bandwidth bound it reaches; large-batch decode does ~2 FLOPs per parameter
per token, so `2 x params x tok/s / matmul FLOP/s` is the fraction of the compute bound.

    python -m benchmarks.bandwidth [--gib 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from benchmarks.default_model import default_gguf

# The dtype names the servers take (--dtype), as torch dtypes.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a full read of an `nbytes` fp32 tensor (torch sum), best of `repeats`."""
    x = torch.ones(max(nbytes // 4, 1), dtype=torch.float32)
    x.sum()  # touch the pages once
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def measure_matmul_flops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an (n, n) @ (n, n) matmul in `dtype`, best of `repeats`."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    a @ b  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


@dataclass(frozen=True)
class ModelBytes:
    """Parameter count of a GGUF model, its bytes as stored (quantized), as dense `dtype` weights, and
    what our decode step reads: Q4_0/Q4_1/Q8_0 matrices as stored, the rest as dense `dtype`."""

    params: int
    stored_bytes: int
    dense_bytes: int
    dtype: str
    decode_bytes: int


def model_bytes(gguf_path: str, dtype: str = "bfloat16") -> ModelBytes:
    """Count the GGUF's tensors (a tied LM head is stored, and counted, once: it is read once per step)."""
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(gguf_path)
    params = sum(int(t.n_elements) for t in reader.tensors)
    stored = sum(int(t.n_bytes) for t in reader.tensors)
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    kernel_types = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)
    decode = sum(
        int(t.n_bytes) if t.tensor_type in kernel_types else int(t.n_elements) * itemsize for t in reader.tensors
    )
    return ModelBytes(params, stored, params * itemsize, dtype, decode)


@dataclass(frozen=True)
class Roofline:
    """Measured peaks of this machine at a thread count."""

    threads: int
    read_bandwidth_gb_s: float
    matmul_gflop_s_fp32: float
    matmul_gflop_s_bf16: float

    def gflop_s(self, dtype: str) -> float:
        return self.matmul_gflop_s_bf16 if DTYPES[dtype] == torch.bfloat16 else self.matmul_gflop_s_fp32


def measure(threads: int | None = None, nbytes: int = 1 << 30, repeats: int = 5) -> Roofline:
    """Measure the roofline with `threads` torch threads (restored afterwards)."""
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return Roofline(
            torch.get_num_threads(),
            measure_read_bandwidth(nbytes, repeats) / 1e9,
            measure_matmul_flops(torch.float32, repeats=repeats) / 1e9,
            measure_matmul_flops(torch.bfloat16, repeats=repeats) / 1e9,
        )
    finally:
        torch.set_num_threads(prev)


def bandwidth_fraction(tok_s: float, weight_bytes: int, bandwidth_gb_s: float) -> float:
    """Share of the memory-bandwidth bound reached by batch-1 decode at `tok_s`."""
    return tok_s * weight_bytes / (bandwidth_gb_s * 1e9)


def flop_fraction(tok_s: float, params: int, gflop_s: float) -> float:
    """Share of the matmul FLOP/s bound reached by decoding at `tok_s` tokens/s in total."""
    return 2.0 * params * tok_s / (gflop_s * 1e9)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bandwidth", description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.0, help="size of the tensor read for bandwidth")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default=None, help="GGUF to count weights of; default: the SmolLM2 GGUF")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    a = ap.parse_args(argv)
    roof = measure(a.threads, int(a.gib * 2**30), a.repeats)
    mb = model_bytes(a.model or default_gguf(), a.dtype)
    bound = roof.read_bandwidth_gb_s * 1e9 / mb.dense_bytes
    print(json.dumps({**asdict(roof), **asdict(mb), "batch1_bandwidth_bound_tok_s": bound}, indent=2))


if __name__ == "__main__":
    main()
