"""The planner: per-layer refresh intervals and GPU expert budgets under one memory budget.

docs/planner.md has the formulation. In short: a cost table C[l, tau, B] (predicted seconds of MoE
layer l when `tide` runs it with interval tau and budget B) is computed once from the analytic cost
model, then a multiple-choice knapsack picks one (tau, B) per layer under the memory row, solved
exactly by CBC through PuLP. A Lagrangian lower bound over all refresh schedules with the chosen
budgets says how far the plan can be from any policy of that kind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pulp
from pulp.apis import coin_api

from tidesim.budget import expert_memory_bytes
from tidesim.errors import InputError
from tidesim.models import ModelSpec

# ----- cost table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostTable:
    """Predicted seconds per MoE layer for every candidate (tau, budget), over one workload.

    layer_cost_s[l, i, k]: layer l with interval taus[i] and budget budgets[k].
    other_s: time outside the MoE layers, the same for every plan.
    """

    taus: np.ndarray
    budgets: np.ndarray
    layer_cost_s: np.ndarray
    other_s: float
    generated_tokens: int

    def __post_init__(self) -> None:
        shape = (self.layer_cost_s.shape[0], len(self.taus), len(self.budgets))
        if self.layer_cost_s.ndim != 3 or self.layer_cost_s.shape != shape:
            raise ValueError(f"layer_cost_s must be [L, {len(self.taus)}, {len(self.budgets)}]")

    @property
    def num_layers(self) -> int:
        return int(self.layer_cost_s.shape[0])

    def total_s(self, tau: np.ndarray, budget: np.ndarray) -> float:
        """Predicted total time of a per-layer choice (values must be candidates)."""
        ti = _index_of(self.taus, tau, "tau")
        bi = _index_of(self.budgets, budget, "budget")
        layers = np.arange(self.num_layers)
        return float(self.other_s + self.layer_cost_s[layers, ti, bi].sum())

    def uniform_total_s(self) -> np.ndarray:
        """[T, K]: total time of every single-tau, uniform-budget setting."""
        return self.other_s + self.layer_cost_s.sum(axis=0)


def _index_of(values: np.ndarray, wanted: np.ndarray, name: str) -> np.ndarray:
    pos = {int(v): i for i, v in enumerate(values)}
    try:
        return np.array([pos[int(w)] for w in np.asarray(wanted).ravel()], dtype=np.int64)
    except KeyError as exc:
        raise InputError(f"{name} {exc.args[0]} is not among the candidates") from None


# ----- memory -------------------------------------------------------------------------------------


def expert_slots(model: ModelSpec, gpu_mem_gib: float) -> int:
    """Expert slots (over all MoE layers) the memory budget holds next to the non-expert weights
    and the reserve; InputError when not even one expert per layer fits."""
    if not gpu_mem_gib > 0:
        raise InputError(f"GPU memory must be positive, got {gpu_mem_gib} GiB")
    free = expert_memory_bytes(model, gpu_mem_gib)
    slots = int(free // model.expert_bytes) if free > 0 else 0
    if slots < model.num_moe_layers:
        need = (model.non_expert_bytes + model.expert_bytes * model.num_moe_layers) / 2**30
        raise InputError(
            f"{gpu_mem_gib:g} GiB of GPU memory does not hold {model.name}'s non-expert weights plus one expert "
            f"per MoE layer and the reserve (needs {need:.2f} GiB plus the reserve of max(1.5 GB, 10%)); "
            "give more memory with --gpu-mem-gib"
        )
    return slots


def uniform_budget(slots: int, layers: int, experts: int) -> int:
    """The budget every layer gets when the slots are shared evenly (what the public code uses)."""
    return min(slots // layers, experts)


def default_budgets(slots: int, layers: int, experts: int) -> list[int]:
    """Candidate budgets: a grid around the uniform budget u from u/4 to 2u (within 1..experts),
    always containing u itself, so the uniform single-tau setting is a feasible point."""
    u = uniform_budget(slots, layers, experts)
    factors = (0.25, 0.5, 0.625, 0.75, 0.875, 1.0, 1.125, 1.25, 1.5, 1.75, 2.0)
    values = {min(max(round(u * f), 1), experts) for f in factors} | {u}
    return sorted(values)


def parse_int_list(text: str, name: str) -> list[int]:
    """'1..32', '1,2,4,8' or '8..64:8' (start..stop:step) -> sorted unique positive integers."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if ".." in part:
                rng, _, step = part.partition(":")
                lo, hi = (int(v) for v in rng.split(".."))
                out.update(range(lo, hi + 1, int(step) if step else 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise InputError(f"{name} must be integers like 1..32, 4,8,16 or 8..96:8, got {text!r}") from None
    if not out or min(out) < 1:
        raise InputError(f"{name} must be positive integers, got {text!r}")
    return sorted(out)


# ----- the multiple-choice knapsack ---------------------------------------------------------------


@dataclass
class MilpResult:
    """One solve: the choice per layer, its predicted total and what CBC said."""

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
    """Choose one (tau, budget) per layer minimising the predicted total under the slot limit."""
    _check_capacity(table, slots)
    start = time.perf_counter()
    if global_tau:
        prob, pick = _global_tau_program(table, slots, relax=False)
    else:
        prob, pick = _per_layer_program(table, slots, relax=False)
    prob.solve(cbc(time_limit_s))
    wall = time.perf_counter() - start
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        status = "infeasible" if prob.sol_status == pulp.LpSolutionInfeasible else "not-solved"
        return MilpResult(np.zeros(0, np.int64), np.zeros(0, np.int64), float("nan"), status, False, wall,
                          _relaxation_bound(table, slots, global_tau))
    tau, budget = pick()
    objective = table.total_s(tau, budget)
    optimal = prob.sol_status == pulp.LpSolutionOptimal
    bound = objective if optimal else _relaxation_bound(table, slots, global_tau)
    return MilpResult(tau, budget, objective, "optimal" if optimal else "feasible", optimal, wall, bound)


def _cheapest_tau(table: CostTable) -> tuple[np.ndarray, np.ndarray]:
    """Per (layer, budget) the best cost over tau and the index of the first tau reaching it."""
    idx = table.layer_cost_s.argmin(axis=1)                      # [L, K], first minimum
    best = np.take_along_axis(table.layer_cost_s, idx[:, None, :], axis=1)[:, 0, :]
    return best, idx


def cbc(time_limit_s: float | None = None) -> pulp.LpSolver:
    """CBC, the solver bundled with PuLP, on one thread so that results are deterministic."""
    bundled = Path(coin_api.pulp_cbc_path)
    path = str(bundled) if bundled.exists() else None
    return pulp.COIN_CMD(path=path, msg=False, timeLimit=time_limit_s, threads=1)


def _var(prob: pulp.LpProblem, name: str, relax: bool) -> pulp.LpVariable:
    return prob.add_variable(name, 0, 1, pulp.LpContinuous if relax else pulp.LpBinary)


def _per_layer_program(table: CostTable, slots: int, relax: bool
                       ) -> tuple[pulp.LpProblem, Callable[[], tuple[np.ndarray, np.ndarray]]]:
    best, tau_idx = _cheapest_tau(table)
    layers, k = best.shape
    prob = pulp.LpProblem("per_layer_plan", pulp.LpMinimize)
    x = [[_var(prob, f"x_{lay}_{j}", relax) for j in range(k)] for lay in range(layers)]
    prob += pulp.lpSum(float(best[lay, j]) * x[lay][j] for lay in range(layers) for j in range(k))
    for lay in range(layers):
        prob += pulp.lpSum(x[lay]) == 1, f"one_choice_{lay}"
    prob += pulp.lpSum(int(table.budgets[j]) * x[lay][j] for lay in range(layers) for j in range(k)) <= slots, \
        "memory"

    def pick() -> tuple[np.ndarray, np.ndarray]:
        chosen = np.array([_argmax_value(x[lay]) for lay in range(layers)])
        taus = table.taus[tau_idx[np.arange(layers), chosen]]
        return taus.astype(np.int64), table.budgets[chosen].astype(np.int64)
    return prob, pick


def _global_tau_program(table: CostTable, slots: int, relax: bool
                        ) -> tuple[pulp.LpProblem, Callable[[], tuple[np.ndarray, np.ndarray]]]:
    c = table.layer_cost_s
    layers, t_count, k = c.shape
    prob = pulp.LpProblem("global_tau_plan", pulp.LpMinimize)
    y = [_var(prob, f"y_{i}", relax) for i in range(t_count)]
    x = [[[_var(prob, f"x_{lay}_{i}_{j}", relax) for j in range(k)] for i in range(t_count)] for lay in range(layers)]
    prob += pulp.lpSum(float(c[lay, i, j]) * x[lay][i][j]
                       for lay in range(layers) for i in range(t_count) for j in range(k))
    prob += pulp.lpSum(y) == 1, "one_tau"
    for lay in range(layers):
        for i in range(t_count):
            prob += pulp.lpSum(x[lay][i]) == y[i], f"link_{lay}_{i}"
    prob += pulp.lpSum(int(table.budgets[j]) * x[lay][i][j]
                       for lay in range(layers) for i in range(t_count) for j in range(k)) <= slots, "memory"

    def pick() -> tuple[np.ndarray, np.ndarray]:
        i = _argmax_value(y)
        chosen = np.array([_argmax_value(x[lay][i]) for lay in range(layers)])
        return np.full(layers, int(table.taus[i]), np.int64), table.budgets[chosen].astype(np.int64)
    return prob, pick


def _argmax_value(variables: list[pulp.LpVariable]) -> int:
    values = [v.value() or 0.0 for v in variables]
    return int(np.argmax(values))


def _relaxation_bound(table: CostTable, slots: int, global_tau: bool) -> float:
    """The LP relaxation's optimum: a lower bound on the MILP optimum when CBC stopped early."""
    build = _global_tau_program if global_tau else _per_layer_program
    prob, _ = build(table, slots, relax=True)
    prob.solve(cbc())
    if prob.status != pulp.LpStatusOptimal:
        return float("nan")
    return float(table.other_s + pulp.value(prob.objective))
