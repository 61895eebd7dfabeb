"""full-swap: per-layer LRU cache, every miss copied on demand, nothing on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
from policy_cases import checked, hand_workload, mask, options, residency, workload

from tidesim.errors import InputError
from tidesim.schedule import COPY_ON_DEMAND, GPU, IDLE


def test_hand_schedule() -> None:
    w = hand_workload()
    s = checked("full-swap", w, options(w, 2))
    assert not s.initial_resident.any()
    assert np.array_equal(s.placement, np.where(w.expert_tokens > 0, GPU, IDLE))
    # Layer 0: f0 copies 0, 2, 3 (order 0, 2, 3; the last two stay); f1 hits 2, 3, copies 1 (order
    # 2, 3, 1 -> keep 3, 1); f2 hits 1, copies 0; f3 copies 2, 3 evicting both.
    # Layer 1: f0 copies 3; f1 hits 3, copies 0, 1, 2 (keep 1, 2); f2 copies 0, 3; f3 copies 1,
    # evicting 0 (used before 3 in f2).
    assert s.resident.tolist() == residency([
        [[2, 3], [3]], [[1, 3], [1, 2]], [[0, 1], [0, 3]], [[2, 3], [1, 3]],
    ]).tolist()
    copies = mask(s.shape, {(0, 0): [0, 2, 3], (1, 0): [1], (2, 0): [0], (3, 0): [2, 3],
                            (0, 1): [3], (1, 1): [0, 1, 2], (2, 1): [0, 3], (3, 1): [1]})
    assert np.array_equal(s.copy, np.where(copies, COPY_ON_DEMAND, 0))


def test_current_forward_is_protected_and_lru_order() -> None:
    # one layer, budget 3: after f0 {0, 1}, f1 uses 2 -> {0, 1, 2}; f2 uses 3 and 0 -> evicts 1
    # (least recently used), never 0 (in use by the same forward).
    w = workload(np.array([[[1, 1, 0, 0]], [[0, 0, 1, 0]], [[1, 0, 0, 1]]]))
    s = checked("full-swap", w, options(w, 3))
    assert s.resident.tolist() == residency([[[0, 1]], [[0, 1, 2]], [[0, 2, 3]]]).tolist()
    assert s.copy[2, 0].tolist() == [0, 0, 0, COPY_ON_DEMAND]


def test_warm_start_and_errors() -> None:
    w = hand_workload()
    warm = np.array([[True, False, True, False], [False, False, False, True]])
    s = checked("full-swap", w, options(w, 2, static_resident=warm))
    assert s.initial_resident.tolist() == warm.tolist()
    assert s.copy[0, 0].tolist() == [0, 0, 0, COPY_ON_DEMAND]   # 0 and 2 were resident
    assert s.copy[0, 1].tolist() == [0, 0, 0, 0]
    with pytest.raises(InputError, match="at least 1 expert slot"):
        checked("full-swap", w, options(w, [2, 0]))


def test_larger_budget_never_copies_more() -> None:
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 3, size=(12, 2, 8)).astype(np.int32)
    w = workload(counts)
    copies = [int((checked("full-swap", w, options(w, b)).copy > 0).sum()) for b in range(1, 9)]
    assert copies == sorted(copies, reverse=True)
    assert copies[-1] == int((counts.sum(axis=0) > 0).sum())   # budget = all: each expert copied once
