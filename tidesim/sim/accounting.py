"""Turn the times an executor measured into Metrics, the same way for every engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tidesim.metrics import Metrics
from tidesim.schedule import Schedule
from tidesim.sim.costs import ScheduleCosts
from tidesim.workload import Workload

BREAKDOWN_KEYS = ("gpu_fixed", "gpu_experts", "copy_stall", "cpu_wait", "sync_refresh", "other")
RESOURCES = ("gpu", "h2d", "d2h", "cpu")


@dataclass
class RunTimes:
    """What an engine found: total time, where the critical path went, time per MoE layer."""

    total_s: float
    breakdown: dict[str, float] = field(default_factory=lambda: dict.fromkeys(BREAKDOWN_KEYS, 0.0))
    layer_time: np.ndarray | None = None


def busy_per_resource(costs: ScheduleCosts) -> dict[str, float]:
    """Work per resource, the same for every engine: GPU seconds, copy-engine seconds per
    direction, and CPU worker-seconds divided by the number of workers (mean per worker)."""
    g, c = costs.gpu, costs.copies
    gpu = (g.fwd_fixed.sum() + g.layer_fixed.sum() * costs.layers + g.grouped.sum() + g.slow_extra.sum()
           + g.od_compute_sum.sum())
    h2d = c.sync_h2d.sum() + c.async_h2d.sum() + c.od_copy_sum.sum() + c.res_h2d.sum()
    d2h = c.demote_d2h.sum() + c.act_d2h.sum()
    return {"gpu": float(gpu), "h2d": float(h2d), "d2h": float(d2h),
            "cpu": float(costs.cpu.total.sum() / costs.rates.workers)}


def build_metrics(engine: str, workload: Workload, schedule: Schedule, costs: ScheduleCosts, times: RunTimes,
                  lower_bound_s: float) -> Metrics:
    """Metrics with the shared names; the breakdown is closed so that it sums to the total."""
    c = costs.counts
    total = float(times.total_s)
    breakdown = {k: float(times.breakdown.get(k, 0.0)) for k in BREAKDOWN_KEYS}
    breakdown["other"] += total - sum(breakdown.values())
    if abs(breakdown["other"]) < 1e-9 * max(total, 1e-3):   # rounding noise of the sums
        breakdown["other"] = 0.0
    pairs = c["gpu_tokens"] + c["cpu_tokens"]
    generated = workload.generated_tokens
    forwards = workload.num_forwards
    layer_time = times.layer_time if times.layer_time is not None else np.zeros(workload.num_layers)
    return Metrics(
        engine=engine, policy=schedule.policy, total_time_s=total, generated_tokens=generated,
        forwards=forwards, tokens_per_s=generated / total if total > 0 else 0.0,
        step_time_s=total / forwards if forwards else 0.0,
        gpu_tokens=int(c["gpu_tokens"]), cpu_tokens=int(c["cpu_tokens"]),
        hit_ratio=c["gpu_tokens"] / pairs if pairs else 1.0,
        h2d_bytes=c["h2d_bytes"], d2h_bytes=c["d2h_bytes"],
        expert_copies=int(c["expert_copies"]), refresh_copies=int(c["refresh_copies"]),
        copy_stall_s=breakdown["copy_stall"] + breakdown["sync_refresh"],
        cpu_share=c["cpu_tokens"] / pairs if pairs else 0.0,
        busy_s=busy_per_resource(costs),
        breakdown_s=breakdown, layer_time_s=[float(x) for x in layer_time],
        lower_bound_s=float(lower_bound_s), is_bound=schedule.is_bound, feasible=schedule.feasible,
        notes=list(costs.flags),
    )
