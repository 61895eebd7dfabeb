"""Pinned host memory at the size asked: page rounding only, and the registry that pins and
unpins; the CUDA test checks that a registered tensor is pinned and copies asynchronously."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tidesim_runtime.engine.pinned import (  # noqa: E402
    PAGE,
    HostPinning,
    IndexStaging,
    page_aligned_empty,
    pinned_bytes,
)


def test_pinned_bytes_round_to_pages_not_powers_of_two() -> None:
    mini_bank = 256 * 3 * 2048 * 512 * 2          # a llada2-mini layer bank in bf16: 1.61 GB
    assert pinned_bytes(mini_bank) == mini_bank      # a whole number of pages already
    assert pinned_bytes(mini_bank) < 2**31           # the caching allocator would take 2 GiB
    assert pinned_bytes(1) == PAGE and pinned_bytes(PAGE + 1) == 2 * PAGE and pinned_bytes(0) == 0


def test_page_aligned_empty_starts_on_a_page() -> None:
    for shape in [(3, 5), (1000,), (7, 1, 9)]:
        t = page_aligned_empty(shape, torch.bfloat16)
        assert t.shape == shape and t.is_contiguous() and t.data_ptr() % PAGE == 0
        t.fill_(1.0)
        assert float(t.float().sum()) == t.numel()


class RefusingCudart:
    """Stands in for torch.cuda.cudart() where cudaHostRegister is refused (error 2: out of memory)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802 (CUDA's name)
        self.calls.append((ptr, size))
        return 2

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        raise AssertionError("nothing was registered")


def test_refused_registration_leaves_the_tensor_pageable_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = RefusingCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    pins = HostPinning(enabled=True)
    t = pins.empty((3, PAGE), torch.float32)
    assert t.shape == (3, PAGE) and len(fake.calls) == 1 and fake.calls[0][1] == pinned_bytes(3 * PAGE * 4)
    assert pins.bytes == 0 and len(pins.refused) == 1 and "refused (CUDA error 2)" in pins.refused[0]
    t.fill_(2.0)                      # still an ordinary host tensor
    pins.release()                    # unregisters nothing


def test_index_staging_without_cuda_uses_the_array_in_place() -> None:
    stage = IndexStaging(4, torch.device("cpu"), HostPinning(enabled=False))
    a = np.array([3, 1, 2], dtype=np.int64)
    t = stage(a)
    assert t.tolist() == [3, 1, 2] and t.dtype == torch.int64 and t.data_ptr() == a.ctypes.data


def test_pinning_without_cuda_is_a_no_op() -> None:
    pins = HostPinning(enabled=False)
    pins.empty((4, 4), torch.float32)
    assert pins.bytes == 0 and pins.pin(torch.zeros(8)) is not None and pins.bytes == 0
    pins.release()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinning_registers_exactly_the_tensors_pages() -> None:
    pins = HostPinning(enabled=True)
    n = 3 * 2048 * 512 * 5 + 17                      # not a power of two
    t = pins.empty((n,), torch.bfloat16)
    try:
        assert t.is_pinned()
        assert pins.bytes == pinned_bytes(n * 2)
        dev = torch.empty(n, dtype=torch.bfloat16, device="cuda")
        dev.copy_(t.fill_(2.0), non_blocking=True)
        torch.cuda.synchronize()
        assert float(dev.float().mean()) == 2.0
    finally:
        pins.release()
    assert not t.is_pinned() and pins.bytes == 0
