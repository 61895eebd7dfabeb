"""tide: interval refresh of the top-budget experts, I/O-aware, sync or async."""

from __future__ import annotations

import numpy as np
from policy_cases import checked, hand_workload, mask, options, residency, workload

from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_SYNC_REFRESH, CPU, GPU, IDLE

# Refreshes at steps 0 and 2 (tau 2, block 1). Layer 0: f0 target {0, 2}; f2 target {0, 1}
# (tie 0/1 at 2 tokens, both in), 2 evicted. Layer 1: f0 target {3} (only one expert has tokens);
# f2 target {0, 3}, 0 copied.
RESIDENT = residency([[[0, 2], [3]], [[0, 2], [3]], [[0, 1], [0, 3]], [[0, 1], [0, 3]]])
COPIED = {(0, 0): [0, 2], (2, 0): [1], (0, 1): [3], (2, 1): [0]}


def test_hand_schedule_sync() -> None:
    w = hand_workload()
    s = checked("tide", w, options(w, 2, tau=2, refresh="sync"))
    assert not s.initial_resident.any()
    assert s.resident.tolist() == RESIDENT.tolist()
    assert np.array_equal(s.copy, np.where(mask(s.shape, COPIED), COPY_SYNC_REFRESH, 0))
    assert s.placement.tolist() == [
        [[GPU, IDLE, GPU, CPU], [IDLE, IDLE, IDLE, GPU]],
        [[IDLE, CPU, GPU, CPU], [CPU, CPU, CPU, GPU]],
        [[GPU, GPU, IDLE, IDLE], [GPU, IDLE, IDLE, GPU]],
        [[IDLE, IDLE, CPU, CPU], [IDLE, CPU, IDLE, IDLE]],
    ]
    assert not s.demote.any()


def test_hand_schedule_async() -> None:
    w = hand_workload()
    s = checked("tide", w, options(w, 2, tau=2, refresh="async"))
    assert s.resident.tolist() == RESIDENT.tolist()
    assert np.array_equal(s.copy, np.where(mask(s.shape, COPIED), COPY_ASYNC_REFRESH, 0))
    # refreshed experts are usable from the next forward; replaced ones serve the refresh forward
    assert s.placement.tolist() == [
        [[CPU, IDLE, CPU, CPU], [IDLE, IDLE, IDLE, CPU]],
        [[IDLE, CPU, GPU, CPU], [CPU, CPU, CPU, GPU]],
        [[GPU, CPU, IDLE, IDLE], [CPU, IDLE, IDLE, GPU]],
        [[IDLE, IDLE, CPU, CPU], [IDLE, CPU, IDLE, IDLE]],
    ]


def test_io_aware_eviction_only_when_needed() -> None:
    # one layer, budget 3, tau 1: f0 -> {0, 1}; f1 target {2}: a free slot, so 0 and 1 stay;
    # f2 target {3}: full, the resident with the fewest tokens (all 0) and the higher id (2) goes.
    w = workload(np.array([[[2, 1, 0, 0]], [[0, 0, 5, 0]], [[0, 0, 0, 4]]]))
    s = checked("tide", w, options(w, 3, tau=1))
    assert s.resident.tolist() == residency([[[0, 1]], [[0, 1, 2]], [[0, 1, 3]]]).tolist()
    assert (s.copy > 0).sum() == 4


def test_first_block_prefill_and_commit() -> None:
    # prefill (block -1), block 0 steps 0-2 and its commit, block 1 steps 0-2 and its commit;
    # tau 2: refreshes at every forward of block 0 and the prefill, never at a commit,
    # in block 1 at steps 0 and 2.
    counts = np.zeros((10, 1, 4), dtype=np.int32)
    for f in range(10):
        counts[f, 0, f % 4] = 3
    w = workload(counts, block=[-1, 0, 0, 0, 0, 1, 1, 1, 1, 1][:10], step=[0, 0, 1, 2, 3, 0, 1, 2, 3, 4][:10],
                 committed=[0, 1, 1, 2, 0, 1, 1, 1, 1, 0])
    s = checked("tide", w, options(w, 1, tau=2))
    refreshed = (s.copy[:, 0] > 0).any(axis=1)
    assert refreshed.tolist() == [True, True, True, True, False, True, False, True, False, False]
    assert s.params["refresh_forwards"] == 6


def test_per_layer_tau() -> None:
    w = hand_workload()
    s = checked("tide", w, options(w, 1, tau=[1, 4]))
    assert (s.copy[:, 0] > 0).any(axis=1).tolist() == [True, True, True, True]
    assert (s.copy[:, 1] > 0).any(axis=1).tolist() == [True, False, False, False]
