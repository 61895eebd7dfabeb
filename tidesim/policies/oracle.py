"""oracle: knows the future; a bound, not a deployable policy.

Residency: before forward f, the GPU holds the top-`budget` experts (by tokens) of forward f
itself, i.e. the set a TIDE refresh on every step would want, one forward early. It gets there
by asynchronous prefetches issued in forward f - 1 (copy=3), marked free on the schedule
(Schedule.free_async_copies: ideal prefetch, no copy-engine time); the first forward's set is
the initial residency (loaded untimed, as for every policy). Residents not needed are kept while
slots allow, so no expert is fetched twice without reason.

Placement: per (forward, layer) the activated experts are ordered by tokens (most first, ties by
id) and the first j run on the GPU, the rest on the CPU; GPU experts outside the resident set are
copied on demand (copy=1) through a staging buffer. j is the split with the smallest estimated
layer time, max(GPU side, CPU side):
  GPU side = resident experts' grouped FFN, then the on-demand copies in order (each one's FFN
             starts when its copy is done and the previous FFN ended), plus one kernel launch;
  CPU side = activations out and back (D2H + H2D of tokens x hidden) plus the worker pool's
             makespan, estimated as max(total CPU time / workers, the longest single expert).
The candidate splits include "resident experts on the GPU, all others on the CPU" (what an
interval refresh does at best), "everything on the GPU" (what full-swap does, with fewer copies)
and everything between, so the oracle is at least as good as those choices under this estimate.
"""

from __future__ import annotations

import numpy as np

from tidesim.hardware import US, HardwareProfile
from tidesim.models import ModelSpec
from tidesim.policies.base import PolicyOptions, register_policy
from tidesim.policies.residency import by_count, int_list, keep_best, make_schedule, rank_experts, top_activated
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_ON_DEMAND, NO_COPY, Schedule
from tidesim.workload import Workload


def oracle_residency(counts: np.ndarray, order: np.ndarray, rank: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """bool [F, L, E]: the resident set at the start of each forward (top-budget of that forward,
    earlier residents kept while slots allow, the best-ranked first)."""
    f, l, e = counts.shape
    start = np.zeros((f, l, e), dtype=bool)
    current = np.zeros((l, e), dtype=bool)
    for fw in range(f):
        current = keep_best(current | top_activated(counts[fw], rank[fw], budget), order[fw], rank[fw], budget)
        start[fw] = current
    return start


def split_estimates(counts_sorted: np.ndarray, n_free: np.ndarray, spec: ModelSpec, hw: HardwareProfile
                    ) -> np.ndarray:
    """float [F, L, K + 1]: estimated layer time when the first j sorted experts run on the GPU
    (K = counts_sorted.shape[2]; see the module docstring for the estimate)."""
    f, l, k = counts_sorted.shape
    est = _estimates(np.ascontiguousarray(counts_sorted.reshape(f * l, k).T), n_free.reshape(-1), spec, hw)
    return est.T.reshape(f, l, k + 1)


def _estimates(counts: np.ndarray, n_free: np.ndarray, spec: ModelSpec, hw: HardwareProfile) -> np.ndarray:
    """split_estimates on a position-major layout: counts [K, N] -> estimates [K + 1, N]."""
    k, n = counts.shape
    launch = hw.gpu.launch_overhead_us * US
    gpu = by_count(lambda t: np.maximum(hw.gpu_expert_time(t, spec) - launch, 0.0), counts)
    cpu = by_count(lambda t: hw.cpu_expert_time(t, spec), counts)
    copy = float(hw.h2d_time(float(spec.expert_bytes)))
    finish = np.zeros((k + 1, n))
    for p in range(k):
        prev = finish[p]
        finish[p + 1] = np.where(p < n_free, prev, np.maximum(prev, (p - n_free + 1) * copy)) + gpu[p]
    finish[1:] += launch
    cpu_rest = np.zeros((k + 1, n))
    cpu_rest[:k] = np.cumsum(cpu[::-1], axis=0)[::-1]
    pairs_rest = np.zeros((k + 1, n), dtype=np.int64)
    pairs_rest[:k] = np.cumsum(counts[::-1], axis=0, dtype=np.int64)[::-1]
    longest = np.zeros((k + 1, n))
    longest[:k] = cpu
    act = spec.activation_bytes_per_token
    moves = by_count(lambda m: hw.d2h_time(m * act) + hw.h2d_time(m * act), pairs_rest)
    makespan = np.maximum(cpu_rest / max(hw.cpu.workers, 1), longest)
    cpu_side = np.where(pairs_rest > 0, moves + makespan, 0.0)
    return np.maximum(finish, cpu_side)


def best_split(counts_sorted: np.ndarray, n_active: np.ndarray, n_free: np.ndarray, spec: ModelSpec,
               hw: HardwareProfile) -> np.ndarray:
    """int [F, L]: how many of the (sorted) activated experts run on the GPU; the smallest
    estimate wins, ties go to fewer GPU experts."""
    f, l, _ = counts_sorted.shape
    k = int(n_active.max()) if n_active.size else 0
    counts = np.ascontiguousarray(counts_sorted[:, :, :k].reshape(f * l, k).T)
    est = _estimates(counts, n_free.reshape(-1), spec, hw)
    est[np.arange(k + 1)[:, None] > n_active.reshape(1, -1)] = np.inf
    return np.argmin(est, axis=0).reshape(f, l)


@register_policy("oracle", "knows the future: each forward's top experts prefetched for free, best CPU/GPU split "
                           "(a bound)")
def oracle(workload: Workload, options: PolicyOptions) -> Schedule:
    f, l, e = workload.expert_tokens.shape
    budget = np.asarray(options.budget, dtype=np.int64)
    counts = workload.expert_tokens
    activated = workload.activated
    ranking = rank_experts(counts)
    start = oracle_residency(counts, ranking.order, ranking.rank, budget)
    resident = np.concatenate([start[1:], start[-1:]], axis=0)

    counts_sorted = np.take_along_axis(counts, ranking.order, axis=2)
    n_active = activated.sum(axis=2)
    n_free = np.minimum(budget[None, :], n_active)
    split = best_split(counts_sorted, n_active, n_free, workload.model, options.hw)
    position = np.arange(e)[None, None, :]
    gpu_sorted = position < split[:, :, None]
    demand_sorted = gpu_sorted & (position >= n_free[:, :, None])
    gpu = np.zeros_like(activated)
    demand = np.zeros_like(activated)
    np.put_along_axis(gpu, ranking.order, gpu_sorted, axis=2)
    np.put_along_axis(demand, ranking.order, demand_sorted, axis=2)

    copy = np.where(resident & ~start, COPY_ASYNC_REFRESH, NO_COPY).astype(np.int8)
    copy[demand] = COPY_ON_DEMAND
    schedule = make_schedule(
        "oracle", workload, budget=budget, initial=start[0], gpu=gpu, copy=copy, resident=resident,
        params={"budget": int_list(budget), "prefetch": "free", "on_demand_copies": int(demand.sum())},
        is_bound=True,
    )
    schedule.free_async_copies = True
    return schedule
