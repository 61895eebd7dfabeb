"""Huge-page advice for large host tensors (runtime/tidesim_runtime/reference/host_memory.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tidesim_runtime.reference.host_memory import (  # noqa: E402
    HUGE_PAGE,
    advise_huge_pages,
    advise_module,
    huge_page_span,
    huge_pages_available,
)


def test_span_covers_only_whole_huge_pages() -> None:
    # an allocation starting 64 bytes past a huge page boundary and 5 huge pages long holds 4 whole ones
    start, length = huge_page_span(10 * HUGE_PAGE + 64, 5 * HUGE_PAGE)
    assert (start, length) == (11 * HUGE_PAGE, 4 * HUGE_PAGE)
    assert huge_page_span(HUGE_PAGE + 1, HUGE_PAGE) == (2 * HUGE_PAGE, 0)
    assert huge_page_span(4 * HUGE_PAGE, 2 * HUGE_PAGE) == (4 * HUGE_PAGE, 2 * HUGE_PAGE)


def _anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages on this system")
def test_advised_tensor_is_backed_by_huge_pages_and_keeps_its_values() -> None:
    before = _anon_huge_kib()
    t = torch.empty(32 * HUGE_PAGE, dtype=torch.uint8)
    assert advise_huge_pages(t)
    t.fill_(7)
    grown_kib = _anon_huge_kib() - before
    # at least half of the 64 MiB landed in huge pages (the kernel may refuse some when memory is fragmented)
    assert grown_kib >= 16 * HUGE_PAGE // 1024
    assert int(t.sum()) == 7 * t.numel()


def test_small_and_non_cpu_tensors_are_left_alone() -> None:
    assert not advise_huge_pages(torch.empty(HUGE_PAGE // 2, dtype=torch.uint8))
    module = torch.nn.Linear(8, 8)
    assert advise_module(module) == 0
