"""The clock of `tidesim calibrate`: samples and their statistics.

On CUDA a sample is the time between two CUDA events on the compute stream around the work; on
the CPU-as-GPU path the host clock. Repeats are interleaved over the points of a curve.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tidesim_runtime.engine.device import DeviceInfo
from tidesim_runtime.engine.streams import Backend

# Seconds of work before a curve is timed: a GPU takes tens to hundreds of milliseconds to leave
# its idle clocks; on the CPU path caches and the allocator settle within a few passes.
WARM_S_CUDA = 0.3
WARM_S_HOST = 0.05


@dataclass
class Stat:
    median_s: float
    spread_s: float


def stat(samples: list[float]) -> Stat:
    """Median, and spread = half the inter-quartile range (robust to a preempted repeat)."""
    if len(samples) >= 4:
        q1, _, q3 = statistics.quantiles(samples, n=4)
        spread = (q3 - q1) / 2
    else:
        spread = (max(samples) - min(samples)) / 2
    return Stat(statistics.median(samples), spread)


class Timer:
    """Times a callable on the device: CUDA events around it on CUDA, the host clock otherwise."""

    def __init__(self, device: DeviceInfo, backend: Backend) -> None:
        self.device = device
        self.backend = backend
        self.warm_s = WARM_S_CUDA if device.is_cuda else WARM_S_HOST

    def time(self, fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Stat:
        return self.time_many([fn], repeats, warmup)[0]

    def time_many(self, fns: Sequence[Callable[[], Any]], repeats: int, warmup: int = 2) -> list[Stat]:
        """Time several callables, repeats interleaved (A B C, A B C, ...): on a shared machine a
        slow spell then spreads over every point instead of bending one part of a curve. Each
        callable runs `warmup` times first (kernel selection, allocator, caches), then the set is
        repeated until it has run for WARM_S (a GPU leaves its idle clocks only under load)."""
        for fn in fns:
            for _ in range(warmup):
                fn()
        self.warm(*fns)
        samples: list[list[float]] = [[] for _ in fns]
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                samples[i].append(self.sample(fn))
        return [stat(s) for s in samples]

    def warm(self, *fns: Callable[[], Any]) -> None:
        """Run `fns` in turn until WARM_S of device time has passed (at least once each)."""
        t0 = time.perf_counter()
        while True:
            for fn in fns:
                fn()
            self.backend.synchronize()
            if time.perf_counter() - t0 >= self.warm_s:
                return

    def sample(self, fn: Callable[[], Any]) -> float:
        a = self.backend.timepoint()
        fn()
        b = self.backend.timepoint()
        self.backend.synchronize()
        return float(self.backend.elapsed(a, b))


def monotone(values: list[float]) -> list[float]:
    """Running maximum: more tokens (or bytes) never take less time; a dip is timing noise."""
    out, best = [], 0.0
    for v in values:
        best = max(best, float(v))
        out.append(round(best, 3))
    return out
