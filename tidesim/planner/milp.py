"""The multiple-choice knapsack: one (tau, budget) per MoE layer under the memory row, solved
exactly by a dynamic program over the slots used (docs/planner.md, section 1). The same program
in PuLP/CBC stays for its LP relaxation and as the tests' cross-check: CBC can branch for many
minutes without closing the last fraction of a percent of its gap, the DP takes milliseconds."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pulp
from pulp.apis import coin_api

from tidesim.errors import InputError
from tidesim.planner.costtable import CostTable

SOLVER_NAME = "exact DP over slots"

# ----- the multiple-choice knapsack ---------------------------------------------------------------


@dataclass
class MilpResult:
    """One solve: the choice per layer, its predicted total and the solver's status."""

    tau: np.ndarray
    budget: np.ndarray
    objective_s: float
    status: str              # optimal | feasible | not-solved | infeasible
    proven_optimal: bool
    wall_time_s: float
    bound_s: float           # lower bound on the optimum (objective when proven optimal)


def _check_capacity(table: CostTable, slots: int) -> None:
    need = int(table.budgets.min()) * table.num_layers
    if need > slots:
        raise InputError(
            f"even the smallest candidate budget ({int(table.budgets.min())} per layer, {need} slots) exceeds "
            f"the {slots} expert slots the memory budget holds; give smaller --budgets or more memory"
        )


def solve_plan(table: CostTable, slots: int, global_tau: bool = False,
               time_limit_s: float | None = None) -> MilpResult:
    """Choose one (tau, budget) per layer minimising the predicted total under the slot limit.

    global_tau: one tau for all layers, solved by enumerating the distinct intervals and solving
    the per-layer-budget knapsack for each; the best of these optima (ties to the largest tau, as
    in _cheapest_tau) is the optimum of the joint program.

    time_limit_s: only for the CBC path (`_solve_cbc`); the exact DP needs none and ignores it, so
    that no wall clock ever decides the plan.
    """
    _check_capacity(table, slots)
    if not global_tau:
        return _solve_dp(table, slots)
    start = time.perf_counter()
    c = table.layer_cost_s
    n = len(table.taus)
    distinct = [i for i in range(n) if not any(np.array_equal(c[:, i], c[:, j]) for j in range(i + 1, n))]
    results = [_solve_dp(CostTable(table.taus[i:i + 1], table.budgets, c[:, i:i + 1], table.other_s,
                                   table.generated_tokens), slots) for i in distinct]
    best = min(results, key=lambda r: (r.objective_s, -int(r.tau[0])))
    return MilpResult(best.tau, best.budget, best.objective_s, "optimal", True, time.perf_counter() - start,
                      best.objective_s)


def _solve_dp(table: CostTable, slots: int) -> MilpResult:
    """The per-layer program, exactly: a DP over (layer, slots used), vectorised over the slots.

    Ties are broken deterministically: the fewest slots in all, then, going back from the last
    layer, the smallest budget, and per (layer, budget) the largest of the cheapest taus.
    Dominated options (a smaller budget matches or beats them) are left out, as in the CBC
    program.
    """
    start = time.perf_counter()
    best, tau_idx = _cheapest_tau(table)
    layers = best.shape[0]
    cost = np.where(_undominated(best, table.budgets), best, np.inf)
    order = np.argsort(table.budgets, kind="stable")             # ties to the smaller budget
    weights = table.budgets[order].astype(np.int64)
    cap = min(slots, int(weights[-1]) * layers)                   # no plan can use more
    value = np.full(cap + 1, np.inf)
    value[0] = 0.0
    choice = np.full((layers, cap + 1), -1, dtype=np.int64)      # position in `order`, -1: unreachable
    for lay in range(layers):
        new = np.full(cap + 1, np.inf)
        for pos, (k, w) in enumerate(zip(order, weights, strict=True)):
            if w > cap or not np.isfinite(cost[lay, k]):
                continue
            candidate = value[:cap + 1 - w] + cost[lay, k]
            better = candidate < new[w:]
            new[w:][better] = candidate[better]
            choice[lay, w:][better] = pos
        value = new
    used = int(np.argmin(value))                                  # first minimum: the fewest slots
    picked = np.empty(layers, dtype=np.int64)
    for lay in range(layers - 1, -1, -1):
        k = int(order[choice[lay, used]])
        picked[lay] = k
        used -= int(table.budgets[k])
    tau = table.taus[tau_idx[np.arange(layers), picked]].astype(np.int64)
    budget = table.budgets[picked].astype(np.int64)
    objective = table.total_s(tau, budget)
    return MilpResult(tau, budget, objective, "optimal", True, time.perf_counter() - start, objective)


def _solve_cbc(table: CostTable, slots: int, time_limit_s: float | None = None) -> MilpResult:
    """The per-layer program (one tau and budget per layer) through CBC: the tests' cross-check of
    the DP (CBC may not close its gap on large tables, hence the limit)."""
    start = time.perf_counter()
    prob, pick = _per_layer_program(table, slots, relax=False)
    prob.solve(cbc(time_limit_s))
    wall = time.perf_counter() - start
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        status = "infeasible" if prob.sol_status == pulp.LpSolutionInfeasible else "not-solved"
        return MilpResult(np.zeros(0, np.int64), np.zeros(0, np.int64), float("nan"), status, False, wall,
                          _relaxation_bound(table, slots))
    tau, budget = pick()
    objective = table.total_s(tau, budget)
    optimal = prob.sol_status == pulp.LpSolutionOptimal
    bound = objective if optimal else _relaxation_bound(table, slots)
    return MilpResult(tau, budget, objective, "optimal" if optimal else "feasible", optimal, wall, bound)


def _cheapest_tau(table: CostTable) -> tuple[np.ndarray, np.ndarray]:
    """Per (layer, budget) the best cost over tau and the index of the last (largest) tau reaching
    it: taus of equal cost are, in practice, one schedule on the calibration prompts (every tau
    past their longest block), and the largest keeps refreshing only at block starts on prompts
    with longer blocks (tidesim.planner.select.best_tau_of)."""
    taus = table.layer_cost_s.shape[1]
    idx = taus - 1 - table.layer_cost_s[:, ::-1, :].argmin(axis=1)    # [L, K], last minimum
    best = np.take_along_axis(table.layer_cost_s, idx[:, None, :], axis=1)[:, 0, :]
    return best, idx


def cbc(time_limit_s: float | None = None) -> pulp.LpSolver:
    """CBC, the solver bundled with PuLP, on one thread so that results are deterministic."""
    bundled = Path(coin_api.pulp_cbc_path)
    path = str(bundled) if bundled.exists() else None
    return pulp.COIN_CMD(path=path, msg=False, timeLimit=time_limit_s, threads=1)


def _var(prob: pulp.LpProblem, name: str, relax: bool) -> pulp.LpVariable:
    return prob.add_variable(name, 0, 1, pulp.LpContinuous if relax else pulp.LpBinary)


def _undominated(cost: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """bool [..., K]: options no smaller budget matches or beats (only those can be optimal; the
    smallest budget always stays, so every choice row keeps an option)."""
    order = np.argsort(budgets, kind="stable")
    ordered = cost[..., order]
    before = np.minimum.accumulate(ordered, axis=-1)
    keep_ordered = np.ones(ordered.shape, dtype=bool)
    keep_ordered[..., 1:] = ordered[..., 1:] < before[..., :-1]
    keep = np.empty_like(keep_ordered)
    keep[..., order] = keep_ordered
    return keep


def _per_layer_program(table: CostTable, slots: int, relax: bool
                       ) -> tuple[pulp.LpProblem, Callable[[], tuple[np.ndarray, np.ndarray]]]:
    best, tau_idx = _cheapest_tau(table)
    layers, k = best.shape
    keep = _undominated(best, table.budgets)
    prob = pulp.LpProblem("per_layer_plan", pulp.LpMinimize)
    x = {(lay, j): _var(prob, f"x_{lay}_{j}", relax) for lay in range(layers) for j in range(k) if keep[lay, j]}
    prob += pulp.lpSum(float(best[lay, j]) * v for (lay, j), v in x.items())
    for lay in range(layers):
        prob += pulp.lpSum(v for (ly, _), v in x.items() if ly == lay) == 1, f"one_choice_{lay}"
    prob += pulp.lpSum(int(table.budgets[j]) * v for (_, j), v in x.items()) <= slots, "memory"

    def pick() -> tuple[np.ndarray, np.ndarray]:
        chosen = np.array([_argmax_value({j: v for (ly, j), v in x.items() if ly == lay}) for lay in range(layers)])
        taus = table.taus[tau_idx[np.arange(layers), chosen]]
        return taus.astype(np.int64), table.budgets[chosen].astype(np.int64)
    return prob, pick


def _argmax_value(variables: dict[int, pulp.LpVariable]) -> int:
    """The key of the variable set to 1 (the largest value, for safety against solver round-off)."""
    return max(variables, key=lambda key: (variables[key].value() or 0.0, -key))


def _relaxation_bound(table: CostTable, slots: int) -> float:
    """The LP relaxation's optimum: a lower bound on the program's optimum (for CBC stopped early)."""
    prob, _ = _per_layer_program(table, slots, relax=True)
    prob.solve(cbc())
    if prob.status != pulp.LpStatusOptimal:
        return float("nan")
    return float(table.other_s + pulp.value(prob.objective))
