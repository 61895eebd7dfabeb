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

from tidesim.policies.registry import PolicyTraits, register_policy
from tidesim.policies.residency import first_true, int_list, refresh_sets
from tidesim.policies.step import Choice, ForwardMeta, PolicyStep, Rows, Setup, copies, no_copies, placement_of
from tidesim.policies.tide import RefreshCount
from tidesim.schedule import COPY_SYNC_REFRESH


def reference_initial(budget: np.ndarray, experts: int) -> np.ndarray:
    """bool [L, E]: experts 0 .. budget-1 of each layer."""
    return np.arange(experts)[None, :] < budget[:, None]


def reference_refresh(current: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(resident after, promoted, demoted) for all layers, the public code's rule. A layer whose
    target is empty (no refresh) promotes and demotes nothing and keeps `current`."""
    promote = target > current       # target & ~current
    can_demote = current > target    # current & ~target
    if current.shape[0] == 1:  # one layer (the live engine's call): cut the row in place
        demote = can_demote
        first_true(demote[0], int(np.count_nonzero(promote)))
    else:
        demote = can_demote & (np.cumsum(can_demote, axis=1) <= promote.sum(axis=1, keepdims=True))
    return (current | target) > demote, promote, demote   # (current | target) & ~demote


@register_policy("tide-reference", "the public TIDE code: synchronous promotions, demotions capped at promotions",
                 PolicyTraits(role="policy", order=60, uses_tau=True, needs_cpu=True))
class TideReference(PolicyStep):
    def __init__(self, setup: Setup) -> None:
        budget = np.asarray(setup.options.budget, dtype=np.int64)
        super().__init__(setup, reference_initial(budget, setup.experts))
        self.tau = np.asarray(setup.options.tau, dtype=np.int64)
        self.refreshed = RefreshCount(self.tau)

    def decide(self, meta: ForwardMeta, rows: Rows, counts: np.ndarray) -> Choice:
        current = self.current[rows]
        refresh, some, every = self.refreshed.flags(meta, rows)
        if not some:
            return (placement_of(counts, current), no_copies(counts),
                    np.zeros(counts.shape, dtype=bool), current.copy())
        target, _ = refresh_sets(current, counts, self.budget[rows])
        if not every:
            target &= refresh[:, None]  # layers that do not refresh: no target, nothing moves
        after, promote, demoted = reference_refresh(current, target)
        return (placement_of(counts, after), copies(promote, COPY_SYNC_REFRESH), demoted, after)

    def params(self) -> dict[str, object]:
        return {"budget": int_list(self.budget), "tau": int_list(self.tau), "refresh": "sync",
                "refresh_forwards": len(self.refreshed.forwards)}
