"""planned: `tide` with the per-layer refresh intervals and GPU expert budgets of a plan.

The plan comes from `tidesim plan` (docs/planner.md). It is read from options.extra["plan"] (a
tidesim.plan.Plan), which then decides tau, budget and refresh mode and must have been made for the
workload's model; without one, the per-layer options.tau and options.budget are used as given
(the sweep passes a freshly solved plan that way). Either way the schedule is exactly tide's for
those per-layer settings, so the planner's predictions and the executors agree.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tidesim.errors import InputError
from tidesim.plan import Plan
from tidesim.policies.base import PolicyOptions, register_policy
from tidesim.policies.tide import tide
from tidesim.schedule import Schedule
from tidesim.workload import Workload


def plan_options(options: PolicyOptions, plan: Plan, workload: Workload) -> PolicyOptions:
    """The options with the plan's tau, budget and refresh mode, after checking it fits the model."""
    plan.check_model(workload.model)
    return replace(options, tau=plan.tau_array(), budget=plan.budget_array(), refresh=plan.refresh)


@register_policy("planned", "tide with a plan's per-layer intervals and budgets (`tidesim plan`, --plan)")
def planned(workload: Workload, options: PolicyOptions) -> Schedule:
    plan = options.extra.get("plan")
    if plan is not None:
        if not isinstance(plan, Plan):
            raise InputError("options.extra['plan'] must be a tidesim.plan.Plan (load it with load_plan)")
        options = plan_options(options, plan, workload)
        options.check(workload)
    schedule = tide(workload, options)
    schedule.policy = "planned"
    schedule.params = {**schedule.params, "per_layer": True,
                       "plan": None if plan is None else {"trace": plan.trace, "mode": plan.mode,
                                                          "objective_s": plan.objective_s},
                       "budget_total": int(np.asarray(options.budget).sum())}
    return schedule
