"""Analytic cost model: closed-form layer times, vectorised over all layer-forwards (numpy).

It charges the same costs as the simulator (tidesim.sim.costs) and follows the same execution
model, with the same CPU pool makespans (the longest-first rule, tidesim.sim.lpt.lpt_makespans,
vectorised over layer-forwards). It replaces the one thing that needs events by a formula:
asynchronous refresh copies by a fluid queue on the H2D engine that uses the engine's idle time
between demand copies (stall when the copies a layer-forward waits for, those of the experts it
runs and those whose slots its demand copies reuse, are not done by then).
Everything else (the CPU pool, sync phase, the on-demand copy/compute pipeline with its slot waits, the results
copy queueing behind on-demand copies) is exact: the per-layer-forward phases are the layer
model's (tidesim.layermodel.layer_phases). docs/costmodel.md lists the cases.

lower_bound(): no execution of the schedule can beat it (per layer the busiest chain, and over
the run the busiest copy engine); the simulator is always at or above it.
"""

from __future__ import annotations

import numpy as np

from tidesim.layermodel import FREE_NOW, OnDemand, cpu_pool_bound, layer_phases, sync_phase
from tidesim.metrics import Metrics
from tidesim.schedule import Schedule
from tidesim.sim.accounting import RunTimes, build_metrics
from tidesim.sim.costs import ScheduleCosts
from tidesim.workload import Workload


def _layer_parts(c: ScheduleCosts, od: OnDemand | None, pool: np.ndarray, async_wait: np.ndarray | None = None,
                 block: np.ndarray | None = None, gate_wait: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per layer-forward phases from the layer model, with the CPU pool's makespans `pool`."""
    return layer_phases(c.rates, c.gpu, c.copies, c.cpu.n, pool, od, c.layers, async_wait, block, gate_wait)


def _slot_demand(c: ScheduleCosts) -> np.ndarray:
    """[G] layer-forwards with demand traffic into slots (sync refresh, demotions, on-demand
    copies): their waits for background copies come before it, at the gate."""
    cp = c.copies
    return (cp.sync_h2d > 0) | (cp.demote_d2h > 0) | (cp.od_n > 0)


def _needed(c: ScheduleCosts, issued: np.ndarray) -> np.ndarray:
    """[G] how much background copy time must have been served (FIFO, cumulative) before each
    layer-forward may go on: up to the last copy it waits for (docs/costmodel.md), 0 if none."""
    i = c.items
    pos = np.arange(i.async_g.size) - c.group_ptr(i.async_g)[i.async_g]        # position in its batch
    through = (issued - c.copies.async_h2d)[i.async_g] + (pos + 1) * c.rates.expert_copy_s
    need = np.zeros(c.groups)
    np.maximum.at(need, i.async_use[i.async_use >= 0], through[i.async_use >= 0])
    demand = _slot_demand(c)
    freed = (i.async_freed >= 0) & demand[np.maximum(i.async_freed, 0)]
    np.maximum.at(need, i.async_freed[freed], through[freed])
    return need


def _demand_after_sync(c: ScheduleCosts) -> np.ndarray:
    """[G] demand time on the engine that carries H2D copies, after the sync phase."""
    h2d = c.copies.od_copy_sum + c.copies.res_h2d
    return h2d + c.copies.act_d2h if c.rates.engines == 1 else h2d


def _clamp_scan(b: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """[n] x_(k+1) = max(min(x_k + b_k, hi_k), lo_k) from x_0 = 0, for all k at once.

    Maps x -> max(min(x + p, hi), lo) with lo <= hi are closed under composition (the outer one
    (p2, hi2, lo2) after the inner (p, hi, lo) is (p + p2, min(hi + p2, hi2),
    max(min(lo + p2, hi2), lo2))), so a prefix scan by doubling composes them in log2(n) vector
    steps instead of a Python loop over layer-forwards."""
    p, lo = b.copy(), lo.copy()
    hi = np.maximum(hi, lo)
    d = 1
    while d < p.size:
        p2, hi2, lo2 = p[d:], hi[d:], lo[d:]
        nlo = np.maximum(np.minimum(lo[:-d] + p2, hi2), lo2)
        nhi = np.maximum(np.minimum(hi[:-d] + p2, hi2), nlo)
        p[d:] = p[:-d] + p2          # right-hand sides are evaluated before the slices are written
        hi[d:], lo[d:] = nhi, nlo
        d *= 2
    return np.maximum(np.minimum(p, hi), lo)


def _async_wait(c: ScheduleCosts, parts: dict[str, np.ndarray], pool: np.ndarray, od: OnDemand | None
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """Fluid-queue estimate of the GPU's wait for asynchronous refresh copies, the demand copies'
    block behind them, and the tail after the last forward.

    The H2D engine serves background copies FIFO in the time demand copies leave it idle; a
    layer-forward waits until the queue has served every copy up to the last one it waits for
    (tidesim.layermodel.background_waits: the copies of the experts its grouped kernel runs, and
    where it has demand copies, those whose slots they reuse). The queue is the real backlog R_k
    left at layer-forward k's expert start (docs/costmodel.md, *Background copies*): k waits
    w_k = max(0, R_k - t_k), t_k the copies queued behind the last one it needs; the wait
    stretches the layer by max(0, w_k - slack_k), and the engine serves copies all that time, so
    R_(k+1) = max(min(R_k, t_k + slack_k) + a_k - cap_k, 0) with a_k the copies k issues and
    cap_k the engine's idle time in k (and the next layer's head). Copies that wait for their
    slot until the grouped kernel ends leave the engine idle before it only when the backlog and
    k's free-slot copies run out first (cap_k loses max(0, grouped - free_k - R_k)), which is a
    clamp from below: every step is a clamp of R_k, composed by _clamp_scan.
    """
    G, L = c.groups, c.layers
    a = c.copies.async_h2d
    copy_s = c.rates.expert_copy_s
    head = parts["fixed"].copy()
    head[::L] += c.gpu.fwd_fixed
    late = np.bincount(c.items.async_g[c.items.async_release != FREE_NOW], minlength=G) > 0
    free = np.bincount(c.items.async_g[c.items.async_release == FREE_NOW], minlength=G) * copy_s
    idle_to = np.where(late, np.minimum(c.gpu.grouped + c.gpu.slow_extra, parts["side"]) - free, -np.inf)
    # a demand copy that arrives while background copies are queued waits for the one in progress
    # (on average half a copy: copies are not preempted); the engine serves that copy meanwhile,
    # so the layer's growth from it is engine time for the queue too
    half = np.full(G, 0.5 * copy_s)
    gain = _layer_parts(c, od, pool, None, half)["layer"] - parts["layer"]
    cap = (np.maximum(parts["side"] - _demand_after_sync(c), 0.0) + np.concatenate([head[1:], [0.0]])
           + gain)
    issued_before = np.cumsum(a) - a
    need = _needed(c, issued_before + a)
    # a wait at the gate delays both sides; one before the grouped kernel only the GPU side
    slack = np.where(_slot_demand(c), 0.0, parts["side"] - parts["gpu_work"])
    behind = np.where(need > 0, issued_before - need, np.inf)        # t_k
    top = behind + slack
    step = a - cap
    after = _clamp_scan(step, top + step, np.maximum(np.minimum(idle_to, top) + step, 0.0))   # R_(k+1)
    backlog = np.concatenate([[0.0], after[:-1]])                    # R_k
    wait = np.maximum(backlog - behind, 0.0)
    tail = float(after[-1]) if G else 0.0
    block = np.where(backlog > 0.0, half, 0.0)
    return wait, block, tail


def estimate(c: ScheduleCosts) -> RunTimes:
    """The analytic estimate of a run: total, breakdown and per-layer times."""
    return _estimate(c)[0]


def _estimate(c: ScheduleCosts) -> tuple[RunTimes, float]:
    """The estimate and the lower bound it was checked against."""
    tail = 0.0
    od = c.ondemand() if c.items.od_g.size else None
    pool = c.cpu_span()          # the simulator's longest-first makespans, the same floats
    parts = _layer_parts(c, od, pool)
    if c.copies.n_async.any():
        wait, block, tail = _async_wait(c, parts, pool, od)
        at_gate = _slot_demand(c)
        parts = _layer_parts(c, od, pool, np.where(at_gate, 0.0, wait), block, np.where(at_gate, wait, 0.0))
    layer = parts["layer"]
    total = float(c.gpu.fwd_fixed.sum() + layer.sum() + tail)
    bound = _lower_bound(c, cpu_pool_bound(c.rates, c.cpu), parts["fixed"], parts["gpu_work"])
    if total < bound:           # the fluid queue can undercount a saturated copy engine
        tail += bound - total
        total = bound
    gpu_end, res_end = parts["gpu_end"], parts["res_end"]
    breakdown = {
        "gpu_fixed": float(c.gpu.fwd_fixed.sum() + parts["fixed"].sum()),
        "sync_refresh": float(parts["sync"].sum()),
        "gpu_experts": float(parts["gpu_work"].sum()),
        "copy_stall": float((gpu_end - parts["gpu_work"]).sum() + parts["gate"].sum() + tail),
        "cpu_wait": float(np.maximum(res_end - gpu_end, 0.0).sum()),
    }
    layer_time = layer.reshape(c.forwards, c.layers).sum(axis=0) if c.groups else np.zeros(c.layers)
    return RunTimes(total_s=total, breakdown=breakdown, layer_time=layer_time), bound


def lower_bound(c: ScheduleCosts) -> float:
    """No execution of this schedule is faster: per layer, fixed work + sync phase + the longest
    of (GPU expert work, on-demand copies then the cheapest on-demand expert, the CPU chain, the
    H2D engine's demand copies); over the run, neither copy engine can be busier than the total."""
    g = c.gpu
    return _lower_bound(c, cpu_pool_bound(c.rates, c.cpu), np.repeat(g.layer_fixed, c.layers),
                        g.grouped + g.slow_extra + g.od_compute_sum)


def _lower_bound(c: ScheduleCosts, pool: np.ndarray, fixed: np.ndarray, gpu: np.ndarray) -> float:
    """lower_bound with the CPU pool's bound, the fixed work and the GPU expert work per
    layer-forward as the layer phases have them already."""
    r, g, cp = c.rates, c.gpu, c.copies
    cpu_chain = np.where(c.cpu.n > 0, cp.act_d2h + pool + cp.res_h2d, 0.0)
    h2d_chain = cp.od_copy_sum + cp.res_h2d + (cp.act_d2h if r.engines == 1 else 0.0)
    chains = [gpu, cpu_chain, h2d_chain]
    if c.items.od_g.size:          # all chains are >= 0: without on-demand copies this one is all 0
        od_min = np.full(c.groups, np.inf)
        np.minimum.at(od_min, c.items.od_g, c.items.od_compute)
        chains.append(np.where(cp.od_n > 0, cp.od_copy_sum + od_min, 0.0))
    per_layer = fixed + sync_phase(r, cp.sync_h2d, cp.demote_d2h) + np.maximum.reduce(chains)
    layered = float(g.fwd_fixed.sum() + per_layer.sum())
    h2d_all = float(cp.sync_h2d.sum() + cp.async_h2d.sum() + cp.od_copy_sum.sum() + cp.res_h2d.sum())
    d2h_all = float(cp.demote_d2h.sum() + cp.act_d2h.sum())
    engines = [h2d_all + d2h_all] if r.engines == 1 else [h2d_all, d2h_all]
    return max([layered, *engines])


def analytic_metrics(workload: Workload, schedule: Schedule, costs: ScheduleCosts) -> Metrics:
    """Metrics of the analytic model (same names as the simulator's)."""
    times, bound = _estimate(costs)
    return build_metrics("analytic", workload, schedule, costs, times, bound)
