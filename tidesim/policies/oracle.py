"""oracle: knows the future; a bound, not a deployable policy.

Residency: before forward f, the GPU holds the top-`budget` experts (by tokens) of forward f
itself, i.e. the set a TIDE refresh on every step would want, one forward early. It gets there
by asynchronous prefetches issued in forward f - 1 (copy=3), marked free on the schedule
(Schedule.free_async_copies: ideal prefetch, no copy-engine time); the first forward's set is
the initial residency (loaded untimed, as for every policy). Residents not needed are kept while
slots allow, so no expert is fetched twice without reason.

Placement: per (forward, layer) the activated experts are ordered by tokens (most first, ties by
id) and the first j run on the GPU, the rest on the CPU; GPU experts outside the resident set are
copied on demand (copy=1) through a staging buffer. Every j is ranked by a quick estimate
(split_estimates); the estimate's best, "resident experts only" and "all on the GPU" are then
timed with the executors' layer model (layer_times: exact for this schedule, which has no
synchronous or charged background copies, so layer-forwards are independent) and the fastest is
taken. Those candidates contain what an interval refresh does at best and what
full-swap does (with fewer copies), which is why the oracle is not slower than the online
policies under the simulator; tests check both the layer model and that claim.
"""

from __future__ import annotations

import numpy as np

from tidesim import layermodel as lm
from tidesim.hardware import HardwareProfile
from tidesim.models import ModelSpec
from tidesim.policies.options import PolicyOptions
from tidesim.policies.registry import PolicyTraits, register_policy
from tidesim.policies.residency import int_list, keep_best, make_schedule, rank_experts, top_activated
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_ON_DEMAND, NO_COPY, Schedule
from tidesim.sim.lpt import lpt_makespans
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
    counts = np.ascontiguousarray(counts_sorted.reshape(f * l, k).T)
    est = _estimates(counts, *_expert_costs(counts, spec, hw), n_free.reshape(-1), spec, hw)
    return est.T.reshape(f, l, k + 1)


def _expert_costs(counts: np.ndarray, spec: ModelSpec, hw: HardwareProfile) -> tuple[np.ndarray, np.ndarray]:
    """(GPU FFN time with its launch, CPU FFN time) per entry; 0 where no tokens."""
    return (lm.per_count(lambda t: hw.gpu_expert_time(t, spec), counts),
            lm.per_count(lambda t: hw.cpu_expert_time(t, spec), counts))


def _estimates(counts: np.ndarray, gpu_full: np.ndarray, cpu: np.ndarray, n_free: np.ndarray, spec: ModelSpec,
               hw: HardwareProfile) -> np.ndarray:
    """split_estimates on a position-major layout: counts [K, N] -> estimates [K + 1, N], with the
    layer model's terms: the grouped kernel of the first min(j, n_free), then the on-demand
    pipeline of the rest (copies from the sync end, staged), against the CPU side's pool bound."""
    k, n = counts.shape
    r = lm.Rates.of(hw, spec)
    in_group = np.arange(k)[:, None] < n_free[None, :]
    grouped_prefix = np.zeros((k + 1, n))
    grouped_prefix[1:] = np.cumsum(np.where(in_group, lm.grouped_share(r, gpu_full), 0.0), axis=0)
    finish = lm.grouped_kernel(r, grouped_prefix, np.minimum(np.arange(k + 1)[:, None], n_free[None, :]))
    od = lm.OnDemand(np.arange(n), np.where(in_group, 0.0, lm.ondemand_compute(r, gpu_full)),
                     np.full((k, n), lm.FREE_NOW), ~in_group)
    grouped_end = finish[np.minimum(n_free, k), np.arange(n)]
    _, _, _, ends = lm.ondemand_pipeline(r.expert_copy_s, np.zeros(n), grouped_end, od)
    finish[1:] = np.where(~in_group, ends, finish[1:])
    cpu_rest = np.zeros((k + 1, n))
    cpu_rest[:k] = np.cumsum(cpu[::-1], axis=0)[::-1]
    pairs_rest = np.zeros((k + 1, n), dtype=np.int64)
    pairs_rest[:k] = np.cumsum(counts[::-1], axis=0, dtype=np.int64)[::-1]
    longest = np.zeros((k + 1, n))
    longest[:k] = cpu
    moves = lm.per_count(lambda m: np.add(*lm.activation_copies(r, hw, m)), pairs_rest)
    none = np.zeros((k + 1, n))
    pool = lm.cpu_pool_bound(r, lm.CpuCosts(total=cpu_rest, longest=longest, shortest=none, n=none))
    return np.maximum(finish, np.where(pairs_rest > 0, moves + pool, 0.0))


def layer_times(counts: np.ndarray, experts: np.ndarray, n_active: np.ndarray, n_free: np.ndarray,
                split: np.ndarray, spec: ModelSpec, hw: HardwareProfile,
                costs: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """float [N]: expert-phase time of each layer-forward for a given split, as the executors'
    layer model charges it (docs/costmodel.md) for this schedule, which has no sync copies and no
    charged background copies, so every layer-forward stands alone.

    counts/experts [N, K]: tokens and expert ids in rank order. The first min(split, n_free) run
    in the grouped kernel, positions n_free .. split-1 are copied on demand (through staging
    slots, so no copy waits for a slot), the rest up to n_active run on the CPU pool with the
    exact longest-first makespan; the phases are the layer model's (tidesim.layermodel).
    `costs`: the (GPU, CPU) expert times of `counts` when already known.
    """
    n, k = counts.shape
    pos = np.arange(k)[None, :]
    r = lm.Rates.of(hw, spec)
    gpu_full, cpu_times = costs if costs is not None else _expert_costs(counts, spec, hw)
    in_group = pos < np.minimum(split, n_free)[:, None]
    on_demand = (pos >= n_free[:, None]) & (pos < split[:, None])
    on_cpu = (pos >= split[:, None]) & (pos < n_active[:, None])
    share = np.where(in_group, lm.grouped_share(r, gpu_full), 0.0).sum(axis=1)
    grouped = lm.grouped_kernel(r, share, in_group.sum(axis=1))
    od_rows, od_cols = np.nonzero(on_demand)
    od_time = lm.ondemand_compute(r, gpu_full[od_rows, od_cols])
    od = lm.OnDemand.pad(od_rows, od_time, np.full(od_rows.size, lm.FREE_NOW))   # staged: slots never wait
    od_n = on_demand.sum(axis=1)
    od_sum = np.bincount(od_rows, weights=od_time, minlength=n)

    rows, cols = np.nonzero(on_cpu)
    cpu_rows = cpu_times[rows, cols]
    span = lpt_makespans(rows, cpu_rows, experts[rows, cols], n, r.workers)
    act, res = lm.activation_copies(r, hw, np.where(on_cpu, counts, 0).sum(axis=1))
    zeros = np.zeros(n)
    gpu = lm.GpuCosts(fwd_fixed=zeros, layer_fixed=zeros, grouped=grouped, od_compute_sum=od_sum,
                      slow_extra=lm.copy_slowdown(r, grouped + od_sum, od_n * r.expert_copy_s + res))
    copies = lm.CopyCosts(sync_h2d=zeros, demote_d2h=zeros, async_h2d=zeros, n_async=zeros, act_d2h=act,
                          res_h2d=res, od_n=od_n, od_copy_sum=od_n * r.expert_copy_s)
    cpu = lm.CpuCosts(total=np.bincount(rows, weights=cpu_rows, minlength=n), longest=zeros, shortest=zeros,
                      n=on_cpu.sum(axis=1))
    lm.charge_contention(r, gpu, cpu, span)
    assert cpu.span is not None
    return lm.layer_phases(r, gpu, copies, cpu.n, cpu.span, od, 1)["side"]


def best_split(counts_sorted: np.ndarray, experts_sorted: np.ndarray, n_active: np.ndarray, n_free: np.ndarray,
               spec: ModelSpec, hw: HardwareProfile, chunk: int = 2048) -> np.ndarray:
    """int [F, L]: how many of the (sorted) activated experts run on the GPU.

    Every split is ranked by the quick estimate (split_estimates); then the estimate's best,
    "resident only" (n_free) and "all on the GPU" (n_active) are timed with the layer model
    (layer_times) and the fastest wins (ties: the earlier candidate in that list). Layer-forwards
    are processed in chunks of similar activated counts, so arrays are only as wide as needed.
    """
    f, l, e = counts_sorted.shape
    counts_all = counts_sorted.reshape(f * l, e)
    experts_all = experts_sorted.reshape(f * l, e)
    active_all, free_all = n_active.reshape(-1), n_free.reshape(-1)
    out = np.zeros(f * l, dtype=np.int64)
    by_width = np.argsort(active_all, kind="stable")
    for lo in range(0, f * l, chunk):
        rows = by_width[lo:lo + chunk]
        active, free = active_all[rows], free_all[rows]
        k = int(active.max())
        if k == 0:
            continue
        counts = counts_all[rows, :k]
        gpu_full, cpu = _expert_costs(counts, spec, hw)
        est = _estimates(np.ascontiguousarray(counts.T), np.ascontiguousarray(gpu_full.T),
                         np.ascontiguousarray(cpu.T), free, spec, hw)
        est[np.arange(k + 1)[:, None] > active[None, :]] = np.inf
        candidates = np.stack([np.argmin(est, axis=0), free, active])
        times = np.stack([layer_times(counts, experts_all[rows, :k], active, free, c, spec, hw, (gpu_full, cpu))
                          for c in candidates])
        out[rows] = candidates[np.argmin(times, axis=0), np.arange(rows.size)]
    return out.reshape(f, l)


@register_policy("oracle", "knows the future: each forward's top experts prefetched for free, best CPU/GPU split "
                           "(a bound)",
                 PolicyTraits(role="bound", order=80, needs_cpu=True, reads_profile=True))
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
    split = best_split(counts_sorted, ranking.order, n_active, n_free, workload.model, options.hw)
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
