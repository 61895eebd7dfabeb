"""Page-locked (pinned) host memory at the size asked, for copies the GPU's DMA engines can run
asynchronously.

torch's `pin_memory=True` goes through its caching host allocator, which rounds every block up
to a power of two: a llada2-mini layer bank of 1.61 GB takes 2 GiB of pinned RAM, a flash layer
of 6.44 GB takes 8 GiB. Pinned memory cannot be swapped, so that waste can starve the host.
Here a plain host tensor (page-aligned) is registered with CUDA (cudaHostRegister) over exactly
its pages, and unregistered when the owner is done (release()). Without CUDA nothing is pinned
and the same code paths run.

How much may be pinned: at most PINNED_SHARE of the host's RAM (the executor's memory check
refuses more before anything is allocated).
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np
import torch

PAGE = mmap.PAGESIZE
PINNED_SHARE = 0.5   # pinned memory cannot be paged out; leave the OS and the page cache the rest


def pinned_bytes(nbytes: int) -> int:
    """Pinned bytes for a buffer of `nbytes`: whole pages, no power-of-two rounding."""
    return -(-int(nbytes) // PAGE) * PAGE


def page_aligned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous host tensor whose first byte starts a page (over-allocated by < one page)."""
    el = torch.empty(0, dtype=dtype).element_size()
    numel = 1
    for d in shape:
        numel *= int(d)
    raw = torch.empty(numel * el + PAGE, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % PAGE
    return raw[skip:skip + numel * el].view(dtype).view(shape)


class HostPinning:
    """Registers host tensors as pinned (CUDA) and unregisters them in release().

    Keeps a reference to every tensor it pinned, so none is freed while registered. With
    `enabled` False (no CUDA) it pins nothing and counts nothing.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._held: list[tuple[torch.Tensor, int]] = []
        self.bytes = 0
        self.refused: list[str] = []

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A new host tensor of `shape`, pinned when enabled."""
        t = page_aligned_empty(shape, dtype) if self.enabled else torch.empty(shape, dtype=dtype)
        self.pin(t)
        return t

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        """Register `t` (contiguous, on the host) over its own pages; returns it."""
        if not self.enabled or t.numel() == 0 or t.is_pinned():
            return t
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("only contiguous host tensors can be pinned")
        ptr = t.data_ptr()
        start = ptr - ptr % PAGE
        size = pinned_bytes(ptr + t.numel() * t.element_size() - start)
        err = torch.cuda.cudart().cudaHostRegister(start, size, 0)
        if _code(err) != 0:
            # refused (a container's locked-memory limit, an overlapping registration): the tensor
            # stays pageable, copies from it stage through the driver's own pinned buffers (slower
            # and synchronous for the host) and calibrate, which pins the same way, measures that
            self.refused.append(f"cudaHostRegister of {size / 2**20:.1f} MiB refused (CUDA error {_code(err)}); "
                                "left pageable")
            return t
        self._held.append((t, start))
        self.bytes += size
        return t

    def release(self) -> None:
        """Unregister everything pinned here (the tensors stay valid, pageable)."""
        while self._held:
            _, start = self._held.pop()
            _check(torch.cuda.cudart().cudaHostUnregister(start), "cudaHostUnregister")
        self.bytes = 0


def _code(err: object) -> int:
    return int(getattr(err, "value", err))  # type: ignore[call-overload]


def _check(err: object, what: str) -> None:
    code = _code(err)
    if code != 0:
        raise RuntimeError(f"{what} failed with CUDA error {code}")


class IndexStaging:
    """Small host arrays (row indices, group offsets) to the device without blocking the host.

    A copy from pageable memory makes the host wait; here each array is written into the next
    chunk of a pinned int64 ring and copied asynchronously on the current stream, ordered before
    the kernels that read it. A chunk is reused only after its earlier copy has finished (an
    event, long done by then). Without CUDA the array is used in place (torch.from_numpy).
    """

    CHUNKS = 8

    def __init__(self, capacity: int, device: torch.device, pinning: HostPinning) -> None:
        self.device = device
        self.capacity = max(int(capacity), 1)
        self.cuda = device.type == "cuda"
        self._ring = pinning.empty((self.CHUNKS, self.capacity), torch.int64) if self.cuda else None
        self._done: list[Any] = [None] * self.CHUNKS
        self._next = 0

    def __call__(self, values: np.ndarray) -> torch.Tensor:
        arr = np.ascontiguousarray(values, dtype=np.int64)
        if not self.cuda:
            return torch.from_numpy(arr)
        n = int(arr.size)
        if n > self.capacity or self._ring is None:
            return torch.from_numpy(arr).to(self.device)   # larger than planned: a blocking copy
        k = self._next
        self._next = (k + 1) % self.CHUNKS
        if self._done[k] is not None:
            self._done[k].synchronize()
        chunk = self._ring[k, :n]
        chunk.numpy()[:] = arr
        out = torch.empty(n, dtype=torch.int64, device=self.device)
        out.copy_(chunk, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._done[k] = ev
        return out
