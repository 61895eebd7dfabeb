"""tidesim.scenario: one resolve for every command, a Scenario equal and hashed by content, the
default-budget and default-tau rules applied with their reasons, warnings returned (not printed)."""

from __future__ import annotations

import dataclasses

import pytest

from tidesim.budget import TIDE_MAX_EXPERTS_PER_LAYER, budget_for_memory, default_budget
from tidesim.errors import InputError
from tidesim.hardware import get_profile
from tidesim.models import PRESETS
from tidesim.scenario import prompt_ids, resolve

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
