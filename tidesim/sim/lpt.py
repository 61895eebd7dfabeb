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


def lpt_makespan(times: list[float] | np.ndarray, workers: int) -> float:
    """Makespan of the longest-first greedy schedule of one task set, in scalar code (one
    layer-forward), with the floating-point sums of lpt_makespans: tasks longest first, each to the
    least-loaded worker (ties to the lowest worker; which of two equal tasks goes first, by expert id
    in lpt_assign, changes no load). One worker: the tasks' sum in the given order, added one at a
    time (not `sum`, which compensates on Python 3.12+). Written in plain loops (an insertion sort:
    a layer-forward has a few hundred tasks at most) because tidesim.policies.rowsplit compiles
    this very function with numba, where loops compile in a fraction of the time sorted() takes.
    After changing it, touch rowsplit.py: numba's cache of its callers is keyed on that file."""
    n = len(times)
    if n == 0:
        return 0.0
    if workers == 1:
        total = 0.0
        for t in times:
            total += t
        return total
    if n <= workers:
        big = times[0]
        for t in times:
            if t > big:
                big = t
        return float(big)
    desc = np.empty(n)
    for i in range(n):                  # longest first
        t = times[i]
        j = i
        while j > 0 and desc[j - 1] < t:
            desc[j] = desc[j - 1]
            j -= 1
        desc[j] = t
    loads = np.zeros(workers)
    for i in range(n):
        w = 0
        for v in range(1, workers):     # the least-loaded worker, the lowest on ties
            if loads[v] < loads[w]:
                w = v
        loads[w] += desc[i]
    big = loads[0]
    for v in range(1, workers):
        if loads[v] > big:
            big = loads[v]
    return float(big)


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
    same); groups with no more tasks than workers take their longest task, and groups of equal
    tasks ceil(n / workers) of them, without being sorted (most groups, at a few tokens)."""
    out = np.zeros(groups)
    if times.size == 0:
        return out
    if workers == 1:
        return np.bincount(group, weights=times, minlength=groups)
    if group.size > 1 and (group[1:] < group[:-1]).any():
        by_group = np.argsort(group, kind="stable")
        group, times, keys = group[by_group], times[by_group], keys[by_group]
    starts = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]]))
    count = np.diff(np.append(starts, group.size))
    gid = group[starts]
    longest = np.maximum.reduceat(times, starts)
    out[gid] = longest
    many = count > workers
    if not many.any():
        return out
    equal = many & (longest == np.minimum.reduceat(times, starts))
    if equal.any():
        out[gid[equal]] = _equal_tasks(longest[equal], -(-count[equal] // workers))
    hard = many & ~equal
    if hard.any():
        sel = np.repeat(hard, count)
        g, t, k = group[sel], times[sel], keys[sel]
        order = _longest_first(g, t, k)
        out[gid[hard]] = lpt_makespans_sorted(g[order], t[order], groups, workers)[gid[hard]]
    return out


_BLOCK = 1 << 20                  # task times gathered per block of ranks (8 MiB)


def lpt_makespans_sorted(group: np.ndarray, times: np.ndarray, groups: int, workers: int) -> np.ndarray:
    """lpt_makespans of tasks already in the rule's order (each group's tasks contiguous, longest
    first, ties by key): a caller that costs many subsets of one task list (the planner's options)
    sorts the list once, and any subset of it keeps the order.

    A group's tasks are its head, stepped through rank by rank, and its tail: the run of tasks
    equal to its shortest one (at a few tokens most CPU experts cost the same), placed at once by
    _equal_tail. The loop over ranks therefore runs over the longest head, not the most tasks."""
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
    first, cnt = starts[many], count[many]
    shortest = t[first + cnt - 1]
    in_tail = np.add.reduceat((t == np.repeat(t[starts + count - 1], count)).astype(np.int64), starts)[many]
    head = np.maximum(cnt - in_tail, workers)             # the first `workers` tasks seed the loads
    by_head = np.argsort(-head, kind="stable")             # longest head first: rank j is a prefix of rows
    many, first, cnt, shortest, head = many[by_head], first[by_head], cnt[by_head], shortest[by_head], head[by_head]
    loads = t[first[:, None] + np.arange(workers)[None, :]]
    flat, base = loads.reshape(-1), np.arange(first.size) * workers
    top = int(head[0])
    active = np.searchsorted(-head, -np.arange(top), side="left").tolist()   # rows whose head has rank j
    j0 = workers
    while j0 < top:               # ranks in blocks: each block's task times gathered into one array
        m0 = active[j0]
        j1 = min(top, j0 + max(1, _BLOCK // m0))
        ranks = np.arange(j0, j1)[:, None]
        at = np.minimum(first[None, :m0] + ranks, t.size - 1)
        block = np.where(ranks < head[None, :m0], t.take(at), 0.0)     # [ranks, rows], 0 past a head's end
        for j in range(j0, j1):
            m = active[j]
            w = loads[:m].argmin(axis=1)
            w += base[:m]
            flat[w] += block[j - j0, :m]
        j0 = j1
    span = loads.max(axis=1)
    rest = cnt - head
    tail = np.flatnonzero(rest > 0)
    for a in range(0, tail.size, max(1, _BLOCK // (workers * 64))):
        rows = tail[a:a + max(1, _BLOCK // (workers * 64))]
        span[rows] = _equal_tail(loads[rows], shortest[rows], rest[rows])
    out[gid[many]] = span
    return out


def _equal_tail(loads: np.ndarray, task: np.ndarray, n: np.ndarray) -> np.ndarray:
    """[R] makespans after n[r] more tasks, all of time task[r], go on workers with loads [R, W].

    Each takes the least-loaded worker and adds its time, so worker w offers the start times
    loads[w], loads[w] + task, (loads[w] + task) + task, ... (the very sums the rule computes) and
    the tasks take the n smallest of all these offers, as a merge of sorted lists does (ties
    between workers give the same sums whichever is taken). The makespan is the latest of the
    n-th smallest offer plus the task and the loads that take none."""
    r, w = loads.shape
    spread = loads.max(axis=1) - loads.min(axis=1)
    # no worker takes more than ceil(n / w) + spread / task + 1 of them
    need = -(-n // w) + np.ceil(spread / np.maximum(task, 1e-300)).astype(np.int64) + 1
    rounds = int(min(need.max(), n.max()))
    offers = np.empty((rounds, r, w))
    offers[0] = loads
    step = task[:, None]
    for c in range(1, rounds):
        np.add(offers[c - 1], step, out=offers[c])
    ordered = np.sort(offers.transpose(1, 0, 2).reshape(r, rounds * w), axis=1)
    nth = ordered[np.arange(r), n - 1]
    return np.maximum(loads.max(axis=1), nth + task)


def _equal_tasks(task: np.ndarray, rounds: np.ndarray) -> np.ndarray:
    """Makespans of groups of equal tasks: the rule deals them round-robin, so every worker's load
    is a sum of equal terms, and the longest is `rounds` = ceil(n / workers) of them, added one at
    a time as the workers add them. add.accumulate adds one term at a time too (same floats), once
    per distinct task time."""
    uniq, which = np.unique(task, return_inverse=True)
    sums = np.add.accumulate(np.repeat(uniq[:, None], int(rounds.max()), axis=1), axis=1)
    return sums[which.reshape(-1), rounds - 1]


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

