"""Every cost of one Schedule on one workload, evaluated once from the hardware profile.

The simulator and the analytic cost model charge exactly these numbers; they differ only in how
they combine them (events and queues versus closed-form per-layer formulas). Expert-level work is
kept sparse: one entry per activated (forward, layer, expert), grouped by layer-forward
g = f * L + l in execution order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tidesim.hardware import US, HardwareProfile
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_ON_DEMAND, COPY_SYNC_REFRESH, CPU, GPU, Schedule
from tidesim.sim.lpt import lpt_makespans
from tidesim.workload import Workload


@dataclass
class ScheduleCosts:
    """Seconds per work item. [F] per forward, [G] per layer-forward (G = F * L, g = f * L + l),
    and sparse per-expert arrays sorted by (g, expert)."""

    forwards: int
    layers: int
    experts: int
    workers: int
    engines: int                 # 1: H2D and D2H share one copy engine; 2: one per direction
    slows: float                 # pcie.copy_slows_compute
    launch_s: float              # one GPU kernel launch
    expert_copy_s: float         # H2D of one expert's weights
    expert_demote_s: float       # D2H of one expert's weights
    fwd_fixed: np.ndarray        # [F] dense layers + lm_head on the GPU
    layer_fixed: np.ndarray      # [F] attention + shared expert + gate, per MoE layer
    sync_h2d: np.ndarray         # [G] synchronous refresh copies (sum of per-expert copies)
    demote_d2h: np.ndarray       # [G] demotions (sum of per-expert copies back)
    async_h2d: np.ndarray        # [G] asynchronous refresh copies issued by this layer-forward
    n_async: np.ndarray          # [G] how many
    act_d2h: np.ndarray          # [G] activations of CPU-routed pairs to the host
    res_h2d: np.ndarray          # [G] their results back to the GPU
    grouped: np.ndarray          # [G] grouped kernel of the experts resident at the gate
    slow_extra: np.ndarray       # [G] GPU slowdown while copies run (pcie.copy_slows_compute) and while
                                 #     the CPU pool computes (cpu.gpu_contention)
    cpu_sum: np.ndarray          # [G] sum of CPU expert task times
    cpu_max: np.ndarray          # [G] longest CPU expert task
    cpu_min: np.ndarray          # [G] shortest CPU expert task (0 where none)
    cpu_n: np.ndarray            # [G] number of CPU expert tasks
    od_copy_sum: np.ndarray      # [G] on-demand copies
    od_compute_sum: np.ndarray   # [G] compute of on-demand experts (each its own launch)
    od_n: np.ndarray             # [G]
    # sparse, sorted by (g, expert)
    cpu_g: np.ndarray
    cpu_expert: np.ndarray
    cpu_time: np.ndarray
    od_g: np.ndarray
    od_expert: np.ndarray
    od_compute: np.ndarray
    gpu_g: np.ndarray            # experts run by the grouped kernel (for timelines)
    gpu_expert: np.ndarray
    gpu_time: np.ndarray         # their share of the grouped kernel (launch excluded)
    async_g: np.ndarray
    async_expert: np.ndarray
    # counts every executor reports the same way
    counts: dict[str, float] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    contention: float = 0.0      # cpu.gpu_contention, already charged in slow_extra and the CPU task times

    @property
    def groups(self) -> int:
        return self.forwards * self.layers

    def group_ptr(self, g_sorted: np.ndarray) -> np.ndarray:
        """Offsets [G + 1] of each layer-forward's slice in a sparse array sorted by g."""
        return np.searchsorted(g_sorted, np.arange(self.groups + 1))


def _per_token_table(fn: object, tokens: np.ndarray) -> np.ndarray:
    """Evaluate a cost curve once per distinct token count present, then gather (fast, and only
    the counts that occur can raise extrapolation flags)."""
    if tokens.size == 0:
        return np.zeros(0)
    present = np.flatnonzero(np.bincount(tokens))
    table = np.zeros(int(tokens.max()) + 1)
    table[present] = fn(present)  # type: ignore[operator]
    return table[tokens]


def schedule_costs(workload: Workload, schedule: Schedule, hw: HardwareProfile) -> ScheduleCosts:
    """Charge every work item of `schedule` with the profile's cost curves."""
    spec = workload.model
    F, L, E = workload.expert_tokens.shape
    tokens = workload.tokens.astype(float)
    context = workload.context.astype(float)
    fwd_fixed = np.broadcast_to(np.asarray(hw.gpu_forward_fixed_time(tokens, context, spec), float), (F,)).copy()
    layer_fixed = np.broadcast_to(np.asarray(hw.gpu_layer_fixed_time(tokens, context, spec), float), (F,)).copy()

    G = F * L
    # sparse over activated experts: flat index = g * E + e, sorted by (g, e)
    flat_place = schedule.placement.reshape(-1)
    idx = np.flatnonzero(flat_place != 0)   # a bool scan is several times faster than int8
    g_all = idx // E
    e_all = idx - g_all * E
    tok_all = workload.expert_tokens.reshape(-1)[idx].astype(np.int64)
    place_all = flat_place[idx]
    copy_all = schedule.copy.reshape(-1)[idx]

    expert_copy = float(hw.h2d_time(float(spec.expert_bytes)))
    expert_demote = float(hw.d2h_time(float(spec.expert_bytes)))
    launch = hw.gpu.launch_overhead_us * US

    on_cpu = place_all == CPU
    on_gpu = place_all == GPU
    od = on_gpu & (copy_all == COPY_ON_DEMAND)
    grp = on_gpu & ~od

    cpu_g, cpu_e, cpu_tok = g_all[on_cpu], e_all[on_cpu], tok_all[on_cpu]
    cpu_time = _per_token_table(lambda x: hw.cpu_expert_time(x, spec), cpu_tok)
    gpu_tok = tok_all[on_gpu]
    gpu_full = _per_token_table(lambda x: hw.gpu_expert_time(x, spec), gpu_tok)
    od_in_gpu = od[on_gpu]
    od_compute = gpu_full[od_in_gpu]
    grp_time = np.maximum(gpu_full[~od_in_gpu] - launch, 0.0)
    grp_g, grp_e = g_all[grp], e_all[grp]
    od_g, od_e = g_all[od], e_all[od]

    cpu_pairs = np.bincount(cpu_g, weights=cpu_tok, minlength=G)
    act_bytes = cpu_pairs * spec.activation_bytes_per_token
    act_d2h = np.asarray(hw.d2h_time(act_bytes), float)
    res_h2d = np.asarray(hw.h2d_time(act_bytes), float)

    grp_n = np.bincount(grp_g, minlength=G)
    grouped = np.bincount(grp_g, weights=grp_time, minlength=G) + np.where(grp_n > 0, launch, 0.0)

    cpu_max = np.zeros(G)
    cpu_min = np.zeros(G)
    if cpu_g.size:
        starts = np.flatnonzero(np.concatenate([[True], cpu_g[1:] != cpu_g[:-1]]))
        cpu_max[cpu_g[starts]] = np.maximum.reduceat(cpu_time, starts)
        cpu_min[cpu_g[starts]] = np.minimum.reduceat(cpu_time, starts)

    copy_idx = np.flatnonzero(schedule.copy.reshape(-1) != 0)
    copy_kind = schedule.copy.reshape(-1)[copy_idx]
    sync = np.bincount(copy_idx[copy_kind == COPY_SYNC_REFRESH] // E, minlength=G)
    async_idx = copy_idx[copy_kind == COPY_ASYNC_REFRESH]
    async_g = async_idx // E
    async_e = async_idx - async_g * E
    n_async = np.bincount(async_g, minlength=G)
    n_async_counted = int(n_async.sum())
    if schedule.free_async_copies:      # a bound's ideal prefetch: counted, never charged
        n_async = np.zeros(G, dtype=np.int64)
        async_g = async_e = np.zeros(0, dtype=np.int64)
    n_demote = np.bincount(np.flatnonzero(schedule.demote.reshape(-1)) // E, minlength=G)
    od_n = np.bincount(od_g, minlength=G)

    # copy_slows_compute, first order: GPU expert work slows by that fraction for as long as this
    # layer-forward's own H2D copies (on demand, asynchronous, results) could overlap it.
    slows = float(hw.pcie.copy_slows_compute)
    gpu_work = grouped + np.bincount(od_g, weights=od_compute, minlength=G)
    h2d_overlap = od_n * expert_copy + n_async * expert_copy + res_h2d
    slow_extra = slows * np.minimum(gpu_work, h2d_overlap) if slows > 0 else np.zeros(G)

    expert_bytes = float(spec.expert_bytes)
    all_copies = int(sync.sum()) + n_async_counted + int(od_n.sum())
    counts = {
        "gpu_tokens": float(gpu_tok.sum()),
        "cpu_tokens": float(cpu_tok.sum()),
        "routed_pairs": float(tok_all.sum()),
        "h2d_bytes": all_copies * expert_bytes + float(act_bytes.sum()),
        "d2h_bytes": float(n_demote.sum()) * expert_bytes + float(act_bytes.sum()),
        "expert_copies": float(all_copies),
        "refresh_copies": float(int(sync.sum()) + n_async_counted),
    }
    costs = ScheduleCosts(
        forwards=F, layers=L, experts=E, workers=max(int(hw.cpu.workers), 1),
        engines=1 if hw.pcie.copy_engines <= 1 else 2, slows=float(hw.pcie.copy_slows_compute),
        launch_s=launch, expert_copy_s=expert_copy, expert_demote_s=expert_demote,
        fwd_fixed=fwd_fixed, layer_fixed=layer_fixed,
        sync_h2d=sync * expert_copy, demote_d2h=n_demote * expert_demote,
        async_h2d=n_async * expert_copy, n_async=n_async,
        act_d2h=act_d2h, res_h2d=res_h2d, grouped=grouped,
        cpu_sum=np.bincount(cpu_g, weights=cpu_time, minlength=G), cpu_max=cpu_max, cpu_min=cpu_min,
        cpu_n=np.bincount(cpu_g, minlength=G),
        od_copy_sum=od_n * expert_copy, od_compute_sum=np.bincount(od_g, weights=od_compute, minlength=G),
        od_n=od_n,
        cpu_g=cpu_g, cpu_expert=cpu_e, cpu_time=cpu_time,
        od_g=od_g, od_expert=od_e, od_compute=od_compute,
        gpu_g=grp_g, gpu_expert=grp_e, gpu_time=grp_time,
        async_g=async_g, async_expert=async_e,
        slow_extra=slow_extra, counts=counts, flags=sorted(hw.flags),
    )
    charge_contention(costs, float(hw.cpu.gpu_contention))
    return costs


def charge_contention(costs: ScheduleCosts, s: float, span: np.ndarray | None = None) -> None:
    """cpu.gpu_contention = s, first order (in place): while a layer-forward's GPU expert work and
    its CPU expert tasks overlap, both progress 1 + s times slower. With o = min(GPU expert work,
    CPU pool makespan) of the layer-forward, the GPU work grows by s x o (in slow_extra) and every
    CPU task of that layer-forward is stretched by the same factor, so the longest-first makespan
    grows by s x o (scaling all tasks alike keeps the longest-first order). s = 0 changes nothing.
    Every executor reads the adjusted costs, so the simulator and the analytic model both charge it.
    span: [G] the CPU pool's longest-first makespans when the sparse task list is not kept (the
    planner's packed costs); by default computed from it."""
    costs.contention = s
    if s <= 0:
        return
    if span is None:
        if costs.cpu_time.size == 0:
            return
        span = lpt_makespans(costs.cpu_g, costs.cpu_time, costs.cpu_expert, costs.groups, costs.workers)
    overlap = np.minimum(costs.grouped + costs.od_compute_sum, span)
    costs.slow_extra = costs.slow_extra + s * overlap
    factor = np.where(span > 0, (span + s * overlap) / np.maximum(span, 1e-300), 1.0)
    costs.cpu_time = costs.cpu_time * factor[costs.cpu_g]
    costs.cpu_sum = costs.cpu_sum * factor
    costs.cpu_max = costs.cpu_max * factor
    costs.cpu_min = costs.cpu_min * factor
