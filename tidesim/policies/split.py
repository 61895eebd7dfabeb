"""The copy-or-CPU split of a layer-forward's activated experts, searched with the layer model.

One search for the two policies that make this choice per layer-forward: the oracle (a bound:
its resident set comes from the future and its on-demand copies are staged) and tide-split
(online: TIDE's resident set, on-demand copies through the executors' slot rule).

Per layer-forward the activated experts come in a decision order: the first n_free are resident
at the gate (they can run in the grouped kernel), the others are not (on the GPU they need an
on-demand copy). A split j runs the first j on the GPU - the first min(j, n_free) in the grouped
kernel, positions n_free .. j-1 copied on demand - and the rest on the CPU pool; positions at or
past `top` (n_active unless given) never go to the GPU, and with keep_resident j < n_free is
not considered (tide-split: the experts at the gate stay there). Every split is ranked by a quick estimate
(the on-demand pipeline in decision order against the CPU pool's bound, all splits at once);
then "resident only" (n_free), the estimate's best and "as many on the GPU as allowed" (top) are
timed exactly with the layer model (layer_times) and the fastest wins, ties to the earlier of
that list, so the split is never slower in the layer model than running every non-resident
expert on the CPU with the same resident set.

RowSplit makes tide-split's choice for one layer-forward in compiled scalar code
(tidesim.policies.rowsplit; the live engine decides one layer per call, where numpy's fixed cost
per call dominated: 17 ms per mini forward, 3.6 to 8 ms with the scalar search in Python); its
decisions are the batched search's (tests/test_policies_tide_split.py checks both ways).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from tidesim import layermodel as lm
from tidesim.hardware import HardwareProfile
from tidesim.models import ModelSpec
from tidesim.sim.lpt import lpt_makespans


@dataclass(frozen=True)
class Slots:
    """Where each layer-forward's on-demand copies find a GPU slot under the executors' slot rule
    (tidesim.layermodel.slot_tags): `free` slots at once, then `deferred` ones after the grouped
    kernel, then those of earlier on-demand experts. n_async: asynchronous refresh copies issued
    in the layer-forward (they add to the copy slowdown). Arrays [N]; None in place of Slots
    means every copy is staged (free at once), as for the oracle."""

    free: np.ndarray
    deferred: np.ndarray
    n_async: np.ndarray
    stay: np.ndarray | None = None     # [N, E] in decision order: an asynchronous refresh copy the
                                       # split may take on demand (it stays resident: no slot reuse)
    backlog: float = 0.0               # background copy time queued ahead: n on-demand copies
                                       # delay it by n copies, charged min(backlog, n x copy)

    def take(self, rows: np.ndarray) -> Slots:
        return Slots(self.free[rows], self.deferred[rows], self.n_async[rows],
                     None if self.stay is None else self.stay[rows], self.backlog)


def stay_charge(r: lm.Rates, backlog: float, n_stays: np.ndarray | int) -> np.ndarray:
    """What n on-demand copies (refresh copies taken on demand or experts passing through) cost
    the background queue they overtake: it waits n copies longer, at most as long as it is
    (min(backlog, n x copy))."""
    return np.minimum(backlog, np.asarray(n_stays) * r.expert_copy_s)


def expert_costs(counts: np.ndarray, spec: ModelSpec, hw: HardwareProfile) -> tuple[np.ndarray, np.ndarray]:
    """(GPU FFN time with its launch, CPU FFN time on one worker) per entry; 0 where no tokens."""
    return (lm.per_count(lambda t: hw.gpu_expert_time(t, spec), counts),
            lm.per_count(lambda t: hw.cpu_expert_time(t, spec), counts))


class ExpertTimes:
    """expert_costs as tables over token counts, grown on demand: an online policy evaluates the
    profile's curves once per count, not once per forward."""

    def __init__(self, spec: ModelSpec, hw: HardwareProfile, top: int = 64) -> None:
        self.spec, self.hw = spec, hw
        self._grow(top)

    def _grow(self, top: int) -> None:
        self.gpu, self.cpu = expert_costs(np.arange(top + 1), self.spec, self.hw)

    def __call__(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        top = int(counts.max(initial=0))
        if top >= self.gpu.size:
            self._grow(max(top, 2 * self.gpu.size))
        return self.gpu[counts], self.cpu[counts]


def split_estimates(counts_sorted: np.ndarray, n_free: np.ndarray, spec: ModelSpec, hw: HardwareProfile
                    ) -> np.ndarray:
    """float [F, L, K + 1]: estimated layer time when the first j experts (in decision order) run
    on the GPU, copies staged (K = counts_sorted.shape[2])."""
    f, l, k = counts_sorted.shape
    counts = np.ascontiguousarray(counts_sorted.reshape(f * l, k).T)
    est = _estimates(counts, *_transposed(expert_costs(counts.T, spec, hw)), n_free.reshape(-1), spec, hw, None)
    return est.T.reshape(f, l, k + 1)


def _transposed(costs: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.ascontiguousarray(costs[0].T), np.ascontiguousarray(costs[1].T)


def _estimates(counts: np.ndarray, gpu_full: np.ndarray, cpu: np.ndarray, n_free: np.ndarray, spec: ModelSpec,
               hw: HardwareProfile, slots: Slots | None) -> np.ndarray:
    """Estimates on a position-major layout: counts [K, N] -> [K + 1, N], with the layer model's
    terms: the grouped kernel of the first min(j, n_free), then the on-demand experts
    (_ondemand_ends), against the CPU side: activations out, the pool's bound, results back once
    the copy engine is free."""
    k, n = counts.shape
    r = lm.Rates.of(hw, spec)
    in_group = np.arange(k)[:, None] < n_free[None, :]
    grouped_prefix = np.zeros((k + 1, n))
    grouped_prefix[1:] = np.cumsum(np.where(in_group, lm.grouped_share(r, gpu_full), 0.0), axis=0)
    finish = lm.grouped_kernel(r, grouped_prefix, np.minimum(np.arange(k + 1)[:, None], n_free[None, :]))
    grouped_end = finish[np.minimum(n_free, k), np.arange(n)]
    ends, engine = _ondemand_ends(r, lm.ondemand_compute(r, gpu_full), n_free, grouped_end, slots)
    finish[1:] = np.where(~in_group, ends, finish[1:])
    engine_end = np.zeros((k + 1, n))
    engine_end[1:] = np.where(~in_group, engine, 0.0)
    cpu_rest = np.zeros((k + 1, n))
    cpu_rest[:k] = np.cumsum(cpu[::-1], axis=0)[::-1]
    pairs_rest = np.zeros((k + 1, n), dtype=np.int64)
    pairs_rest[:k] = np.cumsum(counts[::-1], axis=0, dtype=np.int64)[::-1]
    longest = np.zeros((k + 1, n))
    longest[:k] = np.maximum.accumulate(cpu[::-1], axis=0)[::-1]
    tasks = np.zeros((k + 1, n), dtype=np.int64)
    tasks[:k] = np.cumsum(counts[::-1] > 0, axis=0, dtype=np.int64)[::-1]
    shortest = np.zeros((k + 1, n))
    shortest[:k] = np.minimum.accumulate(np.where(counts > 0, cpu, np.inf)[::-1], axis=0)[::-1]
    shortest[tasks == 0] = 0.0
    act = lm.per_count(lambda m: lm.activation_copies(r, hw, m)[0], pairs_rest)
    res = lm.per_count(lambda m: lm.activation_copies(r, hw, m)[1], pairs_rest)
    pool = pool_estimate(r, cpu_rest, longest, shortest, tasks)
    return np.maximum(finish, np.where(pairs_rest > 0, np.maximum(act + pool, engine_end) + res, 0.0))


def _ondemand_ends(r: lm.Rates, compute: np.ndarray, n_free: np.ndarray, grouped_end: np.ndarray,
                   slots: Slots | None) -> tuple[np.ndarray, np.ndarray]:
    """([K, N] GPU end, [K, N] copy-engine end) when positions n_free .. p are copied on demand
    (position-major; rows below n_free are unused), in decision order, without a loop over them.

    The first copies go back to back: `free` of them at once, then `deferred` ones not before the
    grouped kernel ends (all of them when staged, slots None; at least the first, which finds a
    free or a spare slot), so on-demand expert i ends at T_i + max(grouped end, max over m <= i
    of (landed_m - T_(m-1))), T the running sum of the on-demand compute. Each later copy is
    taken to reuse the slot of the expert just before it (copy, run, copy, run: the slot rule
    when the pool has no other slot to give; an overestimate where it has), so each adds a copy
    and a run. Copies start at the sync end (activations first on one engine are left out)."""
    k, n = compute.shape
    c = r.expert_copy_s
    idx = np.arange(k)[:, None] - n_free[None, :]                     # on-demand index of each position
    is_od = idx >= 0
    t = np.where(is_od, compute, 0.0)
    total = np.cumsum(t, axis=0)
    if slots is None:
        streamed = np.full(n, k)
        landed = (idx + 1) * c
    else:
        free = slots.free[None, :]
        streamed = np.maximum(slots.free + slots.deferred, 1)
        late = np.maximum(free * c, grouped_end[None, :]) + (idx - free + 1) * c
        landed = np.where(idx < free, (idx + 1) * c, late)
    head = is_od & (idx < streamed[None, :])
    lead = np.maximum.accumulate(np.where(head, landed - (total - t), -np.inf), axis=0)
    done = total + np.maximum(grouped_end[None, :], lead)
    if slots is not None:
        last = np.clip(n_free + streamed - 1, 0, k - 1)                    # the last streamed position
        cols = np.arange(n)
        done_s, total_s = done[last, cols], total[last, cols]
        chained = done_s[None, :] + (idx - streamed[None, :] + 1) * c + (total - total_s[None, :])
        done = np.where(head, done, chained)
        before = np.vstack([np.zeros((1, n)), done[:-1]])
        landed = np.where(head, landed, before + c)
    return done, landed


def layer_times(counts: np.ndarray, experts: np.ndarray, n_active: np.ndarray, n_free: np.ndarray,
                split: np.ndarray, spec: ModelSpec, hw: HardwareProfile,
                costs: tuple[np.ndarray, np.ndarray] | None = None, slots: Slots | None = None) -> np.ndarray:
    """float [N]: expert-phase time of each layer-forward for a given split, as the executors'
    layer model charges it (docs/costmodel.md), without waits for earlier background copies
    (none in a schedule without asynchronous refresh).

    counts/experts [N, K]: tokens and expert ids in decision order. The first min(split, n_free)
    run in the grouped kernel, positions n_free .. split-1 are copied on demand (in expert-id
    order, as the executors run them, through the slots `slots` gives, staged when None), the
    rest up to n_active run on the CPU pool with the exact longest-first makespan.
    `costs`: the (GPU, CPU) expert times of `counts` when already known.
    """
    n, k = counts.shape
    pos = np.arange(k)[None, :]
    r = lm.Rates.of(hw, spec)
    gpu_full, cpu_times = costs if costs is not None else expert_costs(counts, spec, hw)
    in_group = pos < np.minimum(split, n_free)[:, None]
    on_demand = (pos >= n_free[:, None]) & (pos < split[:, None])
    on_cpu = (pos >= split[:, None]) & (pos < n_active[:, None])
    share = np.where(in_group, lm.grouped_share(r, gpu_full), 0.0).sum(axis=1)
    grouped = lm.grouped_kernel(r, share, in_group.sum(axis=1))
    od_rows, od_cols = np.nonzero(on_demand)
    by_id = np.lexsort((experts[od_rows, od_cols], od_rows))
    od_rows, od_cols = od_rows[by_id], od_cols[by_id]
    od_time = lm.ondemand_compute(r, gpu_full[od_rows, od_cols])
    passing = np.ones(od_rows.size, bool)
    n_async = None if slots is None else slots.n_async
    if slots is not None and slots.stay is not None:      # refresh copies taken on demand: no longer background
        taken = slots.stay[od_rows, od_cols]
        passing = ~taken
        n_async = slots.n_async - np.bincount(od_rows[taken], minlength=n)
    as_g = np.zeros(0, np.int64) if n_async is None else np.repeat(np.arange(n), n_async)
    if slots is None:
        release, as_release = np.full(od_rows.size, lm.FREE_NOW), as_g
    else:
        release, as_release, _ = lm.slot_tags(od_rows, passing, as_g, slots.free, slots.deferred)
    od = lm.OnDemand.pad(od_rows, od_time, release)
    od_n = on_demand.sum(axis=1)
    od_sum = np.bincount(od_rows, weights=od_time, minlength=n)

    rows, cols = np.nonzero(on_cpu)
    cpu_rows = cpu_times[rows, cols]
    span = lpt_makespans(rows, cpu_rows, experts[rows, cols], n, r.workers)
    act, res = lm.activation_copies(r, hw, np.where(on_cpu, counts, 0).sum(axis=1))
    zeros = np.zeros(n)
    slow = zeros
    cpu = lm.CpuCosts(total=np.bincount(rows, weights=cpu_rows, minlength=n), longest=zeros, shortest=zeros,
                      n=on_cpu.sum(axis=1))
    if r.slows > 0 or r.slows_cpu > 0:   # the copies that run while each piece of expert work does (layer model)
        g_ov, od_ov, pool_ov = lm.copy_overlaps(r, grouped, od, as_g, as_release, act, res, span, cpu.n)
        slow = lm.copy_slowdown(r, grouped, g_ov)
        if od_ov is not None:
            extra = lm.copy_slowdown(r, od.compute, od_ov) * od.valid
            od.compute = od.compute + extra
            od_sum = od_sum.copy()
            od_sum[od.rows] += extra.sum(axis=0)
        lm.charge_copy_pool(r, cpu, span, pool_ov)
        assert cpu.span is not None
        span = cpu.span
    gpu = lm.GpuCosts(fwd_fixed=zeros, layer_fixed=zeros, grouped=grouped, od_compute_sum=od_sum, slow_extra=slow)
    copies = lm.CopyCosts(sync_h2d=zeros, demote_d2h=zeros, async_h2d=zeros, n_async=zeros, act_d2h=act,
                          res_h2d=res, od_n=od_n, od_copy_sum=od_n * r.expert_copy_s)
    lm.charge_contention(r, gpu, cpu, span)
    assert cpu.span is not None
    return lm.layer_phases(r, gpu, copies, cpu.n, cpu.span, od, 1)["side"]


def best_split(counts_sorted: np.ndarray, experts_sorted: np.ndarray, n_active: np.ndarray, n_free: np.ndarray,
               spec: ModelSpec, hw: HardwareProfile, slots: Slots | None = None, top: np.ndarray | None = None,
               keep_resident: bool = False, try_all: bool = True, times: ExpertTimes | None = None,
               chunk: int = 2048) -> np.ndarray:
    """int [N]: how many of each layer-forward's activated experts (in decision order, arrays
    [N, E]) run on the GPU; see the module docstring. keep_resident: only splits of at least
    n_free (every expert at the gate runs there); try_all: time "top" too; times: the expert
    times' tables, when the caller keeps them. Layer-forwards are processed in chunks of
    similar activated counts, so arrays are only as wide as needed."""
    top_all = n_active if top is None else top
    out = np.zeros(n_active.size, dtype=np.int64)
    by_width = np.argsort(n_active, kind="stable")
    for lo in range(0, n_active.size, chunk):
        rows = by_width[lo:lo + chunk]
        active, free, most = n_active[rows], n_free[rows], top_all[rows]
        k = int(active.max())
        if k == 0:
            continue
        counts = counts_sorted[rows, :k]
        gpu_full, cpu = expert_costs(counts, spec, hw) if times is None else times(counts)
        part = None if slots is None else slots.take(rows)
        est = _estimates(np.ascontiguousarray(counts.T), *_transposed((gpu_full, cpu)), free, spec, hw, part)
        j = np.arange(k + 1)[:, None]
        est[(j > most[None, :]) | ((j < free[None, :]) if keep_resident else False)] = np.inf
        candidates = np.stack([free, np.argmin(est, axis=0)] + ([most] if try_all else []))
        out[rows] = _fastest(candidates, counts, experts_sorted[rows, :k], active, free, spec, hw, (gpu_full, cpu),
                             part)
    return out


def _fastest(candidates: np.ndarray, counts: np.ndarray, experts: np.ndarray, active: np.ndarray, free: np.ndarray,
             spec: ModelSpec, hw: HardwareProfile, costs: tuple[np.ndarray, np.ndarray], slots: Slots | None
             ) -> np.ndarray:
    """[N] the fastest of the candidate splits [C, N] by layer_times (ties: the earlier candidate),
    every candidate timed in one call."""
    differ = (candidates != candidates[0]).any(axis=0)
    if not differ.all():           # where every candidate is the same split there is nothing to time
        out = candidates[0].copy()
        if differ.any():
            at = np.flatnonzero(differ)
            out[at] = _fastest(candidates[:, at], counts[at], experts[at], active[at], free[at], spec, hw,
                               (costs[0][at], costs[1][at]), None if slots is None else slots.take(at))
        return out
    c, n = candidates.shape
    rep = lambda a: np.tile(a, (c, 1)) if a.ndim == 2 else np.tile(a, c)  # noqa: E731
    tiled = None if slots is None else Slots(rep(slots.free), rep(slots.deferred), rep(slots.n_async),
                                             None if slots.stay is None else rep(slots.stay), slots.backlog)
    times = layer_times(rep(counts), rep(experts), rep(active), rep(free), candidates.reshape(-1), spec, hw,
                        (rep(costs[0]), rep(costs[1])), tiled).reshape(c, n)
    if slots is not None and slots.backlog > 0:
        times = times + stay_charge(lm.Rates.of(hw, spec), slots.backlog, candidates - free[None, :])
    return candidates[np.argmin(times, axis=0), np.arange(n)]


def pool_estimate(r: lm.Rates, total: np.ndarray, longest: np.ndarray, shortest: np.ndarray, n: np.ndarray
                  ) -> np.ndarray:
    """The estimate's CPU pool time: the layer model's bound on the longest-first makespan
    (tidesim.layermodel.cpu_pool_bound: the mean load, the longest task or ceil(n / workers)
    rounds of the shortest, whichever is longest; exact with one worker, with no more tasks than
    workers, or with equal tasks, the common case at a few tokens). The compiled one-layer
    estimate writes the same terms (tidesim.policies.rowsplit._pool: after a change to the
    layer model's bound, change it there too)."""
    return lm.cpu_pool_bound(r, lm.CpuCosts(total=total, longest=longest, shortest=shortest, n=n))


def slot_spares(n_od: np.ndarray, n_async: np.ndarray, free: np.ndarray, deferred: np.ndarray) -> np.ndarray:
    """Spare slots a layer-forward's copies take under the slot rule (tidesim.layermodel.slot_tags)
    when every on-demand copy only passes through (tide-split's: each is used once and dropped),
    in closed form. The first on-demand copy takes a spare only when no slot is free or deferred;
    later ones reuse queued slots (deferred ones, then those of the on-demand experts before them).
    Asynchronous copies take the free slots left, then the queue's rest, then spares."""
    od_spare = ((n_od > 0) & (free + deferred == 0)).astype(np.int64)
    popped = np.maximum(n_od - free, 0) - od_spare
    left_free = np.maximum(free - n_od, 0)
    queue_left = deferred + n_od - popped
    return od_spare + np.maximum(n_async - left_free - queue_left, 0)


class RowSplit:
    """best_split(keep_resident=True, try_all=False) for one layer-forward, compiled
    (tidesim.policies.rowsplit), for a caller that decides one layer per call (the live engine),
    where numpy's per-call overhead on the batched search costs milliseconds. The same decisions
    from the same floating-point terms: the estimate over the splits from "resident only" to `top`
    (split._estimates' terms), then, where it names another split, both timed in the layer model
    without copy slowdown (split.layer_times' terms; profiles with pcie.copy_slows_compute or
    pcie.copy_slows_cpu > 0 take best_split). Bounds on the longest-first makespans (the pool's lower bound, and the
    list-scheduling bound: the mean load plus (1 - 1/workers) of the longest task) settle most
    comparisons before the exact makespans; a relative margin of 1e-9 keeps rounding out of the
    verdict. The compiled code (and numba) is loaded on the first one-layer call, so that batched
    callers never import it."""

    MARGIN = 1e-9

    def __init__(self, spec: ModelSpec, hw: HardwareProfile, times: ExpertTimes) -> None:
        self.spec, self.hw, self.times = spec, hw, times
        self.r = lm.Rates.of(hw, spec)
        # without numba (an image that lacks it) one-layer calls take the batched search: same decisions
        self.usable = self.r.slows <= 0 and self.r.slows_cpu <= 0 and importlib.util.find_spec("numba") is not None
        self.fc = np.array([self.r.launch_s, self.r.expert_copy_s, lm.ONDEMAND_LAUNCHES_PER_EXPERT * self.r.launch_s,
                            self.r.contention, self.MARGIN, self.r.pool_contention])
        self.ic = np.array([self.r.workers, self.r.engines], np.int64)
        self._act = np.zeros((2, 1))                   # activation copies by pair count; NaN: not yet evaluated
        self._need = np.zeros(2, np.int64)             # pair counts the compiled search asks to evaluate
        self._out = np.zeros(4, np.int64)

    @property
    def kernels(self) -> ModuleType:
        """tidesim.policies.rowsplit, imported on first use (not kept: the policy stays picklable)."""
        from tidesim.policies import rowsplit

        return rowsplit

    def act_res(self, pairs: np.ndarray) -> np.ndarray:
        """[2, n]: lm.activation_copies (out, back) of each entry, from a table kept over the pair
        counts seen (the profile's curves are evaluated for the counts present only, as per_count
        does, so no extrapolation is flagged for a count never asked for)."""
        top = int(pairs.max())
        if top >= self._act.shape[1]:
            grown = np.full((2, max(top + 1, 2 * self._act.shape[1])), np.nan)
            grown[:, :self._act.shape[1]] = self._act
            self._act = grown
        got = self._act[:, pairs]
        if np.isnan(got[0]).any():
            miss = np.unique(pairs[np.isnan(got[0])])
            self._act[0, miss], self._act[1, miss] = lm.activation_copies(self.r, self.hw, miss)
            got = self._act[:, pairs]
        return got

    def _fill(self, status: int, counts: np.ndarray) -> None:
        """Fill the table the compiled code found short (its status), before calling it again."""
        if status == self.kernels.GROW_TIMES:
            self.times(counts)
        else:
            self.act_res(self._need[1:int(self._need[0]) + 1])

    def _room(self, k: int) -> None:
        if self._need.size < k + 2:
            self._need = np.zeros(k + 2, np.int64)

    def one(self, counts: np.ndarray, experts: np.ndarray, nf: int, most: int, fr: int, d0: int,
            stay: np.ndarray | None = None, backlog: float = 0.0) -> int:
        """The split of one layer-forward: counts and expert ids [k] of its activated experts in
        decision order (the first nf at the gate, positions nf .. most - 1 movable), `fr` free and
        `d0` deferred slots; `stay` [k]: positions whose on-demand copy stays resident, and `backlog`
        (Slots.stay, Slots.backlog)."""
        kern = self.kernels
        self._room(counts.size)
        stay_arr = np.zeros(0, np.bool_) if stay is None else np.asarray(stay, np.bool_)
        counts, experts = np.asarray(counts, np.int64), np.asarray(experts, np.int64)
        while True:
            split = kern.row_split(counts, experts, nf, most, fr, d0, stay_arr, float(backlog), self.times.gpu,
                                   self.times.cpu, self._act, self.fc, self.ic, self._need)
            if split >= 0:
                return int(split)
            self._fill(split, counts)

    def tide_split_layer(self, counts: np.ndarray, current: np.ndarray, history: np.ndarray, budget: int,
                         refreshing: bool, sync: bool, copy_code: int, size: int, backlog: float
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int, int, float]:
        """tide-split's one-layer step, compiled (rowsplit.tide_split_layer; `history` is updated in
        place): placement, copy, resident [1, E], the on-demand copies, the spare slots taken, the
        copies the backlog counts and the side bound (0.0 with synchronous refresh)."""
        kern, out = self.kernels, self._out
        self._room(counts.size)
        while True:
            placement, copy, resident, bound = kern.tide_split_layer(
                counts, current, history, budget, refreshing, sync, copy_code, size, backlog,
                self.times.gpu, self.times.cpu, self._act, self.fc, self.ic, self._need, out)
            if out[0] >= 0:
                return placement, copy, resident, int(out[1]), int(out[2]), int(out[3]), float(bound)
            self._fill(int(out[0]), counts)
