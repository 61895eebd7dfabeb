"""full-swap: fetch every missing expert on demand into a per-layer LRU cache of `budget` slots
(MoE-Infinity / mixtral-offloading style); nothing runs on the CPU.

Within a forward the activated experts are used in a fixed order: the hits (already resident)
first, then the misses, each group by expert id; every miss is copied on demand right before it
runs. A slot is freed by evicting the least recently used expert (never-used initial residents
count as oldest, lower id first). Because the experts of the current forward were used last,
they are evicted only when the budget is smaller than the activated set; then the copies pass
through the slots and the last `budget` experts in that order stay.
"""

from __future__ import annotations

import numpy as np

from tidesim.errors import InputError
from tidesim.policies.registry import PolicyTraits, register_policy
from tidesim.policies.residency import int_list
from tidesim.policies.step import Choice, ForwardMeta, PolicyStep, Rows, Setup, copies
from tidesim.schedule import COPY_ON_DEMAND


def lru_step(resident: np.ndarray, stamp: np.ndarray, activated: np.ndarray, now: int,
             budget: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One forward of the LRU caches of the given layers: (resident at the end, updated stamps).

    stamp[l, e] is the last use (larger = more recent); the forward's uses get now + position.
    The cache then holds the `budget` most recently used experts among those it held and those
    it just used (an LRU cache always holds the most recent distinct items): the last `budget`
    experts used in this forward, and when fewer were used, the most recent earlier residents in
    the slots left (stamps are distinct, so "most recent" has no ties).
    """
    if resident.shape[0] == 1:
        return lru_step_one(resident, stamp, activated, now, int(budget[0]))
    hit = activated & resident
    miss = activated & ~resident
    n_act = activated.sum(axis=1)
    position = np.where(hit, np.cumsum(hit, axis=1) - 1,
                        hit.sum(axis=1, keepdims=True) + np.cumsum(miss, axis=1) - 1)
    stamp = np.where(activated, now + position, stamp)
    candidates = resident | activated
    over = candidates.sum(axis=1) > budget
    if not over.any():  # every layer's cache holds all its candidates: nothing to evict
        return candidates, stamp
    after = candidates & ~over[:, None]
    after |= over[:, None] & activated & (position >= (n_act - budget)[:, None])
    some_old = over & (n_act < budget)   # slots left for earlier residents, fewer than there are
    if some_old.any():
        old = resident[some_old] & ~activated[some_old]
        key = np.where(old, stamp[some_old], -(2**62))  # not old: last; -key must not overflow
        newest = -np.sort(-key, axis=1)  # descending
        left = (budget[some_old] - n_act[some_old])[:, None]
        threshold = np.take_along_axis(newest, left - 1, axis=1)
        after[some_old] |= old & (key >= threshold)
    return after, stamp


def lru_step_one(resident: np.ndarray, stamp: np.ndarray, activated: np.ndarray, now: int,
                 budget: int) -> tuple[np.ndarray, np.ndarray]:
    """lru_step for one layer (the live engine's call), on the experts used instead of masks."""
    act, res = activated[0], resident[0]
    used = np.concatenate(((act & res).nonzero()[0], (act > res).nonzero()[0]))  # hits, then misses, by id
    stamp = stamp.copy()
    stamp[0, used] = np.arange(now, now + used.size)
    candidates = res | act
    if np.count_nonzero(candidates) <= budget:  # the cache holds all its candidates: nothing to evict
        return candidates[None], stamp
    after = np.zeros(candidates.shape, dtype=bool)
    after[used[max(used.size - budget, 0):]] = True  # the last `budget` experts used
    left = budget - used.size
    if left > 0:  # slots left for earlier residents, fewer than there are: the most recent
        old = (res > act).nonzero()[0]
        after[old[np.argsort(stamp[0, old])[old.size - left:]]] = True
    return after[None], stamp


@register_policy("full-swap", "copy every missing expert to the GPU on demand; per-layer LRU cache of the budget",
                 PolicyTraits(role="baseline", order=20))
class FullSwap(PolicyStep):
    """State: the resident set and the last-use stamps of every layer's LRU cache."""

    def __init__(self, setup: Setup) -> None:
        l, e = setup.layers, setup.experts
        options = setup.options
        budget = np.asarray(options.budget, dtype=np.int64)
        if (budget < 1).any():
            raise InputError("full-swap runs every expert on the GPU and needs at least 1 expert slot per MoE layer; "
                             "give a budget of 1 or more")
        initial = (np.zeros((l, e), dtype=bool) if options.static_resident is None
                   else np.asarray(options.static_resident, dtype=bool))
        if initial.shape != (l, e) or (initial.sum(axis=1) > budget).any():
            raise InputError(f"the warm-start resident set must be [{l}, {e}] with at most budget experts per layer")
        super().__init__(setup, initial)
        # Never-used initial residents are older than any use; lower ids are older among them.
        self.stamp = np.broadcast_to(np.arange(e, dtype=np.int64) - e, (l, e)).copy()

    def decide(self, meta: ForwardMeta, rows: Rows, counts: np.ndarray) -> Choice:
        activated = counts > 0
        current = self.current[rows]
        copy = copies(activated > current, COPY_ON_DEMAND)  # the misses
        after, self.stamp[rows] = lru_step(current, self.stamp[rows], activated, meta.index * self.setup.experts,
                                           self.budget[rows])
        placement = activated.view(np.int8)  # every activated expert runs on the GPU (GPU is 1: step checks)
        return (placement, copy, np.zeros(counts.shape, dtype=bool), after)

    def params(self) -> dict[str, object]:
        return {"budget": int_list(self.budget), "warm_start": self.setup.options.static_resident is not None}
