"""planned: exactly tide with a plan's per-layer settings; refuses a plan for another model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from planner_cases import TINY, h100, tiny_workload

from tidesim.errors import InputError
from tidesim.models import PRESETS
from tidesim.plan import Fingerprints, Plan, SolverInfo, model_fingerprint
from tidesim.policies import PolicyOptions, build_schedule, policy_names, uniform
from tidesim.schedule import schedule_problems


def tiny_plan(tau: list[int], budget: list[int], model_sha: str | None = None) -> Plan:
    return Plan(
        model="tiny", hw="h100-sxm-pcie5", trace="tiny", mode="per-layer", gpu_mem_gib=2.0, expert_slots=48,
        tau=tau, budget=budget, objective_s=1.0, oracle_bound_s=None, gap=None,
        solver=SolverInfo("cbc", "optimal", True, 0.0, None, 1.0),
        fingerprints=Fingerprints("0" * 64, "1" * 64, model_sha or model_fingerprint(TINY)),
        taus=[1, 2, 3], budgets=[2, 5, 9],
    )


def test_registered_right_after_tide_reference() -> None:
    names = policy_names()
    assert names.index("planned") == names.index("tide-reference") + 1


def test_plan_decides_and_matches_tide_per_layer() -> None:
    w = tiny_workload()
    hw = h100()
    plan = tiny_plan([1, 3, 2], [2, 9, 5])
    # The options' own uniform settings are overridden by the plan.
    options = PolicyOptions(budget=uniform(4, 3), tau=uniform(7, 3), hw=hw, extra={"plan": plan})
    planned = build_schedule("planned", w, options)
    tide = build_schedule("tide", w, PolicyOptions(budget=np.array([2, 9, 5]), tau=np.array([1, 3, 2]), hw=hw))
    assert planned.policy == "planned" and schedule_problems(planned, w) == []
    for field in ("placement", "copy", "demote", "resident", "initial_resident", "budget"):
        assert np.array_equal(getattr(planned, field), getattr(tide, field)), field
    assert planned.params["tau"] == [1, 3, 2] and planned.params["budget"] == [2, 9, 5]
    assert planned.resident.sum(axis=2).max(axis=0).tolist() == [2, 9, 5]


def test_without_a_plan_uses_the_per_layer_options() -> None:
    w = tiny_workload()
    options = PolicyOptions(budget=np.array([1, 4, 16]), tau=np.array([2, 2, 5]), hw=h100())
    planned = build_schedule("planned", w, options)
    tide = build_schedule("tide", w, replace(options))
    assert np.array_equal(planned.placement, tide.placement) and np.array_equal(planned.copy, tide.copy)


def test_refuses_a_plan_for_another_model() -> None:
    w = tiny_workload()
    other = tiny_plan([1, 1, 1], [2, 2, 2], model_sha=model_fingerprint(PRESETS["llada2-mini"]))
    with pytest.raises(InputError, match="made for model"):
        build_schedule("planned", w, PolicyOptions(budget=uniform(2, 3), tau=uniform(1, 3), hw=h100(),
                                                   extra={"plan": other}))
    with pytest.raises(InputError, match="must be a tidesim.plan.Plan"):
        build_schedule("planned", w, PolicyOptions(budget=uniform(2, 3), tau=uniform(1, 3), hw=h100(),
                                                   extra={"plan": {"tau": [1, 1, 1]}}))
