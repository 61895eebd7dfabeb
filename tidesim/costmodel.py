"""Analytic cost model: closed-form layer times, vectorised over all layer-forwards (numpy).

It charges the same costs as the simulator (tidesim.sim.costs) and follows the same execution
model, but replaces the two things that need events by formulas:
- the CPU pool's longest-first schedule by its bound max(sum / workers, longest task,
  ceil(n / workers) x shortest task) (exact with one worker, with no more tasks than workers,
  or with equal tasks; otherwise at most the LPT makespan);
- asynchronous refresh copies by a fluid queue on the H2D engine that uses the engine's idle
  time between demand copies (stall when a layer's copies are not done by the next forward).
Everything else (sync phase, on-demand copy/compute pipeline as a two-stage flow shop, the
results copy queueing behind on-demand copies) is exact. docs/costmodel.md lists the cases.

lower_bound(): no execution of the schedule can beat it (per layer the busiest chain, and over
the run the busiest copy engine); the simulator is always at or above it.
"""

from __future__ import annotations

import numpy as np

from tidesim.metrics import Metrics
from tidesim.schedule import Schedule
from tidesim.sim.accounting import RunTimes, build_metrics
from tidesim.sim.costs import ScheduleCosts
from tidesim.workload import Workload


def _sync_phase(c: ScheduleCosts) -> np.ndarray:
    return np.maximum(c.sync_h2d, c.demote_d2h) if c.engines == 2 else c.sync_h2d + c.demote_d2h


def _cpu_pool_bound(c: ScheduleCosts) -> np.ndarray:
    """No pool of `workers` finishes a layer's CPU tasks sooner than the mean load, the longest
    task, or ceil(n / workers) rounds of the shortest one."""
    if c.workers == 1:
        return c.cpu_sum
    rounds = np.ceil(c.cpu_n / c.workers) * c.cpu_min
    return np.maximum.reduce([c.cpu_sum / c.workers, c.cpu_max, rounds])


def _flow_shop(c: ScheduleCosts) -> np.ndarray:
    """[G] max over k of (k copies + compute of on-demand experts k..n): the time from the first
    on-demand copy's start to the last on-demand expert's end when the GPU is free."""
    out = np.zeros(c.groups)
    n = c.od_g.size
    if n == 0:
        return out
    ptr = c.group_ptr(c.od_g)
    start = ptr[c.od_g]
    k = np.arange(n) - start + 1
    cum = np.cumsum(c.od_compute)
    before = np.concatenate([[0.0], cum])[start]           # compute of earlier groups
    prefix_excl = cum - c.od_compute - before
    total = c.od_compute_sum[c.od_g]
    value = k * c.expert_copy_s + (total - prefix_excl)
    np.maximum.at(out, c.od_g, value)
    return out


def _layer_parts(c: ScheduleCosts, async_wait: np.ndarray, block: np.ndarray | None = None
                 ) -> dict[str, np.ndarray]:
    """Per layer-forward: fixed, sync phase, GPU side end and CPU side end (from the sync end).
    block: expected wait of a demand copy behind a background copy already on the engine."""
    block = np.zeros(c.groups) if block is None else block
    fixed = np.repeat(c.layer_fixed, c.layers)
    sync = _sync_phase(c) + np.where(c.sync_h2d > 0, block, 0.0)
    s0 = (c.act_d2h if c.engines == 1 else np.zeros(c.groups)) + block   # on-demand copies queue behind activations
    has_cpu = c.cpu_n > 0
    has_od = c.od_n > 0
    cpu_end = c.act_d2h + _cpu_pool_bound(c)
    copies_end = np.where(has_od, s0 + c.od_copy_sum, 0.0)
    res_end = np.where(has_cpu, np.maximum(cpu_end, copies_end) + block + c.res_h2d, 0.0)
    gpu_work = c.grouped + c.slow_extra + c.od_compute_sum
    gpu_end = np.maximum(async_wait + gpu_work, np.where(has_od, s0 + _flow_shop(c), 0.0))
    side = np.maximum(gpu_end, res_end)
    return {"fixed": fixed, "sync": sync, "gpu_work": gpu_work, "gpu_end": gpu_end, "res_end": res_end,
            "side": side, "layer": fixed + sync + side}


def _demand_after_sync(c: ScheduleCosts) -> np.ndarray:
    """[G] demand time on the engine that carries H2D copies, after the sync phase."""
    h2d = c.od_copy_sum + c.res_h2d
    return h2d + c.act_d2h if c.engines == 1 else h2d


def _async_wait(c: ScheduleCosts, parts: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, float]:
    """Fluid-queue estimate of the GPU's wait for asynchronous refresh copies, and the tail after
    the last forward.

    The H2D engine serves background copies FIFO in the time demand copies leave it idle; copies
    issued by layer-forward k must be done when the same layer's next forward reaches its
    experts. Without waits the backlog follows Lindley's recursion (vectorised with cumulative
    sums). A wait of w at a layer with slack s (how long its CPU side outlasts its GPU work)
    stretches the timeline by max(0, w - s), and while a backlog lasts every second of stretch
    serves one more second of copies. So the cumulative stretch E follows
    E_k = max(E_(k-1), deficit_k - slack_k): a running maximum, restarted where the backlog empties.
    """
    G, L = c.groups, c.layers
    a = c.async_h2d
    # idle engine time from this layer-forward's expert start to the next one's
    head = parts["fixed"].copy()
    head[::L] += c.fwd_fixed
    cap = np.maximum(parts["side"] - _demand_after_sync(c), 0.0) + np.concatenate([head[1:], [0.0]])
    s = np.cumsum(a - cap)
    queue = s - np.minimum(np.minimum.accumulate(s), 0.0)
    issued = np.cumsum(a)
    served = issued - queue
    # the latest earlier forward of the same layer that issued background copies
    fwd = np.where((a > 0).reshape(c.forwards, L), np.arange(c.forwards)[:, None], -1)
    last = np.maximum.accumulate(fwd, axis=0)
    prev = np.vstack([np.full((1, L), -1), last[:-1]])       # strictly before this forward
    prev_g = np.where(prev >= 0, prev * L + np.arange(L)[None, :], -1).reshape(G)
    served_before = np.concatenate([[0.0], served[:-1]])     # served by this layer's expert start
    need = np.where(prev_g >= 0, issued[np.maximum(prev_g, 0)], 0.0)
    deficit = np.where(prev_g >= 0, np.maximum(need - served_before, 0.0), 0.0)
    slack = parts["side"] - parts["gpu_work"]
    # running maximum of (deficit - slack), restarted wherever the backlog emptied
    segment = np.cumsum(queue <= 0.0)
    span = float(np.abs(deficit - slack).max()) + 1.0
    offset = segment * (2.0 * span)
    stretch = np.maximum(np.maximum.accumulate(deficit - slack + offset) - offset, 0.0)
    first = np.concatenate([[True], segment[1:] != segment[:-1]])
    before = np.where(first, 0.0, np.concatenate([[0.0], stretch[:-1]]))
    wait = np.maximum(deficit - before, 0.0)
    tail = max(float(queue[-1] - stretch[-1]), 0.0) if G else 0.0
    # a demand copy that arrives while background copies are queued waits for the one in progress:
    # on average half a copy (copies are not preempted)
    backlog = np.concatenate([[0.0], queue[:-1]]) > 0.0
    block = np.where(backlog, 0.5 * c.expert_copy_s, 0.0)
    return wait, block, tail


def estimate(c: ScheduleCosts) -> RunTimes:
    """The analytic estimate of a run: total, breakdown and per-layer times."""
    wait = np.zeros(c.groups)
    tail = 0.0
    parts = _layer_parts(c, wait)
    if c.n_async.any():
        wait, block, tail = _async_wait(c, parts)
        parts = _layer_parts(c, wait, block)
    layer = parts["layer"]
    total = float(c.fwd_fixed.sum() + layer.sum() + tail)
    bound = lower_bound(c)
    if total < bound:           # the fluid queue can undercount a saturated copy engine
        tail += bound - total
        total = bound
    gpu_end, res_end = parts["gpu_end"], parts["res_end"]
    breakdown = {
        "gpu_fixed": float(c.fwd_fixed.sum() + parts["fixed"].sum()),
        "sync_refresh": float(parts["sync"].sum()),
        "gpu_experts": float(parts["gpu_work"].sum()),
        "copy_stall": float((gpu_end - parts["gpu_work"]).sum() + tail),
        "cpu_wait": float(np.maximum(res_end - gpu_end, 0.0).sum()),
    }
    layer_time = layer.reshape(c.forwards, c.layers).sum(axis=0) if c.groups else np.zeros(c.layers)
    return RunTimes(total_s=total, breakdown=breakdown, layer_time=layer_time)


def lower_bound(c: ScheduleCosts) -> float:
    """No execution of this schedule is faster: per layer, fixed work + sync phase + the longest
    of (GPU expert work, on-demand copies then the cheapest on-demand expert, the CPU chain, the
    H2D engine's demand copies); over the run, neither copy engine can be busier than the total."""
    fixed = np.repeat(c.layer_fixed, c.layers)
    has_cpu = c.cpu_n > 0
    cpu_bound = _cpu_pool_bound(c)
    cpu_chain = np.where(has_cpu, c.act_d2h + cpu_bound + c.res_h2d, 0.0)
    od_min = np.full(c.groups, np.inf)
    if c.od_g.size:
        np.minimum.at(od_min, c.od_g, c.od_compute)
    od_chain = np.where(c.od_n > 0, c.od_copy_sum + od_min, 0.0)
    h2d_chain = c.od_copy_sum + c.res_h2d + (c.act_d2h if c.engines == 1 else 0.0)
    gpu = c.grouped + c.slow_extra + c.od_compute_sum
    per_layer = fixed + _sync_phase(c) + np.maximum.reduce([gpu, od_chain, cpu_chain, h2d_chain])
    layered = float(c.fwd_fixed.sum() + per_layer.sum())
    h2d_all = float(c.sync_h2d.sum() + c.async_h2d.sum() + c.od_copy_sum.sum() + c.res_h2d.sum())
    d2h_all = float(c.demote_d2h.sum() + c.act_d2h.sum())
    engines = [h2d_all + d2h_all] if c.engines == 1 else [h2d_all, d2h_all]
    return max([layered, *engines])


def analytic_metrics(workload: Workload, schedule: Schedule, costs: ScheduleCosts) -> Metrics:
    """Metrics of the analytic model (same names as the simulator's)."""
    return build_metrics("analytic", workload, schedule, costs, estimate(costs), lower_bound(costs))
