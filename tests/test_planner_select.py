"""The choice of the kept plan (tidesim.planner.select and make_plan): never slower than the best
single tau on the prompts it is evaluated on, by the executor it is evaluated with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from planner_cases import gib_for_slots, h100, tiny_workload, write_tiny_trace

from tidesim.planner import make_plan, plan_policies, uniform_budget
from tidesim.planner.select import INTERVALS, OPTIMUM, SINGLE, Candidate, best_tau_of, choose, plan_candidates
from tidesim.policies import PolicyOptions, build_schedule, uniform
from tidesim.policies.registry import plan_runner
from tidesim.run import run

TAUS = list(range(1, 9))
BUDGETS = [2, 4, 8, 12, 16]


def _plan(name: str, kind: int, tau: list[int], budget: list[int]) -> Candidate:
    return Candidate(name, kind, np.array(tau), np.array(budget))


def test_best_tau_of_breaks_ties_to_the_largest() -> None:
    assert best_tau_of({1: 3.0, 2: 2.0, 3: 2.5}) == 2
    assert best_tau_of({1: 3.0, 12: 2.0, 13: 2.0, 32: 2.0}) == 32


def test_candidates_leave_out_a_plan_that_is_a_single_tau() -> None:
    optimum = _plan("optimum", OPTIMUM, [2, 1], [4, 8])
    intervals = _plan("intervals", INTERVALS, [3, 3], [6, 6])      # = tau 3 with the uniform budget 6
    out = plan_candidates(optimum, intervals, [1, 3, 2], 6, 2)
    assert [c.name for c in out] == ["tau 1", "tau 2", "tau 3", "optimum"]
    assert all(c.budget.tolist() == [6, 6] for c in out if c.kind == SINGLE)


def test_choose_keeps_the_fastest_ties_to_the_simpler_then_larger_tau() -> None:
    cands = plan_candidates(_plan("optimum", OPTIMUM, [2, 1], [4, 8]), _plan("intervals", INTERVALS, [2, 1], [6, 6]),
                            [1, 2, 3], 6, 2)
    names = [c.name for c in cands]
    assert names == ["tau 1", "tau 2", "tau 3", "optimum", "intervals"]

    def kept(*times: float) -> str:
        chosen, record = choose(cands, list(times), [4, 5], "sim")
        assert record.chosen == chosen.name and record.prompts == [4, 5] and record.engine == "sim"
        assert [c.time_s for c in record.candidates] == list(times)
        return chosen.name
    assert kept(5.0, 4.0, 4.0, 4.5, 4.2) == "tau 3"          # equal singles: the larger tau
    assert kept(5.0, 4.0, 4.0, 4.0, 4.0) == "tau 3"          # a plan as fast as a single tau: the single
    assert kept(5.0, 4.0, 4.0, 4.0, 3.9) == "intervals"
    assert kept(5.0, 4.0, 4.0, 3.9, 3.9) == "intervals"      # equal plans: the simpler one
    assert kept(5.0, 4.0, 4.0, 3.8, 3.9) == "optimum"


def _policy_s(policy: str, prompts: list[int], tau: np.ndarray, budget: np.ndarray, engine: str, seed: int) -> float:
    """The policy with these per-layer settings, run independently of the planner."""
    w = tiny_workload(seed).select_prompts(prompts)
    options = PolicyOptions(budget=budget, tau=tau, hw=h100())
    return run(w, build_schedule(policy, w, options), h100(), engine=engine).total_time_s


CASES = [
    (3, 12, None, "analytic"),        # tide: the knapsack optimum (fit on prompt 0) loses on prompts 1, 2
    (8, 36, None, "analytic"),
    (3, 24, [0, 1], "sim"),
    (5, 12, [2], "sim"),
]


# every case for tide; two for the others (their tables run the policy itself, seconds per plan)
PLANS = [(policy, *case) for policy in plan_policies() for case in (CASES if policy == "tide" else CASES[::3])]


@pytest.mark.parametrize("policy, seed, slots, calibrate, engine", PLANS)
def test_kept_plan_is_never_slower_than_a_single_tau_where_evaluated(tmp_path: Path, policy: str, seed: int,
                                                                      slots: int, calibrate: list[int] | None,
                                                                      engine: str) -> None:
    path = write_tiny_trace(tmp_path, seed)
    outcome = make_plan(path, "tiny", h100(), gib_for_slots(slots), taus=TAUS, budgets=BUDGETS,
                        calibrate_prompts=calibrate, engine=engine, policy=policy)
    plan = outcome.plan
    assert plan.policy == policy and plan.heldout is not None and plan.selection is not None
    held = plan.heldout.prompts
    assert plan.selection.prompts == held and held == [p for p in (0, 1, 2) if p not in (calibrate or [0])]
    layers = tiny_workload(seed).num_layers
    u = uniform_budget(slots, layers, 16)
    singles = {t: _policy_s(policy, held, uniform(t, layers), uniform(u, layers), engine, seed) for t in TAUS}
    kept_s = _policy_s(policy, held, plan.tau_array(), plan.budget_array(), engine, seed)
    assert kept_s == pytest.approx(plan.heldout.plan_time_s, rel=1e-12)
    assert kept_s <= min(singles.values()) * (1 + 1e-12)
    assert plan.heldout.best_single_tau_time_s == pytest.approx(min(singles.values()), rel=1e-12)
    assert plan.heldout.best_single_tau == max(t for t, v in singles.items() if v == min(singles.values()))
    # every candidate's recorded time is its independent run, and the kept one is the fastest
    times = {c.name: c.time_s for c in plan.selection.candidates}
    for t in TAUS:
        assert times[f"tau {t}"] == pytest.approx(singles[t], rel=1e-12)
    assert times[plan.selection.chosen] == min(times.values())
    # the plan file, run the way `simulate --plan` runs it (its runner, the plan in the options),
    # takes the time the planner recorded: the planner evaluated what the executors execute
    w = tiny_workload(seed).select_prompts(held)
    options = PolicyOptions(budget=uniform(1, layers), tau=uniform(1, layers), hw=h100(), extra={"plan": plan})
    ran = run(w, build_schedule(plan_runner(policy), w, options), h100(), engine=engine).total_time_s
    assert ran == pytest.approx(plan.heldout.plan_time_s, rel=1e-12)


def test_the_optimum_that_loses_held_out_is_replaced_and_noted(tmp_path: Path) -> None:
    # seed 3, 12 slots: the knapsack optimum fit on prompt 0 is 0.04% slower than tau 7 on prompts
    # 1 and 2 (analytic), so the plan keeps tau 7 with the uniform budget 4 and says why.
    path = write_tiny_trace(tmp_path, 3)
    plan = make_plan(path, "tiny", h100(), gib_for_slots(12), taus=TAUS, budgets=BUDGETS).plan
    assert plan.selection is not None
    times = {c.name: c.time_s for c in plan.selection.candidates}
    assert times["optimum"] > min(v for k, v in times.items() if k.startswith("tau "))
    assert plan.selection.chosen == "tau 7" and plan.tau == [7, 7, 7] and plan.budget == [4, 4, 4]
    assert plan.notes == ["kept tau 7 with the uniform budget 4: faster than the knapsack optimum on the "
                          "evaluation prompts 1,2 (analytic)"]
    # the optimum itself is still the solver's: its objective on the calibration prompts is below the kept plan's
    assert plan.solver.milp_bound_s < plan.objective_s


def test_without_held_out_prompts_the_choice_is_on_the_calibration_prompts(tmp_path: Path) -> None:
    path = write_tiny_trace(tmp_path, 3)
    plan = make_plan(path, "tiny", h100(), gib_for_slots(24), taus=TAUS, budgets=BUDGETS,
                     calibrate_prompts=[0, 1, 2]).plan
    assert plan.heldout is None and plan.calibration is not None and plan.selection is not None
    assert plan.selection.prompts == [0, 1, 2]
    # the analytic optimum on these same prompts is at least as fast as every single tau: it is kept
    assert plan.selection.chosen == "optimum" and plan.calibration.speedup >= 1.0
