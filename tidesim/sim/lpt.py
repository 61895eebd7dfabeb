"""CPU expert tasks of one layer on a pool of workers: deterministic longest-first greedy (LPT).

Within a layer the CPU pool serves only that layer (per-layer barrier), so its schedule is fully
known once the activations arrive: tasks sorted by time (longest first, ties by expert id) each
go to the worker that frees first (ties: lowest worker id). This is exactly what a pool of
`workers` threads pulling from a longest-first queue does, with one event per layer instead of
one per expert.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Assignment:
    """One task placed on a worker, with its start offset from the pool's start."""

    task: int
    worker: int
    start: float
    duration: float


def lpt_order(times: list[float], keys: list[int]) -> list[int]:
    """Task indices longest first, ties broken by key (expert id)."""
    return sorted(range(len(times)), key=lambda i: (-times[i], keys[i]))


def lpt_makespan(times: list[float], keys: list[int], workers: int) -> float:
    """Makespan of the longest-first greedy schedule (fast paths for 1 worker or few tasks)."""
    n = len(times)
    if n == 0:
        return 0.0
    if workers == 1:
        return float(sum(times))
    if n <= workers:
        return float(max(times))
    loads = [0.0] * workers
    heap = [(0.0, w) for w in range(workers)]
    for i in lpt_order(times, keys):
        load, w = heapq.heappop(heap)
        load += times[i]
        loads[w] = load
        heapq.heappush(heap, (load, w))
    return max(loads)


def lpt_assign(times: list[float], keys: list[int], workers: int) -> list[Assignment]:
    """The full assignment (for timelines); the same rule as lpt_makespan."""
    heap = [(0.0, w) for w in range(workers)]
    out: list[Assignment] = []
    for i in lpt_order(times, keys):
        load, w = heapq.heappop(heap)
        out.append(Assignment(task=i, worker=w, start=load, duration=times[i]))
        heapq.heappush(heap, (load + times[i], w))
    return out


def lpt_makespans(group: np.ndarray, times: np.ndarray, keys: np.ndarray, groups: int, workers: int
                  ) -> np.ndarray:
    """[groups] makespans of many independent task sets at once (one per layer-forward), with the
    same rule and the same floating-point sums as lpt_makespan: tasks of each group sorted longest
    first (ties by key), each added to the least-loaded worker (ties: lowest worker id)."""
    out = np.zeros(groups)
    if times.size == 0:
        return out
    if workers == 1:
        return np.bincount(group, weights=times, minlength=groups)
    order = np.lexsort((keys, -times, group))
    g, t = group[order], times[order]
    first = np.concatenate([[True], g[1:] != g[:-1]])
    starts = np.flatnonzero(first)
    rank = np.arange(g.size) - np.repeat(starts, np.diff(np.append(starts, g.size)))
    gid = g[starts]
    pad = np.zeros((gid.size, int(rank.max()) + 1))
    pad[np.repeat(np.arange(gid.size), np.diff(np.append(starts, g.size))), rank] = t
    loads = np.zeros((gid.size, workers))
    rows = np.arange(gid.size)
    for j in range(pad.shape[1]):
        w = np.argmin(loads, axis=1)
        loads[rows, w] += pad[:, j]
    out[gid] = loads.max(axis=1)
    return out
