"""tide-reference: what the public TIDE code (github.com/ims-kdks/TIDE) does, for comparison with
the paper's setup.

- Start: experts 0 .. budget-1 of every layer are on the GPU (the code's enable_offload).
- Refresh steps as in `tide` (first generated block, step % tau == 0; never a commit forward).
- On a refresh the target is the top-`budget` experts with at least one token. Target experts
  not resident are promoted (synchronous H2D, copy=2, run on the GPU in this forward). Resident
  experts outside the target may be demoted, but at most as many as there are promotions: the
  lowest expert ids go first (the code walks a Python set of small ints, which iterates in
  ascending order); the others stay resident. A demotion is a synchronous D2H copy (demote=True),
  since the code moves the weights back with .to("cpu").
- Every other forward, tokens for non-resident experts run on the CPU.
The cap keeps residency within the budget: a refresh either demotes as many as it promotes or
leaves exactly the target resident.
"""

from __future__ import annotations

import numpy as np

from tidesim.policies.base import PolicyOptions, register_policy
from tidesim.policies.residency import int_list, make_schedule, rank_experts, refresh_steps, top_activated
from tidesim.schedule import COPY_SYNC_REFRESH, NO_COPY, Schedule
from tidesim.workload import Workload


def reference_initial(budget: np.ndarray, experts: int) -> np.ndarray:
    """bool [L, E]: experts 0 .. budget-1 of each layer."""
    return np.arange(experts)[None, :] < budget[:, None]


def reference_refresh(current: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(resident after, promoted, demoted) for all layers, the public code's rule."""
    promote = target & ~current
    can_demote = current & ~target
    demote = can_demote & (np.cumsum(can_demote, axis=1) <= promote.sum(axis=1, keepdims=True))
    return (current | target) & ~demote, promote, demote


@register_policy("tide-reference", "the public TIDE code: synchronous promotions, demotions capped at promotions")
def tide_reference(workload: Workload, options: PolicyOptions) -> Schedule:
    f, l, e = workload.expert_tokens.shape
    budget = np.asarray(options.budget, dtype=np.int64)
    tau = np.asarray(options.tau, dtype=np.int64)
    counts = workload.expert_tokens
    activated = workload.activated
    ranking = rank_experts(counts)
    refresh = refresh_steps(workload, tau)
    initial = reference_initial(budget, e)

    resident = np.zeros((f, l, e), dtype=bool)
    copy = np.full((f, l, e), NO_COPY, dtype=np.int8)
    demote = np.zeros((f, l, e), dtype=bool)
    current = initial.copy()
    for fw in range(f):
        target = top_activated(counts[fw], ranking.rank[fw], budget) & refresh[fw][:, None]
        rows = refresh[fw][:, None]
        after, promote, demoted = reference_refresh(current, target)
        after = np.where(rows, after, current)
        copy[fw][promote & rows] = COPY_SYNC_REFRESH
        demote[fw] = demoted & rows
        resident[fw] = after
        current = after
    return make_schedule(
        "tide-reference", workload, budget=budget, initial=initial, gpu=activated & resident, copy=copy,
        resident=resident, demote=demote,
        params={"budget": int_list(budget), "tau": int_list(tau), "refresh": "sync",
                "refresh_forwards": int(refresh.any(axis=1).sum())},
    )
