"""The planner: per-layer refresh intervals and GPU expert budgets under one memory budget.

docs/planner.md has the formulation. In short: a cost table C[l, tau, B] (predicted seconds of MoE
layer l when `tide` runs it with interval tau and budget B) is computed once from the analytic cost
model, then a multiple-choice knapsack picks one (tau, B) per layer under the memory row, solved
exactly by a dynamic program over the slots used. A Lagrangian lower bound over all refresh schedules with the chosen
budgets says how far the plan can be from any policy of that kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tidesim.errors import InputError
from tidesim.hardware import HardwareProfile
from tidesim.metrics import Metrics
from tidesim.plan import (
    Evaluation,
    Fingerprints,
    Plan,
    SolverInfo,
    file_fingerprint,
    model_fingerprint,
    profile_fingerprint,
)
from tidesim.planner.bound import OracleBound, OracleCosts, oracle_bound, oracle_costs
from tidesim.planner.candidates import default_budgets, expert_slots, parse_int_list, uniform_budget
from tidesim.planner.costtable import CostTable, _index_of, cost_table, distinct_taus
from tidesim.planner.milp import SOLVER_NAME, MilpResult, cbc, solve_plan
from tidesim.workload import Workload

# ----- evaluation and the whole planning run ------------------------------------------------------


def evaluate_plan(workload: Workload, hw: HardwareProfile, tau: np.ndarray, budget: np.ndarray,
                  engine: str = "analytic") -> Metrics:
    """Run the `planned` policy with these per-layer settings through an executor."""
    from tidesim.policies import PolicyOptions, build_schedule
    from tidesim.run import run

    options = PolicyOptions(budget=np.asarray(budget, np.int64), tau=np.asarray(tau, np.int64), hw=hw,
                            refresh="sync")
    return run(workload, build_schedule("planned", workload, options), hw, engine=engine)


def single_tau_sweep(workload: Workload, hw: HardwareProfile, taus: list[int], budget: int,
                     engine: str = "analytic") -> dict[int, float]:
    """Total time of `tide` with one tau and a uniform budget, for every candidate tau (the paper's
    setting). Analytic: read off a one-budget cost table; sim: one simulation per distinct tau."""
    from tidesim.policies import PolicyOptions, build_schedule, uniform
    from tidesim.run import run

    if engine == "analytic":
        table = cost_table(workload, hw, taus, [budget])
        return {int(t): float(v) for t, v in zip(table.taus, table.uniform_total_s()[:, 0], strict=True)}
    same = distinct_taus(workload, taus)
    times: dict[int, float] = {}
    layers = workload.num_layers
    for tau in sorted(set(same.values())):
        options = PolicyOptions(budget=uniform(budget, layers), tau=uniform(tau, layers), hw=hw, refresh="sync")
        times[tau] = run(workload, build_schedule("tide", workload, options), hw, engine=engine).total_time_s
    return {t: times[same[t]] for t in sorted(taus)}


def compare_on(workload: Workload, hw: HardwareProfile, prompts: list[int], tau: np.ndarray, budget: np.ndarray,
               taus: list[int], uniform_b: int, engine: str) -> Evaluation:
    """The plan against the best single-tau tide (chosen on these same prompts) with the same memory."""
    plan_s = evaluate_plan(workload, hw, tau, budget, engine).total_time_s
    sweep = single_tau_sweep(workload, hw, taus, uniform_b, engine)
    best_tau = min(sweep, key=lambda t: (sweep[t], t))
    tokens = workload.generated_tokens
    best_s = sweep[best_tau]
    return Evaluation(prompts=prompts, engine=engine, generated_tokens=tokens, plan_time_s=plan_s,
                      plan_tokens_per_s=tokens / plan_s, best_single_tau=best_tau, best_single_tau_budget=uniform_b,
                      best_single_tau_time_s=best_s, best_single_tau_tokens_per_s=tokens / best_s,
                      speedup=best_s / plan_s)


@dataclass
class PlanOutcome:
    """The plan plus what the command shows next to it."""

    plan: Plan
    table: CostTable
    uniform_budget: int
    tau_sweep: dict[int, float]          # calibration: total time of single-tau tide, uniform budget


def split_prompts(all_prompts: list[int], calibrate: list[int] | None) -> tuple[list[int], list[int]]:
    """Calibration prompts (default: the first half, at least one) and the held-out rest."""
    if calibrate is None:
        calibrate = all_prompts[: max(1, len(all_prompts) // 2)]
    unknown = sorted(set(calibrate) - set(all_prompts))
    if unknown:
        raise InputError(f"prompt {unknown[0]} is not in the trace (it has prompts {all_prompts})")
    return sorted(set(calibrate)), [p for p in all_prompts if p not in set(calibrate)]


def robust_plan(workload: Workload, hw: HardwareProfile, calib: list[int], table: CostTable, result: MilpResult,
                slots: int, uniform_b: int, best_tau: int, global_tau: bool, time_limit_s: float | None
                ) -> tuple[MilpResult, str]:
    """Keep the optimum only if it is at least as fast as the best single tau (uniform budget) on
    every calibration prompt by itself, not just on their sum; otherwise fall back to per-layer
    intervals with the uniform budget, and failing that to the best single tau itself.

    Moving slots between layers can fit one prompt's routing and lose on the next (the gains are
    often a fraction of a percent); this check is what keeps such plans off held-out prompts.
    """
    if len(calib) < 2:
        return result, ""
    layers = workload.num_layers
    single = (np.full(layers, best_tau, np.int64), np.full(layers, uniform_b, np.int64))
    per_prompt = [workload.select_prompts([p]) for p in calib]
    base = [evaluate_plan(w, hw, *single).total_time_s for w in per_prompt]

    def holds(candidate: MilpResult) -> bool:
        return all(evaluate_plan(w, hw, candidate.tau, candidate.budget).total_time_s <= b * (1 + 1e-12)
                   for w, b in zip(per_prompt, base, strict=True))

    if holds(result):
        return result, ""
    k = int(np.flatnonzero(table.budgets == uniform_b)[0])
    uniform_table = CostTable(table.taus, table.budgets[k:k + 1], table.layer_cost_s[:, :, k:k + 1], table.other_s,
                              table.generated_tokens)
    intervals = solve_plan(uniform_table, slots, global_tau=global_tau, time_limit_s=time_limit_s)
    why = "the MILP optimum lost to the best single tau on a calibration prompt by itself"
    if intervals.status in ("optimal", "feasible") and holds(intervals):
        return intervals, f"{why}; kept per-layer intervals with the uniform budget {uniform_b}"
    objective = table.total_s(*single)
    fallback = MilpResult(single[0], single[1], objective, result.status, result.proven_optimal,
                          result.wall_time_s, min(result.bound_s, objective))
    return fallback, f"{why}, and so did per-layer intervals; kept the best single tau {best_tau}"


def make_plan(trace_path: Path, trace_name: str, hw: HardwareProfile, gpu_mem_gib: float, *,
              global_tau: bool = False, taus: list[int] | None = None, budgets: list[int] | None = None,
              time_limit_s: float | None = None, calibrate_prompts: list[int] | None = None,
              engine: str = "analytic", oracle_iterations: int = 80,
              progress: Callable[[Iterable[int]], Iterable[int]] | None = None) -> PlanOutcome:
    """Everything `tidesim plan` does: cost table on the calibration prompts, MILP, oracle bound,
    evaluation on calibration and held-out prompts, fingerprints."""
    from tidesim.trace.io import read_trace
    from tidesim.workload import workload_from_trace

    if time_limit_s is not None and time_limit_s <= 0:
        raise InputError(f"--time-limit must be positive, got {time_limit_s}")
    trace = read_trace(trace_path)
    model = trace.model
    workload = workload_from_trace(trace)
    calib, held = split_prompts(trace.prompt_ids, calibrate_prompts)
    slots = expert_slots(model, gpu_mem_gib)
    layers, experts = model.num_moe_layers, model.num_experts
    taus = taus or list(range(1, 33))
    budgets = budgets or default_budgets(slots, layers, experts)
    if max(budgets) > experts:
        raise InputError(f"--budgets must not exceed the model's {experts} experts per layer")
    u = uniform_budget(slots, layers, experts)
    calib_w = workload.select_prompts(calib)
    table = cost_table(calib_w, hw, taus, sorted(set(budgets) | {u}), progress=progress)
    result = solve_plan(table, slots, global_tau=global_tau, time_limit_s=time_limit_s)
    if result.status not in ("optimal", "feasible"):
        raise InputError(f"the solver found no plan ({result.status}); give a longer --time-limit")
    sweep = {int(t): float(v) for t, v in
             zip(table.taus, table.uniform_total_s()[:, int(np.flatnonzero(table.budgets == u)[0])], strict=True)}
    best_tau = min(sweep, key=lambda t: (sweep[t], t))
    result, robust_note = robust_plan(workload, hw, calib, table, result, slots, u, best_tau, global_tau,
                                      time_limit_s)
    layer_upper = table.layer_cost_s[np.arange(layers), _index_of(table.taus, result.tau, "tau"),
                                     _index_of(table.budgets, result.budget, "budget")]
    bound = oracle_bound(oracle_costs(calib_w, hw), result.budget, oracle_iterations, layer_upper)
    calibration = compare_on(calib_w, hw, calib, result.tau, result.budget, taus, u, engine)
    heldout = (compare_on(workload.select_prompts(held), hw, held, result.tau, result.budget, taus, u, engine)
               if held else None)
    notes = [robust_note] if robust_note else []
    if engine == "analytic" and abs(calibration.plan_time_s - result.objective_s) > 1e-6 * result.objective_s:
        notes.append(f"the cost model's time of the plan ({calibration.plan_time_s:.6g} s) differs from the "
                     f"table's prediction ({result.objective_s:.6g} s): layer additivity does not hold")
    plan = Plan(
        model=model.name, hw=hw.name, trace=trace_name, mode="global-tau" if global_tau else "per-layer",
        gpu_mem_gib=float(gpu_mem_gib), expert_slots=slots,
        tau=[int(t) for t in result.tau], budget=[int(b) for b in result.budget],
        objective_s=result.objective_s, oracle_bound_s=bound.bound_s,
        gap=result.objective_s / bound.bound_s - 1 if bound.bound_s > 0 else None,
        solver=SolverInfo(SOLVER_NAME, result.status, result.proven_optimal, result.wall_time_s, time_limit_s,
                          result.bound_s),
        fingerprints=Fingerprints(file_fingerprint(trace_path), profile_fingerprint(hw), model_fingerprint(model)),
        taus=[int(t) for t in table.taus], budgets=[int(b) for b in table.budgets],
        calibration=calibration, heldout=heldout, notes=notes,
    )
    return PlanOutcome(plan=plan, table=table, uniform_budget=u, tau_sweep=sweep)


__all__ = [
    "CostTable", "MilpResult", "OracleBound", "OracleCosts", "PlanOutcome", "cbc", "compare_on", "cost_table",
    "default_budgets", "distinct_taus", "evaluate_plan", "expert_slots", "make_plan", "oracle_bound", "oracle_costs",
    "parse_int_list", "robust_plan", "single_tau_sweep", "solve_plan", "split_prompts", "uniform_budget",
]
