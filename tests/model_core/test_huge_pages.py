"""advise_huge_pages: the advice lands on the tensor's whole 2 MiB pages (Linux), and nothing else changes."""

from __future__ import annotations

import sys

import pytest
import torch

from model_core.huge_pages import HUGE_PAGE, advise_huge_pages
from model_core.kv_cache import PagedKVCache


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise advice is Linux's")
def test_the_advice_covers_the_whole_huge_pages_inside() -> None:
    t = torch.empty(3 * HUGE_PAGE + 12345, dtype=torch.uint8)
    if not advise_huge_pages(t):
        pytest.skip("this kernel takes no huge-page advice (built without transparent huge pages)")
    first = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE  # the first whole huge page inside t
    assert "hg" in _vm_flags(first)
    assert "hg" in _vm_flags(first + HUGE_PAGE)
    t.fill_(7)  # the memory works as before
    assert int(t.sum()) == 7 * t.numel()


def test_small_and_non_cpu_tensors_get_no_advice() -> None:
    assert not advise_huge_pages(torch.zeros(1000))  # no whole huge page inside
    assert not advise_huge_pages(torch.empty(4 * HUGE_PAGE, dtype=torch.uint8, device="meta"))


def test_a_large_cache_starts_zeroed() -> None:
    cache = PagedKVCache(2, 512, 16, 4, 64, torch.bfloat16)  # 2 x 8193 rows x 8 x 64 bf16: 16 MiB
    assert cache.kv.shape == (2, 512 * 16 + 1, 8, 64)
    assert not cache.kv.any()
