"""planned: `tide` with the per-layer refresh intervals and GPU expert budgets of a plan.

The plan comes from `tidesim plan` (docs/planner.md). It is read from options.extra["plan"] (a
tidesim.plan.Plan), which then decides tau, budget and refresh mode and must have been made for the
workload's model; without one, the per-layer options.tau and options.budget are used as given
(the sweep passes a freshly solved plan that way). Either way the schedule is exactly tide's for
those per-layer settings, so the planner's predictions and the executors agree.
"""

from __future__ import annotations

from dataclasses import replace

from tidesim.errors import InputError
from tidesim.models import ModelSpec
from tidesim.plan import Plan
from tidesim.policies.options import PolicyOptions
from tidesim.policies.registry import PolicyTraits, register_policy
from tidesim.policies.step import Setup
from tidesim.policies.tide import Tide


def plan_options(options: PolicyOptions, plan: Plan, model: ModelSpec, layers: int) -> PolicyOptions:
    """The options with the plan's tau, budget and refresh mode for the first `layers` MoE layers,
    after checking the plan was made for this model."""
    plan.check_model(model)
    return replace(options, tau=plan.tau_array()[:layers], budget=plan.budget_array()[:layers],
                   refresh=plan.refresh)


def planned_setup(setup: Setup) -> tuple[Setup, Plan | None]:
    """The setup with options.extra["plan"]'s per-layer settings applied, and that plan (None: the
    options' own tau and budget stand)."""
    plan = setup.options.extra.get("plan")
    if plan is None:
        return setup, None
    if not isinstance(plan, Plan):
        raise InputError("options.extra['plan'] must be a tidesim.plan.Plan (load it with load_plan)")
    options = plan_options(setup.options, plan, setup.model, setup.layers)
    options.check_shape(setup.layers, setup.experts)
    return replace(setup, options=options), plan


@register_policy("planned", "tide with a plan's per-layer intervals and budgets (`tidesim plan`, --plan)",
                 PolicyTraits(role="policy", order=70, needs_cpu=True, needs_plan=True, speedup_figure=True))
class Planned(Tide):
    def __init__(self, setup: Setup) -> None:
        setup, self.plan = planned_setup(setup)
        super().__init__(setup)

    def params(self) -> dict[str, object]:
        plan = self.plan
        return {**super().params(), "per_layer": True,
                "plan": None if plan is None else {"trace": plan.trace, "mode": plan.mode,
                                                   "objective_s": plan.objective_s},
                "budget_total": int(self.budget.sum())}
