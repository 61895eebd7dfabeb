"""fiddler: static set of budget - 1, one streaming slot, CPU or copy by the cheaper cost."""

from __future__ import annotations

import numpy as np
from policy_cases import checked, hand_workload, options, profile

from tidesim.schedule import COPY_ON_DEMAND, CPU, GPU, IDLE


def test_hand_schedule() -> None:
    w = hand_workload()
    # one CPU worker: GPU expert 10 us, copy 20 us, CPU 10 us per token: copy iff 30 < 10 t, i.e. t >= 4
    s = checked("fiddler", w, options(w, 2, warmup_fraction=0.5, hw=profile(10.0, 10.0, 20.0, cpu_workers=1)))
    static = np.array([[False, True, False, False], [False, False, False, True]])   # top-1 of warm-up
    assert s.initial_resident.tolist() == static.tolist()
    assert all(s.resident[f].tolist() == static.tolist() for f in range(4))
    assert s.placement.tolist() == [
        [[CPU, IDLE, CPU, CPU], [IDLE, IDLE, IDLE, GPU]],     # layer 0 expert 0: 3 tokens, a tie: CPU
        [[IDLE, GPU, CPU, CPU], [CPU, CPU, CPU, GPU]],
        [[CPU, GPU, IDLE, IDLE], [GPU, IDLE, IDLE, GPU]],     # layer 1 expert 0: 5 tokens, streamed
        [[IDLE, IDLE, CPU, CPU], [IDLE, CPU, IDLE, IDLE]],
    ]
    expected_copy = np.zeros(s.shape, dtype=np.int8)
    expected_copy[2, 1, 0] = COPY_ON_DEMAND
    assert np.array_equal(s.copy, expected_copy)
    assert s.params["static_experts"] == [1, 1]


def test_cpu_latency_uses_the_whole_cpu() -> None:
    # 8 workers: one expert on the whole CPU takes 10 t / 8 us, so copy iff 30 < 1.25 t: never here
    w = hand_workload()
    s = checked("fiddler", w, options(w, 2, warmup_fraction=0.5, hw=profile(10.0, 10.0, 20.0, cpu_workers=8)))
    assert not s.copy.any()
    # ... and with a 2 us copy + 10 us GPU run: copy iff 12 < 1.25 t, i.e. t >= 10 (max count here is 5)
    assert not checked("fiddler", w, options(w, 2, hw=profile(10.0, 10.0, 2.0, cpu_workers=8))).copy.any()
    assert checked("fiddler", w, options(w, 2, hw=profile(10.0, 10.0, 2.0, cpu_workers=2))).copy.any()


def test_cost_rule_extremes() -> None:
    w = hand_workload()
    slow_link = checked("fiddler", w, options(w, 2, hw=profile(10.0, 10.0, 1e6)))
    assert not slow_link.copy.any()
    slow_cpu = checked("fiddler", w, options(w, 2, hw=profile(10.0, 1000.0, 20.0)))
    assert np.array_equal(slow_cpu.placement, np.where(w.expert_tokens > 0, GPU, IDLE))
    assert (slow_cpu.copy > 0).sum() == ((w.expert_tokens > 0) & ~slow_cpu.initial_resident[None]).sum()


def test_full_budget_and_no_slot() -> None:
    w = hand_workload()
    full = checked("fiddler", w, options(w, 4, hw=profile(10.0, 1000.0, 20.0)))
    assert full.initial_resident.all() and not full.copy.any()
    # a given static set that fills the budget leaves no streaming slot: misses go to the CPU
    given = np.array([[True, True, False, False], [True, True, False, False]])
    s = checked("fiddler", w, options(w, 2, static_resident=given, hw=profile(10.0, 1000.0, 20.0)))
    assert not s.copy.any()
    assert s.placement[0, 0].tolist() == [GPU, IDLE, CPU, CPU]
    zero = checked("fiddler", w, options(w, 0, hw=profile(10.0, 1000.0, 20.0)))
    assert np.array_equal(zero.placement, np.where(w.expert_tokens > 0, CPU, IDLE))
