"""The layer-time model: what one MoE layer-forward costs on each resource, and how the parts
combine into its time. The one source of these terms for every executor and estimator: the
simulator (tidesim.sim), the analytic model (tidesim.costmodel), the oracle's split search
(tidesim.policies.oracle), the planner's cost table and its bound (tidesim.planner).

Data: `Rates` (the profile's constants), `GpuCosts`, `CopyCosts` and `CpuCosts` (per
layer-forward work, grouped by resource). Pure functions: the per-expert charges, the sync phase,
the CPU pool's bound, the copy slowdown and GPU/CPU contention, the slot releases of copies, the
on-demand copy/compute pipeline and the closed-form layer phases (the CPU pool's makespan itself
is tidesim.sim.lpt.lpt_makespans, which every executor charges). docs/costmodel.md states the
model; change a term here and every consumer follows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tidesim.hardware import US, HardwareProfile
from tidesim.models import ModelSpec
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_ON_DEMAND, COPY_SYNC_REFRESH, GPU, Schedule

# Kernel launches the runtime issues for one on-demand expert (runtime executor, swiglu_into: the
# gate/up GEMM, SiLU, the product, the down GEMM written in place; the layer's tokens are gathered
# and its outputs combined once per layer, with the grouped experts): the model charges that many
# launch overheads instead of the one inside gpu_expert_time. The runtime imports this constant,
# and a test counts its kernels at torch's dispatcher.
ONDEMAND_LAUNCHES_PER_EXPERT = 4

# When the slot a copy writes into is free (docs/costmodel.md, "Slots"): at once, after the
# layer's grouped kernel (it reads the expert leaving that slot), or, for k >= 0, after the k-th
# on-demand expert of the same layer-forward has run (it only passed through that slot).
FREE_NOW = -2
AFTER_GROUPED = -1


@dataclass(frozen=True)
class Rates:
    """The profile's constants the layer model uses (seconds, counts)."""

    launch_s: float              # one GPU kernel launch
    expert_copy_s: float         # H2D of one expert's weights
    expert_demote_s: float       # D2H of one expert's weights
    engines: int                 # 1: H2D and D2H share one copy engine; 2: one per direction
    workers: int                 # CPU pool
    slows: float                 # pcie.copy_slows_compute
    slows_cpu: float             # pcie.copy_slows_cpu: CPU pool tasks slowed by H2D copies
    contention: float            # cpu.gpu_contention: GPU expert work slowed by the CPU pool
    pool_contention: float       # cpu.pool_contention: CPU pool tasks slowed by GPU expert work
    act_bytes_per_pair: float    # activation bytes of one routed (token, expert) pair

    @classmethod
    def of(cls, hw: HardwareProfile, spec: ModelSpec) -> Rates:
        return cls(launch_s=hw.gpu.launch_overhead_us * US,
                   expert_copy_s=float(hw.h2d_time(float(spec.expert_bytes))),
                   expert_demote_s=float(hw.d2h_time(float(spec.expert_bytes))),
                   engines=1 if hw.pcie.copy_engines <= 1 else 2, workers=max(int(hw.cpu.workers), 1),
                   slows=float(hw.pcie.copy_slows_compute), slows_cpu=float(hw.pcie.copy_slows_cpu),
                   contention=float(hw.cpu.gpu_contention),
                   pool_contention=float(hw.cpu.pool_side_contention()),
                   act_bytes_per_pair=float(spec.activation_bytes_per_token))


@dataclass
class GpuCosts:
    """GPU stream work: [F] per forward, [G] per layer-forward (g = f * L + l)."""

    fwd_fixed: np.ndarray        # [F] dense layers + lm_head
    layer_fixed: np.ndarray      # [F] attention + shared expert + gate, per MoE layer
    grouped: np.ndarray          # [G] grouped kernel of the experts resident at the gate
    od_compute_sum: np.ndarray   # [G] on-demand experts (each with its own launches)
    slow_extra: np.ndarray       # [G] slowdown while copies run and while the CPU pool computes


@dataclass
class CopyCosts:
    """Copy-engine work per layer-forward [G]."""

    sync_h2d: np.ndarray         # synchronous refresh copies
    demote_d2h: np.ndarray       # demotions
    async_h2d: np.ndarray        # asynchronous refresh copies issued here
    n_async: np.ndarray
    act_d2h: np.ndarray          # activations of CPU-routed pairs to the host
    res_h2d: np.ndarray          # their results back
    od_n: np.ndarray             # on-demand copies
    od_copy_sum: np.ndarray


@dataclass
class CpuCosts:
    """CPU pool work per layer-forward [G] (task times already stretched by contention)."""

    total: np.ndarray            # sum of task times
    longest: np.ndarray
    shortest: np.ndarray         # 0 where none
    n: np.ndarray
    span: np.ndarray | None = None   # the longest-first makespan, once computed (every executor charges it)


# ----- per-expert charges -----------------------------------------------------------------------


def per_count(fn: Callable[[np.ndarray], np.ndarray], counts: np.ndarray) -> np.ndarray:
    """fn applied to every entry of an integer array via a table over the counts present (fn(0)
    is taken as 0): cost curves are evaluated once per distinct token count."""
    counts = np.asarray(counts)
    if counts.size == 0:
        return np.zeros(counts.shape)
    top = int(counts.max())
    table = np.zeros(top + 1)
    present = np.flatnonzero(np.bincount(counts.ravel(), minlength=top + 1))
    present = present[present > 0]
    if present.size:
        table[present] = fn(present)
    return table[counts]


def grouped_share(r: Rates, gpu_full: np.ndarray) -> np.ndarray:
    """An expert's share of the grouped kernel: its GPU time without its launch."""
    return np.maximum(gpu_full - r.launch_s, 0.0)


def ondemand_compute(r: Rates, gpu_full: np.ndarray) -> np.ndarray:
    """An on-demand expert: its share plus ONDEMAND_LAUNCHES_PER_EXPERT launches."""
    return grouped_share(r, gpu_full) + ONDEMAND_LAUNCHES_PER_EXPERT * r.launch_s


def grouped_kernel(r: Rates, share_sum: np.ndarray, n: np.ndarray) -> np.ndarray:
    """The grouped kernel: the experts' shares plus one launch where any expert runs."""
    return share_sum + np.where(n > 0, r.launch_s, 0.0)


def activation_copies(r: Rates, hw: HardwareProfile, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(D2H of the CPU-routed pairs' activations, H2D of their results)."""
    nbytes = np.asarray(pairs, float) * r.act_bytes_per_pair
    return np.asarray(hw.d2h_time(nbytes), float), np.asarray(hw.h2d_time(nbytes), float)


# ----- shared resources -------------------------------------------------------------------------


def copy_slowdown(r: Rates, gpu_work: np.ndarray, h2d_overlap: np.ndarray) -> np.ndarray:
    """pcie.copy_slows_compute: a piece of GPU expert work slows by that fraction for as long as
    H2D copies run while it does (h2d_overlap, from copy_overlaps; capped at the work itself)."""
    return r.slows * np.minimum(gpu_work, h2d_overlap) if r.slows > 0 else np.zeros(np.shape(gpu_work))


def copy_overlaps(r: Rates, grouped: np.ndarray, od: OnDemand | None, async_g: np.ndarray,
                  async_release: np.ndarray, act_d2h: np.ndarray, res_h2d: np.ndarray, pool: np.ndarray,
                  cpu_n: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """How long each piece of a layer-forward's expert work runs while one of its own H2D copies
    is on the engine: (grouped kernel [G], each on-demand expert [K, R] as `od`, the CPU pool [G]
    between the activations' arrival (act_d2h) and act_d2h + pool).

    First order (docs/costmodel.md, "Copies slow compute"): on the layer-forward's own timeline
    from the end of its sync phase, before any slowdown and without waits for other
    layer-forwards' copies. The grouped kernel runs [0, grouped]; the on-demand copies and
    experts as the pipeline places them; the asynchronous copies (sorted by g, in issue order)
    after the on-demand copies, each once its slot is free; the CPU results once the pool is done
    (pool) and the on-demand copies have left the engine. A copy that the slot rule holds until
    after the grouped kernel does not overlap it."""
    c = r.expert_copy_s
    groups = grouped.size
    s0 = act_d2h.copy() if r.engines == 1 else np.zeros(groups)    # the engine is free from here
    engine_free = s0.copy()
    col_of = np.full(groups, -1, np.int64)
    x0: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    ends = starts = a_od = np.zeros((0, 0))
    if od is not None and od.rows.size:
        engine, _, starts, ends = ondemand_pipeline(c, s0[od.rows], grouped[od.rows], od)
        engine_free[od.rows] = engine
        col_of[od.rows] = np.arange(od.rows.size)
        a_od = ends - od.compute
        at_k, at_col = np.nonzero(od.valid)
        x0.append(starts[at_k, at_col])
        rows.append(od.rows[at_col])
    if async_g.size:
        pos = _rank(async_g)
        rel = np.where(async_release == AFTER_GROUPED, grouped[async_g], 0.0)
        late = async_release >= 0
        if late.any():
            rel[late] = ends[async_release[late], col_of[async_g[late]]]
        x0.append(np.maximum(engine_free[async_g], _segment_cummax(async_g, rel - pos * c)) + pos * c)
        rows.append(async_g)
    res = np.flatnonzero((cpu_n > 0) & (res_h2d > 0))
    x0.append(np.maximum(act_d2h[res] + pool[res], engine_free[res]))
    rows.append(res)
    start, g = np.concatenate(x0), np.concatenate(rows)
    stop = start + np.concatenate([np.full(start.size - res.size, c), res_h2d[res]])
    grouped_ov = np.bincount(g, weights=np.clip(np.minimum(stop, grouped[g]) - np.maximum(start, 0.0), 0.0, None),
                             minlength=groups)
    busy = cpu_n[g] > 0
    gb, pool_start = g[busy], act_d2h[g[busy]]
    pool_ov = np.bincount(gb, weights=np.clip(np.minimum(stop[busy], pool_start + pool[gb])
                                              - np.maximum(start[busy], pool_start), 0.0, None), minlength=groups)
    if od is None or not od.rows.size:
        return grouped_ov, None, pool_ov
    od_ov = np.zeros(od.compute.shape)
    col = col_of[g]
    at = col >= 0
    start, stop, col = start[at], stop[at], col[at]
    for k in range(od.compute.shape[0]):
        hit = np.clip(np.minimum(stop, ends[k, col]) - np.maximum(start, a_od[k, col]), 0.0, None)
        od_ov[k] = np.bincount(col, weights=np.where(od.valid[k, col], hit, 0.0), minlength=od.rows.size)
    return grouped_ov, od_ov, pool_ov


def charge_copy_pool(r: Rates, cpu: CpuCosts, span: np.ndarray, pool_ov: np.ndarray) -> np.ndarray:
    """pcie.copy_slows_cpu = c (in place): the CPU pool progresses 1 + c times slower while the
    layer-forward's own H2D copies run beside it (pool_ov, from copy_overlaps: they read host
    memory the experts stream, and on the CPU-as-GPU path a copy is a memcpy on a core), so to
    first order its makespan grows by c x pool_ov; every task is stretched alike (the
    longest-first order kept). Sets cpu.span; returns the factor per layer-forward [G]."""
    return stretch_pool(cpu, span, r.slows_cpu * pool_ov)


def stretch_pool(cpu: CpuCosts, span: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """Every CPU task of a layer-forward stretched alike so that its longest-first makespan `span`
    grows by `extra` (in place; scaling all tasks alike keeps their order): the factor
    (span + extra) / span per layer-forward [G], 1 where the pool has no work. Sets cpu.span."""
    factor = np.where(span > 0, (span + extra) / np.maximum(span, 1e-300), 1.0)
    cpu.total, cpu.longest, cpu.shortest = cpu.total * factor, cpu.longest * factor, cpu.shortest * factor
    cpu.span = span * factor
    return factor


def contention_overlap(gpu_work: np.ndarray, span: np.ndarray) -> np.ndarray:
    """The contentions' overlap: while both run, the GPU side progresses 1 + s_gpu and the pool
    1 + s_pool times slower, so to first order each grows by its s x min(GPU expert work, CPU pool
    makespan)."""
    return np.minimum(gpu_work, span)


def sync_phase(r: Rates, sync_h2d: np.ndarray, demote_d2h: np.ndarray) -> np.ndarray:
    """Sync refresh copies and demotions: in parallel with two engines, one after the other with one."""
    return np.maximum(sync_h2d, demote_d2h) if r.engines == 2 else sync_h2d + demote_d2h


def cpu_pool_bound(r: Rates, cpu: CpuCosts) -> np.ndarray:
    """No pool of `workers` finishes a layer's CPU tasks sooner than the mean load, the longest
    task, or ceil(n / workers) rounds of the shortest one (equal to the longest-first makespan
    with one worker, with no more tasks than workers, or with equal tasks). A bound, for where one
    is wanted (the analytic model's lower_bound, the split policies' screening): every executor
    charges the makespan itself, tidesim.sim.lpt.lpt_makespans."""
    if r.workers == 1:
        return cpu.total
    rounds = np.ceil(cpu.n / r.workers) * cpu.shortest
    return np.maximum.reduce([cpu.total / r.workers, cpu.longest, rounds])


def charge_contention(r: Rates, gpu: GpuCosts, cpu: CpuCosts, span: np.ndarray) -> np.ndarray:
    """cpu.gpu_contention = s_gpu and cpu.pool_contention = s_pool (in place): with
    o = contention_overlap(GPU expert work, makespan), the GPU work grows by s_gpu x o (slow_extra)
    and every CPU task of the layer-forward is stretched by (span + s_pool x o) / span, so the
    longest-first makespan grows by s_pool x o (scaling all tasks alike keeps their order).
    Returns that factor per layer-forward [G] (1 where s_pool = 0)."""
    if r.contention <= 0 and r.pool_contention <= 0:
        cpu.span = span
        return np.ones(span.shape)
    overlap = contention_overlap(gpu.grouped + gpu.od_compute_sum, span)
    gpu.slow_extra = gpu.slow_extra + r.contention * overlap
    return stretch_pool(cpu, span, r.pool_contention * overlap)


# ----- slots: when a copy may start -------------------------------------------------------------


def copy_releases(schedule: Schedule, copy_idx: np.ndarray | None = None, copy_kind: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Release tags (FREE_NOW, AFTER_GROUPED or k) of the on-demand and the asynchronous copies,
    each in (forward, layer, expert) order: the slot rule of the runtime's slot plan.

    Per layer-forward, copies take a slot in expert-id order, on-demand copies first: a free
    slot if any (the pool's unused slots and those of leaving experts that do not run on the GPU
    now), else the slot of a leaving expert that runs in the grouped kernel (AFTER_GROUPED), else
    the slot of an earlier on-demand expert that only passes through (its index k), else a spare
    slot (free; the pool keeps it). A bound with free prefetches (the oracle) stages every copy:
    all FREE_NOW. copy_idx, copy_kind: the flat indices of the schedule's copies and their kinds,
    when the caller has them. Only layer-forwards with copies are looked at.
    """
    F, L, E = schedule.copy.shape
    flat_copy = schedule.copy.reshape(-1)
    if copy_idx is None:
        copy_idx = np.flatnonzero(flat_copy != 0)
    kind = flat_copy[copy_idx] if copy_kind is None else copy_kind
    is_od, is_as = kind == COPY_ON_DEMAND, kind == COPY_ASYNC_REFRESH
    od_idx, as_idx = copy_idx[is_od], copy_idx[is_as]
    if schedule.free_async_copies or od_idx.size + as_idx.size == 0:
        return np.full(od_idx.size, FREE_NOW, np.int64), np.full(as_idx.size, FREE_NOW, np.int64)
    copy_g = copy_idx // E                                # ascending (copy_idx is)
    first = np.concatenate([[True], copy_g[1:] != copy_g[:-1]])
    rows = copy_g[first]                                  # layer-forwards with any copy, in g order
    row_of = np.cumsum(first) - 1                         # each copy's position in rows
    f, layer = np.divmod(rows, L)
    resident = schedule.resident.reshape(F * L, E)
    before = np.where((f > 0)[:, None], resident[np.maximum(rows - L, 0)], schedule.initial_resident[layer])
    after = resident[rows]
    copy = schedule.copy.reshape(F * L, E)[rows]
    free_base, deferred, n_sync = slot_counts(before, after, schedule.placement.reshape(F * L, E)[rows], copy)
    size0 = np.maximum(schedule.budget, schedule.initial_resident.sum(axis=1))[layer]
    n_before = before.sum(axis=1)
    od_g, as_g = row_of[is_od], row_of[is_as]
    passing = ~after[od_g, od_idx % E]
    by_layer = np.lexsort((f, layer))                     # the pool of a layer carries over forwards
    size = size0.copy()
    for _ in range(F + 1):         # the pool grows only where it must; a few rounds settle it
        free, sync_spare = free_slots(size, free_base, n_sync)
        od_tag, as_tag, spare = _tags(od_g, passing, as_g, free, deferred)
        spare = spare + sync_spare
        grown = size0.copy()
        grown[by_layer] += _segment_cumsum(layer[by_layer], spare[by_layer]) - spare[by_layer]
        grown = np.maximum(grown, n_before)
        if np.array_equal(grown, size):
            break
        size = grown
    return od_tag, as_tag


def slot_counts(before: np.ndarray, after: np.ndarray, placement: np.ndarray, copy: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per layer-forward (rows of [N, E] arrays): (free_base, deferred, n_sync) of the slot rule.
    free_base: free slots are the pool's size plus this (leaving experts that do not run on the
    GPU now, less the residents before); deferred: leaving experts that run in the grouped kernel
    (their slots free after it); n_sync: synchronous refresh copies (they take free slots first)."""
    leaving = before & ~after
    in_grouped = leaving & (placement == GPU) & (copy == 0)
    free_base = (leaving & ~in_grouped).sum(axis=1) - before.sum(axis=1)
    return free_base, in_grouped.sum(axis=1), (copy == COPY_SYNC_REFRESH).sum(axis=1)


def free_slots(size: np.ndarray, free_base: np.ndarray, n_sync: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slots free at once for on-demand and asynchronous copies, spare slots the sync copies take)
    of a pool of `size` slots (slot_counts gives the other two)."""
    return np.maximum(size + free_base - n_sync, 0), np.maximum(n_sync - size - free_base, 0)


def slot_tags(od_g: np.ndarray, passing: np.ndarray, as_g: np.ndarray, free: np.ndarray, deferred: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The slot rule's release tags of on-demand copies (layer-forward ids od_g, sorted; whether
    each only passes through) and asynchronous ones (as_g), given each layer-forward's `free`
    and `deferred` slots (indices into those arrays), and the spare slots each took: what
    copy_releases computes for a whole schedule, for callers that decide forward by forward."""
    return _tags(od_g, passing, as_g, free, deferred)


def background_waits(schedule: Schedule, async_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Who waits for each asynchronous copy (flat indices, ascending): (use, freed), each a
    layer-forward g or -1 (docs/costmodel.md, "Waits for background copies").

    use: the first later forward of the same layer whose grouped kernel runs the copied expert;
    the GPU waits for this copy there, and only there. freed: the forward where the expert leaves
    the GPU without having run since; its slot frees while the copy may still be in flight, so
    that layer-forward's demand copies and demotions wait for it. A copy whose expert stays
    resident and idle to the end is waited for by the run's final drain only. A bound with free
    prefetches (the oracle) charges its copies no time: all -1.
    """
    n = async_idx.size
    use, freed = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    if schedule.free_async_copies or n == 0:
        return use, freed
    F, L, E = schedule.copy.shape
    f0, rest = np.divmod(async_idx, L * E)
    layer, expert = np.divmod(rest, E)
    open_ = np.arange(n)
    d = 1
    while open_.size:            # look one forward further for the copies still open
        f = f0[open_] + d
        alive = f < F
        open_, f = open_[alive], f[alive]
        li, ei = layer[open_], expert[open_]
        runs = (schedule.placement[f, li, ei] == GPU) & (schedule.copy[f, li, ei] == 0)
        leaves = ~schedule.resident[f, li, ei] & ~runs
        use[open_[runs]] = (f * L + li)[runs]
        freed[open_[leaves]] = (f * L + li)[leaves]
        open_ = open_[~(runs | leaves)]
        d += 1
    return use, freed


def _tags(od_g: np.ndarray, passing: np.ndarray, as_g: np.ndarray, free: np.ndarray, deferred: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised slot rule (see copy_releases): tags of the on-demand and asynchronous copies,
    and how many spare slots each layer-forward took.

    The slots that free later form a queue per layer-forward: the grouped kernel's first, then
    each pass-through on-demand expert's as it is planned. A copy past the free slots takes the
    queue's head, or a spare slot when the queue is empty then; so the spares up to copy k are
    the running maximum of (copies wanting a queue slot - entries queued so far)."""
    groups = free.size
    k = _rank(od_g)
    fr, d0 = free[od_g], deferred[od_g]
    passes_before = _segment_cumsum(od_g, passing.astype(np.int64)) - passing      # passes among copies < k
    wanting = k - fr + 1                                                              # queue slots wanted up to k
    short = np.where(wanting > 0, wanting - d0 - passes_before, -1)
    spares = np.maximum(_segment_cummax(od_g, short), 0)                              # spares up to k (incl.)
    prev_spares = np.maximum(np.where(k > 0, np.concatenate([[0], spares[:-1]]), 0), 0)
    pops = (wanting > 0) & (spares == prev_spares)
    head = wanting - 1 - prev_spares                                                  # queue index taken
    pass_pos = np.flatnonzero(passing)
    pass_ptr = np.searchsorted(od_g[pass_pos], np.arange(groups + 1))
    od_tag = np.full(od_g.size, FREE_NOW, np.int64)
    od_tag[pops & (head < d0)] = AFTER_GROUPED
    via_pass = pops & (head >= d0)
    if via_pass.any():
        od_tag[via_pass] = k[pass_pos[pass_ptr[od_g[via_pass]] + head[via_pass] - d0[via_pass]]]
    n_od = np.bincount(od_g, minlength=groups)
    popped = np.bincount(od_g[pops], minlength=groups)
    od_spare = np.bincount(od_g, weights=(wanting > 0) & ~pops, minlength=groups).astype(np.int64)
    queued = deferred + np.bincount(od_g[pass_pos], minlength=groups)
    # asynchronous copies: the free slots left, then the rest of the queue, then spares
    a = _rank(as_g)
    left_free = np.maximum(free - n_od, 0)
    i = a - left_free[as_g]
    q = popped[as_g] + i                                                               # queue index
    takes = (i >= 0) & (q < queued[as_g])
    as_tag = np.full(as_g.size, FREE_NOW, np.int64)
    as_tag[takes & (q < deferred[as_g])] = AFTER_GROUPED
    late = takes & (q >= deferred[as_g])
    if late.any():
        as_tag[late] = k[pass_pos[pass_ptr[as_g[late]] + q[late] - deferred[as_g[late]]]]
    spare = od_spare + np.bincount(as_g[(i >= 0) & ~takes], minlength=groups)
    return od_tag, as_tag, spare


def _segment_cumsum(g_sorted: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Running sum of values within each run of equal (sorted) group ids."""
    total = np.cumsum(values)
    if total.size == 0:
        return total
    starts = np.flatnonzero(np.concatenate([[True], g_sorted[1:] != g_sorted[:-1]]))
    base = np.repeat(total[starts] - values[starts], np.diff(np.append(starts, g_sorted.size)))
    return total - base


def _segment_cummax(g_sorted: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Running maximum within each run of equal (sorted) group ids (integers, or floats)."""
    if values.size == 0:
        return values
    run = np.cumsum(np.concatenate([[0], (g_sorted[1:] != g_sorted[:-1]).astype(np.int64)]))
    span = np.abs(values).max() + 1
    offset = run * (2 * span)
    return np.maximum.accumulate(values + offset) - offset


def _rank(g_sorted: np.ndarray) -> np.ndarray:
    """Position of each entry within its run of equal (sorted) group ids."""
    if g_sorted.size == 0:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.concatenate([[True], g_sorted[1:] != g_sorted[:-1]]))
    return np.arange(g_sorted.size) - np.repeat(starts, np.diff(np.append(starts, g_sorted.size)))


# ----- on-demand pipeline and the layer's phases ------------------------------------------------


@dataclass
class OnDemand:
    """The on-demand experts of the layer-forwards that have any, padded position-major: column r
    is layer-forward rows[r], entry [k, r] its k-th on-demand expert (compute time, release tag,
    validity)."""

    rows: np.ndarray             # [R] layer-forward g of each column
    compute: np.ndarray          # [K, R]
    release: np.ndarray          # [K, R]
    valid: np.ndarray            # [K, R] bool

    @classmethod
    def pad(cls, g_sorted: np.ndarray, compute: np.ndarray, release: np.ndarray) -> OnDemand:
        """From sparse lists sorted by g; columns ordered by how many experts they hold (most
        first, ties by g), so that the pipeline's k-th step reads a leading slice."""
        return OnDemandLayout.of(g_sorted, release).fill(compute)


    @classmethod
    def single(cls, g: int, compute: np.ndarray, release: np.ndarray) -> OnDemand:
        """One layer-forward's on-demand experts (the simulator's case)."""
        return cls(np.array([g]), np.asarray(compute, float)[:, None], np.asarray(release, np.int64)[:, None],
                   np.ones((len(compute), 1), bool))


@dataclass(frozen=True)
class OnDemandLayout:
    """OnDemand's padding of sparse lists sorted by g, and their release tags: what does not
    depend on the profile (a schedule's costing keeps it for the next profile)."""

    g: np.ndarray                # the layer-forwards it was made from
    rows: np.ndarray             # [R]
    k: np.ndarray                # each entry's position within its layer-forward
    col: np.ndarray              # each entry's column
    release: np.ndarray          # [K, R]
    valid: np.ndarray            # [K, R] bool

    @classmethod
    def of(cls, g_sorted: np.ndarray, release: np.ndarray) -> OnDemandLayout:
        first = np.concatenate([[True], g_sorted[1:] != g_sorted[:-1]]) if g_sorted.size else np.zeros(0, bool)
        rows, inverse = g_sorted[first], np.cumsum(first) - 1
        count = np.diff(np.append(np.flatnonzero(first), g_sorted.size))
        order = np.argsort(-count, kind="stable")
        col = np.empty_like(order)
        col[order] = np.arange(order.size)
        k, at = _rank(g_sorted), col[inverse]
        width = int(count.max()) if count.size else 0
        tags, valid = np.full((width, rows.size), FREE_NOW, np.int64), np.zeros((width, rows.size), bool)
        tags[k, at] = release
        valid[k, at] = True
        out = cls(g_sorted.copy(), rows[order], k, at, tags, valid)
        for a in (out.g, out.rows, out.k, out.col, out.release, out.valid):
            a.flags.writeable = False                # shared by every OnDemand it fills
        return out

    def fill(self, compute: np.ndarray) -> OnDemand:
        """The padded arrays with these compute times (release tags and validity shared, read-only)."""
        out = np.zeros(self.valid.shape)
        out[self.k, self.col] = compute
        return OnDemand(self.rows, out, self.release, self.valid)


def ondemand_pipeline(copy_s: float, copy_start: np.ndarray, grouped_end: np.ndarray, od: OnDemand
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The two-stage pipeline of a layer's on-demand experts, per column: copy k starts when the
    engine is free (from copy_start) and its slot is released, and lands copy_s later; expert k
    runs when its copy has landed and the GPU is free (from grouped_end, after the grouped kernel).
    Returns (engine free after the last copy [R], GPU end [R], copy starts [K, R], compute ends
    [K, R]). Step k touches only the leading columns that reach position k."""
    width, n = od.compute.shape
    reach = np.where(od.valid.any(axis=0), width - np.argmax(od.valid[::-1], axis=0), 0)
    busy = [n] * width
    if n > 1 and width and (np.diff(reach) <= 0).all():     # columns sorted by reach (OnDemand.pad)
        busy = np.searchsorted(-reach, -np.arange(width), side="left").tolist()
    engine = np.array(copy_start, float, copy=True)
    g_end = np.asarray(grouped_end, float)
    gpu = g_end.copy()
    starts = np.zeros((width, n))
    ends = np.zeros((width, n))
    for k in range(width):
        m = busy[k]
        tag = od.release[k, :m]
        slot = np.where(tag == AFTER_GROUPED, g_end[:m], 0.0)
        if tag.max(initial=-1) >= 0:
            slot = np.where(tag >= 0, ends[np.maximum(tag, 0), np.arange(m)], slot)
        start = np.maximum(engine[:m], slot)
        landed = start + copy_s
        done = np.maximum(gpu[:m], landed) + od.compute[k, :m]
        v = od.valid[k, :m]
        starts[k, :m] = start
        ends[k, :m] = np.where(v, done, 0.0)
        np.copyto(engine[:m], landed, where=v)
        np.copyto(gpu[:m], done, where=v)
    return engine, gpu, starts, ends


def layer_phases(r: Rates, gpu: GpuCosts, copies: CopyCosts, cpu_n: np.ndarray, pool: np.ndarray, od: OnDemand | None,
                 layers: int, async_wait: np.ndarray | None = None, block: np.ndarray | None = None,
                 gate_wait: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Closed-form phases of every layer-forward [G]: fixed work, sync phase, GPU and CPU side ends
    (from the sync end) and the layer time. pool: the CPU pool's time per layer-forward (its exact
    makespan or its bound); async_wait: the GPU's wait for earlier background copies before its
    grouped kernel; block: a demand copy's expected wait behind a background copy already on the
    engine; gate_wait: a wait for background copies before the sync phase (where demand copies
    reuse their slots or the GPU runs their experts; docs/costmodel.md)."""
    groups = copies.sync_h2d.size
    fixed = np.repeat(gpu.layer_fixed, layers)
    gate = np.zeros(groups) if gate_wait is None else gate_wait
    sync = sync_phase(r, copies.sync_h2d, copies.demote_d2h)
    gpu_work = gpu.grouped + gpu.slow_extra + gpu.od_compute_sum
    grouped_end = gpu.grouped + gpu.slow_extra
    # no wait and no block (the common case): the terms below are all 0, and all others are >= 0
    if async_wait is not None:
        grouped_end = async_wait + gpu.grouped + gpu.slow_extra
    if block is not None:
        sync = sync + np.where(copies.sync_h2d > 0, block, 0.0)
    gpu_end = grouped_end
    cpu_end = copies.act_d2h + pool
    if od is not None and od.rows.size:
        zero = np.zeros(groups)
        s0 = (copies.act_d2h if r.engines == 1 else zero) + (zero if block is None else block)  # behind activations
        engine, od_end, _, _ = ondemand_pipeline(r.expert_copy_s, s0[od.rows], grouped_end[od.rows], od)
        gpu_end = grouped_end.copy()
        gpu_end[od.rows] = od_end
        copies_end = np.zeros(groups)
        copies_end[od.rows] = engine
        cpu_end = np.maximum(cpu_end, copies_end)
    if block is not None:
        cpu_end = cpu_end + block
    res_end = np.where(cpu_n > 0, cpu_end + copies.res_h2d, 0.0)
    side = np.maximum(gpu_end, res_end)
    return {"fixed": fixed, "gate": gate, "sync": sync, "gpu_work": gpu_work, "gpu_end": gpu_end,
            "res_end": res_end, "side": side, "layer": fixed + gate + sync + side}
