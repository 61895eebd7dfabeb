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
The policy is an online step (tidesim.policies.step): it decides each (forward, layer) from that
forward's routing and the resident set so far.
"""

from __future__ import annotations

import numpy as np

from tidesim.policies.base import register_policy
from tidesim.policies.residency import int_list, keep_best, refresh_rule, refresh_sets, top_activated
from tidesim.policies.step import Choice, ForwardMeta, PolicyStep, Rows, Setup, placement_of
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_SYNC_REFRESH, NO_COPY


def refreshes(meta: ForwardMeta, tau: np.ndarray) -> np.ndarray:
    """bool [n]: which of the layers (intervals `tau`) refresh in this forward (residency.refresh_rule)."""
    return refresh_rule(meta.first_block, meta.step, meta.is_commit, tau)


class RefreshCount:
    """Forwards in which at least one layer refreshed (Schedule.params refresh_forwards)."""

    def __init__(self) -> None:
        self.forwards: set[int] = set()

    def note(self, meta: ForwardMeta, refresh: np.ndarray) -> None:
        if refresh.any():
            self.forwards.add(meta.index)


def refreshed_residents(current: np.ndarray, counts: np.ndarray, order: np.ndarray, rank: np.ndarray,
                        budget: np.ndarray) -> np.ndarray:
    """TIDE's refresh rule, the one place it is written: bool [..., L, E] resident after a refresh
    of `current` with one forward's counts/order/rank [L, E] and budget [..., L]: the top-budget
    activated experts, then residents by rank while slots remain. Leading axes are options (the
    planner's cost table refreshes many (tau, budget) candidates at once). The online step uses
    residency.refresh_sets, the same rule computed with one sort per layer (tests check they agree)."""
    target = top_activated(counts, rank, budget)
    return keep_best(current | target, order, rank, budget)


@register_policy("tide", "TIDE: refresh the top-budget experts every tau steps, copying only the difference; "
                         "misses on the CPU")
class Tide(PolicyStep):
    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self.tau = np.asarray(setup.options.tau, dtype=np.int64)
        self.sync = setup.options.refresh == "sync"
        self.refreshed = RefreshCount()

    def decide(self, meta: ForwardMeta, rows: Rows, counts: np.ndarray) -> Choice:
        current = self.current[rows]
        refresh = refreshes(meta, self.tau[rows])
        self.refreshed.note(meta, refresh)
        if not refresh.any():
            gpu = current
            copy = np.full(counts.shape, NO_COPY, dtype=np.int8)
            after = current
        else:
            _, refreshed = refresh_sets(current, counts, self.budget[rows])
            after = np.where(refresh[:, None], refreshed, current)
            copy = np.where(after & ~current, COPY_SYNC_REFRESH if self.sync else COPY_ASYNC_REFRESH,
                            NO_COPY).astype(np.int8)
            gpu = after if self.sync else current
        return (placement_of(counts, gpu), copy, np.zeros(counts.shape, dtype=bool), after.copy())

    def params(self) -> dict[str, object]:
        return {"budget": int_list(self.budget), "tau": int_list(self.tau), "refresh": self.setup.options.refresh,
                "refresh_forwards": len(self.refreshed.forwards)}
