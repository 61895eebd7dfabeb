"""tide: TIDE's interval-based, I/O-aware refresh of the GPU-resident experts.

Layer l refreshes on every forward of the first generated block (prefill included) and on
denoising steps that are multiples of tau[l]; commit forwards never refresh (residency.
refresh_steps). On a refresh the target is the top-`budget` experts by tokens of the current
forward (experts with no tokens excluded). Only target experts that are not resident are copied;
residents stay unless their slot is needed, and then those with the fewest tokens in this forward
go first (ties: higher id first). Dropping costs nothing: the host keeps every expert.

refresh="sync": the copies (copy=2) happen after the gate, before the layer's experts run, and
the new experts run on the GPU in that same forward; evicted experts' tokens run on the CPU.
refresh="async": the copies (copy=3) overlap with compute and the new experts are usable from
the next forward; this forward still uses the old resident set (the experts being replaced stay
usable until it ends, so in-flight copies need staging memory beyond the budget).
Between refreshes, tokens for non-resident experts run on the CPU. The GPU starts empty.
"""

from __future__ import annotations

import numpy as np

from tidesim.policies.base import PolicyOptions, register_policy
from tidesim.policies.residency import int_list, keep_best, make_schedule, rank_experts, refresh_steps, top_activated
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_SYNC_REFRESH, NO_COPY, Schedule
from tidesim.workload import Workload


def refreshed_residents(current: np.ndarray, counts: np.ndarray, order: np.ndarray, rank: np.ndarray,
                        budget: np.ndarray) -> np.ndarray:
    """TIDE's refresh rule, the one place it is written: bool [..., L, E] resident after a refresh
    of `current` with one forward's counts/order/rank [L, E] and budget [..., L]: the top-budget
    activated experts, then residents by rank while slots remain. Leading axes are options (the
    planner's cost table refreshes many (tau, budget) candidates at once)."""
    target = top_activated(counts, rank, budget)
    return keep_best(current | target, order, rank, budget)


@register_policy("tide", "TIDE: refresh the top-budget experts every tau steps, copying only the difference; "
                         "misses on the CPU")
def tide(workload: Workload, options: PolicyOptions) -> Schedule:
    f, l, e = workload.expert_tokens.shape
    budget = np.asarray(options.budget, dtype=np.int64)
    tau = np.asarray(options.tau, dtype=np.int64)
    sync = options.refresh == "sync"
    counts = workload.expert_tokens
    activated = workload.activated
    ranking = rank_experts(counts)
    refresh = refresh_steps(workload, tau)
    copy_kind = COPY_SYNC_REFRESH if sync else COPY_ASYNC_REFRESH

    resident = np.zeros((f, l, e), dtype=bool)
    copy = np.full((f, l, e), NO_COPY, dtype=np.int8)
    gpu = np.zeros((f, l, e), dtype=bool)
    current = np.zeros((l, e), dtype=bool)
    for fw in range(f):
        refreshed = refreshed_residents(current, counts[fw], ranking.order[fw], ranking.rank[fw], budget)
        after = np.where(refresh[fw][:, None], refreshed, current)
        copy[fw][after & ~current] = copy_kind
        gpu[fw] = activated[fw] & (after if sync else current)
        resident[fw] = after
        current = after
    return make_schedule(
        "tide", workload, budget=budget, initial=np.zeros((l, e), dtype=bool), gpu=gpu, copy=copy,
        resident=resident,
        params={"budget": int_list(budget), "tau": int_list(tau), "refresh": options.refresh,
                "refresh_forwards": int(refresh.any(axis=1).sum())},
    )
