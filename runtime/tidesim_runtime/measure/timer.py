"""The clock of `tidesim calibrate`: samples and their statistics.

On CUDA a sample is the time between two CUDA events on the compute stream around the work; on
the CPU-as-GPU path the host clock. Repeats are interleaved over the points of a curve.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tidesim_runtime.engine.device import DeviceInfo
from tidesim_runtime.engine.streams import Backend


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

    def time(self, fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Stat:
        return self.time_many([fn], repeats, warmup)[0]

    def time_many(self, fns: Sequence[Callable[[], Any]], repeats: int, warmup: int = 1) -> list[Stat]:
        """Time several callables, repeats interleaved (A B C, A B C, ...): on a shared machine a
        slow spell then spreads over every point instead of bending one part of a curve."""
        for fn in fns:
            for _ in range(warmup):
                fn()
        self.backend.synchronize()
        samples: list[list[float]] = [[] for _ in fns]
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                samples[i].append(self.sample(fn))
        return [stat(s) for s in samples]

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
