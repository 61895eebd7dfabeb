"""tide-split: TIDE's interval refresh, plus a copy-or-CPU split of the experts it misses, chosen
per layer-forward with the layer model.

Residency is exactly tide's (sync or async refresh, one tau or a plan's per-layer tau and budgets,
given as for `planned`: options.extra["plan"], else options.tau and options.budget). What differs
is where the activated experts outside the GPU set run. Once the router has run, the policy knows
this forward's tokens per expert; it orders the activated experts (those at the gate first, then
the others, each by tokens, most first, ties by id) and picks how many run on the GPU with the
split search shared with the oracle (tidesim.policies.split): the ones past the resident set are
copied in on demand (copy=1), used once and dropped (the host keeps every expert), the rest run
on the CPU pool. The search times its candidates with the executors' layer model (grouped
kernel, the copy engine and the slot rule, activations out and back, the longest-first CPU pool,
copy slowdown, GPU/CPU contention) and always includes tide's own choice, so in that model a
layer-forward is never slower than tide's with the same resident set; waits for earlier
background copies (asynchronous refresh) are left out of the comparison.

Experts that cannot be copied on demand here stay on the CPU: those resident before this forward
(a sync refresh evicts them now). With asynchronous refresh, this forward's refresh copies of its
own activated experts are candidates too: taken on demand (copy=1, resident after, as tide has
them), the expert runs on the GPU once its copy lands instead of on the CPU, with no copy beyond
tide's; executors serve demand copies ahead of queued background copies, so taking n of them
delays the background copies queued ahead by n copies. The same holds for every on-demand copy
(those that pass through too): the comparison charges a candidate with n on-demand copies
min(Backlog estimate, n x copy time), the policy's estimate of the background copies still
queued on the copy engine, which the GPU would wait for later, a cost the per-layer-forward
comparison does not see otherwise (without any charge tide-split lost to tide with asynchronous
refresh on the prefix-cache traces). The
slot rule needs the pool's size: the policy keeps it per layer, as the executors' slot plan
grows it (tidesim.layermodel.copy_releases), from the spare slots its copies took so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tidesim import layermodel as lm
from tidesim.policies.planned import planned_setup
from tidesim.policies.registry import PolicyTraits, register_policy
from tidesim.policies.split import (
    ExpertTimes,
    RowSplit,
    Slots,
    best_split,
    pool_estimate,
    slot_spares,
)
from tidesim.policies.step import Choice, ForwardMeta, Rows, Setup
from tidesim.policies.tide import Tide
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_ON_DEMAND, CPU, GPU, NO_COPY


@dataclass
class Backlog:
    """A fluid estimate of the background copies still queued on the copy engine, from the policy's
    own decisions: each forward adds its asynchronous refresh and on-demand copies and drains by a
    lower bound on its duration (so the estimate errs towards a backlog). Decided from the past
    only: a forward's figures are folded in when the next forward starts, the same whether its
    layers were decided at once or one by one."""

    rates: lm.Rates
    seconds: float = 0.0
    forward: int = -1
    _copies: int = 0
    _elapsed: float = 0.0

    def next_forward(self, index: int) -> None:
        self.seconds = max(self.seconds + self._copies * self.rates.expert_copy_s - self._elapsed, 0.0)
        self.forward, self._copies, self._elapsed = index, 0, 0.0

    def add_one(self, copies: int, elapsed: float) -> None:
        """add, with the copies already counted (one layer-forward)."""
        self._copies += copies
        self._elapsed += elapsed

    def add(self, copy: np.ndarray, elapsed: list[float]) -> None:
        """add for several layer-forwards; their times added one at a time, as add_one does."""
        self._copies += int(np.count_nonzero((copy == COPY_ASYNC_REFRESH) | (copy == COPY_ON_DEMAND)))
        for value in elapsed:
            self._elapsed += value


def decision_order(counts: np.ndarray, gate: np.ndarray, movable: np.ndarray) -> np.ndarray:
    """int [n, E]: the activated experts at the gate first, then those that may be copied in, then
    the other activated ones, each band by tokens (most first, ties by id), then the idle ones."""
    top = int(counts.max(initial=0)) + 1
    band = np.where(gate, 0, np.where(movable, 1, np.where(counts > 0, 2, 3)))
    return np.argsort(band * top + (top - 1 - counts), axis=1, kind="stable")


@register_policy("tide-split", "tide's refresh; per layer-forward, each missed expert copied in or run on the CPU, "
                               "whichever split the layer model says is fastest",
                 PolicyTraits(role="policy", order=75, uses_tau=True, needs_cpu=True, reads_profile=True,
                              speedup_figure=True, plannable=True))
class TideSplit(Tide):
    def __init__(self, setup: Setup) -> None:
        setup, self.plan = planned_setup(setup)
        super().__init__(setup)
        self.spec, self.hw = self.setup.model, self.setup.options.hw
        self.times = ExpertTimes(self.spec, self.hw)
        self.row = RowSplit(self.spec, self.hw, self.times)
        self.size0 = np.maximum(self.budget, self.initial.sum(axis=1))   # the slot pool, as copy_releases starts it
        self.spares = np.zeros(setup.layers, dtype=np.int64)             # spare slots taken so far, per layer
        self.on_demand = 0
        self.backlog = Backlog(lm.Rates.of(self.hw, self.spec))
        # activation history per (layer, expert): bit 62 = activated in the layer's previous forward,
        # bit 61 = the one before, ... (63 forwards); compared as integers, most recent use first
        self.history = np.zeros((setup.layers, setup.experts), dtype=np.int64)
        self._past = self.history                  # the rows' history before the forward being decided
        self._ids = np.arange(setup.experts)

    def decide(self, meta: ForwardMeta, rows: Rows, counts: np.ndarray) -> Choice:
        if counts.shape[0] == 1 and self.row.usable:
            return self._decide_one(meta, rows, counts)
        placement, copy, demote, resident = self._refresh(meta, rows, counts)
        before = self.current[rows]
        act = counts > 0
        gate = placement == GPU
        movable = act & ~gate & ~before & (copy == NO_COPY)          # may be copied in on demand now
        # asynchronous refresh: this forward's refresh copies of its activated experts may be taken now
        stay = act & ~gate & (copy == COPY_ASYNC_REFRESH) if not self.sync else np.zeros_like(act)
        if not self.sync:
            self._background(meta)
        movable |= stay
        free_base, deferred, n_sync = lm.slot_counts(before, resident, placement, copy)
        size = np.maximum(self.size0[rows] + self.spares[rows], before.sum(axis=1))
        if movable.any():
            free, _ = lm.free_slots(size, free_base, n_sync)
            order = decision_order(counts, gate & act, movable)
            n_free, top = gate.sum(axis=1), (gate | movable).sum(axis=1)
            slots = Slots(free, deferred, (copy == COPY_ASYNC_REFRESH).sum(axis=1),
                          np.take_along_axis(stay, order, axis=1) if stay.any() else None, self.backlog.seconds)
            counts_sorted = np.take_along_axis(counts, order, axis=1)
            split = best_split(counts_sorted, order, act.sum(axis=1), n_free, self.spec, self.hw, slots, top,
                               keep_resident=True, try_all=False, times=self.times)
            placement, copy = self._apply(order, split, n_free, placement, copy)
            # slot_counts is unchanged: on-demand experts were neither resident nor leaving
        self._take_spares(rows, size, free_base, deferred, n_sync, copy, resident)
        if not self.sync:
            self.backlog.add(copy, self._side_bound(counts, placement))
        return placement, copy, demote, resident

    def _decide_one(self, meta: ForwardMeta, rows: Rows, counts: np.ndarray) -> Choice:
        """decide for one layer (the live engine's call) in compiled scalar code (RowSplit.
        tide_split_layer, tidesim.policies.rowsplit: _refresh and the split for one row): the
        same decisions as the batched path, at a fraction of its cost."""
        layer = rows.start if isinstance(rows, slice) else int(rows[0])
        refreshing = self.refreshed.flags(meta, rows)[1]
        if not self.sync:
            self._background(meta)
        c = np.ascontiguousarray(counts[0], dtype=np.int64)   # one compiled variant (no copy when it is one)
        placement, copy, resident, n_od, spare, n_copies, bound = self.row.tide_split_layer(
            c, self.current[layer], self.history[layer], int(self.budget[layer]), refreshing, self.sync,
            self.copy_code, int(self.size0[layer] + self.spares[layer]), self.backlog.seconds)
        self.on_demand += n_od
        self.spares[layer] += spare
        if not self.sync:
            self.backlog.add_one(n_copies, bound)
        return placement, copy, np.zeros(counts.shape, dtype=bool), resident

    def _side_bound(self, counts: np.ndarray, placement: np.ndarray) -> list[float]:
        """A lower bound on the time each selected layer-forward takes (the CPU pool's bound of its
        CPU experts and the GPU's grouped kernel, whichever is longer): how long the copy engine has
        at least to serve background copies while they run."""
        gpu_full, cpu = self.times(counts)
        where = placement == CPU
        on_cpu = np.where(where, cpu, 0.0)
        shortest = np.where(where, cpu, np.inf).min(axis=1)
        n = where.sum(axis=1)
        pool = pool_estimate(self.backlog.rates, on_cpu.sum(axis=1), on_cpu.max(axis=1),
                             np.where(n > 0, shortest, 0.0), n)
        grouped = np.where(placement == GPU, gpu_full, 0.0).sum(axis=1)
        return list(np.maximum(pool, grouped).tolist())

    def _refresh(self, meta: ForwardMeta, rows: Rows, counts: np.ndarray) -> Choice:
        """Tide.decide (the interval refresh, its target and its copies) with tide-split's ranking
        (refresh_order), the activation history updated first: every forward, refresh or not."""
        self._past = self.history[rows].copy()   # a view for a slice of rows: keep the past, not the update
        self.history[rows] = (self._past >> 1) | ((counts > 0).astype(np.int64) << 62)
        return super().decide(meta, rows, counts)

    def refresh_order(self, rows: Rows, counts: np.ndarray) -> np.ndarray:
        """The refresh ranks experts by tokens, then by their activation history before this
        forward (activated in the previous forward first, ties by the forward before that, and so
        on: the history as a binary number), then by id, where TIDE breaks ties by id alone. With
        a prefix cache a forward activates fewer experts than the budget, so a refresh keeps every
        activated expert and the ties decide which idle residents stay: by history, those the next
        forwards are likeliest to use (temporal stability); by id, an arbitrary set, copied back
        soon after. Causal: the ranking reads the current forward's routing and the past."""
        history = self._past
        if counts.shape[0] == 1:
            return np.lexsort((self._ids, -history[0], -counts[0]))[None, :]
        return np.lexsort((np.broadcast_to(self._ids, counts.shape), -history, -counts), axis=-1)

    def _background(self, meta: ForwardMeta) -> None:
        """Fold the forward before into the backlog estimate (Backlog) when a forward starts: the
        background copy time the split charges its on-demand copies for (split.stay_charge)."""
        if meta.index != self.backlog.forward:
            self.backlog.next_forward(meta.index)

    def _apply(self, order: np.ndarray, split: np.ndarray, n_free: np.ndarray, placement: np.ndarray,
               copy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Placement and copies of the chosen splits: decision positions n_free .. split - 1 (not
        resident at the gate) move from the CPU to the GPU, copied on demand."""
        placement, copy = placement.copy(), copy.copy()
        for i in np.flatnonzero(split > n_free).tolist():
            demand = order[i, n_free[i]:split[i]]
            placement[i, demand] = GPU
            copy[i, demand] = COPY_ON_DEMAND
            self.on_demand += demand.size
        return placement, copy

    def _take_spares(self, rows: Rows, size: np.ndarray, free_base: np.ndarray, deferred: np.ndarray,
                     n_sync: np.ndarray, copy: np.ndarray, resident: np.ndarray) -> None:
        """Grow each layer's slot pool by the spare slots this forward's copies take (the slot
        rule, as tidesim.layermodel.copy_releases applies it to the whole schedule; in closed form,
        split.slot_spares: an on-demand copy is never resident after its forward, so it only passes
        through its slot)."""
        free, sync_spare = lm.free_slots(size, free_base, n_sync)
        od = copy == COPY_ON_DEMAND
        if (od & resident).any():     # some stay: the general slot rule
            od_g, od_e = np.nonzero(od)
            taken = lm.slot_tags(od_g, ~resident[od_g, od_e], np.nonzero(copy == COPY_ASYNC_REFRESH)[0], free,
                                 deferred)[2]
        else:
            taken = slot_spares(od.sum(axis=1), (copy == COPY_ASYNC_REFRESH).sum(axis=1), free, deferred)
        spare = sync_spare + taken
        if spare.any():
            self.spares[rows] += spare

    def params(self) -> dict[str, object]:
        plan = None if self.plan is None else {"trace": self.plan.trace, "mode": self.plan.mode}
        return {**super().params(), "plan": plan, "split": "layer model", "on_demand_copies": self.on_demand}
