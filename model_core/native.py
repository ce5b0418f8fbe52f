"""Small C kernels (model_core/kernels/*.c), compiled on first use and loaded with ctypes.

Each source is compiled once with the system C compiler into a per-user cache (keyed by a hash of
the source and flags; `AIGC_CACHE_DIR` moves it) and loaded with ctypes. The kernels use OpenMP and
share PyTorch's thread pool (the same libgomp is loaded). Where they cannot run (no AVX-512, no
compiler, `AIGC_NATIVE_KERNELS=0`), `load_library` returns None and callers keep their PyTorch path.
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
CFLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "fma", "f16c")
# kernel -> (extra compiler flags, extra /proc/cpuinfo flags it needs at run time)
KERNELS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "qmatmul": (("-mavx512bf16",), ("avx512_bf16",)),
    "paged_attention": ((), ()),
}


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


def library_path(name: str) -> Path:
    """Where kernels/<name>.c compiles to: the cache, under a hash of the source and flags."""
    source = KERNEL_DIR / f"{name}.c"
    cflags = (*CFLAGS, *KERNELS[name][0])
    digest = hashlib.sha256(source.read_bytes() + " ".join(cflags).encode()).hexdigest()[:16]
    return cache_dir() / f"{name}-{digest}.so"


def build(name: str) -> Path:
    """Compile kernels/<name>.c into the cache (whatever this CPU is); raises OSError/SubprocessError."""
    target = library_path(name)
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise OSError("no C compiler (gcc or cc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run([cc, *CFLAGS, *KERNELS[name][0], str(KERNEL_DIR / f"{name}.c"), "-o", str(out)],
                       check=True, capture_output=True, timeout=300)
        os.replace(out, target)  # atomic: concurrent builders each install a whole file
    return target


@functools.cache
def load_library(name: str) -> ctypes.CDLL | None:
    """kernels/<name>.c as a loaded library, or None (the reason logged once) where it cannot run."""
    if not enabled():
        return None
    missing = [f for f in (*CPU_FLAGS, *KERNELS[name][1]) if f not in cpu_flags()]
    if missing:
        log.info("native kernel %s off: this CPU lacks %s", name, ", ".join(missing))
        return None
    try:
        path = build(name)
    except (OSError, subprocess.SubprocessError) as e:
        stderr = getattr(e, "stderr", None) or b""
        log.warning("native kernel %s off (PyTorch path used): build failed: %s %s", name, e,
                    stderr.decode(errors="replace")[-500:])
        return None
    return ctypes.CDLL(str(path))


if __name__ == "__main__":  # python -m model_core.native --build-all: fill the cache (e.g. in an image build)
    import sys

    if sys.argv[1:] != ["--build-all"]:
        sys.exit("usage: python -m model_core.native --build-all")
    for kernel in KERNELS:
        print(kernel, build(kernel))
