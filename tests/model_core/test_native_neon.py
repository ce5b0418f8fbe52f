"""The NEON builds of the C kernels (neon: armv8-a; neon-dotprod: armv8.2-a with integer dot products), cross-compiled
for aarch64 and run under qemu-user, against the aarch64 build of the plain-C reference on the same inputs: every
entry point, fp32 and bf16 activations, the quantized matmul on Q4_0/Q4_1/Q8_0 weights in both modes (exact, and
int8 activations on interleaved weights) at odd sizes, and on Q2_K..Q6_K and Q5_0/Q5_1 weights (quant_matmul_kind,
both modes); and the aarch64 reference build against this machine's own.

Marked `emulated`, so not in the default run: `make test-neon` (installs the tools if missing), or
`pytest -m emulated tests/model_core/test_native_neon.py` with Debian's gcc-aarch64-linux-gnu, qemu-user and
libgomp1-arm64-cross installed. The libraries are built by `native.build(name, cc="aarch64-linux-gnu-gcc")` into
a temporary cache; kernel_driver.c (built with the same compiler) dlopen()s one, runs a file of calls on it and
writes back the buffers they wrote: one qemu process per build and entry point runs all its cases. neon and the
reference run on an emulated Cortex-A53 (armv8.0: an instruction newer than that stops them with SIGILL),
neon-dotprod on qemu's "max" CPU (which has the dot products).

Tolerances, relative to the largest |value| of each output buffer: fp32 1e-5 (summation order, fused
multiply-adds), bf16 2^-7 (a value near that scale one bf16 rounding apart is 2^-8 away; one more for an
intermediate rounded the other way). The integer modes are specified bit for bit the same in every build
(kernels/common.h), so there the matmul's results must be equal (a whole layer in the 16-bit mode with fp32
activations: 2^-12, see TOLERANCE_I16_LAYER). The measured differences are printed at the end.
"""

from __future__ import annotations

import ctypes
import functools
import re
import shutil
import signal
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize

from model_core import native
from model_core.qmatmul import (
    BF16,
    F16,
    GGML_TYPES,
    IQ4_NL,
    IQ4_XS,
    Q2_K,
    Q3_K,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    QuantWeight,
)
from tests.utils import kquant_weight

CROSS_CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
SYSROOT = "/usr/aarch64-linux-gnu"  # the arm64 libc and libgomp qemu loads the programs with
DRIVER_SOURCE = Path(__file__).parent / "kernel_driver.c"
NEON = ["neon", "neon-dotprod"]
# The CPU qemu emulates for each build and what aigc_cpu_features() must then report.
QEMU_CPU = {"neon": "cortex-a53", "neon-dotprod": "max", "reference": "cortex-a53"}
CPU_FEATURES = {"cortex-a53": native.CPU_NEON, "max": native.CPU_NEON | native.CPU_NEON_DOTPROD}
TOLERANCE = {0: 1e-5, 1: 2**-7}  # fp32, bf16 activations: max |diff| / max |reference|
# a layer in the 16-bit integer mode with fp32 activations: its fp32 steps (norms, attention) differ between builds
# by a rounding or two, which can move an activation across a step of its 16-bit grid (1/32512 of its block's
# largest value) before the (exact) integer products: a few steps' worth at the output
TOLERANCE_I16_LAYER = 2**-12
QTYPES = {
    Q4_0: gguf.GGMLQuantizationType.Q4_0,
    Q4_1: gguf.GGMLQuantizationType.Q4_1,
    Q8_0: gguf.GGMLQuantizationType.Q8_0,
}
QNAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0"}

_missing = [tool for tool in (CROSS_CC, QEMU) if shutil.which(tool) is None]
if not Path(SYSROOT, "lib", "libgomp.so.1").exists():
    _missing.append(f"{SYSROOT}/lib/libgomp.so.1")
pytestmark = [
    pytest.mark.emulated,
    pytest.mark.skipif(
        bool(_missing),
        reason=f"{' and '.join(_missing)} not installed (Debian: apt-get install "
        "gcc-aarch64-linux-gnu qemu-user libgomp1-arm64-cross; make test-neon)",
    ),
]

# Each entry point's arguments, from native.ENTRY_POINTS (the ctypes table of kernels/aigc_kernels.h), as name:kind
# with kind b a buffer (or NULL), w llama_decode_layer's array of W_POINTERS weight pointers (3 per part of its 4
# projections, NULL past the last), i an integer (int or int64_t),
# f a float. kernel_driver.c reads the buffers (w: its 12), then the integers, then the floats, each in this order
# (aigc_kernels_isa's one buffer is the driver's: 64 bytes for the name).
DRIVER_KINDS = {"p": "b", "w": "w", "i": "i", "l": "i", "f": "f"}
W_POINTERS = 3 * 4 * native.PROJECTION_PARTS
SIGNATURES = {
    name: [(arg, DRIVER_KINDS[kind]) for arg, kind in entry.args] if name != "aigc_kernels_isa" else [("name", "b")]
    for name, entry in native.ENTRY_POINTS.items()
    # (llama_decode_scratch_bytes returns a size, not a status: asked of the host's library instead;
    # llama_decode_layers' table holds addresses, which the driver's process does not share: a loop over
    # llama_decode_layer, the same C in every build, tested against it on this CPU's builds in test_kernel_glue.py)
    if name not in ("llama_decode_scratch_bytes", "llama_decode_layers")
}
# The buffers each writes (all activations, of the call's act): they come back from the driver.
OUTPUTS = {
    "aigc_kernels_isa": ("name",),
    "aigc_cpu_features": (),
    "quant_matmul": ("y",),
    "paged_attention_decode": ("out",),
    "llama_rmsnorm": ("out",),
    "llama_add_rmsnorm": ("x", "out"),
    "llama_swiglu": ("g",),
    "llama_attention": ("qkv", "kv", "att"),
    "llama_decode_layer": ("x", "kv"),
    "quant_matmul_kind": ("y",),
    "quant_dequantize": ("out",),
    "lora_add": ("out",),
}
ENTRIES = list(SIGNATURES)[2:]  # those with cases (CASES)


def scratch_for(n: int, B: int, C: int, nh: int, nkv: int, hs: int, F: int, act: int) -> dict[str, Any]:
    """The scratch arguments of llama_attention / llama_decode_layer for case n: every other case NULL (the library
    allocates), the others a buffer of the size the (host) library asks for, which the aarch64 one asks for too."""
    if n % 2:
        return dict(scratch=None, scratch_bytes=0)
    size = native.load("reference").call("llama_decode_scratch_bytes", B, C, nh, nkv, hs, F, act)
    return dict(scratch=np.zeros(size, np.uint8), scratch_bytes=size)


@dataclass
class Call:
    entry: str
    args: dict[str, Any]  # by SIGNATURES' names: numpy arrays (or None), w a list of 12, ints, floats
    label: str  # the case, for messages

    @property
    def act(self) -> int:
        return int(self.args["act"])

    @property
    def i8(self) -> int:
        return int(self.args.get("i8", 0))


@dataclass
class Result:
    rc: int
    out: dict[str, np.ndarray] = field(default_factory=dict)  # the written buffers, shaped as the inputs


# ---- the inputs


def act_array(a: np.ndarray, act: int) -> np.ndarray:
    """float32 values as the kernels' activations: float32, or bfloat16 bits (uint16, rounded to nearest even)."""
    if act == 0:
        return np.ascontiguousarray(a, dtype=np.float32)
    return (
        torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        .to(torch.bfloat16)
        .view(torch.int16)
        .numpy()
        .view(np.uint16)
    )


def as_float(a: np.ndarray) -> np.ndarray:
    """Activations (float32, or bfloat16 bits) -> float64."""
    if a.dtype == np.uint16:
        a = (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float64)


def int_mode(i8: int, n: int) -> int:
    """The matmul mode of a case with integer products (i8 true): int8 activations, or on odd n 16-bit ones."""
    return 0 if not i8 else native.INT8 | (native.INT16 if n % 2 else 0)


def quantized(qtype: int, n: int, k: int, rng: np.random.Generator, i8: int) -> QuantWeight:
    """A random (n, k) weight as GGML blocks (gguf's quantizer), in the form the matmul mode reads."""
    w = rng.standard_normal((n, k), dtype=np.float32) * 0.2
    qw = QuantWeight.from_ggml(qtype, torch.from_numpy(np.ascontiguousarray(quantize(w, QTYPES[qtype]))))
    return qw.interleave() if i8 else qw


def weight_buffers(qw: QuantWeight) -> list[np.ndarray | None]:
    return [qw.qs.numpy(), qw.d.numpy(), None if qw.m is None else qw.m.numpy()]


def rope_tables(rng: np.random.Generator, B: int, hs: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, hs) fp32 cos and sin, half-split form."""
    ang = rng.uniform(0, 6, (B, hs // 2)).astype(np.float32)
    return np.concatenate([np.cos(ang)] * 2, 1), np.concatenate([np.sin(ang)] * 2, 1)


def paged_rows(rng: np.random.Generator, lens: list[int], Tk: int) -> tuple[int, np.ndarray]:
    """A cache of R rows and each sequence's (B, Tk) int64 row table: disjoint, scattered rows."""
    R = len(lens) * Tk + 3
    return R, rng.permutation(R)[: len(lens) * Tk].reshape(len(lens), Tk).astype(np.int64)


def quant_matmul_cases() -> Iterator[Call]:
    # (M, N, nb = K/32): rows 1..19, N mostly not a multiple of 8, 1 to 40 blocks; then random ones
    fixed = [
        (1, 1, 1),
        (19, 13, 40),
        (4, 70, 3),
        (2, 9, 1),
        (7, 31, 17),
        (3, 8, 2),
        (5, 45, 39),
        (1, 66, 40),
        (18, 3, 5),
        (11, 24, 8),
        (6, 17, 12),
        (13, 50, 25),
        (9, 5, 33),
        (16, 41, 7),
        (8, 2, 21),
        (17, 63, 4),
    ]
    rng = np.random.default_rng(1)
    n = 0
    for qtype in QTYPES:
        for act in (0, 1):
            for i8 in (0, 1):
                drawn = zip(rng.integers(1, 20, 8), rng.integers(1, 71, 8), rng.integers(1, 41, 8))
                for M, N, nb in [*fixed, *((int(M), int(N), int(nb)) for M, N, nb in drawn)]:
                    n += 1
                    x = rng.standard_normal((M, 32 * nb), dtype=np.float32) * 2
                    if n % 3 == 0:
                        x[:, :32] = 0  # a block of zeros (int8 scale 0)
                    bias = rng.standard_normal(N, dtype=np.float32) if n % 2 else None
                    qs, d, m = weight_buffers(quantized(qtype, N, 32 * nb, rng, i8))
                    yield Call(
                        "quant_matmul",
                        dict(
                            x=act_array(x, act),
                            act=act,
                            qs=qs,
                            d=d,
                            m=m,
                            bias=bias,
                            y=np.zeros((M, N), np.float32 if act == 0 else np.uint16),
                            M=M,
                            N=N,
                            K=32 * nb,
                            i8=int_mode(i8, n // 3),
                            nthreads=1 + n % 3,
                        ),
                        f"{QNAMES[qtype]} M={M} N={N} K={32 * nb} bias={bias is not None}",
                    )


# The attention parameters (scale, softcap, window; scale None: 1/sqrt(hs)) the attention cases cycle through: the
# default attention, another scale with soft-capped scores, windows of one key, shorter than most rows, and longer.
ATTENTION_PARAMS: list[tuple[float | None, float, int]] = [
    (None, 0.0, 0),
    (0.3, 5.0, 0),
    (None, 0.0, 5),
    (0.2, 30.0, 17),
    (0.25, 8.0, 1),
    (None, 50.0, 400),
]


def attention_params(n: int, hs: int) -> tuple[dict[str, Any], str]:
    """Case n's scale, softcap and window arguments, and their label."""
    scale, softcap, window = ATTENTION_PARAMS[n % len(ATTENTION_PARAMS)]
    scale = float(hs) ** -0.5 if scale is None else scale
    return dict(scale=scale, softcap=softcap, window=window), f" scale={scale:.3g} softcap={softcap:g} window={window}"


def paged_attention_decode_cases() -> Iterator[Call]:
    rng = np.random.default_rng(2)
    n = 0
    for nh, nkv, hs, lens in [
        (9, 3, 64, [1, 7, 33, 4, 30]),
        (4, 4, 16, [17]),
        (8, 2, 128, [2, 64, 65]),
        (2, 1, 32, [300, 1]),
        (6, 2, 80, [5, 40, 9]),
        (2, 2, 256, [13]),
        (3, 1, 48, [1, 2]),
    ]:
        for act in (0, 1):
            for _ in range(3):
                B, Tk, n = len(lens), max(lens) + 2, n + 1
                R, rows = paged_rows(rng, lens, Tk)
                params, label = attention_params(n, hs)
                yield Call(
                    "paged_attention_decode",
                    dict(
                        q=act_array(rng.standard_normal((B, nh, hs)), act),
                        kv=act_array(rng.standard_normal((R, 2 * nkv, hs)), act),
                        rows=rows,
                        lens=np.array(lens, np.int32),
                        out=act_array(np.zeros((B, nh, hs)), act),
                        B=B,
                        nh=nh,
                        nkv=nkv,
                        hs=hs,
                        Tk=Tk,
                        **params,
                        act=act,
                        nthreads=2,
                    ),
                    f"nh={nh} nkv={nkv} hs={hs} lens={lens}{label}",
                )


NORM_SHAPES = [(1, 1), (3, 7), (2, 96), (5, 131), (4, 576), (1, 1003), (19, 64)]


def llama_rmsnorm_cases() -> Iterator[Call]:
    rng = np.random.default_rng(3)
    for B, C in NORM_SHAPES:
        for act in (0, 1):
            yield Call(
                "llama_rmsnorm",
                dict(
                    x=act_array(rng.standard_normal((B, C)) * 3, act),
                    w=act_array(1 + 0.3 * rng.standard_normal(C), act),
                    eps=1e-5 if C % 2 else 1e-6,
                    out=act_array(np.zeros((B, C)), act),
                    B=B,
                    C=C,
                    act=act,
                ),
                f"B={B} C={C}",
            )


def llama_add_rmsnorm_cases() -> Iterator[Call]:
    rng = np.random.default_rng(4)
    for B, C in NORM_SHAPES:
        for act in (0, 1):
            norm = C != 131  # once without w: the add alone (out NULL)
            yield Call(
                "llama_add_rmsnorm",
                dict(
                    x=act_array(rng.standard_normal((B, C)) * 3, act),
                    y=act_array(rng.standard_normal((B, C)), act),
                    w=act_array(1 + 0.3 * rng.standard_normal(C), act) if norm else None,
                    eps=1e-5,
                    out=act_array(np.zeros((B, C)), act) if norm else None,
                    B=B,
                    C=C,
                    act=act,
                ),
                f"B={B} C={C}{'' if norm else ' w=NULL'}",
            )


def llama_swiglu_cases() -> Iterator[Call]:
    rng = np.random.default_rng(5)
    for n, (B, F) in enumerate([(1, 1), (3, 5), (2, 160), (4, 259), (1, 1536), (7, 33)]):
        for act in (0, 1):
            for gate in (0, 1) if n % 2 else (0,):  # SiLU, and GELU-tanh (Gemma) every other size
                yield Call(
                    "llama_swiglu",
                    dict(
                        gu=act_array(rng.standard_normal((B, 2 * F)) * 4, act),
                        g=act_array(np.zeros((B, F)), act),
                        B=B,
                        F=F,
                        gate=gate,
                        act=act,
                    ),
                    f"B={B} F={F} gate={gate}",
                )


def qk_norms(n: int, rng: np.random.Generator, hs: int, act: int) -> tuple[dict[str, Any], str]:
    """Case n's QK-norm arguments (eps, q_norm, k_norm): every other case none (NULL), the others random weights."""
    if n % 2 == 0:
        return dict(q_norm=None, k_norm=None), ""
    q_norm, k_norm = (act_array(1 + 0.3 * rng.standard_normal(hs), act) for _ in range(2))
    return dict(q_norm=q_norm, k_norm=k_norm), " qk_norm"


def llama_attention_cases() -> Iterator[Call]:
    rng = np.random.default_rng(6)
    n = 0
    for nh, nkv, hs, lens, Tk in [
        (4, 2, 32, [9, 5, 1], 9),
        (2, 1, 16, [3], 4),
        (8, 2, 64, [1, 40, 17, 33, 2], 40),
        (3, 3, 48, [7, 7], 7),
        (4, 1, 128, [70, 12], 72),
    ]:
        for act in (0, 1):
            B, n = len(lens), n + 1
            R, rows = paged_rows(rng, lens, Tk)
            cos, sin = rope_tables(rng, B, hs)
            params, label = attention_params(n, hs)
            norms, norm_label = qk_norms(n, rng, hs, act)
            yield Call(
                "llama_attention",
                dict(
                    qkv=act_array(rng.standard_normal((B, (nh + 2 * nkv) * hs)), act),
                    B=B,
                    eps=1e-6,
                    **norms,
                    cos=cos,
                    sin=sin,
                    kv=act_array(rng.standard_normal((R, 2 * nkv, hs)), act),
                    write=np.ascontiguousarray(rows[np.arange(B), np.array(lens) - 1]),
                    rows=rows,
                    lens=np.array(lens, np.int32),
                    att=act_array(np.zeros((B, nh * hs)), act),
                    Tk=Tk,
                    nh=nh,
                    nkv=nkv,
                    hs=hs,
                    **params,
                    act=act,
                    nthreads=2,
                    **scratch_for(n, B, 32, nh, nkv, hs, 32, act),
                ),
                f"nh={nh} nkv={nkv} hs={hs} lens={lens}{label}{norm_label}",
            )


def llama_decode_layer_cases() -> Iterator[Call]:
    rng = np.random.default_rng(7)
    n = 0
    for C, F, nh, nkv, hs, lens, Tk, qtypes in [
        (96, 160, 4, 2, 32, [9, 5, 1], 9, (Q4_1,) * 4),
        (64, 96, 2, 1, 16, [5], 5, (Q4_0,) * 4),
        (128, 256, 2, 2, 64, [1, 12, 7, 3, 10], 12, (Q8_0,) * 4),
        (160, 224, 4, 2, 48, [20, 6], 20, (Q4_1, Q4_0, Q8_0, Q4_1)),
        # with their kinds: a Q4_K_M file's mixes and the other kinds
        (256, 256, 4, 2, 64, [9, 5, 1], 9, (Q5_0, Q4_K, Q4_K, Q6_K)),
        (256, 512, 2, 1, 96, [4, 11], 11, (Q4_K, Q5_0, Q6_K, Q8_0)),
        (256, 256, 4, 2, 64, [3], 3, (Q5_K, Q5_1, Q4_1, Q5_K)),
        (256, 256, 4, 2, 64, [6, 2], 6, (F16, Q4_K, BF16, Q6_K)),
        (256, 256, 4, 2, 64, [4, 7], 7, (Q2_K, Q3_K, Q3_K, Q2_K)),
        # Wqkv and Wgate|up in parts of different kinds (a Q4_K_M file's q, k in Q4_K and v in Q6_K): types
        # (q, Wo, gate, Wdown, k and up, v)
        (256, 256, 4, 2, 64, [5, 9, 1], 9, (Q4_K, Q4_K, Q4_K, Q6_K, Q4_K, Q6_K)),
        (96, 160, 4, 2, 32, [1], 4, (Q4_0, Q8_0, Q4_1, Q8_0, Q8_0, Q4_1)),
    ]:
        kquants = any(GGML_TYPES[qt].kind.entry == "quant_matmul_kind" for qt in qtypes)
        parts = len(qtypes) > 4
        for act in (0, 1):
            for i8 in (0, 1):
                B, n = len(lens), n + 1
                R, rows = paged_rows(rng, lens, Tk)
                cos, sin = rope_tables(rng, B, hs)
                params, label = attention_params(n, hs)
                # each projection's parts (type, rows, in features): Wqkv, Wo, Wgate|up, Wdown
                split = [
                    [(qtypes[0], (nh + 2 * nkv) * hs, C)], [(qtypes[1], C, nh * hs)], [(qtypes[2], 2 * F, C)],
                    [(qtypes[3], C, F)],
                ]  # fmt: skip
                if parts:
                    split[0] = [(qtypes[0], nh * hs, C), (qtypes[4], nkv * hs, C), (qtypes[5], nkv * hs, C)]
                    split[2] = [(qtypes[2], F, C), (qtypes[4], F, C)]
                qws = [
                    kquant_weight(qt, r, k, seed=n + 3 * i + j)[0].interleave()
                    if qt not in QTYPES and i8 and GGML_TYPES[qt].kind.int8 else
                    kquant_weight(qt, r, k, seed=n + 3 * i + j)[0] if qt not in QTYPES else
                    quantized(qt, r, k, rng, i8)
                    for i, projection in enumerate(split)
                    for j, (qt, r, k) in enumerate(projection)
                ]  # fmt: skip
                w = [b for qw in qws for b in weight_buffers(qw)]
                kinds = np.array([qw.kind.value for qw in qws], np.int32) if kquants or parts or n % 2 else None
                part_rows = [[r for _, r, _ in p] + [0] * (native.PROJECTION_PARTS - len(p)) for p in split]
                parts_arg = np.array(sum(part_rows, []), np.int32) if parts else None
                # a QKV bias, QK-norm, both or neither, over both activation dtypes and matmul modes; Gemma's post
                # norms and GELU-tanh gate every third case
                norms, norm_label = qk_norms(n // 2, rng, hs, act)
                gemma = n % 3 == 0
                post = [act_array(1 + 0.1 * rng.standard_normal(C), act) if gemma else None for _ in range(2)]
                bias = rng.standard_normal((nh + 2 * nkv) * hs).astype(np.float32) if (n + n // 4) % 2 else None
                yield Call(
                    "llama_decode_layer",
                    dict(
                        x=act_array(rng.standard_normal((B, C)), act),
                        B=B,
                        C=C,
                        attn_norm=act_array(1 + 0.1 * rng.standard_normal(C), act),
                        ffn_norm=act_array(1 + 0.1 * rng.standard_normal(C), act),
                        post_attn_norm=post[0],
                        post_ffn_norm=post[1],
                        eps=1e-5,
                        w=w,
                        kinds=kinds,
                        parts=parts_arg,
                        qkv_bias=bias,
                        **norms,
                        cos=cos,
                        sin=sin,
                        kv=act_array(rng.standard_normal((R, 2 * nkv, hs)), act),
                        write=np.ascontiguousarray(rows[np.arange(B), np.array(lens) - 1]),
                        rows=rows,
                        lens=np.array(lens, np.int32),
                        Tk=Tk,
                        nh=nh,
                        nkv=nkv,
                        hs=hs,
                        F=F,
                        gate=int(gemma),
                        **params,
                        act=act,
                        i8=int_mode(i8, n // 2),
                        nthreads=2,
                        **scratch_for(n, B, C, nh, nkv, hs, F, act),
                        **lora_args(n, rng, B, (C, nh * hs, C, F), ((nh + 2 * nkv) * hs, C, 2 * F, C)),
                    ),
                    f"C={C} F={F} nh={nh} nkv={nkv} hs={hs} lens={lens} "
                    f"{'/'.join(GGML_TYPES[q].name for q in qtypes)}{label}"
                    f"{' qkv_bias' if bias is not None else ''}{norm_label}{' gemma' if gemma else ''}",
                )


def lora_stacks(rng: np.random.Generator, ranks: list[int], ins: list[int], outs: list[int]) -> dict[str, Any]:
    """Random LoRA pairs as lora_add takes them: for each (rank, in, out) in turn, A (rank, in) then (bt) B^T
    (rank, out), float32, stacked flat."""
    a = [rng.standard_normal(r * k).astype(np.float32) * 0.3 for r, k in zip(ranks, ins, strict=True)]
    bt = [rng.standard_normal(r * n).astype(np.float32) * 0.3 for r, n in zip(ranks, outs, strict=True)]
    return dict(A=np.concatenate(a), Bt=np.concatenate(bt))


def lora_args(n: int, rng: np.random.Generator, B: int, ins: tuple[int, ...], outs: tuple[int, ...]) -> dict[str, Any]:
    """llama_decode_layer's LoRA arguments for case n: every third case two adapters over the rows (one of them
    targeting only the attention's projections, a row without any), the others none (NULL)."""
    if n % 3 != 1:
        return dict(lora_slots=None, lora_G=0, lora_a=None, lora_bt=None, lora_ranks=None)
    ranks = [4, 8, 2, 0, 3, 0, 5, 0]  # (projection, slot): Wqkv, Wo, Wgate|up, Wdown x 2 slots
    stacks = lora_stacks(rng, ranks, [ins[i // 2] for i in range(8)], [outs[i // 2] for i in range(8)])
    return dict(
        lora_slots=np.array([b % 3 - 1 for b in range(B)], np.int32),
        lora_G=2,
        lora_a=stacks["A"],
        lora_bt=stacks["Bt"],
        lora_ranks=np.array(ranks, np.int32),
    )


def lora_add_cases() -> Iterator[Call]:
    """Rows of 3 adapters (ranks 5, 0 and 16) and none, at sizes across the kernel's output chunk of 64."""
    rng = np.random.default_rng(11)
    for N, n_in, n_out in [(1, 32, 8), (7, 96, 70), (5, 200, 150), (3, 576, 960)]:
        for act in (0, 1):
            ranks = [5, 0, 16]
            stacks = lora_stacks(rng, ranks, [n_in] * 3, [n_out] * 3)
            yield Call(
                "lora_add",
                dict(
                    x=act_array(rng.standard_normal((N, n_in)), act),
                    out=act_array(rng.standard_normal((N, n_out)), act),
                    N=N,
                    n_in=n_in,
                    n_out=n_out,
                    act=act,
                    choice=np.array([i % 4 - 1 for i in range(N)], np.int32),
                    G=3,
                    A=stacks["A"],
                    Bt=stacks["Bt"],
                    ranks=np.array(ranks, np.int32),
                    nthreads=2,
                ),
                f"N={N} n_in={n_in} n_out={n_out}",
            )


def quant_matmul_kind_cases() -> Iterator[Call]:
    """The K-quants and the 5-bit blocks of 32 in both modes at odd sizes, from quantized weights and from random
    blocks (Q5_0/Q5_1 with K = 32 * 9 nsb: not a multiple of 256), F16/BF16 weights; and the older forms once each
    through this entry."""
    rng = np.random.default_rng(7)
    fixed = [(1, 1, 1), (19, 13, 2), (4, 70, 1), (7, 31, 3), (2, 9, 6), (9, 5, 4), (5, 45, 2), (16, 41, 1)]
    n = 0
    for qtype in (Q4_K, Q6_K, Q5_K, Q5_0, Q5_1, IQ4_NL, IQ4_XS, Q2_K, Q3_K, F16, BF16):
        for act in (0, 1):
            for (M, N, nsb), i8 in zip(fixed, (0, 1) * 4 if GGML_TYPES[qtype].kind.int8 else (0,) * 8):
                n += 1
                K = 256 * nsb if GGML_TYPES[qtype].block == 256 else 32 * 9 * nsb
                x = rng.standard_normal((M, K), dtype=np.float32) * 2
                bias = rng.standard_normal(N, dtype=np.float32) if n % 2 else None
                qw, _ = kquant_weight(qtype, N, K, seed=n, random_blocks=n % 3 == 0)
                qs, d, m = weight_buffers(qw.interleave() if i8 else qw)
                yield Call(
                    "quant_matmul_kind",
                    dict(
                        x=act_array(x, act),
                        act=act,
                        kind=qw.kind.value,
                        qs=qs,
                        d=d,
                        m=m,
                        bias=bias,
                        y=np.zeros((M, N), np.float32 if act == 0 else np.uint16),
                        M=M,
                        N=N,
                        K=K,
                        i8=int_mode(i8, n // 2),
                        nthreads=1 + n % 3,
                    ),
                    f"{qw.kind.name} M={M} N={N} K={K} bias={bias is not None}",
                )
    for qtype in (Q4_1, Q8_0):
        qw = quantized(qtype, 13, 96, rng, 0)
        qs, d, m = weight_buffers(qw)
        x = rng.standard_normal((3, 96), dtype=np.float32)
        yield Call(
            "quant_matmul_kind",
            dict(x=act_array(x, 0), act=0, kind=qw.kind.value, qs=qs, d=d, m=m, bias=None,
                 y=np.zeros((3, 13), np.float32), M=3, N=13, K=96, i8=0, nthreads=2),
            f"{QNAMES[qtype]} M=3 N=13 K=96",
        )  # fmt: skip


def quant_dequantize_cases() -> Iterator[Call]:
    """Every kind's row form (and the older two forms) dequantized to fp32 and bf16."""
    rng = np.random.default_rng(11)
    for n, qtype in enumerate((Q4_0, Q8_0, Q4_K, Q6_K, Q5_K, Q5_0, Q5_1, IQ4_NL, IQ4_XS, Q2_K, Q3_K, F16, BF16)):
        N, K = 3 + n, 256 * (1 + n % 2)
        qw = quantized(qtype, N, K, rng, 0) if qtype in QTYPES else kquant_weight(qtype, N, K, seed=n)[0]
        qs, d, m = weight_buffers(qw)
        for act in (0, 1):
            yield Call(
                "quant_dequantize",
                dict(kind=qw.kind.value, qs=qs, d=d, m=m, out=np.zeros((N, K), np.float32 if act == 0 else np.uint16),
                     N=N, K=K, act=act, nthreads=1 + n % 2),
                f"{qw.kind.name} N={N} K={K}",
            )  # fmt: skip


CASES: dict[str, Callable[[], Iterator[Call]]] = {
    "quant_matmul": quant_matmul_cases,
    "paged_attention_decode": paged_attention_decode_cases,
    "llama_rmsnorm": llama_rmsnorm_cases,
    "llama_add_rmsnorm": llama_add_rmsnorm_cases,
    "llama_swiglu": llama_swiglu_cases,
    "llama_attention": llama_attention_cases,
    "llama_decode_layer": llama_decode_layer_cases,
    "quant_matmul_kind": quant_matmul_kind_cases,
    "quant_dequantize": quant_dequantize_cases,
    "lora_add": lora_add_cases,
}


@functools.cache
def cases(entry: str) -> list[Call]:
    return list(CASES[entry]())


# ---- running the calls: on an aarch64 library through kernel_driver under qemu, or on this machine's library


def buffers(call: Call) -> list[tuple[str, np.ndarray | None]]:
    """The call's buffers in the driver's order (w: its W_POINTERS, each named w)."""
    out: list[tuple[str, np.ndarray | None]] = []
    for name, kind in SIGNATURES[call.entry]:
        if kind == "b":
            out.append((name, call.args[name]))
        elif kind == "w":
            out += [(name, a) for a in call.args[name]] + [(name, None)] * (W_POINTERS - len(call.args[name]))
    return out


def encode(calls: list[Call]) -> bytes:
    parts = []
    for call in calls:
        sig, bufs = SIGNATURES[call.entry], buffers(call)
        ints = [int(call.args[n]) for n, k in sig if k == "i"]
        floats = [float(call.args[n]) for n, k in sig if k == "f"]
        name = call.entry.encode()
        parts.append(struct.pack(f"=I{len(name)}s3I", len(name), name, len(bufs), len(ints), len(floats)))
        for bname, a in bufs:
            data = b"" if a is None else np.ascontiguousarray(a).tobytes()
            parts += [struct.pack("=qI", -1 if a is None else len(data), bname in OUTPUTS[call.entry]), data]
        parts.append(struct.pack(f"={len(ints)}q{len(floats)}f", *ints, *floats))
    return b"".join(parts)


def decode(data: bytes, calls: list[Call]) -> list[Result]:
    results, at = [], 0
    for call in calls:
        (rc,) = struct.unpack_from("=i", data, at)
        at += 4
        result = Result(rc)
        for bname, a in buffers(call):
            if bname not in OUTPUTS[call.entry]:
                continue
            (size,) = struct.unpack_from("=q", data, at)
            at += 8
            if a is not None:
                assert size == a.nbytes, (call.entry, bname, size, a.nbytes)
                result.out[bname] = np.frombuffer(data, a.dtype, a.size, at).reshape(a.shape)
                at += size
        results.append(result)
    assert at == len(data), f"{len(data) - at} bytes left over in the driver's results"
    return results


def run_host(kernels: native.Kernels, call: Call) -> Result:
    """The call on a library this machine loads (ctypes), on copies of its buffers."""
    copies = {
        n: None if call.args[n] is None else np.array(call.args[n]) for n, kind in SIGNATURES[call.entry] if kind == "b"
    }
    args: list[Any] = []
    for name, kind in SIGNATURES[call.entry]:
        if kind == "b":
            a = copies[name]
            args.append(None if a is None else a.ctypes.data)
        elif kind == "w":
            args.append(
                (ctypes.c_void_p * W_POINTERS)(*[None if a is None else a.ctypes.data for a in call.args[name]])
            )
        else:
            args.append(call.args[name])
    rc = getattr(kernels.lib, call.entry)(*args)  # (typed by native.ENTRY_POINTS; the raw status, compared)
    return Result(rc, {n: a for n in OUTPUTS[call.entry] if (a := copies[n]) is not None})


class Aarch64:
    """The aarch64 libraries (native.build with the cross compiler, into a cache of this session's own) and the
    driver, each built on first use; calls run under qemu-aarch64."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Path | str] = {}  # path, or why the build failed
        self._results: dict[tuple[str, str], list[Result]] = {}

    def _build(self, key: str, make: Callable[[], Path]) -> Path:
        if key not in self._built:
            try:
                self._built[key] = make()
            except subprocess.CalledProcessError as e:
                cmd = " ".join(map(str, e.cmd))
                self._built[key] = f"building {key} for aarch64 failed: {cmd}\n{e.stderr.decode(errors='replace')}"
        built = self._built[key]
        if isinstance(built, str):
            pytest.fail(built, pytrace=False)
        return built

    def library(self, isa: str) -> Path:
        def make() -> Path:
            with pytest.MonkeyPatch.context() as mp:  # native.library_path reads the cache dir from here
                mp.setenv("AIGC_CACHE_DIR", str(self.root / "cache"))
                return native.build(isa, cc=CROSS_CC)

        return self._build(isa, make)

    def driver(self) -> Path:
        def make() -> Path:
            out = self.root / "kernel_driver"
            subprocess.run(
                [
                    CROSS_CC,
                    "-O2",
                    "-Wall",
                    "-Wextra",
                    "-Werror",
                    f"-I{native.KERNEL_DIR}",  # aigc_kernels.h: the entry points' types
                    str(DRIVER_SOURCE),
                    "-ldl",
                    "-o",
                    str(out),
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
            return out

        return self._build("kernel_driver", make)

    def run(self, isa: str, calls: list[Call], tag: str) -> list[Result]:
        """The calls on one build, in one qemu process."""
        lib, driver = self.library(isa), self.driver()
        requests, results = self.root / f"{isa}-{tag}.in", self.root / f"{isa}-{tag}.out"
        requests.write_bytes(encode(calls))
        cmd = [QEMU, "-L", SYSROOT, "-cpu", QEMU_CPU[isa], str(driver), str(lib), str(requests), str(results)]
        # libgomp's idle threads spin by default: under emulation that steals the CPU from the working ones
        env = {"OMP_WAIT_POLICY": "PASSIVE", "PATH": "/usr/bin:/bin"}
        proc = subprocess.run(cmd, capture_output=True, timeout=600, env=env, cwd=self.root)  # cwd: core dumps
        if proc.returncode:
            how = f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else proc.returncode
            pytest.fail(f"{' '.join(cmd)} exited with {how}: {proc.stderr.decode(errors='replace')}", pytrace=False)
        return decode(results.read_bytes(), calls)

    def results(self, isa: str, entry: str) -> list[Result]:
        if (isa, entry) not in self._results:
            self._results[isa, entry] = self.run(isa, cases(entry), entry)
        return self._results[isa, entry]


@pytest.fixture(scope="session")
def aarch64(tmp_path_factory: pytest.TempPathFactory) -> Aarch64:
    return Aarch64(tmp_path_factory.mktemp("aarch64"))


@pytest.fixture(scope="session")
def report(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Lines of measured differences, printed at the end of the session."""
    lines: list[str] = []
    yield lines
    terminal = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if terminal is not None and capture is not None and lines:
        with capture.global_and_fixture_disabled():
            terminal.write_line("")
            terminal.write_line("max |diff| / max |reference| of the worst output buffer, emulated aarch64 builds:")
            for line in lines:
                terminal.write_line("  " + line)


# ---- comparing


def compare(entry: str, runs: list[tuple[Call, Result, Result]], who: str, report: list[str]) -> None:
    """Each (call, result, reference result): the same rc, and each written buffer within the tolerance of the
    call's activation dtype, or equal for the matmul in int8 mode (specified bit for bit, kernels/common.h).
    Reports the worst difference per activation dtype and mode, then fails listing every call out of bounds."""
    failures: list[str] = []
    bad = 0  # calls with a failure
    worst: dict[str, tuple[float, float, str]] = {}
    for call, got, want in runs:
        where = f"{entry}({call.label}, act={call.act}{f', i8={call.i8}' if call.i8 else ''})"
        if got.rc != want.rc:
            failures.append(f"{where}: returned {got.rc}, the reference {want.rc}")
            bad += 1
            continue
        before = len(failures)
        for name, ref in want.out.items():
            a, b = as_float(got.out[name]), as_float(ref)
            scale, err = float(np.abs(b).max()), float(np.abs(a - b).max())
            rel = err / scale if scale else (0.0 if err == 0 else float("inf"))
            key = f"{'bf16' if call.act else 'fp32'}{' i16' if call.i8 & native.INT16 else ' i8' if call.i8 else ''}"
            if key not in worst or rel > worst[key][0]:
                worst[key] = (rel, err, f"{name} of {call.label}")
            exact = entry in ("quant_matmul", "quant_matmul_kind") and bool(call.i8)
            allowed = TOLERANCE_I16_LAYER if call.act == 0 and call.i8 & native.INT16 else TOLERANCE[call.act]
            if not (np.isfinite(a).all() and np.isfinite(b).all()) or (err > 0 if exact else rel > allowed):
                failures.append(
                    f"{where}: {name} max |diff| {err:.3g} (max |ref| {scale:.3g}, relative {rel:.3g}; "
                    f"allowed {0 if exact else allowed})"
                )
        bad += len(failures) > before
    for key, (rel, err, at) in sorted(worst.items()):
        where = f"(|diff| {err:.2e}; {at})" if err else "(all equal)"
        report.append(f"{who:34s} {entry:22s} {key:8s} {rel:9.2e} {where}")
    if failures:
        pytest.fail(f"{who}: {bad} of {len(runs)} calls differ:\n" + "\n".join(failures[:20]), pytrace=False)


# ---- the tests


def test_the_driver_takes_each_entry_points_arguments() -> None:
    """kernel_driver.c's table of buffer, integer and float counts against SIGNATURES (native.ENTRY_POINTS; the
    table itself is checked against aigc_kernels.h in test_native.py, the driver's calls by the compiler)."""
    table = re.findall(r'\{"(\w+)", (\d+), (\d+), (\d+), call_\w+\}', DRIVER_SOURCE.read_text())
    assert [name for name, *_ in table] == list(SIGNATURES)
    for name, nbuf, nint, nflt in table:
        kinds = [kind for _, kind in SIGNATURES[name]]
        counts = (kinds.count("b") + W_POINTERS * kinds.count("w"), kinds.count("i"), kinds.count("f"))
        assert (int(nbuf), int(nint), int(nflt)) == counts, name


@pytest.mark.parametrize("isa", [*NEON, "reference"])
def test_each_aarch64_build_names_its_isa_and_sees_the_emulated_cpu(isa: str, aarch64: Aarch64) -> None:
    name, features = aarch64.run(
        isa,
        [Call("aigc_kernels_isa", {"name": np.zeros(64, np.uint8)}, "name"), Call("aigc_cpu_features", {}, "features")],
        "isa",
    )
    assert name.rc == 0 and name.out["name"].tobytes().split(b"\0")[0].decode() == isa
    assert features.rc == CPU_FEATURES[QEMU_CPU[isa]], f"{features.rc} on qemu's {QEMU_CPU[isa]}"


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("isa", NEON)
def test_neon_build_computes_what_the_aarch64_reference_build_computes(
    isa: str, entry: str, aarch64: Aarch64, report: list[str]
) -> None:
    """Every case of the entry point (fp32 and bf16; the matmuls exact and in int8 mode) on the NEON build and on
    the reference build, both aarch64 under qemu. A build without the int8 mode must refuse it
    (AIGC_ERR_UNSUPPORTED)."""
    want, got = aarch64.results("reference", entry), aarch64.results(isa, entry)
    assert all(r.rc == 0 for r in want), f"the reference build refused a case: {[r.rc for r in want]}"
    runs = list(zip(cases(entry), got, want))
    if not native.ISAS[isa].has_int8:  # aigc_kernels.h: builds without int8 mode refuse i8 = 1
        refused = [g.rc for c, g, _ in runs if c.i8]
        unsupported = [native.AIGC_ERR_UNSUPPORTED] * len(refused)
        assert refused == unsupported, f"{isa} has no int8 mode, yet i8 = 1 returned {refused}"
        runs = [r for r in runs if not r[0].i8]
    compare(entry, runs, f"{isa} vs aarch64 reference", report)


@pytest.mark.parametrize("entry", ENTRIES)
def test_aarch64_reference_build_computes_what_this_machines_reference_build_computes(
    entry: str, aarch64: Aarch64, report: list[str]
) -> None:
    """The same plain C compiled for aarch64 (run under qemu) and for this machine (ctypes): equal up to float
    rounding (fused multiply-adds, libm)."""
    host = native.load("reference")
    want = [run_host(host, call) for call in cases(entry)]
    got = aarch64.results("reference", entry)
    compare(entry, list(zip(cases(entry), got, want)), f"aarch64 vs {native.machine()} reference", report)
