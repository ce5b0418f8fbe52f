"""Transparent huge pages for a large CPU buffer read in scattered pieces: the paged KV cache.

A decode step reads each sequence's keys block by block from wherever its blocks lie; with 4 KiB pages a key row
of a few hundred bytes crosses into a new page every few keys, each a TLB miss and a restart of the hardware
prefetcher (which stops at page boundaries). Backed by 2 MiB pages, the same reads ran 10-16% faster (16 sequences
of 200 keys in 30 layers of SmolLM2's shape, blocks in random order; README.md, Benchmarks). Linux's
`madvise(MADV_HUGEPAGE)` asks for them where the system leaves it to the program (THP "madvise", the common
default); "always" gives them anyway and "never" refuses: the advice changes nothing there.
"""

from __future__ import annotations

import ctypes
import sys

import torch

MADV_HUGEPAGE = 14  # linux/mman.h
HUGE_PAGE = 2 << 20  # x86-64 and arm64 (4 KiB base pages)


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Advise huge pages for the 2 MiB-aligned pages inside t's memory (CPU), before anything touches it: its first
    writes then fault in huge pages. Returns whether the advice was given (False: not Linux, not on the CPU, smaller
    than a huge page, or refused by the system); the tensor is unchanged either way."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu":
        return False
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo, hi = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE  # whole huge pages within it
    if hi <= lo:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return bool(libc.madvise(lo, hi - lo, MADV_HUGEPAGE) == 0)
