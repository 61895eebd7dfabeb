"""Every cost of one Schedule on one workload, evaluated once from the hardware profile with the
layer model's charges (tidesim.layermodel).

The simulator and the analytic cost model charge exactly these numbers; they differ only in how
they combine them (events and queues versus closed-form per-layer formulas). Work is grouped by
resource (GPU stream, copy engines, CPU pool); expert-level work is kept sparse: one entry per
activated (forward, layer, expert), grouped by layer-forward g = f * L + l in execution order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tidesim import curves
from tidesim.hardware import HardwareProfile
from tidesim.hardware_parts import GPUProfile, part_digest
from tidesim.layermodel import (
    CopyCosts,
    CpuCosts,
    GpuCosts,
    OnDemand,
    OnDemandLayout,
    Rates,
    activation_copies,
    background_waits,
    charge_contention,
    charge_copy_pool,
    copy_overlaps,
    copy_releases,
    copy_slowdown,
    grouped_kernel,
    grouped_share,
    ondemand_compute,
    per_count,
)
from tidesim.lru import LRU
from tidesim.notes import cached, collecting
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_ON_DEMAND, COPY_SYNC_REFRESH, Schedule, SparseCells
from tidesim.sim.lpt import lpt_makespans
from tidesim.workload import Workload


@dataclass
class ExpertItems:
    """Sparse per-expert work, each list sorted by (g, expert)."""

    cpu_g: np.ndarray
    cpu_expert: np.ndarray
    cpu_time: np.ndarray         # one worker, contention included
    od_g: np.ndarray
    od_expert: np.ndarray
    od_compute: np.ndarray
    od_release: np.ndarray       # slot release tag (tidesim.layermodel.FREE_NOW, AFTER_GROUPED, k)
    async_g: np.ndarray
    async_expert: np.ndarray
    async_release: np.ndarray
    async_use: np.ndarray        # layer-forward whose grouped kernel waits for the copy, -1: none
    async_freed: np.ndarray      # layer-forward whose demand copies wait for it (its slot), -1: none
    sync_g: np.ndarray           # synchronous refresh copies (one timeline slice each)
    sync_expert: np.ndarray
    demote_g: np.ndarray         # demotions
    demote_expert: np.ndarray


@dataclass
class ScheduleCosts:
    """Seconds per work item, by resource: [F] per forward, [G] per layer-forward (G = F * L)."""

    forwards: int
    layers: int
    experts: int
    rates: Rates
    gpu: GpuCosts
    copies: CopyCosts
    cpu: CpuCosts
    items: ExpertItems
    counts: dict[str, float] = field(default_factory=dict)   # what every executor reports the same way
    flags: list[str] = field(default_factory=list)
    od_layout: OnDemandLayout | None = None                  # ondemand()'s padding, when kept with the schedule

    @property
    def groups(self) -> int:
        return self.forwards * self.layers

    def group_ptr(self, g_sorted: np.ndarray) -> np.ndarray:
        """Offsets [G + 1] of each layer-forward's slice in a sparse array sorted by g."""
        return np.searchsorted(g_sorted, np.arange(self.groups + 1))

    def ondemand(self) -> OnDemand:
        """The on-demand experts padded per layer-forward (the layer model's pipeline input)."""
        if self.od_layout is not None:
            return self.od_layout.fill(self.items.od_compute)
        return OnDemand.pad(self.items.od_g, self.items.od_compute, self.items.od_release)

    def cpu_span(self) -> np.ndarray:
        """[G] the CPU pool's longest-first makespans (computed once)."""
        if self.cpu.span is None:
            i = self.items
            self.cpu.span = lpt_makespans(i.cpu_g, i.cpu_time, i.cpu_expert, self.groups, self.rates.workers)
        return self.cpu.span


@dataclass(frozen=True)
class _Cells:
    """Workload-level per-cell costs of every activated (forward, layer, expert), for one profile:
    independent of the schedule, so kept per workload (a sweep or the planner costs many
    schedules, and many profiles, of one workload)."""

    idx: np.ndarray              # flat index f * L * E + l * E + e, ascending
    tokens: np.ndarray
    gpu_full: np.ndarray         # one expert on the GPU, its launch included
    cpu: np.ndarray              # one expert on one CPU worker
    share: np.ndarray            # one expert's share of the grouped kernel (its GPU time without launch)
    share_sum: np.ndarray        # [G] grouped shares of all activated experts
    n_active: np.ndarray         # [G] activated experts
    tokens_sum: float
    position: np.ndarray         # int32 [F * L * E]: each activated cell's position in idx, -1 elsewhere
    fwd_fixed: np.ndarray        # [F] GPU work outside the MoE layers
    layer_fixed: np.ndarray      # [F] GPU work of one MoE layer outside its experts


@dataclass
class _WorkloadCache:
    """What one workload's costing keeps: its cells, and per GPU and per CPU part the cell times
    with the notes they raised (a few of each: grids vary the profile point to point)."""

    idx: np.ndarray
    tokens: np.ndarray
    g: np.ndarray
    n_active: np.ndarray
    tokens_sum: float
    position: np.ndarray
    gpu: LRU[str, tuple[tuple[np.ndarray, np.ndarray, np.ndarray], frozenset[str]]] = field(
        default_factory=lambda: LRU(_PER_SIDE))
    cpu: LRU[str, tuple[np.ndarray, frozenset[str]]] = field(default_factory=lambda: LRU(_PER_SIDE))
    fixed: LRU[str, tuple[tuple[np.ndarray, np.ndarray], frozenset[str]]] = field(
        default_factory=lambda: LRU(_PER_SIDE))


def _new_entry(workload: Workload) -> _WorkloadCache:
    flat = workload.expert_tokens.reshape(-1)
    idx = np.flatnonzero(flat)
    g = idx // workload.num_experts
    tokens = flat[idx].astype(np.int64)
    position = np.full(flat.size, -1, np.int32 if idx.size < 2**31 else np.int64)
    position[idx] = np.arange(idx.size)
    n_active = np.bincount(g, minlength=flat.size // workload.num_experts)
    return _WorkloadCache(idx, tokens, g, n_active, float(tokens.sum()), position)


def _fixed_times(workload: Workload, gpu: GPUProfile) -> tuple[np.ndarray, np.ndarray]:
    """[F] per forward: GPU work outside the MoE layers, and that of one MoE layer outside its experts."""
    spec = workload.model
    f_count = workload.num_forwards
    tokens = workload.tokens.astype(float)
    context = workload.context.astype(float)
    fwd = np.broadcast_to(np.asarray(curves.gpu_forward_fixed_time(gpu, tokens, context, spec), float),
                          (f_count,)).copy()
    layer = np.broadcast_to(np.asarray(curves.gpu_layer_fixed_time(gpu, tokens, context, spec), float),
                            (f_count,)).copy()
    return fwd, layer


_PER_SIDE = 4
_ENTRIES: LRU[str, _WorkloadCache] = LRU(4)     # by workload content (Workload.digest)


def _cells(workload: Workload, hw: HardwareProfile, r: Rates) -> _Cells:
    """The workload's cells with this profile's GPU and CPU times, from the cache when a workload of
    the same content was costed with parts of the same content before. Each time table is a
    function of the workload and one part (tidesim.curves reads one part), so it is keyed by the
    two contents, never by object identity or a list of fields."""
    spec = workload.model
    entry = _ENTRIES.get(workload.digest)
    if entry is None:
        entry = _new_entry(workload)
        _ENTRIES.put(workload.digest, entry)
    groups = workload.num_forwards * workload.num_layers
    gpu_part, cpu_part = part_digest(hw.gpu), part_digest(hw.cpu)

    def gpu_times() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        full = per_count(lambda t: curves.gpu_expert_time(hw.gpu, t, spec), entry.tokens)
        share = grouped_share(r, full)        # reads the launch overhead: a GPU field
        return full, share, np.bincount(entry.g, weights=share, minlength=groups)

    gpu_full, share, share_sum = cached(entry.gpu, gpu_part, gpu_times)
    cpu = cached(entry.cpu, cpu_part, lambda: per_count(lambda t: curves.cpu_expert_time(hw.cpu, t, spec),
                                                            entry.tokens))
    fwd_fixed, layer_fixed = cached(entry.fixed, gpu_part, lambda: _fixed_times(workload, hw.gpu))
    return _Cells(entry.idx, entry.tokens, gpu_full, cpu, share, share_sum, entry.n_active, entry.tokens_sum,
                  entry.position, fwd_fixed, layer_fixed)


def schedule_costs(workload: Workload, schedule: Schedule, hw: HardwareProfile) -> ScheduleCosts:
    """Charge every work item of `schedule` with the profile's cost curves; the notes the lookups
    said are the costs' flags (and reach any collection the caller has open)."""
    with collecting() as raised:
        return _schedule_costs(workload, schedule, hw, raised)


def _schedule_costs(workload: Workload, schedule: Schedule, hw: HardwareProfile, raised: set[str]) -> ScheduleCosts:
    spec = workload.model
    F, L, E = workload.expert_tokens.shape
    G = F * L
    r = Rates.of(hw, spec)
    cells = _cells(workload, hw, r)
    # the few cells with work off the grouped kernel (Schedule.sparse: the builder's, or one scan)
    sparse = schedule.sparse()
    copy_idx, copy_kind = sparse.copy, sparse.copy_kind
    cs = _cpu_side(cells, sparse.cpu, E, G)
    cpu_g, cpu_time = cs.g, cs.time
    kinds = {COPY_SYNC_REFRESH: int(np.count_nonzero(copy_kind == COPY_SYNC_REFRESH))}
    for k in (COPY_ON_DEMAND, COPY_ASYNC_REFRESH):          # none when every copy is a sync refresh
        kinds[k] = 0 if kinds[COPY_SYNC_REFRESH] == copy_kind.size else int(np.count_nonzero(copy_kind == k))
    od_g, od_e, od_time, od_share = _ondemand_side(cells, r, copy_idx[copy_kind == COPY_ON_DEMAND]
                                                   if kinds[COPY_ON_DEMAND] else None, E)
    od_n = np.bincount(od_g, minlength=G)
    od_sum = np.bincount(od_g, weights=od_time, minlength=G)
    # grouped kernel: every activated expert's share minus those on the CPU or on demand
    off_g, off_share = ((np.concatenate([cpu_g, od_g]), np.concatenate([cs.share, od_share])) if od_g.size
                        else (cpu_g, cs.share))
    grp_sum = cells.share_sum - np.bincount(off_g, weights=off_share, minlength=G)
    grp_n = cells.n_active - cs.costs.n - od_n
    grp_sum = np.where(grp_n > 0, np.maximum(grp_sum, 0.0), 0.0)
    grouped = grouped_kernel(r, grp_sum, grp_n)
    act_d2h, res_h2d = activation_copies(r, hw, cs.pairs)

    sync_idx = copy_idx if kinds[COPY_SYNC_REFRESH] == copy_idx.size else copy_idx[copy_kind == COPY_SYNC_REFRESH]
    sync_g, sync_e = _split(sync_idx, E)
    sync = np.bincount(sync_g, minlength=G)
    async_g, async_e = (_split(copy_idx[copy_kind == COPY_ASYNC_REFRESH], E) if kinds[COPY_ASYNC_REFRESH]
                        else (np.zeros(0, np.int64), np.zeros(0, np.int64)))
    if kinds[COPY_ON_DEMAND] + kinds[COPY_ASYNC_REFRESH]:      # the slot rule follows from the schedule alone
        od_release, async_release = sparse.memo(f"releases {schedule.free_async_copies}",
                                                lambda: copy_releases(schedule, copy_idx, copy_kind))
    else:
        od_release = async_release = np.zeros(0, np.int64)
    n_async = np.bincount(async_g, minlength=G)
    n_async_counted = int(async_g.size)
    if schedule.free_async_copies:      # a bound's ideal prefetch: counted, never charged
        n_async = np.zeros(G, dtype=np.int64)
        async_g = async_e = async_release = np.zeros(0, dtype=np.int64)
    if async_g.size:                    # who waits for each background copy
        async_use, async_freed = sparse.memo("background waits", lambda: background_waits(
            schedule, copy_idx[copy_kind == COPY_ASYNC_REFRESH]))
    else:
        async_use = async_freed = np.zeros(0, np.int64)
    demoted = sparse.demote
    demote_g, demote_e = _split(demoted, E)
    n_demote = np.bincount(demote_g, minlength=G)

    od_layout = _od_layout(sparse, schedule, od_g, od_release)
    slow = np.zeros(G)
    if r.slows > 0 or r.slows_cpu > 0:
        slow, od_time, pool_factor = _slowdowns(r, grouped, od_g, od_time, od_release, od_layout, async_g,
                                                async_release, act_d2h, res_h2d, cs)
        od_sum = np.bincount(od_g, weights=od_time, minlength=G)
        cpu_time = cpu_time * pool_factor[cpu_g]
    gpu = GpuCosts(fwd_fixed=cells.fwd_fixed.copy(), layer_fixed=cells.layer_fixed.copy(), grouped=grouped,
                   od_compute_sum=od_sum, slow_extra=slow)
    copies = CopyCosts(sync_h2d=sync * r.expert_copy_s, demote_d2h=n_demote * r.expert_demote_s,
                       async_h2d=n_async * r.expert_copy_s, n_async=n_async, act_d2h=act_d2h, res_h2d=res_h2d,
                       od_n=od_n, od_copy_sum=od_n * r.expert_copy_s)
    cpu = cs.costs
    items = ExpertItems(cpu_g=cpu_g, cpu_expert=cs.expert, cpu_time=cpu_time, od_g=od_g, od_expert=od_e,
                        od_compute=od_time, od_release=od_release, async_g=async_g,
                        async_expert=async_e, async_release=async_release, async_use=async_use,
                        async_freed=async_freed, sync_g=sync_g, sync_expert=sync_e, demote_g=demote_g,
                        demote_expert=demote_e)

    expert_bytes = float(spec.expert_bytes)
    cpu_tokens = cs.tokens
    act_bytes = cpu_tokens * r.act_bytes_per_pair
    n_sync = int(sync.sum())
    all_copies = n_sync + n_async_counted + int(od_g.size)
    counts = {
        "gpu_tokens": cells.tokens_sum - cpu_tokens,
        "cpu_tokens": cpu_tokens,
        "routed_pairs": cells.tokens_sum,
        "h2d_bytes": all_copies * expert_bytes + act_bytes,
        "d2h_bytes": float(demoted.size) * expert_bytes + act_bytes,
        "expert_copies": float(all_copies),
        "refresh_copies": float(n_sync + n_async_counted),
    }
    costs = ScheduleCosts(forwards=F, layers=L, experts=E, rates=r, gpu=gpu, copies=copies, cpu=cpu, items=items,
                          counts=counts, flags=sorted(raised),
                          od_layout=od_layout)
    if (r.contention > 0 or r.pool_contention > 0) and cpu_time.size:
        factor = charge_contention(r, gpu, cpu, costs.cpu_span())
        items.cpu_time = items.cpu_time * factor[cpu_g]
    return costs


def _slowdowns(r: Rates, grouped: np.ndarray, od_g: np.ndarray, od_time: np.ndarray, od_release: np.ndarray,
               layout: OnDemandLayout | None, async_g: np.ndarray, async_release: np.ndarray, act_d2h: np.ndarray,
               res_h2d: np.ndarray, cs: _CpuSide) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pcie.copy_slows_compute on the grouped kernels [G] (slow_extra) and on each on-demand
    expert (its compute time), and pcie.copy_slows_cpu on the CPU pool (its tasks stretched in
    cs.costs, the factor [G] returned for the per-task times), for the copies that really run
    while they do (copy_overlaps)."""
    groups = grouped.size
    span = lpt_makespans(cs.g, cs.time, cs.expert, groups, r.workers)
    if od_g.size and layout is None:
        layout = OnDemandLayout.of(od_g, od_release)
    od = layout.fill(od_time) if layout is not None and od_g.size else None
    g_ov, od_ov, pool_ov = copy_overlaps(r, grouped, od, async_g, async_release, act_d2h, res_h2d, span,
                                         cs.costs.n)
    if od_ov is not None and layout is not None:
        od_time = od_time + copy_slowdown(r, od_time, od_ov[layout.k, layout.col])
    factor = charge_copy_pool(r, cs.costs, span, pool_ov)
    return copy_slowdown(r, grouped, g_ov), od_time, factor


@dataclass
class _CpuSide:
    """The experts that run on the CPU: per task (sorted by g, expert) and per layer-forward."""

    g: np.ndarray
    expert: np.ndarray
    time: np.ndarray             # one worker
    share: np.ndarray            # their grouped-kernel shares (not run on the GPU)
    pairs: np.ndarray            # [G] routed (token, expert) pairs
    tokens: float
    costs: CpuCosts


def _cpu_side(cells: _Cells, cpu_cells: np.ndarray, experts: int, groups: int) -> _CpuSide:
    """Per layer-forward count, sum, longest and shortest of the CPU tasks, and their routed pairs;
    the float sums in task order (bincount), as every engine has charged them."""
    at = np.take(cells.position, cpu_cells)            # (take gathers faster than indexing)
    if at.size and at.min() < 0:                       # only activated experts run anywhere
        cpu_cells, at = cpu_cells[at >= 0], at[at >= 0]
    g, expert = _split(cpu_cells, experts)
    time, tok = np.take(cells.cpu, at), np.take(cells.tokens, at)
    n = np.zeros(groups, np.int64)
    longest, shortest, pairs = np.zeros(groups), np.zeros(groups), np.zeros(groups)
    if g.size:
        starts = np.flatnonzero(np.concatenate([[True], g[1:] != g[:-1]]))
        gid = g[starts]
        n[gid] = np.diff(np.append(starts, g.size))
        longest[gid] = np.maximum.reduceat(time, starts)
        shortest[gid] = np.minimum.reduceat(time, starts)
        pairs[gid] = np.add.reduceat(tok, starts)      # integers: exact in any order
    costs = CpuCosts(total=np.bincount(g, weights=time, minlength=groups), longest=longest, shortest=shortest, n=n)
    return _CpuSide(g, expert, time, np.take(cells.share, at), pairs, float(tok.sum()), costs)


def _od_layout(sparse: SparseCells, schedule: Schedule, od_g: np.ndarray, od_release: np.ndarray
               ) -> OnDemandLayout | None:
    """The on-demand pipeline's padding, kept with the schedule's sparse record: it follows from the
    copies and their slot releases, whatever the profile (checked against this costing's rows)."""
    if not od_g.size:
        return None
    layout = sparse.memo(f"od layout {schedule.free_async_copies}", lambda: OnDemandLayout.of(od_g, od_release))
    return layout if layout.g is od_g or np.array_equal(layout.g, od_g) else None


def _ondemand_side(cells: _Cells, r: Rates, flat: np.ndarray | None, experts: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(layer-forward, expert, compute time, grouped share) of the on-demand experts, which run on
    the GPU, from their copies' flat cells (None: there are none). A copy of an idle expert, which
    no valid schedule has, takes the next activated cell."""
    if flat is None:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0), np.zeros(0)
    at = np.take(cells.position, flat).astype(np.int64)
    idle = at < 0
    if idle.any():
        at[idle] = np.searchsorted(cells.idx, flat[idle])
    g, expert = _split(cells.idx[at], experts)
    return g, expert, ondemand_compute(r, cells.gpu_full[at]), cells.share[at]


def _split(flat: np.ndarray, experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(layer-forward, expert) of flat cell indices; shifts when the experts are a power of two."""
    if experts & (experts - 1) == 0:
        shift = experts.bit_length() - 1
        return flat >> shift, flat & (experts - 1)
    return np.divmod(flat, experts)
