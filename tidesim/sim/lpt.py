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
    first (ties by key), each added to the least-loaded worker (ties: lowest worker id).

    The one definition of the CPU pool's time: the simulator's pool and the analytic model both
    read it (ScheduleCosts.cpu_span), the planner's cost table too. Vectorised over groups: the
    loop runs over task ranks (at most the most tasks in one group), each step placing one task
    in every group that still has one. The first `workers` tasks of a group go one per worker
    (their loads are the task times, whichever worker the tie rule picks, so the makespan is the
    same); groups with no more tasks than workers take their longest task and leave the loop."""
    out = np.zeros(groups)
    if times.size == 0:
        return out
    if workers == 1:
        return np.bincount(group, weights=times, minlength=groups)
    order = _longest_first(group, times, keys)
    return lpt_makespans_sorted(group[order], times[order], groups, workers)


_BLOCK = 1 << 20                  # task times gathered per block of ranks (8 MiB)


def lpt_makespans_sorted(group: np.ndarray, times: np.ndarray, groups: int, workers: int) -> np.ndarray:
    """lpt_makespans of tasks already in the rule's order (each group's tasks contiguous, longest
    first, ties by key): a caller that costs many subsets of one task list (the planner's options)
    sorts the list once, and any subset of it keeps the order."""
    out = np.zeros(groups)
    if times.size == 0:
        return out
    if workers == 1:
        return np.bincount(group, weights=times, minlength=groups)
    g, t = group, times
    starts = np.flatnonzero(np.concatenate([[True], g[1:] != g[:-1]]))
    count = np.diff(np.append(starts, g.size))
    gid = g[starts]
    out[gid] = t[starts]                                   # the longest task
    many = np.flatnonzero(count > workers)
    equal = t[starts[many]] == t[starts[many] + count[many] - 1]     # longest == shortest
    if equal.any():
        out[gid[many[equal]]] = _equal_tasks(t[starts[many[equal]]], -(-count[many[equal]] // workers))
        many = many[~equal]
    if not many.size:
        return out
    many = many[np.argsort(-count[many], kind="stable")]  # most tasks first: rank j is a prefix of rows
    first, cnt = starts[many], count[many]
    loads = t[first[:, None] + np.arange(workers)[None, :]]
    flat, base = loads.reshape(-1), np.arange(first.size) * workers
    top = int(cnt[0])
    active = np.searchsorted(-cnt, -np.arange(top), side="left").tolist()   # rows with more than j tasks
    j0 = workers
    while j0 < top:               # ranks in blocks: each block's task times gathered into one array
        m0 = active[j0]
        j1 = min(top, j0 + max(1, _BLOCK // m0))
        ranks = np.arange(j0, j1)[:, None]
        at = np.minimum(first[None, :m0] + ranks, t.size - 1)
        block = np.where(ranks < cnt[None, :m0], t.take(at), 0.0)      # [ranks, rows], 0 past a row's end
        for j in range(j0, j1):
            m = active[j]
            w = loads[:m].argmin(axis=1)
            w += base[:m]
            flat[w] += block[j - j0, :m]
        j0 = j1
    out[gid[many]] = loads.max(axis=1)
    return out


def _longest_first(group: np.ndarray, times: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The order np.lexsort((keys, -times, group)) gives: by group, longest first, ties by key.
    Task times take few distinct values (a function of the token count), so their dense rank, the
    group and the key pack into one integer, and one stable integer sort (several times faster
    than lexsort's three passes) gives the same order; lexsort where the packed key could overflow."""
    uniq, rank = np.unique(times, return_inverse=True)
    span_k = int(keys.max()) - int(keys.min()) + 1
    if (int(group.max()) + 1) * uniq.size * span_k >= 2 ** 62:
        return np.lexsort((keys, -times, group))
    packed = (group.astype(np.int64) * uniq.size + (uniq.size - 1 - rank.reshape(-1))) * span_k + (keys - keys.min())
    return np.argsort(packed, kind="stable")


def _equal_tasks(task: np.ndarray, rounds: np.ndarray) -> np.ndarray:
    """Makespans of groups of equal tasks: the rule deals them round-robin, so every worker's load
    is a sum of equal terms, and the longest is `rounds` = ceil(n / workers) of them, added one at
    a time as the workers add them (the same float as the step-by-step rule)."""
    span = task.copy()
    for k in range(2, int(rounds.max()) + 1):
        more = rounds >= k
        span[more] += task[more]
    return span
