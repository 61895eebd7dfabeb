"""The slot plan (runtime/tidesim_runtime/engine/slots.py): which slot every resident, copied and
on-demand expert uses, and what each copy waits for."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from runtime_cases import manual_schedule, schedule_for, tiny_workload  # noqa: E402
from tidesim_runtime.engine.slots import AFTER_GROUPED, FREE, after_on_demand, plan_slots  # noqa: E402

from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_ON_DEMAND, COPY_SYNC_REFRESH, CPU, GPU, IDLE  # noqa: E402


def test_slot_plan_sync_refresh_reuses_the_freed_slot() -> None:
    # experts 0,1 resident in slots 0,1; forward 0 drops 1 (demoted) and refreshes 2 in; 1 runs on CPU
    s = manual_schedule(placement=[[GPU, CPU, GPU, IDLE]], copy=[[0, 0, COPY_SYNC_REFRESH, 0]],
                        resident=[[True, False, True, False]], initial=[True, True, False, False], budget=2,
                        demote=[[False, True, False, False]])
    plan = plan_slots(s)
    lp = plan.layers[0][0]
    assert plan.initial_slots == [{0: 0, 1: 1}]
    assert lp.demotes == [(1, 1)]
    assert [(op.expert, op.slot) for op in lp.sync] == [(2, 1)]
    assert lp.grouped == [(0, 0), (2, 1)]
    assert lp.cpu == [1]
    assert plan.pool_size == [2] and plan.spare == [0]


def test_slot_plan_on_demand_passes_through_when_budget_is_short() -> None:
    # budget 1, three experts copied on demand in one forward: slot 0 serves them one after another
    s = manual_schedule(placement=[[GPU, GPU, GPU]], copy=[[COPY_ON_DEMAND] * 3],
                        resident=[[False, False, True]], initial=[False, False, False], budget=1)
    lp = plan_slots(s).layers[0][0]
    assert [(op.expert, op.slot, op.wait) for op in lp.on_demand] == [(0, 0, FREE), (1, 0, after_on_demand(0)),
                                                                         (2, 0, after_on_demand(1))]


def test_slot_plan_async_copy_waits_for_the_leaving_experts_last_run() -> None:
    # expert 0 resident and used this forward, replaced asynchronously by expert 1
    s = manual_schedule(placement=[[GPU, CPU]], copy=[[0, COPY_ASYNC_REFRESH]], resident=[[False, True]],
                        initial=[True, False], budget=1)
    lp = plan_slots(s).layers[0][0]
    assert lp.grouped == [(0, 0)]
    assert [(op.expert, op.slot, op.wait) for op in lp.background] == [(1, 0, AFTER_GROUPED)]


def test_slot_plan_counts_spare_slots_beyond_the_budget() -> None:
    # two synchronous copies into a budget of 1 (an over-full schedule): one spare slot
    s = manual_schedule(placement=[[GPU, GPU]], copy=[[COPY_SYNC_REFRESH, COPY_SYNC_REFRESH]],
                        resident=[[True, False]], initial=[False, False], budget=1)
    plan = plan_slots(s)
    assert plan.pool_size == [2] and plan.spare == [1]


@pytest.mark.parametrize("policy,refresh", [("full-swap", "sync"), ("tide", "sync"), ("tide", "async"),
                                            ("fiddler", "sync"), ("cpu-routing", "sync")])
def test_slot_plan_keeps_residents_in_distinct_slots(policy: str, refresh: str) -> None:
    wl = tiny_workload()
    s = schedule_for(policy, wl, budget=4, refresh=refresh)
    plan = plan_slots(s)
    for f in range(wl.num_forwards):
        for layer in range(wl.num_layers):
            lp = plan.layers[f][layer]
            slots = [sl for _, sl in lp.grouped]
            assert len(slots) == len(set(slots))
            assert sorted([e for e, _ in lp.grouped] + [op.expert for op in lp.on_demand] + lp.cpu) == \
                np.flatnonzero(wl.expert_tokens[f, layer]).tolist()
