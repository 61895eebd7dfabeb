"""The planner: per-layer refresh intervals and GPU expert budgets under one memory budget.

docs/planner.md has the formulation. In short: a cost table C[l, tau, B] (predicted seconds of MoE
layer l when the policy, `tide` by default, runs it with interval tau and budget B) is computed once
from the analytic cost model on the calibration prompts, then a multiple-choice knapsack picks one
(tau, B) per layer under the memory row, solved exactly by a dynamic program over the slots used.
That optimum, the per-layer intervals with the uniform budget and every single tau are then run by
one executor on the evaluation prompts, and the fastest is kept (planner.select). A Lagrangian lower
bound over all refresh schedules with the chosen budgets says how far the plan can be from any
policy of that kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tidesim.errors import InputError
from tidesim.hardware import HardwareProfile
from tidesim.metrics import Metrics
from tidesim.models import ModelSpec
from tidesim.plan import (
    Evaluation,
    Fingerprints,
    Plan,
    Selection,
    SolverInfo,
    file_fingerprint,
    model_fingerprint,
    profile_fingerprint,
)
from tidesim.planner.bound import OracleBound, OracleCosts, oracle_bound, oracle_costs
from tidesim.planner.candidates import default_budgets, expert_slots, parse_int_list, uniform_budget
from tidesim.planner.costtable import CostTable, _index_of, check_plan_policy, cost_table, distinct_taus, plan_policies
from tidesim.planner.milp import SOLVER_NAME, MilpResult, cbc, solve_plan
from tidesim.planner.select import INTERVALS, OPTIMUM, SINGLE, Candidate, best_tau_of, choose, plan_candidates
from tidesim.workload import Workload

# ----- evaluation and the whole planning run ------------------------------------------------------

def bounded(policy: str) -> bool:
    """Whether the Lagrangian bound covers `policy`'s schedules (docs/planner.md section 3: every
    miss on the CPU, copies synchronous): the reference policy only; tide-split copies misses on
    demand, which can beat it, so its plans carry none."""
    from tidesim.policies.registry import reference_policy

    return policy == reference_policy()



def evaluate_plan(workload: Workload, hw: HardwareProfile, tau: np.ndarray, budget: np.ndarray,
                  engine: str = "analytic", policy: str = "tide") -> Metrics:
    """Run the plan's runner (plan_runner) with these per-layer settings through an executor."""
    from tidesim.policies import PolicyOptions, build_schedule
    from tidesim.policies.registry import plan_runner
    from tidesim.run import run

    options = PolicyOptions(budget=np.asarray(budget, np.int64), tau=np.asarray(tau, np.int64), hw=hw,
                            refresh="sync")
    return run(workload, build_schedule(plan_runner(policy), workload, options), hw, engine=engine)


def single_tau_sweep(workload: Workload, hw: HardwareProfile, taus: list[int], budget: int,
                     engine: str = "analytic", policy: str = "tide") -> dict[int, float]:
    """Total time of the policy with one tau and a uniform budget, for every candidate tau (the
    paper's setting). Analytic: read off a one-budget cost table; sim: one simulation per distinct
    tau."""
    from tidesim.policies import PolicyOptions, build_schedule, uniform
    from tidesim.run import run

    if engine == "analytic":
        table = cost_table(workload, hw, taus, [budget], policy=policy)
        return {int(t): float(v) for t, v in zip(table.taus, table.uniform_total_s()[:, 0], strict=True)}
    same = distinct_taus(workload, taus)
    times: dict[int, float] = {}
    layers = workload.num_layers
    for tau in sorted(set(same.values())):
        options = PolicyOptions(budget=uniform(budget, layers), tau=uniform(tau, layers), hw=hw, refresh="sync")
        times[tau] = run(workload, build_schedule(policy, workload, options), hw, engine=engine).total_time_s
    return {t: times[same[t]] for t in sorted(taus)}


def evaluation(prompts: list[int], engine: str, tokens: int, plan_s: float, sweep: dict[int, float],
               budget: int) -> Evaluation:
    """The plan's time against the best single tau of `sweep` (ties: the largest tau)."""
    best_tau = best_tau_of(sweep)
    best_s = sweep[best_tau]
    return Evaluation(prompts=prompts, engine=engine, generated_tokens=tokens, plan_time_s=plan_s,
                      plan_tokens_per_s=tokens / plan_s, best_single_tau=best_tau, best_single_tau_budget=budget,
                      best_single_tau_time_s=best_s, best_single_tau_tokens_per_s=tokens / best_s,
                      speedup=best_s / plan_s)


def compare_on(workload: Workload, hw: HardwareProfile, prompts: list[int], tau: np.ndarray, budget: np.ndarray,
               taus: list[int], uniform_b: int, engine: str, policy: str = "tide") -> Evaluation:
    """The plan against the best single-tau policy (chosen on these same prompts) with the same memory."""
    plan_s = evaluate_plan(workload, hw, tau, budget, engine, policy).total_time_s
    sweep = single_tau_sweep(workload, hw, taus, uniform_b, engine, policy)
    return evaluation(prompts, engine, workload.generated_tokens, plan_s, sweep, uniform_b)


@dataclass
class PlanOutcome:
    """The plan plus what the command shows next to it."""

    plan: Plan
    table: CostTable
    uniform_budget: int
    tau_sweep: dict[int, float]          # calibration: total time of the single-tau policy, uniform budget


def split_prompts(all_prompts: list[int], calibrate: list[int] | None) -> tuple[list[int], list[int]]:
    """Calibration prompts (default: the first half, at least one) and the held-out rest."""
    from tidesim.workload import check_prompt_ids

    if calibrate is None:
        calibrate = all_prompts[: max(1, len(all_prompts) // 2)]
    check_prompt_ids(sorted(set(calibrate)), all_prompts, "--calibrate-prompts")
    return sorted(set(calibrate)), [p for p in all_prompts if p not in set(calibrate)]


def plan_grid(model: ModelSpec, gpu_mem_gib: float, taus: list[int] | None, budgets: list[int] | None
              ) -> tuple[int, list[int], list[int]]:
    """The knapsack's slots (tidesim.budget.expert_slots) and the checked candidate grids: taus
    (default 1..32, each at least 1 by the --tau rule) and budgets (default a grid around the
    uniform budget, each within the model's experts by the --budget rule)."""
    from tidesim.budget import check_budget
    from tidesim.limits import check_tau

    slots = expert_slots(model, gpu_mem_gib)
    taus = taus or list(range(1, 33))
    check_tau(min(taus), "--taus")
    budgets = budgets or default_budgets(slots, model.num_moe_layers, model.num_experts)
    check_budget(max(budgets), model.num_experts, "--budgets", model.name)
    return slots, taus, budgets


def fit_candidates(table: CostTable, slots: int, uniform_b: int, global_tau: bool, time_limit_s: float | None
                   ) -> tuple[MilpResult, list[Candidate]]:
    """The knapsack optimum on the calibration table and the plans the planner may keep instead:
    per-layer intervals with the uniform budget (the same program with B fixed to it) and every
    single tau with the uniform budget."""
    result = solve_plan(table, slots, global_tau=global_tau, time_limit_s=time_limit_s)
    if result.status not in ("optimal", "feasible"):
        raise InputError(f"the solver found no plan ({result.status}); give a longer --time-limit")
    k = int(np.flatnonzero(table.budgets == uniform_b)[0])
    uniform_table = CostTable(table.taus, table.budgets[k:k + 1], table.layer_cost_s[:, :, k:k + 1], table.other_s,
                              table.generated_tokens)
    intervals = solve_plan(uniform_table, slots, global_tau=global_tau, time_limit_s=time_limit_s)
    optimum = Candidate("optimum", OPTIMUM, result.tau, result.budget)
    fallback = Candidate("intervals", INTERVALS, intervals.tau, intervals.budget)
    return result, plan_candidates(optimum, fallback, [int(t) for t in table.taus], uniform_b, table.num_layers)


def select_plan(workload: Workload, hw: HardwareProfile, prompts: list[int], candidates: list[Candidate],
                uniform_b: int, engine: str, policy: str = "tide") -> tuple[Candidate, Selection, Evaluation]:
    """Run every candidate with `engine` on these prompts and keep the fastest (planner.select);
    returns it, the record of the choice and its evaluation against the best single tau there."""
    singles = [int(c.tau[0]) for c in candidates if c.kind == SINGLE]
    sweep = single_tau_sweep(workload, hw, singles, uniform_b, engine, policy)
    times = [sweep[int(c.tau[0])] if c.kind == SINGLE else
             evaluate_plan(workload, hw, c.tau, c.budget, engine, policy).total_time_s for c in candidates]
    kept, record = choose(candidates, times, prompts, engine)
    plan_s = times[candidates.index(kept)]
    return kept, record, evaluation(prompts, engine, workload.generated_tokens, plan_s, sweep, uniform_b)


def make_plan(trace_path: Path, trace_name: str, hw: HardwareProfile, gpu_mem_gib: float, *,
              global_tau: bool = False, taus: list[int] | None = None, budgets: list[int] | None = None,
              time_limit_s: float | None = None, calibrate_prompts: list[int] | None = None,
              engine: str = "analytic", oracle_iterations: int = 80, policy: str = "tide",
              progress: Callable[[Iterable[int]], Iterable[int]] | None = None) -> PlanOutcome:
    """Everything `tidesim plan` does, from a trace file: read it, split the prompts, check the grids
    (split_prompts, plan_grid: the rules tidesim.scenario.resolve_plan applies for the command),
    then plan_workload."""
    from tidesim.trace.io import read_trace
    from tidesim.workload import workload_from_trace

    trace = read_trace(trace_path)
    calib, held = split_prompts(trace.prompt_ids, calibrate_prompts)
    slots, taus, budgets = plan_grid(trace.model, gpu_mem_gib, taus, budgets)
    return plan_workload(workload_from_trace(trace), trace_path, trace_name, hw, gpu_mem_gib, slots, calib, held,
                         taus, budgets, global_tau=global_tau, time_limit_s=time_limit_s, engine=engine,
                         oracle_iterations=oracle_iterations, policy=policy, progress=progress)


def plan_workload(workload: Workload, trace_path: Path, trace_name: str, hw: HardwareProfile, gpu_mem_gib: float,
                  slots: int, calib: list[int], held: list[int], taus: list[int], budgets: list[int], *,
                  global_tau: bool = False, time_limit_s: float | None = None, engine: str = "analytic",
                  oracle_iterations: int = 80, policy: str = "tide",
                  progress: Callable[[Iterable[int]], Iterable[int]] | None = None) -> PlanOutcome:
    """The planning run on resolved inputs (slots, prompt split and grids checked): cost table on
    the calibration prompts, knapsack, the choice among the candidates on the evaluation prompts
    (the held-out ones; the calibration ones when none are held out), Lagrangian bound, evaluation
    on both sets, fingerprints."""
    if time_limit_s is not None and time_limit_s <= 0:
        raise InputError(f"--time-limit must be positive, got {time_limit_s}")
    check_plan_policy(policy)
    model = workload.model
    layers, experts = model.num_moe_layers, model.num_experts
    u = uniform_budget(slots, layers, experts)
    calib_w = workload.select_prompts(calib)
    table = cost_table(calib_w, hw, taus, sorted(set(budgets) | {u}), progress=progress, policy=policy)
    result, candidates = fit_candidates(table, slots, u, global_tau, time_limit_s)
    sweep = {int(t): float(v) for t, v in
             zip(table.taus, table.uniform_total_s()[:, int(np.flatnonzero(table.budgets == u)[0])], strict=True)}
    chosen_on = held or calib
    kept, selection, chosen_eval = select_plan(workload.select_prompts(chosen_on), hw, chosen_on, candidates, u,
                                               engine, policy)
    objective = table.total_s(kept.tau, kept.budget)
    bound_s = None
    if bounded(policy):
        layer_upper = table.layer_cost_s[np.arange(layers), _index_of(table.taus, kept.tau, "tau"),
                                         _index_of(table.budgets, kept.budget, "budget")]
        bound_s = oracle_bound(oracle_costs(calib_w, hw), kept.budget, oracle_iterations, layer_upper).bound_s
    calibration = chosen_eval if not held else compare_on(calib_w, hw, calib, kept.tau, kept.budget, taus, u,
                                                          engine, policy)
    heldout = chosen_eval if held else None
    lost = not (np.array_equal(kept.tau, result.tau) and np.array_equal(kept.budget, result.budget))
    notes = [] if not lost else [
        f"kept {'the per-layer intervals' if kept.kind == INTERVALS else kept.name} with the uniform budget {u}: "
        f"faster than the knapsack optimum on the evaluation prompts {_ids(chosen_on)} ({engine})"]
    if engine == "analytic" and abs(calibration.plan_time_s - objective) > 1e-6 * objective:
        notes.append(f"the cost model's time of the plan ({calibration.plan_time_s:.6g} s) differs from the "
                     f"table's prediction ({objective:.6g} s): layer additivity does not hold")
    plan = Plan(
        model=model.name, hw=hw.name, trace=trace_name, mode="global-tau" if global_tau else "per-layer",
        gpu_mem_gib=float(gpu_mem_gib), expert_slots=slots,
        tau=[int(t) for t in kept.tau], budget=[int(b) for b in kept.budget],
        objective_s=objective, oracle_bound_s=bound_s,
        gap=objective / bound_s - 1 if bound_s else None,
        solver=SolverInfo(SOLVER_NAME, result.status, result.proven_optimal, result.wall_time_s, time_limit_s,
                          result.bound_s),
        fingerprints=Fingerprints(file_fingerprint(trace_path), profile_fingerprint(hw), model_fingerprint(model)),
        taus=[int(t) for t in table.taus], budgets=[int(b) for b in table.budgets],
        calibration=calibration, heldout=heldout, notes=notes, policy=policy, selection=selection,
    )
    return PlanOutcome(plan=plan, table=table, uniform_budget=u, tau_sweep=sweep)


def _ids(prompts: list[int]) -> str:
    return ",".join(map(str, prompts))


__all__ = [
    "Candidate", "CostTable", "MilpResult", "OracleBound", "OracleCosts", "PlanOutcome", "cbc",
    "compare_on", "cost_table", "default_budgets", "distinct_taus", "evaluate_plan", "evaluation", "expert_slots",
    "fit_candidates", "make_plan", "oracle_bound", "oracle_costs", "parse_int_list", "plan_grid", "plan_policies",
    "plan_workload", "select_plan", "single_tau_sweep", "solve_plan", "split_prompts", "uniform_budget",
]
