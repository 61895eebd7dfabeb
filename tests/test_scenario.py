"""tidesim.scenario: one resolve for every command, a Scenario equal and hashed by content, the
default-budget and default-tau rules applied with their reasons, warnings returned (not printed)."""

from __future__ import annotations

import dataclasses

import pytest

from tidesim.budget import TIDE_MAX_EXPERTS_PER_LAYER, budget_for_memory, default_budget
from tidesim.errors import InputError
from tidesim.hardware import get_profile
from tidesim.models import PRESETS
from tidesim.scenario import prompt_ids, resolve, resolve_plan

TRACE = "llada2-mini-4layer_captured_prefix_g256"
HW = "h100-sxm-pcie5"


def test_same_inputs_give_equal_scenarios_and_one_cache_entry() -> None:
    a = resolve(TRACE, HW, ["full-swap"], budget=64)
    b = resolve(TRACE, get_profile(HW), ["full-swap"], budget=64)
    assert a is not b and a.workload is not b.workload
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert resolve(TRACE, HW, ["full-swap"], budget=63) != a


def test_the_key_sees_every_profile_field() -> None:
    """A profile that differs in any field (here the PCIe bandwidth) is another scenario, whatever its name."""
    hw = get_profile(HW)
    faster = dataclasses.replace(hw, pcie=dataclasses.replace(hw.pcie, h2d_gbs=hw.pcie.h2d_gbs * 2))
    assert faster.name == hw.name
    assert resolve(TRACE, faster, ["full-swap"], budget=64) != resolve(TRACE, hw, ["full-swap"], budget=64)


def test_workload_digest_is_content() -> None:
    a = resolve(TRACE, HW, ["full-swap"], budget=64).workload
    assert a.digest == dataclasses.replace(a, tokens=a.tokens.copy()).digest
    changed = a.expert_tokens.copy()
    changed[0, 0, 0] += 1
    assert a.digest != dataclasses.replace(a, expert_tokens=changed).digest


def test_default_budget_and_tau_rules() -> None:
    s = resolve(TRACE, HW, ["full-swap"], gpu_mem_gib=3.0)
    model = s.workload.model
    assert model.name not in TIDE_MAX_EXPERTS_PER_LAYER
    assert s.budget == budget_for_memory(model, 3.0) and s.budget_source == "--gpu-mem-gib (3 GiB)"
    assert s.tau_choice is None and s.tau == 1        # full-swap does not use tau: no search
    tide = resolve(TRACE, HW, ["tide"], budget=64, tau=4)
    assert tide.tau == 4 and tide.tau_choice is not None and tide.tau_choice.source == "--tau"
    capped = default_budget(PRESETS["llada2-mini"], 80.0, "h100")
    assert capped.slots == 128 and capped.reason == "h100 (80 GiB, capped at 128 as in the TIDE scripts)"


def test_bad_inputs_are_one_line() -> None:
    with pytest.raises(InputError, match="--tau must be at least 1"):
        resolve(TRACE, HW, ["tide"], budget=64, tau=0)
    with pytest.raises(InputError, match="--budget must lie in 0..256"):
        resolve(TRACE, HW, ["tide"], budget=257)
    with pytest.raises(InputError, match="--prompts is empty"):
        prompt_ids(" , ", [0, 1])
    with pytest.raises(InputError, match="prompt 5 is not in the trace"):
        prompt_ids("0,5", [0, 1])


def test_resolve_plan_applies_the_same_rules_as_resolve(tmp_path) -> None:
    """tidesim plan's inputs: the slots the memory holds (the tiny model: 3 MoE layers x 16 experts,
    24 slots at gib_for_slots(24)), the first half of 3 prompts (one) for calibration, the planner's
    default grids, and the checks every command uses, with the flag named."""
    from planner_cases import gib_for_slots, write_tiny_trace

    path = write_tiny_trace(tmp_path)
    inputs = resolve_plan(str(path), HW, gib_for_slots(24), "tide")
    assert inputs.slots == 24 and inputs.calibration == [0] and inputs.heldout == [1, 2]
    assert inputs.taus == list(range(1, 33)) and 8 in inputs.budgets          # 24 slots / 3 layers: uniform 8
    assert inputs.workload.digest == resolve(str(path), HW, ["full-swap"], budget=4).workload.digest
    assert resolve_plan(str(path), HW, gib_for_slots(24), "tide", calibrate_prompts=[0, 2]).heldout == [1]
    with pytest.raises(InputError, match="--calibrate-prompts: prompt 7 is not in the trace"):
        resolve_plan(str(path), HW, gib_for_slots(24), "tide", calibrate_prompts=[7])
    with pytest.raises(InputError, match="--taus must be at least 1, got 0"):
        resolve_plan(str(path), HW, gib_for_slots(24), "tide", taus=[0, 2])
    with pytest.raises(InputError, match="--budgets must lie in 0..16 experts per layer for tiny"):
        resolve_plan(str(path), HW, gib_for_slots(24), "tide", budgets=[4, 17])


def test_one_budget_range_and_memory_rule() -> None:
    """--budget in resolve and a policy's per-layer budget share budget.check_budget; the uniform
    budget is the planner's slots shared evenly, capped (budget.expert_slots is the one memory rule)."""
    from tidesim.budget import expert_slots, live_budget

    mini = PRESETS["llada2-mini"]
    for gib in (24.0, 40.0, 80.0):
        assert budget_for_memory(mini, gib) == min(expert_slots(mini, gib) // mini.num_moe_layers, mini.num_experts)
    assert live_budget(256) == 128 and live_budget(5) == 2
    with pytest.raises(InputError, match="--budget must lie in 0..256 experts per layer for llada2-mini-4layer"):
        resolve(TRACE, HW, ["full-swap"], budget=257)
