"""all-gpu: every expert resident, budget = all experts, feasibility from GPU memory."""

from __future__ import annotations

import numpy as np
from policy_cases import checked, hand_workload, options, workload

from tidesim.hardware import get_profile
from tidesim.models import get_model
from tidesim.schedule import CPU, GPU, IDLE


def test_hand_schedule() -> None:
    w = hand_workload()
    s = checked("all-gpu", w, options(w, 1))
    assert s.budget.tolist() == [4, 4]
    assert s.initial_resident.all() and s.resident.all()
    assert np.array_equal(s.placement, np.where(w.expert_tokens > 0, GPU, IDLE))
    assert not (s.placement == CPU).any() and not s.copy.any() and not s.demote.any()
    assert s.is_bound and s.feasible


def test_feasibility_follows_gpu_memory() -> None:
    h100 = get_profile("h100-sxm-pcie5")
    for name, fits in (("llada2-mini", True), ("llada2-flash", False)):
        spec = get_model(name)
        w = workload(np.ones((2, spec.num_moe_layers, spec.num_experts), dtype=np.int32), model=spec)
        s = checked("all-gpu", w, options(w, 8, hw=h100))
        assert s.feasible is fits, name
        assert s.is_bound
    # mini's 30.6 GB of experts do not fit a 24 GB card
    spec = get_model("llada2-mini")
    w = workload(np.ones((1, spec.num_moe_layers, spec.num_experts), dtype=np.int32), model=spec)
    assert not checked("all-gpu", w, options(w, 8, hw=h100.scaled(gpu_memory_gib=24))).feasible
