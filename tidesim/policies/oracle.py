"""oracle: knows the future; a bound, not a deployable policy.

Residency: before forward f, the GPU holds the top-`budget` experts (by tokens) of forward f
itself, i.e. the set a TIDE refresh on every step would want, one forward early. It gets there
by asynchronous prefetches issued in forward f - 1 (copy=3), marked free on the schedule
(Schedule.free_async_copies: ideal prefetch, no copy-engine time); the first forward's set is
the initial residency (loaded untimed, as for every policy). Residents not needed are kept while
slots allow, so no expert is fetched twice without reason.

Placement: per (forward, layer) the activated experts are ordered by tokens (most first, ties by
id) and the first j run on the GPU, the rest on the CPU; GPU experts outside the resident set are
copied on demand (copy=1) through a staging buffer. j comes from the split search shared with
tide-split (tidesim.policies.split: a quick estimate ranks every j, then "resident experts only",
the estimate's best and "all on the GPU" are timed with the executors' layer model, exact for
this schedule, which has no synchronous or charged background copies, so layer-forwards are
independent) and the fastest is taken. Those candidates contain what an interval refresh does at best and what
full-swap does (with fewer copies), which is why the oracle is not slower than the online
policies under the simulator; tests check both the layer model and that claim.
"""

from __future__ import annotations

import numpy as np

from tidesim.policies.options import PolicyOptions
from tidesim.policies.registry import PolicyTraits, register_policy
from tidesim.policies.residency import int_list, keep_best, make_schedule, rank_experts, top_activated
from tidesim.policies.split import best_split
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
    split = best_split(counts_sorted.reshape(f * l, e), ranking.order.reshape(f * l, e), n_active.reshape(-1),
                       n_free.reshape(-1), workload.model, options.hw).reshape(f, l)
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
