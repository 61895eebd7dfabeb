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
from tidesim.metrics import Metrics
from tidesim.notes import noting
from tidesim.policies.registry import traits
from tidesim.scenario import PerLayer, Scenario, assemble
from tidesim.sweep.grid import Point
from tidesim.sweep.hardware import build_hardware, hardware_columns
from tidesim.sweep.results import metric_columns, param_columns
from tidesim.sweep.workloads import load_workload, trace_label
from tidesim.workload import Workload


@dataclass
class Evaluation:
    """The metrics of one point plus what the point resolved to (effective hardware, budget, tau)."""

    metrics: Metrics
    derived: dict[str, Any] = field(default_factory=dict)


Evaluator = Callable[[Point, Path], Evaluation]

# ----- the real evaluation -----------------------------------------------------------------------------
def evaluate_point(point: Point, cache_dir: Path) -> Evaluation:
    """Evaluate one point with the real simulator / cost model (the default evaluator): the point
    resolved into a Scenario (scenario.assemble: the default-budget and default-tau rules of every
    command), then tidesim.evaluate.evaluate."""
    from tidesim.evaluate import evaluate

    scenario, plan_info = point_scenario(point, cache_dir)
    policy = point.params["policy"]
    options = scenario.options(policy)
    derived = hardware_columns(scenario.hw)
    derived["trace_file"] = trace_label(point)
    if plan_info is not None:
        derived["per_layer"] = json.dumps(plan_info, sort_keys=True)
    derived["budget_used"] = float(np.mean(options.budget))
    derived["tau_used"] = float(np.mean(options.tau))
    metrics = evaluate(scenario, policy).metrics
    metrics.policy = policy
    return Evaluation(metrics=metrics, derived=derived)


def point_scenario(point: Point, cache_dir: Path) -> tuple[Scenario, dict[str, Any] | None]:
    """The point's Scenario: its workload, what-if profile, budget (`memory`: the default-budget
    rule with the point's cap), tau (`best`: the default-tau rule) and, for the policy that runs a
    plan, the per-layer plan solved for this point's memory. Sweeps explore what-if profiles, so a
    measured profile without curves for the model falls back to the roofline (with its note).
    Returns the scenario and the solved plan's summary (None for other policies)."""
    p = point.params
    workload = load_workload(point, cache_dir)
    hw = build_hardware(p)
    policy = p["policy"]
    per_layer, info, said = None, None, frozenset[str]()
    budget = None if p["budget"] == "memory" else int(p["budget"])
    cap = None if p["budget_cap"] == "none" else int(p["budget_cap"])
    if traits(policy).needs_plan:
        (tau, layer_budget, info), said = noting(lambda: plan_point(workload, hw))
        per_layer = PerLayer(tuple(int(t) for t in tau), tuple(int(b) for b in layer_budget))
        budget = min(info["slots"] // workload.num_layers, workload.num_experts)   # the same memory, uniform
    scenario = assemble(trace_label(point), workload, hw, [policy], budget=budget, budget_cap=cap,
                        tau=None if p["tau"] == "best" else int(p["tau"]), refresh=p["refresh"],
                        engine=p["engine"], allow_roofline=True, notes=tuple(said),
                        warmup_fraction=p["warmup_fraction"], per_layer=per_layer)
    return scenario, info


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


# ----- rows --------------------------------------------------------------------------------------------
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
