"""The C kernels (model_core/kernels/): one library per instruction set, compiled on first use, loaded with ctypes.

Each ISA's library is compiled from its sources (see kernels/common.h) with the system C compiler into a
per-user cache (named by a hash of the sources and flags; `AIGC_CACHE_DIR` moves it) and loaded with
ctypes. They use OpenMP and share PyTorch's thread pool (the same libgomp is loaded). Which one a model
uses is decided once, by `model_core.backend`. `python -m model_core.native --build` fills the cache
ahead of time with every library this CPU runs.
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

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).parent / "kernels"
COMMON_FLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared")
LIBS = ("-lm", "-Wl,-z,defs")  # a symbol left undefined fails the build, not the load
SIMD_SOURCES = ("qmatmul.c", "qmatmul_i8.c", "attention.c", "ops.c", "layer.c", "cpu.c")


@dataclass(frozen=True)
class Isa:
    name: str
    arch: str  # the machine (platform.machine()) it runs on; "" = any
    sources: tuple[str, ...]
    flags: tuple[str, ...]
    feature: int  # the aigc_cpu_features() bit it needs (0: none)
    max_rows: int  # decode batches up to this many rows run on the quantized weights by default (measured)
    q8_max_rows: int  # the same for 8-bit weights (their blocks cost more to decode in some builds)
    int8: bool  # its matmuls round activations to int8 per block (integer dot products, as llama.cpp) by default
    has_int8: bool  # it has that mode (interleaved weights; see kernels/common.h)


# best first; features as kernels/cpu.c reports them
CPU_AVX2, CPU_AVX512BF16, CPU_NEON, CPU_NEON_DOTPROD, CPU_AMX_BF16, CPU_AVX512F = 1, 2, 4, 8, 16, 32
ISAS: dict[str, Isa] = {
    isa.name: isa
    for isa in (
        Isa(
            "avx512bf16",
            "x86_64",
            (*SIMD_SOURCES, "qmatmul_avx512bf16.c"),
            ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-mf16c"),
            CPU_AVX512BF16,
            6,
            4,
            False,
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
        Isa("reference", "", ("reference.c", "layer.c", "cpu.c"), (), 0, 16, 16, False, True),
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


class Kernels:
    """One ISA's loaded library, its entry points typed (see kernels/layer.c)."""

    def __init__(self, isa: Isa, path: Path) -> None:
        self.isa, self.path = isa, path
        self.lib = lib = ctypes.CDLL(str(path))
        ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        lib.aigc_kernels_isa.restype = ctypes.c_char_p
        lib.aigc_kernels_isa.argtypes = []
        lib.aigc_cpu_features.argtypes = []
        lib.quant_matmul.argtypes = [ptr, i32, *[ptr] * 5, *[i32] * 5]
        lib.paged_attention_decode.argtypes = [*[ptr] * 5, *[i32] * 5, f32, i32, i32]
        lib.llama_rmsnorm.argtypes = [ptr, ptr, f32, ptr, i32, i32, i32]
        lib.llama_add_rmsnorm.argtypes = [ptr, ptr, ptr, f32, ptr, i32, i32, i32]
        lib.llama_swiglu.argtypes = [ptr, ptr, i32, i32, i32]
        lib.llama_attention.argtypes = [ptr, i32, *[ptr] * 7, *[i32] * 6]
        lib.llama_decode_layer.argtypes = [ptr, i32, i32, ptr, ptr, f32, *[ptr] * 7, *[i32] * 8]
        for fn in (
            lib.aigc_cpu_features,
            lib.quant_matmul,
            lib.paged_attention_decode,
            lib.llama_decode_layer,
            lib.llama_rmsnorm,
            lib.llama_add_rmsnorm,
            lib.llama_swiglu,
            lib.llama_attention,
        ):
            fn.restype = i32
        built_for = lib.aigc_kernels_isa().decode()
        if built_for != isa.name:
            raise KernelsUnavailable(f"{path} holds the {built_for!r} kernels, not {isa.name!r}")

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
    return bits


def machine() -> str:
    return platform.machine().lower().replace("arm64", "aarch64").replace("amd64", "x86_64")


@functools.cache
def cpu_features() -> int:
    """What this CPU runs (CPU_* bits), asked of the CPU through the reference library (CPUID, HWCAP: right under
    emulators too), else read from /proc/cpuinfo."""
    try:
        return int(load("reference").lib.aigc_cpu_features())
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
