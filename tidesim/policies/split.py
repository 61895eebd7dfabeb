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
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def take(self, rows: np.ndarray) -> Slots:
        return Slots(self.free[rows], self.deferred[rows], self.n_async[rows])


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
    act = lm.per_count(lambda m: lm.activation_copies(r, hw, m)[0], pairs_rest)
    res = lm.per_count(lambda m: lm.activation_copies(r, hw, m)[1], pairs_rest)
    none = np.zeros((k + 1, n))
    pool = lm.cpu_pool_bound(r, lm.CpuCosts(total=cpu_rest, longest=longest, shortest=none, n=none))
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
    as_g = np.zeros(0, np.int64) if slots is None else np.repeat(np.arange(n), slots.n_async)
    if slots is None:
        release, as_release = np.full(od_rows.size, lm.FREE_NOW), as_g
    else:
        release, as_release, _ = lm.slot_tags(od_rows, np.ones(od_rows.size, bool), as_g, slots.free, slots.deferred)
    od = lm.OnDemand.pad(od_rows, od_time, release)
    od_n = on_demand.sum(axis=1)
    od_sum = np.bincount(od_rows, weights=od_time, minlength=n)

    rows, cols = np.nonzero(on_cpu)
    cpu_rows = cpu_times[rows, cols]
    span = lpt_makespans(rows, cpu_rows, experts[rows, cols], n, r.workers)
    act, res = lm.activation_copies(r, hw, np.where(on_cpu, counts, 0).sum(axis=1))
    zeros = np.zeros(n)
    slow = zeros
    if r.slows > 0:           # the copies that run while each piece of GPU work does (layer model)
        g_ov, od_ov = lm.copy_overlaps(r, grouped, od, as_g, as_release, act, res, span, on_cpu.sum(axis=1))
        slow = lm.copy_slowdown(r, grouped, g_ov)
        if od_ov is not None:
            extra = lm.copy_slowdown(r, od.compute, od_ov) * od.valid
            od.compute = od.compute + extra
            od_sum = od_sum.copy()
            od_sum[od.rows] += extra.sum(axis=0)
    gpu = lm.GpuCosts(fwd_fixed=zeros, layer_fixed=zeros, grouped=grouped, od_compute_sum=od_sum, slow_extra=slow)
    copies = lm.CopyCosts(sync_h2d=zeros, demote_d2h=zeros, async_h2d=zeros, n_async=zeros, act_d2h=act,
                          res_h2d=res, od_n=od_n, od_copy_sum=od_n * r.expert_copy_s)
    cpu = lm.CpuCosts(total=np.bincount(rows, weights=cpu_rows, minlength=n), longest=zeros, shortest=zeros,
                      n=on_cpu.sum(axis=1))
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
    tiled = None if slots is None else Slots(rep(slots.free), rep(slots.deferred), rep(slots.n_async))
    times = layer_times(rep(counts), rep(experts), rep(active), rep(free), candidates.reshape(-1), spec, hw,
                        (rep(costs[0]), rep(costs[1])), tiled).reshape(c, n)
    return candidates[np.argmin(times, axis=0), np.arange(n)]
