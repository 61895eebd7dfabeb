"""run(): execute one Schedule on one workload and profile, with the simulator or the analytic
model; the one entry point the commands, the planner, the demo, sweeps and validation call."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tidesim.costmodel import analytic_metrics, lower_bound
from tidesim.errors import InputError
from tidesim.hardware import HardwareProfile
from tidesim.metrics import Metrics
from tidesim.schedule import Schedule, schedule_problems
from tidesim.sim.accounting import build_metrics
from tidesim.sim.costs import schedule_costs
from tidesim.sim.engine import simulate
from tidesim.sim.timeline import Timeline
from tidesim.workload import Workload

ENGINES = ("sim", "analytic")


def run(workload: Workload, schedule: Schedule, hw: HardwareProfile, engine: str = "sim",
        timeline: str | Path | Timeline | None = None, on_forward: Callable[[int], None] | None = None,
        check: bool = True) -> Metrics:
    """Metrics of `schedule` on `workload` with profile `hw`.

    engine: "sim" (discrete-event, exact for the documented model) or "analytic" (closed form,
    vectorised). timeline: a path (Chrome trace JSON written atomically) or a Timeline to fill;
    simulator only. on_forward: called after each simulated forward (progress bars).
    check: verify the schedule's invariants first (lossless, residency, budget).
    """
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if timeline is not None and engine != "sim":
        raise InputError("a timeline needs the simulator (--engine sim)")
    if check:
        problems = schedule_problems(schedule, workload)
        if problems:
            raise InputError(f"policy {schedule.policy!r} produced an invalid schedule: {problems[0]}")
    costs = schedule_costs(workload, schedule, hw)
    if engine == "analytic":
        return analytic_metrics(workload, schedule, costs)
    tl = timeline if isinstance(timeline, Timeline) else (Timeline() if timeline is not None else None)
    times = simulate(costs, tl, on_forward)
    metrics = build_metrics("sim", workload, schedule, costs, times, lower_bound(costs))
    if tl is not None and not isinstance(timeline, Timeline):
        assert timeline is not None
        tl.save(timeline)
    return metrics
