import pytest

from tidesim.budget import budget_for_memory, reserve_bytes
from tidesim.errors import InputError
from tidesim.models import PRESETS


def test_flash_on_80gb_card_hand_computed():
    flash = PRESETS["llada2-flash"]
    total = 80e9
    free = total - flash.non_expert_bytes - max(1.5e9, 8e9)
    expected = int(free // (flash.expert_bytes * 31))
    assert budget_for_memory(flash, total / 2**30, 96) == expected
    assert 60 < expected < 96


def test_cap_and_reserve():
    assert reserve_bytes(10e9) == 1.5e9 and reserve_bytes(141e9) == pytest.approx(14.1e9)
    assert budget_for_memory(PRESETS["llada2-mini"], 141e9 / 2**30, 128) == 128
    assert budget_for_memory(PRESETS["llada2-mini"], 1000, None) == 256


def test_infeasible_memory_is_an_input_error():
    with pytest.raises(InputError, match="does not hold"):
        budget_for_memory(PRESETS["llada2-flash"], 4.0)
    with pytest.raises(InputError, match="positive"):
        budget_for_memory(PRESETS["llada2-flash"], 0)


def test_memory_for_budget_inverts_budget_for_memory():
    from tidesim.budget import memory_for_budget
    from tidesim.planner.candidates import expert_slots

    for name, per_layer in (("llada2-mini", 128), ("llada2-flash", 84), ("llada2-flash", 40)):
        spec = PRESETS[name]
        gib = memory_for_budget(spec, per_layer)
        assert budget_for_memory(spec, gib) == per_layer
        # exactly that many slots for the planner: the plan gets the memory tide's budget occupies
        assert expert_slots(spec, gib) == per_layer * spec.num_moe_layers
        assert budget_for_memory(spec, gib * 0.999) == per_layer - 1 or per_layer == 1
