"""cpu-routing: a static popular set on the GPU, everything else on the CPU, no copies."""

from __future__ import annotations

import numpy as np
from policy_cases import checked, hand_workload, options

from tidesim.schedule import CPU, GPU, IDLE


def test_hand_schedule_from_warmup() -> None:
    w = hand_workload()
    s = checked("cpu-routing", w, options(w, 2, warmup_fraction=0.5))
    # warm-up = forwards 0-1; totals layer 0 [3, 4, 3, 2] -> {1, 0 (tie with 2, lower id)};
    # layer 1 [1, 1, 1, 7] -> {3, 0}
    static = np.array([[True, True, False, False], [True, False, False, True]])
    assert s.initial_resident.tolist() == static.tolist()
    assert all(s.resident[f].tolist() == static.tolist() for f in range(4))
    expected = np.where(w.expert_tokens > 0, np.where(static[None], GPU, CPU), IDLE)
    assert np.array_equal(s.placement, expected)
    assert s.placement[0].tolist() == [[GPU, IDLE, CPU, CPU], [IDLE, IDLE, IDLE, GPU]]
    assert not s.copy.any() and not s.demote.any()
    assert s.params["warmup_forwards"] == 2


def test_given_static_set_and_full_warmup() -> None:
    w = hand_workload()
    given = np.array([[False, False, True, True], [False, True, False, False]])
    s = checked("cpu-routing", w, options(w, 2, static_resident=given))
    assert s.initial_resident.tolist() == given.tolist()
    assert s.placement[3].tolist() == [[IDLE, IDLE, GPU, GPU], [IDLE, GPU, IDLE, IDLE]]
    # whole trace as warm-up: layer 0 totals [5, 6, 6, 5] -> {1, 2}
    s = checked("cpu-routing", w, options(w, 2, warmup_fraction=1.0))
    assert s.initial_resident[0].tolist() == [False, True, True, False]


def test_budget_zero_runs_everything_on_cpu() -> None:
    w = hand_workload()
    s = checked("cpu-routing", w, options(w, 0))
    assert not s.resident.any()
    assert np.array_equal(s.placement, np.where(w.expert_tokens > 0, CPU, IDLE))
