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

from tidesim.policies.registry import PolicyTraits, register_policy
from tidesim.policies.residency import int_list, refresh_rule, refresh_sets
from tidesim.policies.step import Choice, ForwardMeta, PolicyStep, Rows, Setup, copies, no_copies, placement_of
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_SYNC_REFRESH


def refreshes(meta: ForwardMeta, tau: np.ndarray) -> np.ndarray:
    """bool [n]: which of the layers (intervals `tau`) refresh in this forward (residency.refresh_rule)."""
    return refresh_rule(meta.first_block, meta.step, meta.is_commit, tau)


class RefreshCount:
    """Which layers refresh in a forward, and the forwards in which at least one did
    (Schedule.params refresh_forwards). The rule is evaluated once per forward for every layer
    and kept: the live engine asks layer by layer, once per MoE layer with the same meta."""

    def __init__(self, tau: np.ndarray) -> None:
        self.tau = tau
        self.forwards: set[int] = set()
        self._meta: ForwardMeta | None = None
        self._flags = np.zeros(tau.shape, dtype=bool)
        self._listed: list[bool] = []

    def flags(self, meta: ForwardMeta, rows: Rows) -> tuple[np.ndarray, bool, bool]:
        """(refresh [n] of the layers `rows`, whether any of them refreshes, whether all do);
        a forward in which one does is counted."""
        if meta is not self._meta:
            self._meta = meta
            self._flags = refreshes(meta, self.tau)
            self._listed = self._flags.tolist()
        flags = self._flags[rows]
        if isinstance(rows, slice) and rows.stop - rows.start == 1:  # one layer: a plain bool
            some = every = self._listed[rows.start]
        else:
            some, every = bool(flags.any()), bool(flags.all())
        if some:
            self.forwards.add(meta.index)
        return flags, some, every


def refreshed_residents(current: np.ndarray, counts: np.ndarray, order: np.ndarray, budget: np.ndarray
                        ) -> np.ndarray:
    """TIDE's refresh rule (residency.refresh_sets, written once) over leading option axes: bool
    [..., L, E] resident after a refresh of `current` with one forward's counts/order [L, E] and
    budget [..., L]. The planner's residency pass refreshes many (tau, budget) candidates at once
    through this; the online step calls refresh_sets per layer."""
    layers, experts = counts.shape
    flat = current.reshape(-1, experts)
    rows = flat.shape[0] // layers
    _, refreshed = refresh_sets(flat, np.broadcast_to(counts, (rows, layers, experts)).reshape(-1, experts),
                                np.broadcast_to(budget, current.shape[:-1]).reshape(-1),
                                np.broadcast_to(order, (rows, layers, experts)).reshape(-1, experts))
    return refreshed.reshape(current.shape)


@register_policy("tide", "TIDE: refresh the top-budget experts every tau steps, copying only the difference; "
                         "misses on the CPU",
                 PolicyTraits(role="policy", order=50, uses_tau=True, needs_cpu=True, speedup_figure=True,
                              plannable=True, reference=True))
class Tide(PolicyStep):
    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self.tau = np.asarray(setup.options.tau, dtype=np.int64)
        self.sync = setup.options.refresh == "sync"
        self.copy_code = COPY_SYNC_REFRESH if self.sync else COPY_ASYNC_REFRESH
        self.refreshed = RefreshCount(self.tau)

    def decide(self, meta: ForwardMeta, rows: Rows, counts: np.ndarray) -> Choice:
        current = self.current[rows]
        refresh, some, every = self.refreshed.flags(meta, rows)
        if not some:
            return (placement_of(counts, current), no_copies(counts), np.zeros(counts.shape, dtype=bool),
                    current.copy())
        _, refreshed = refresh_sets(current, counts, self.budget[rows], self.refresh_order(rows, counts))
        after = refreshed if every else np.where(refresh[:, None], refreshed, current)
        copy = copies(after > current, self.copy_code)  # copied: resident after, not before
        gpu = after if self.sync else current
        return (placement_of(counts, gpu), copy, np.zeros(counts.shape, dtype=bool), after)

    def refresh_order(self, rows: Rows, counts: np.ndarray) -> np.ndarray | None:
        """The experts of each row by refresh rank (refresh_sets' `order`); None: TIDE's, by tokens
        then id. A policy that breaks the ties otherwise overrides only this."""
        return None

    def params(self) -> dict[str, object]:
        return {"budget": int_list(self.budget), "tau": int_list(self.tau), "refresh": self.setup.options.refresh,
                "refresh_forwards": len(self.refreshed.forwards)}
