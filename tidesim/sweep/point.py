"""One sweep point evaluated: trace -> workload -> what-if hardware -> GPU expert budget -> policy
(or the planner's plan) -> Schedule -> `tidesim.run.run` (analytic cost model or simulator) -> one
flat row. An InputError (the point's inputs do not fit, e.g. GPU memory too small for the model)
becomes the row's `error`."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tidesim.errors import InputError
from tidesim.hardware import HardwareProfile
from tidesim.lru import LRU
from tidesim.metrics import Metrics
from tidesim.policies.options import PolicyOptions
from tidesim.policies.registry import traits
from tidesim.schedule import Schedule
from tidesim.sweep.grid import Point
from tidesim.sweep.hardware import build_hardware, hardware_columns
from tidesim.sweep.results import metric_columns, param_columns
from tidesim.sweep.workloads import load_workload, trace_label, workload_key
from tidesim.workload import Workload


@dataclass
class Evaluation:
    """The metrics of one point plus what the point resolved to (effective hardware, budget, tau)."""

    metrics: Metrics
    derived: dict[str, Any] = field(default_factory=dict)


Evaluator = Callable[[Point, Path], Evaluation]

# ----- the real evaluation -----------------------------------------------------------------------------
def evaluate_point(point: Point, cache_dir: Path) -> Evaluation:
    """Evaluate one point with the real simulator / cost model (the default evaluator)."""
    from tidesim.budget import budget_for_memory
    from tidesim.policies import PolicyOptions, uniform
    from tidesim.run import run

    p = point.params
    workload = load_workload(point, cache_dir)
    hw = build_hardware(p)
    model = workload.model
    layers = model.num_moe_layers
    derived = hardware_columns(hw)
    derived["trace_file"] = trace_label(point)
    policy = p["policy"]
    if traits(policy).needs_plan:
        tau, budget, info = plan_point(workload, hw)
        derived["per_layer"] = json.dumps(info, sort_keys=True)
    else:
        if p["budget"] == "memory":
            cap = None if p["budget_cap"] == "none" else int(p["budget_cap"])
            slots = budget_for_memory(model, hw.gpu.memory_gib, cap)
        else:
            slots = int(p["budget"])
        tau, budget = uniform(point_tau(p, workload, hw, slots, workload_key(point)), layers), uniform(slots, layers)
    derived["budget_used"] = float(np.mean(budget))
    derived["tau_used"] = float(np.mean(tau))
    options = PolicyOptions(budget=budget, tau=tau, hw=hw, refresh=p["refresh"],
                            warmup_fraction=p["warmup_fraction"])
    schedule, fresh = cached_schedule(policy, workload_key(point), workload, options)
    metrics = run(workload, schedule, hw, engine=p["engine"], check=fresh)
    metrics.policy = policy
    return Evaluation(metrics=metrics, derived=derived)


def point_tau(p: dict[str, Any], workload: Workload, hw: HardwareProfile, slots: int, wkey: str | None = None) -> int:
    """The point's tau; `best` follows the default-tau rule of every command (tidesim.default_tau):
    the analytic best single tau for this workload, profile, budget and refresh mode. Policies that
    do not refresh on an interval ignore tau, so they skip the search. With `wkey` (the point's
    workload_key) the choice is kept per process for points with the same inputs (tide and
    tide-reference on one profile search once)."""
    if p["tau"] != "best":
        return int(p["tau"])
    if not traits(p["policy"]).uses_tau:
        return 1
    from tidesim.default_tau import best_tau

    if wkey is None:
        return best_tau(workload, hw, slots, p["refresh"]).tau
    key = json.dumps([wkey, hw.fingerprint(), slots, p["refresh"]])
    known = TAUS.get(key)
    if known is None:
        choice, raised = hw.noting(lambda: best_tau(workload, hw, slots, p["refresh"]))
        known = (choice.tau, raised)
        TAUS.put(key, known)
    hw.flags.update(known[1])             # the search's notes on the profile, as if it ran here
    return known[0]


TAUS: LRU[str, tuple[int, frozenset[str]]] = LRU(256)   # best tau and the notes it added


PLAN_TAUS = list(range(1, 33))      # the candidate intervals the planner chooses from (TIDE swept 1..31)


def plan_point(workload: Workload, hw: HardwareProfile) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Solve the per-layer plan (tau and budget per MoE layer) for this point's hardware and GPU
    memory, over the candidate intervals PLAN_TAUS and the planner's default budget grid."""
    from tidesim import planner

    layers, experts = workload.num_layers, workload.num_experts
    slots = planner.expert_slots(workload.model, hw.gpu.memory_gib)
    budgets = planner.default_budgets(slots, layers, experts)
    table = planner.cost_table(workload, hw, PLAN_TAUS, budgets)
    result = planner.solve_plan(table, slots)
    if result.status not in ("optimal", "feasible"):
        raise InputError(f"the planner found no plan for {hw.gpu.memory_gib:g} GiB ({result.status})")
    info = {"tau": [int(t) for t in result.tau], "budget": [int(b) for b in result.budget],
            "predicted_s": float(result.objective_s), "status": result.status, "slots": int(slots)}
    return np.asarray(result.tau, np.int64), np.asarray(result.budget, np.int64), info


# ----- schedules ---------------------------------------------------------------------------------------
class _WatchedOptions(PolicyOptions):
    """PolicyOptions that notes whether the policy read the hardware profile."""

    def __getattribute__(self, name: str) -> Any:
        if name == "hw":
            object.__setattr__(self, "hw_read", True)
        return super().__getattribute__(name)


SCHEDULES: LRU[str, Schedule] = LRU(16)      # schedules that did not read the profile
HW_SCHEDULES: LRU[str, Schedule] = LRU(2)    # those that did (rarely reused: a grid's profiles differ)


def cached_schedule(policy: str, wkey: str, workload: Workload, options: PolicyOptions) -> tuple[Schedule, bool]:
    """The policy's Schedule, reused across points that differ only in hardware when the policy
    never read the hardware profile (most placements depend on routing, budget and tau alone).
    Whether it read it is observed, not assumed: a policy that reads `options.hw` is cached per
    profile. Returns (schedule, built now)."""
    from tidesim.policies import build_schedule

    base = json.dumps([wkey, policy, options.budget.tolist(), options.tau.tolist(), options.refresh,
                       options.warmup_fraction])
    per_hw = base + options.hw.fingerprint()
    for key, cache in ((base, SCHEDULES), (per_hw, HW_SCHEDULES)):
        kept = cache.get(key)
        if kept is not None:
            return kept, False
    watched = _WatchedOptions(budget=options.budget, tau=options.tau, hw=options.hw, refresh=options.refresh,
                              warmup_fraction=options.warmup_fraction)
    schedule = build_schedule(policy, workload, watched)
    if getattr(watched, "hw_read", False):
        HW_SCHEDULES.put(per_hw, schedule)
    else:
        SCHEDULES.put(base, schedule)
    return schedule, True


# ----- rows --------------------------------------------------------------------------------------------
_METRIC_SKIP = {"engine", "policy", "busy_s", "breakdown_s", "layer_time_s", "notes"}


def evaluate_row(point: Point, cache_dir: Path, evaluator: Evaluator) -> dict[str, Any]:
    """Executor task: one point -> one flat row (an InputError becomes the row's `error`)."""
    row: dict[str, Any] = {"point_id": point.id, "index": point.index}
    row.update(param_columns(point))
    try:
        result = evaluator(point, cache_dir)
    except InputError as exc:
        row["error"] = str(exc)
        return row
    row.update(result.derived)
    row.update(metric_columns(result.metrics))
    row["error"] = None
    return row


def evaluate_rows(points: list[Point], cache_dir: Path, evaluator: Evaluator) -> list[dict[str, Any]]:
    """Executor task: a few points, one after another in one worker (see point_batches)."""
    return [evaluate_row(p, cache_dir, evaluator) for p in points]
