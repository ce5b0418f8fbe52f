"""The C kernels (model_core/kernels/): one library per instruction set, compiled on first use, loaded with ctypes.

Each ISA's library is compiled from its sources (see kernels/common.h) with the system C compiler into a
per-user cache (named by a hash of the sources and flags; `AIGC_CACHE_DIR` moves it) and loaded with
ctypes. They use OpenMP and share PyTorch's thread pool (the same libgomp is loaded). Which one a model
uses is decided once, by `model_core.backend`. `python -m model_core.native --build` fills the cache
ahead of time with every library this CPU runs.

What a library exports is declared in kernels/aigc_kernels.h, and mirrored here in ENTRY_POINTS (argument names
and ctypes types, return type, whether it returns a status): `Kernels` types every entry point from that table,
and `Kernels.call` checks the status, raising `KernelError` (the kernel's name and code) for a nonzero one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).parent / "kernels"
COMMON_FLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared", "-fvisibility=hidden")  # exported: AIGC_API only
LIBS = ("-lm", "-Wl,-z,defs")  # a symbol left undefined fails the build, not the load
SIMD_SOURCES = ("qmatmul.c", "qmatmul_i8.c", "attention.c", "ops.c", "layer.c", "lora.c", "cpu.c")


@dataclass(frozen=True)
class Isa:
    name: str
    arch: str  # the machine (platform.machine()) it runs on; "" = any
    sources: tuple[str, ...]
    flags: tuple[str, ...]
    feature: int  # the aigc_cpu_features() bit it needs (0: none)
    max_rows: int  # decode batches up to this many rows run on the quantized weights by default (measured)
    wide_max_rows: int  # the same for the float kinds (F16, BF16: no AMX tile path; a layer with a block part takes
    # max_rows)
    int8: bool  # its matmuls round activations to int8 per block (integer dot products, as llama.cpp) by default
    has_int8: bool  # it has that mode (interleaved weights; see kernels/common.h)


# best first; features as kernels/cpu.c reports them (the CPU_* bits of kernels/aigc_kernels.h)
CPU_AVX2, CPU_AVX512BF16, CPU_NEON, CPU_NEON_DOTPROD, CPU_AMX_BF16, CPU_AVX512F, CPU_AVX512VNNI = 1, 2, 4, 8, 16, 32, 64
ISAS: dict[str, Isa] = {
    isa.name: isa
    for isa in (
        Isa(
            "avx512bf16",
            "x86_64",
            (*SIMD_SOURCES, "qmatmul_avx512bf16.c"),
            (
                *("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mfma", "-mf16c"),
                *("-mamx-tile", "-mamx-bf16", "-mamx-int8"),
            ),
            CPU_AVX512BF16 | CPU_AVX512VNNI,
            16,  # on AMX tiles from 8 rows (kernels/qmatmul_avx512bf16.c); without AMX: backend.NO_AMX_MAX_ROWS
            4,  # (a SmolLM2 F16 step at 8 and 16 rows: 345 and 570 tok/s dense, 250 and 270 on its vector path)
            False,
            True,
        ),
        # the avx2 build's integer modes with AVX512-VNNI's vpdpbusd (on 512-bit vectors: the same sums bit for bit)
        # and the other kernels at 16 floats; before avx2: 1.4-1.5x avx2's SmolLM2 steps on Sapphire Rapids cores
        # (README, Native kernels)
        Isa(
            "avx512vnni",
            "x86_64",
            SIMD_SOURCES,
            ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"),
            CPU_AVX512VNNI | CPU_AVX2,
            32,
            32,
            True,
            True,
        ),
        Isa("avx2", "x86_64", SIMD_SOURCES, ("-mavx2", "-mfma", "-mf16c"), CPU_AVX2, 32, 32, True, True),
        Isa(
            "neon-dotprod",
            "aarch64",
            SIMD_SOURCES,
            ("-march=armv8.2-a+dotprod",),
            CPU_NEON | CPU_NEON_DOTPROD,
            32,
            32,
            True,
            True,
        ),
        Isa("neon", "aarch64", SIMD_SOURCES, ("-march=armv8-a",), CPU_NEON, 16, 16, False, False),
        Isa("reference", "", ("reference.c", "layer.c", "lora.c", "cpu.c"), (), 0, 16, 16, False, True),
    )
}


class KernelsUnavailable(RuntimeError):
    """An ISA's library cannot run here (not this CPU, no compiler, the build failed)."""


def cache_dir() -> Path:
    root = os.environ.get("AIGC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "aigc-serve"
    )
    return Path(root) / "kernels"


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def command(isa: Isa, cc: str, out: Path) -> list[str]:
    return [
        cc,
        *COMMON_FLAGS,
        *isa.flags,
        f'-DAIGC_ISA="{isa.name}"',
        *(str(KERNEL_DIR / s) for s in isa.sources),
        *LIBS,
        "-o",
        str(out),
    ]


def library_path(isa: Isa, cross_cc: str | None = None) -> Path:
    """Where an ISA's library compiles to: the cache, under a hash of the sources, headers and flags (and of the
    compiler, for a cross-compiler's build), so that a cache filled ahead of time serves a machine without gcc."""
    digest = hashlib.sha256(
        " ".join((*COMMON_FLAGS, *LIBS, *isa.flags, isa.name, *isa.sources, os.path.basename(cross_cc or ""))).encode()
    )
    for f in sorted(KERNEL_DIR.glob("*.[ch]")):
        digest.update(f.name.encode() + f.read_bytes())
    return cache_dir() / f"aigc-kernels-{isa.name}-{digest.hexdigest()[:16]}.so"


def build(name: str, cc: str | None = None) -> Path:
    """Compile an ISA's library into the cache, unless it is there (for this machine, or for another with a
    cross-compiler `cc`); raises OSError/SubprocessError."""
    isa = ISAS[name]
    target = library_path(isa, cc)
    if target.exists():
        return target
    cc = cc or compiler()
    if cc is None:
        raise OSError("no C compiler (gcc or cc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run(command(isa, cc, out), check=True, capture_output=True, timeout=300)
        os.replace(out, target)  # atomic: concurrent builders each install a whole file
    return target


# The argument kinds of ENTRY_POINTS' specs: a pointer (a tensor's data_ptr(), or None), an array of pointers
# (ctypes.c_void_p * n), a C int, a float, an int64_t.
ARG_TYPES: dict[str, Any] = {
    "p": ctypes.c_void_p,
    "w": ctypes.POINTER(ctypes.c_void_p),
    "i": ctypes.c_int,
    "f": ctypes.c_float,
    "l": ctypes.c_int64,
}


@dataclass(frozen=True)
class EntryPoint:
    """One exported function of kernels/aigc_kernels.h: its return type, its arguments in order (name, kind of
    ARG_TYPES) and whether that return is an AIGC_* status (`Kernels.call` raises KernelError for nonzero)."""

    restype: Any
    args: tuple[tuple[str, str], ...]
    status: bool = True

    @property
    def argtypes(self) -> list[Any]:
        return [ARG_TYPES[kind] for _, kind in self.args]


def _entry(restype: Any, spec: str, status: bool = True) -> EntryPoint:
    """spec: 'name:kind ...' in the C declaration's order."""
    return EntryPoint(restype, tuple((n, k) for n, _, k in (a.partition(":") for a in spec.split())), status)


_I, _L = ctypes.c_int, ctypes.c_int64
# kernels/aigc_kernels.h, entry for entry (tests/model_core/test_native.py checks the two agree).
ENTRY_POINTS: dict[str, EntryPoint] = {
    "aigc_kernels_isa": _entry(ctypes.c_char_p, "", status=False),
    "aigc_cpu_features": _entry(_I, "", status=False),
    "quant_matmul": _entry(_I, "x:p act:i qs:p d:p m:p bias:p y:p M:i N:i K:i i8:i nthreads:i"),
    "paged_attention_decode": _entry(
        _I, "q:p kv:p rows:p lens:p out:p B:i nh:i nkv:i hs:i Tk:i scale:f softcap:f window:i act:i nthreads:i"
    ),
    "llama_rmsnorm": _entry(_I, "x:p w:p eps:f out:p B:i C:i act:i"),
    "llama_add_rmsnorm": _entry(_I, "x:p y:p w:p eps:f out:p B:i C:i act:i"),
    "llama_swiglu": _entry(_I, "gu:p g:p B:i F:i gate:i act:i"),
    "llama_decode_scratch_bytes": _entry(_L, "B:i C:i nh:i nkv:i hs:i F:i act:i", status=False),
    "llama_attention": _entry(
        _I,
        "qkv:p B:i eps:f q_norm:p k_norm:p cos:p sin:p kv:p write:p rows:p lens:p att:p Tk:i nh:i nkv:i hs:i "
        "scale:f softcap:f window:i act:i nthreads:i scratch:p scratch_bytes:l",
    ),
    "llama_decode_layer": _entry(
        _I,
        "x:p B:i C:i attn_norm:p ffn_norm:p post_attn_norm:p post_ffn_norm:p eps:f w:w kinds:p parts:p qkv_bias:p "
        "q_norm:p "
        "k_norm:p cos:p sin:p kv:p write:p rows:p lens:p Tk:i nh:i nkv:i hs:i F:i gate:i scale:f softcap:f window:i "
        "act:i i8:i nthreads:i scratch:p scratch_bytes:l lora_slots:p lora_G:i lora_a:p lora_bt:p lora_ranks:p",
    ),
    "llama_decode_layers": _entry(
        _I,
        "L:i layers:p x:p B:i C:i eps:f write:p rows:p lens:p Tk:i nh:i nkv:i hs:i F:i gate:i scale:f softcap:f "
        "act:i nthreads:i scratch:p scratch_bytes:l failed:p",
    ),
    "quant_matmul_kind": _entry(_I, "x:p act:i kind:i qs:p d:p m:p bias:p y:p M:i N:i K:i i8:i nthreads:i"),
    "quant_dequantize": _entry(_I, "kind:i qs:p d:p m:p out:p N:i K:i act:i nthreads:i"),
    "lora_add": _entry(_I, "x:p out:p N:i n_in:i n_out:i act:i choice:p G:i A:p Bt:p ranks:p nthreads:i"),
}

# llama_decode_layer's most parts of one projection (AIGC_PROJECTION_PARTS of kernels/aigc_kernels.h)
PROJECTION_PARTS = 3
# llama_decode_layers' arguments of each layer, in order (the AIGC_LA_* of kernels/aigc_kernels.h): int64 values,
# addresses for the pointers (0: NULL)
LAYER_ARGS = (
    "attn_norm ffn_norm post_attn_norm post_ffn_norm w kinds parts qkv_bias q_norm k_norm cos sin kv lora_slots lora_a "
    "lora_bt lora_ranks window i8 lora_g"
).split()
# the matmuls' mode bits (their i8 argument): int8 activations; one method at every batch size (batch-invariant);
# with INT8, activations rounded to 16 bits (two int8 halves) instead of 8
INT8, EVERY_BATCH, INT16 = 1, 2, 4

# The AIGC_* statuses of kernels/aigc_kernels.h.
AIGC_OK, AIGC_ERR_ARGS, AIGC_ERR_NOMEM, AIGC_ERR_UNSUPPORTED = 0, -1, -2, -3
STATUS = {
    AIGC_OK: "AIGC_OK",
    AIGC_ERR_ARGS: "AIGC_ERR_ARGS (a shape, size or argument outside what the kernel takes)",
    AIGC_ERR_NOMEM: "AIGC_ERR_NOMEM (an allocation failed)",
    AIGC_ERR_UNSUPPORTED: "AIGC_ERR_UNSUPPORTED (this build lacks the mode asked for)",
}


class KernelError(RuntimeError):
    """A kernel returned a nonzero AIGC_* status."""

    def __init__(self, kernel: str, code: int, isa: str, context: str = "") -> None:
        self.kernel, self.code, self.isa = kernel, code, isa
        what = STATUS.get(code, "an unknown status")
        super().__init__(f"kernel {kernel} ({isa} build) returned {code}: {what}{f'; {context}' if context else ''}")


class Kernels:
    """One ISA's loaded library, its entry points typed from ENTRY_POINTS (see kernels/aigc_kernels.h)."""

    def __init__(self, isa: Isa, path: Path) -> None:
        self.isa, self.path = isa, path
        self.lib = lib = ctypes.CDLL(str(path))
        self._fns: dict[str, Any] = {}
        for name, entry in ENTRY_POINTS.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = entry.restype, entry.argtypes
            self._fns[name] = fn
        built_for = lib.aigc_kernels_isa().decode()
        if built_for != isa.name:
            raise KernelsUnavailable(f"{path} holds the {built_for!r} kernels, not {isa.name!r}")

    def call(self, name: str, *args: Any, context: str = "") -> int:
        """Run entry point `name` (ENTRY_POINTS); a nonzero status raises KernelError naming it, its code and
        `context` (e.g. the shapes). Returns the result (0 for a status)."""
        rc: int = self._fns[name](*args)
        if rc and ENTRY_POINTS[name].status:
            raise KernelError(name, rc, self.isa.name, context)
        return rc

    @property
    def name(self) -> str:
        return self.isa.name

    def __repr__(self) -> str:
        return f"Kernels({self.isa.name!r})"


def features_from_cpuinfo(text: str, machine: str) -> int:
    """CPU_* bits from /proc/cpuinfo's text (x86 `flags`, aarch64 `Features` lines)."""
    words: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            words.update(value.split())
    bits = 0
    if {"avx2", "fma", "f16c"} <= words:
        bits |= CPU_AVX2
    if {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= words:
        bits |= CPU_AVX512BF16
    if "asimd" in words or machine in ("aarch64", "arm64"):
        bits |= CPU_NEON
    if "asimddp" in words:
        bits |= CPU_NEON_DOTPROD
    if {"amx_bf16", "amx_tile"} <= words:
        bits |= CPU_AMX_BF16
    if "avx512f" in words:
        bits |= CPU_AVX512F
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= words:
        bits |= CPU_AVX512VNNI
    return bits


def machine() -> str:
    return platform.machine().lower().replace("arm64", "aarch64").replace("amd64", "x86_64")


@functools.cache
def cpu_features() -> int:
    """What this CPU runs (CPU_* bits), asked of the CPU through the reference library (CPUID, HWCAP: right under
    emulators too), else read from /proc/cpuinfo."""
    try:
        return load("reference").call("aigc_cpu_features")
    except KernelsUnavailable:
        try:
            with open("/proc/cpuinfo") as f:
                return features_from_cpuinfo(f.read(), machine())
        except OSError:
            return features_from_cpuinfo("", machine())


def runs_here(isa: Isa) -> bool:
    return (not isa.arch or isa.arch == machine()) and (cpu_features() & isa.feature) == isa.feature


def runnable() -> list[str]:
    """The ISAs this CPU executes, best first (the reference last)."""
    return [name for name, isa in ISAS.items() if runs_here(isa)]


@functools.cache
def load(name: str) -> Kernels:
    """An ISA's library, built if needed; KernelsUnavailable (with the reason) where it cannot run here."""
    isa = ISAS[name]
    if name != "reference" and not runs_here(isa):
        raise KernelsUnavailable(f"this CPU cannot run the {name} kernels")
    try:
        return Kernels(isa, build(name))
    except (OSError, subprocess.SubprocessError) as e:
        stderr = getattr(e, "stderr", None) or b""
        raise KernelsUnavailable(
            f"building the {name} kernels failed: {e} {stderr.decode(errors='replace')[-500:]}"
        ) from e


def buildable() -> list[str]:
    """The ISAs of this machine's architecture (whether or not this CPU runs them): what an image ships."""
    return [name for name, isa in ISAS.items() if isa.arch in ("", machine())]


if __name__ == "__main__":  # fill the cache, e.g. in an image build where the compiler is
    import sys

    if sys.argv[1:] != ["--build"]:
        sys.exit("usage: python -m model_core.native --build")
    for name in buildable():  # the image may run on another CPU of this architecture than the one building it
        print(name, build(name))
