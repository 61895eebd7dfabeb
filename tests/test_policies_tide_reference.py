"""tide-reference: the public TIDE code's moves (experts 0..B-1 at start, demotions capped)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from policy_cases import checked, hand_workload, mask, options, residency, workload, workloads

from tidesim.schedule import COPY_SYNC_REFRESH, CPU, GPU, IDLE


def test_hand_schedule() -> None:
    w = hand_workload()
    s = checked("tide-reference", w, options(w, 2, tau=2, refresh="async"))   # refresh mode is ignored
    assert s.initial_resident.tolist() == [[True, True, False, False]] * 2
    # Layer 0: f0 target {0, 2}: promote 2, demote 1; f2 target {0, 1}: promote 1, demote 2.
    # Layer 1: f0 target {3}: promote 3, may demote 0 or 1 but only one (the lower id, 0), 1 stays;
    # f2 target {0, 3}: promote 0, demote 1.
    assert s.resident.tolist() == residency([
        [[0, 2], [1, 3]], [[0, 2], [1, 3]], [[0, 1], [0, 3]], [[0, 1], [0, 3]],
    ]).tolist()
    promoted = {(0, 0): [2], (2, 0): [1], (0, 1): [3], (2, 1): [0]}
    assert np.array_equal(s.copy, np.where(mask(s.shape, promoted), COPY_SYNC_REFRESH, 0))
    assert np.array_equal(s.demote, mask(s.shape, {(0, 0): [1], (2, 0): [2], (0, 1): [0], (2, 1): [1]}))
    assert s.placement.tolist() == [
        [[GPU, IDLE, GPU, CPU], [IDLE, IDLE, IDLE, GPU]],
        [[IDLE, CPU, GPU, CPU], [CPU, GPU, CPU, GPU]],
        [[GPU, GPU, IDLE, IDLE], [GPU, IDLE, IDLE, GPU]],
        [[IDLE, IDLE, CPU, CPU], [IDLE, CPU, IDLE, IDLE]],
    ]
    assert s.params["refresh"] == "sync"


def test_no_demotion_without_promotion() -> None:
    # budget 3 of 4, start {0, 1, 2}; the target {1} is resident: nothing moves, 0 and 2 stay.
    w = workload(np.array([[[0, 4, 0, 0]]]))
    s = checked("tide-reference", w, options(w, 3, tau=1))
    assert not s.copy.any() and not s.demote.any()
    assert s.resident[0, 0].tolist() == [True, True, True, False]


@settings(max_examples=40, deadline=None)
@given(w=workloads())
def test_demotions_never_exceed_promotions(w) -> None:  # type: ignore[no-untyped-def]
    for budget in range(1, w.num_experts + 1):
        s = checked("tide-reference", w, options(w, budget, tau=1))
        assert ((s.copy > 0).sum(axis=2) >= s.demote.sum(axis=2)).all()
