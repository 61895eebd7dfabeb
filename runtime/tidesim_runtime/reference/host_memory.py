"""Transparent huge pages for the model's large host tensors.

A mini-shaped model holds about 10 GB of float32 expert weights in host memory; touching them for
the first time in 4 KiB pages costs millions of page faults (on the 2-core development machine
about half the load time of `tidesim trace capture` was system time). Linux backs a region with
2 MiB pages when it is advised to (MADV_HUGEPAGE) and transparent huge pages are in `madvise` or
`always` mode, so the model's parameters are advised right after they are allocated and before
they are first written. Nothing changes where the kernel says no (other systems, THP `never`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20          # bytes: x86-64 and arm64 transparent huge page size
MADV_HUGEPAGE = 14           # <linux/mman.h>
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@lru_cache(maxsize=1)
def huge_pages_available() -> bool:
    """Linux with transparent huge pages in `always` or `madvise` mode."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[never]" not in setting


@lru_cache(maxsize=1)
def _madvise() -> Callable[[int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    fn = ctypes.CDLL(name, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def huge_page_span(address: int, nbytes: int) -> tuple[int, int]:
    """(start, length) of the whole huge pages inside [address, address + nbytes); length 0 if none."""
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    end = (address + nbytes) // HUGE_PAGE * HUGE_PAGE
    return start, max(0, end - start)


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask the kernel to back the tensor's whole 2 MiB pages with huge pages; True if it agreed.
    Call before the tensor is first written (pages already touched stay small)."""
    if tensor.device.type != "cpu" or not huge_pages_available():
        return False
    start, length = huge_page_span(tensor.data_ptr(), tensor.untyped_storage().nbytes())
    fn = _madvise()
    if length == 0 or fn is None:
        return False
    return int(fn(start, length, MADV_HUGEPAGE)) == 0


def advise_module(module: torch.nn.Module, min_bytes: int = 2 * HUGE_PAGE) -> int:
    """advise_huge_pages for every parameter and buffer of at least `min_bytes`; how many agreed."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(advise_huge_pages(t) for t in tensors if t.untyped_storage().nbytes() >= min_bytes)
