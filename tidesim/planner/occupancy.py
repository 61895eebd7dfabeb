"""Which experts `tide` (synchronous refresh) keeps on the GPU, per candidate (tau, budget), over a
workload: the part of the planner's cost table that does not depend on the hardware profile.

The residency of every forward follows from the routing, tau and the budget alone (TIDE's refresh
rule, written once in tidesim.policies.residency.refresh_sets and applied to every option at once
through tidesim.policies.tide.refreshed_residents); only what an expert costs on either side comes
from the profile. So a sweep over many profiles of one workload steps the forwards once per
(tau, budget) and then costs each profile from compact per-option counts. An expert's time on
either side is a function of its token count, so the activated cells of a layer-forward are
grouped into (layer-forward, token count) pairs, and an option keeps only how many of each pair's
experts are resident.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from tidesim.workload import PerWorkload, Workload


@dataclass(frozen=True)
class CellPairs:
    """A workload's activated (forward, layer, expert) cells, grouped by (layer-forward g, token count)."""

    cells: np.ndarray        # [N] flat index f * L * E + l * E + e of every activated cell, ascending
    cell_pair: np.ndarray    # [N] the pair of each cell
    g: np.ndarray            # [P] layer-forward of each pair (pairs sorted by g, then count)
    count: np.ndarray        # [P] tokens of each expert in the pair
    mult: np.ndarray         # [P] experts in the pair
    starts: np.ndarray       # [H] first pair of each layer-forward that has any
    groups: np.ndarray       # [H] those layer-forwards
    n_active: np.ndarray     # [G] activated experts per layer-forward
    tokens: np.ndarray       # [G] routed (token, expert) pairs per layer-forward
    forward_ptr: np.ndarray  # [F + 1] each forward's slice of `cells`
    experts: int


@dataclass(frozen=True)
class Residency:
    """tide's residency for one (tau, budget): per pair, the experts on the GPU at the gate (after
    the forward's refresh), and per layer-forward the refresh copies and the GPU side's size."""

    gpu_mult: np.ndarray     # [P] experts of each pair on the GPU
    copies: np.ndarray       # [G] experts copied by the refresh
    gpu_n: np.ndarray        # [G] activated experts on the GPU
    gpu_tokens: np.ndarray   # [G] their routed pairs
    on_gpu: np.ndarray       # [N] packed bits: each activated cell on the GPU (for per-task sums)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.__dict__.values())

    def gpu_cells(self, n_cells: int) -> np.ndarray:
        """bool [N]: the activated cells on the GPU."""
        return np.unpackbits(self.on_gpu, count=n_cells).view(bool)


def cell_pairs(workload: Workload) -> CellPairs:
    """The workload's pairs (kept per workload object)."""
    return _entry(workload).pairs


def residencies(workload: Workload, options: list[tuple[int, int]], max_cells: int = 4_000_000,
                progress: Callable[[Iterable[int]], Iterable[int]] | None = None) -> list[Residency]:
    """tide's residency for every (tau, budget) option, from the per-workload cache where an earlier
    call stepped it (a sweep asks again for each profile); new ones are stepped together, vectorised
    over (option, layer, expert), at most max_cells options x layers x experts per step (and
    8 x max_cells options x activated cells)."""
    entry = _entry(workload)
    missing = [o for o in dict.fromkeys(options) if o not in entry.options]
    per_chunk = max(1, min(max_cells // max(1, workload.num_layers * workload.num_experts),
                           8 * max_cells // max(1, entry.pairs.cells.size)))     # bool per option and cell
    chunks = [missing[i:i + per_chunk] for i in range(0, len(missing), per_chunk)]
    indices: Iterable[int] = range(len(chunks))
    if progress is not None:
        indices = progress(indices)
    found: dict[tuple[int, int], Residency] = {}
    for i in indices:
        found.update(zip(chunks[i], _step(workload, entry.pairs, chunks[i]), strict=True))
    out = [found[o] if o in found else entry.options[o] for o in options]
    for option, res in found.items():
        entry.keep(option, res)
    for option in options:
        if option in entry.options:
            entry.options.move_to_end(option)
    return out


# ----- the per-workload cache -----------------------------------------------------------------------

_MAX_BYTES = 128 * 2**20     # residencies kept per workload (a sweep's: tens of options, ~1 MB each)


@dataclass
class _Entry:
    pairs: CellPairs
    options: OrderedDict[tuple[int, int], Residency] = field(default_factory=OrderedDict)
    held: int = 0

    def keep(self, option: tuple[int, int], res: Residency) -> None:
        if option in self.options:
            return
        self.options[option] = res
        self.held += res.nbytes
        while self.held > _MAX_BYTES and len(self.options) > 1:
            _, old = self.options.popitem(last=False)
            self.held -= old.nbytes


_entry: PerWorkload[_Entry] = PerWorkload(lambda workload: _Entry(_make_pairs(workload)))


def _make_pairs(workload: Workload) -> CellPairs:
    f_count, layers, experts = workload.expert_tokens.shape
    groups = f_count * layers
    flat = workload.expert_tokens.reshape(-1)
    cells = np.flatnonzero(flat)
    tokens = flat[cells].astype(np.int64)
    g = cells // experts
    span = int(tokens.max(initial=0)) + 1
    uniq, cell_pair, mult = np.unique(g * span + tokens, return_inverse=True, return_counts=True)
    pair_g, pair_count = np.divmod(uniq, span)
    starts = np.flatnonzero(np.concatenate([[True], pair_g[1:] != pair_g[:-1]])) if pair_g.size else pair_g
    return CellPairs(cells=cells, cell_pair=cell_pair.reshape(-1), g=pair_g, count=pair_count, mult=mult,
                     starts=starts, groups=pair_g[starts], n_active=np.bincount(g, minlength=groups),
                     tokens=np.bincount(g, weights=tokens, minlength=groups).astype(np.int64),
                     forward_ptr=np.searchsorted(cells, np.arange(f_count + 1) * layers * experts),
                     experts=experts)


# ----- stepping the forwards ------------------------------------------------------------------------


def _step(workload: Workload, pairs: CellPairs, options: list[tuple[int, int]]) -> list[Residency]:
    """Residency of each option, with tide's own refresh rule applied to all options at once."""
    from tidesim.policies.residency import rank_experts, refresh_steps
    from tidesim.policies.tide import refreshed_residents

    f_count, layers, experts = workload.expert_tokens.shape
    n = len(options)
    tau = np.array([t for t, _ in options], dtype=np.int64)
    budget = np.array([b for _, b in options], dtype=np.int64)[:, None]          # [n, 1]
    refresh = refresh_steps(workload, tau)                                        # [F, n]
    current = np.zeros((n, layers, experts), dtype=bool)
    copies = np.zeros((n, f_count, layers), dtype=np.int64)
    on_gpu = np.zeros((n, pairs.cells.size), dtype=bool)
    within = pairs.cells % (layers * experts)                                     # l * E + e
    for f in range(f_count):
        rows = np.flatnonzero(refresh[f])
        if rows.size:
            counts = workload.expert_tokens[f]
            ranking = rank_experts(counts)
            old = current[rows]
            b = np.broadcast_to(budget[rows], (rows.size, layers))               # [r, L]
            new = refreshed_residents(old, counts, ranking.order, b)
            copies[rows, f] = (new & ~old).sum(axis=-1)
            current[rows] = new
        lo, hi = pairs.forward_ptr[f], pairs.forward_ptr[f + 1]
        on_gpu[:, lo:hi] = current.reshape(n, layers * experts)[:, within[lo:hi]]
    return [_summarise(pairs, on_gpu[k], copies[k].reshape(-1)) for k in range(n)]


def _summarise(pairs: CellPairs, on_gpu: np.ndarray, copies: np.ndarray) -> Residency:
    """One option's per-pair and per-layer-forward counts from its cells on the GPU."""
    groups = pairs.n_active.size
    pair = pairs.cell_pair[on_gpu]
    gpu_mult = np.bincount(pair, minlength=pairs.g.size)
    gpu_n = np.bincount(pairs.g, weights=gpu_mult, minlength=groups)
    gpu_tokens = np.bincount(pairs.g, weights=gpu_mult * pairs.count, minlength=groups)
    return Residency(gpu_mult=_small(gpu_mult), copies=_small(copies), gpu_n=_small(gpu_n.astype(np.int64)),
                     gpu_tokens=gpu_tokens.astype(np.int64), on_gpu=np.packbits(on_gpu))


def _small(values: np.ndarray) -> np.ndarray:
    """Counts of experts (at most E per layer-forward) in the smallest integer type that holds them."""
    top = int(values.max(initial=0))
    return values.astype(np.int16 if top < 2**15 else np.int64)
