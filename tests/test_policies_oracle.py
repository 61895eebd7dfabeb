"""oracle: each forward's top experts prefetched for free the forward before, best split."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_cases import checked, hand_workload, mask, options, profile, residency, workloads

from tidesim.policies.oracle import split_estimates
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_ON_DEMAND, CPU, GPU, IDLE

# Start-of-forward residency: layer 0 {0, 2}, {1, 2}, {0, 1}, {2, 3}; layer 1 {3}, {0, 1}, {0, 3},
# {0, 1} (each forward's top 2 with tokens, earlier residents kept while slots allow).
START = residency([[[0, 2], [3]], [[1, 2], [0, 1]], [[0, 1], [0, 3]], [[2, 3], [0, 1]]])
END = np.concatenate([START[1:], START[-1:]])
PREFETCH = {(0, 0): [1], (1, 0): [0], (2, 0): [2, 3], (0, 1): [0, 1], (1, 1): [3], (2, 1): [1]}


def test_hand_schedule_slow_link() -> None:
    """Copies cost 1 s: nothing is copied on demand; resident experts on the GPU, others on the CPU."""
    w = hand_workload()
    s = checked("oracle", w, options(w, 2, hw=profile(10.0, 10.0, 1e6)))
    assert s.is_bound and s.free_async_copies
    assert s.initial_resident.tolist() == START[0].tolist()
    assert s.resident.tolist() == END.tolist()
    assert np.array_equal(s.copy, np.where(mask(s.shape, PREFETCH), COPY_ASYNC_REFRESH, 0))
    assert s.placement.tolist() == [
        [[GPU, IDLE, GPU, CPU], [IDLE, IDLE, IDLE, GPU]],
        [[IDLE, GPU, GPU, CPU], [GPU, GPU, CPU, CPU]],
        [[GPU, GPU, IDLE, IDLE], [GPU, IDLE, IDLE, GPU]],
        [[IDLE, IDLE, GPU, GPU], [IDLE, GPU, IDLE, IDLE]],
    ]


def test_hand_schedule_slow_cpu() -> None:
    """CPU at 1 ms per token: every activated expert runs on the GPU; the missing ones are copied
    on demand (layer 1 expert 3 at f1 is also the next forward's prefetch, so it stays)."""
    w = hand_workload()
    s = checked("oracle", w, options(w, 2, hw=profile(10.0, 1000.0, 20.0)))
    assert np.array_equal(s.placement, np.where(w.expert_tokens > 0, GPU, IDLE))
    demand = mask(s.shape, {(0, 0): [3], (1, 0): [3], (1, 1): [2, 3]})
    expected = np.where(mask(s.shape, PREFETCH), COPY_ASYNC_REFRESH, 0)
    expected[demand] = COPY_ON_DEMAND
    assert np.array_equal(s.copy, expected)
    assert s.resident.tolist() == END.tolist()


def test_split_estimate_by_hand() -> None:
    """Layer 0, forward 0 of the slow-link case: sorted tokens [3, 2, 1], two resident."""
    hw = profile(10.0, 10.0, 1e6)
    est = split_estimates(np.array([[[3, 2, 1]]]), np.array([[2]]), hand_workload().model, hw)[0, 0]
    d2h = lambda n: 10e-6 + n * 256 / 50e9  # noqa: E731  (linear model; activations 256 B per token)
    # j = 2: GPU 2 x (10 - 5 launch) + 5 = 15 us; CPU: 1 pair out and back (d2h + 20 us) + 10 us
    assert np.isclose(est[2], d2h(1) + 20e-6 + 10e-6)
    # j = 0: all on the CPU: 6 pairs moved, makespan max(60 / 8 workers, 30) us
    assert np.isclose(est[0], d2h(6) + 20e-6 + 30e-6)
    assert est[3] > 0.5   # a 1 s copy
    assert int(np.argmin(est)) == 2


@settings(max_examples=30, deadline=None)
@given(w=workloads(), data=st.data())
def test_no_worse_than_tide_refreshing_every_step(w, data) -> None:  # type: ignore[no-untyped-def]
    """The oracle's GPU-resident experts at each forward are the top-budget of that forward: no
    online policy with the same budget has a resident set holding more of its tokens."""
    budget = data.draw(st.integers(1, w.num_experts))
    s = checked("oracle", w, options(w, budget))
    before = s.resident_before()
    free_tokens = np.where(before, w.expert_tokens, 0).sum(axis=2)
    for name in ("tide", "tide-reference", "full-swap", "cpu-routing"):
        other = checked(name, w, options(w, budget, tau=1))
        assert (np.where(other.resident_before(), w.expert_tokens, 0).sum(axis=2) <= free_tokens).all(), name
