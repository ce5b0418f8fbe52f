"""The C kernels (model_core/kernels/*.c): compiled on first use, loaded with ctypes.

All sources are compiled together, once, with the system C compiler into a per-user cache (named by
a hash of the sources and flags; `AIGC_CACHE_DIR` moves it) and loaded with ctypes. They use OpenMP
and share PyTorch's thread pool (the same libgomp is loaded). Where they cannot run (a CPU without
AVX-512 BF16, no compiler, `AIGC_NATIVE_KERNELS=0`), `load_library` returns None and the callers keep
their PyTorch paths. `python -m model_core.native --build` fills the cache ahead of time.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).parent / "kernels"
CFLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-mf16c", "-fopenmp", "-fPIC",
          "-shared")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "fma", "f16c")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def enabled() -> bool:
    return os.environ.get("AIGC_NATIVE_KERNELS", "1").lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("AIGC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "aigc-serve")
    return Path(root) / "kernels"


def _sources() -> list[Path]:
    return sorted(KERNEL_DIR.glob("*.c"))


def library_path() -> Path:
    """Where the kernels compile to: the cache, under a hash of the sources, headers and flags."""
    digest = hashlib.sha256(" ".join(CFLAGS).encode())
    for f in sorted(KERNEL_DIR.glob("*.[ch]")):
        digest.update(f.name.encode() + f.read_bytes())
    return cache_dir() / f"aigc-kernels-{digest.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile the kernels into the cache (whatever this CPU is); raises OSError/SubprocessError."""
    target = library_path()
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise OSError("no C compiler (gcc or cc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run([cc, *CFLAGS, *map(str, _sources()), "-o", str(out)], check=True, capture_output=True,
                       timeout=300)
        os.replace(out, target)  # atomic: concurrent builders each install a whole file
    return target


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The kernels as a loaded library, or None (the reason logged once) where they cannot run here."""
    if not enabled():
        return None
    missing = [f for f in CPU_FLAGS if f not in cpu_flags()]
    if missing:
        log.info("native kernels off: this CPU lacks %s", ", ".join(missing))
        return None
    try:
        path = build()
    except (OSError, subprocess.SubprocessError) as e:
        stderr = getattr(e, "stderr", None) or b""
        log.warning("native kernels off (PyTorch paths used): build failed: %s %s", e,
                    stderr.decode(errors="replace")[-500:])
        return None
    lib = ctypes.CDLL(str(path))
    lib.quant_matmul_bf16.argtypes = [*[ctypes.c_void_p] * 6, *[ctypes.c_int] * 4]
    lib.paged_attention_decode.argtypes = [*[ctypes.c_void_p] * 5, *[ctypes.c_int] * 5, ctypes.c_float,
                                           ctypes.c_int, ctypes.c_int]
    lib.llama_decode_layer.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_float, *[ctypes.c_void_p] * 7, *[ctypes.c_int] * 6]
    ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.llama_rmsnorm.argtypes = [ptr, ptr, f32, ptr, i32, i32]
    lib.llama_add_rmsnorm.argtypes = [ptr, ptr, ptr, f32, ptr, i32, i32]
    lib.llama_swiglu.argtypes = [ptr, ptr, i32, i32]
    lib.llama_attention.argtypes = [ptr, i32, *[ptr] * 7, *[i32] * 5]
    for fn in (lib.quant_matmul_bf16, lib.paged_attention_decode, lib.llama_decode_layer, lib.llama_rmsnorm,
               lib.llama_add_rmsnorm, lib.llama_swiglu, lib.llama_attention):
        fn.restype = ctypes.c_int
    return lib


if __name__ == "__main__":  # fill the cache, e.g. in an image build where the compiler is
    import sys

    if sys.argv[1:] != ["--build"]:
        sys.exit("usage: python -m model_core.native --build")
    print(build())
