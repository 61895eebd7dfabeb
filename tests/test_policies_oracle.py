"""oracle: each forward's top experts prefetched for free the forward before, best split."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_cases import checked, hand_workload, mask, options, profile, residency, workloads

from tidesim.policies.split import split_estimates
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


def _sim_total(w, schedule, hw) -> float:  # type: ignore[no-untyped-def]
    from tidesim.sim.costs import schedule_costs
    from tidesim.sim.engine import simulate

    return simulate(schedule_costs(w, schedule, hw)).total_s


@settings(max_examples=25, deadline=None)
@given(w=workloads(), data=st.data())
def test_layer_model_matches_the_simulator(w, data) -> None:  # type: ignore[no-untyped-def]
    """The oracle picks its split with layer_times; for its own schedules that must be exactly
    what the simulator charges (one copy engine or two, copy_slows_compute or not, GPU/CPU
    contention or not)."""
    from tidesim.policies.residency import rank_experts
    from tidesim.policies.split import layer_times
    from tidesim.sim.costs import schedule_costs
    from tidesim.sim.engine import simulate

    hw = profile(data.draw(st.sampled_from([5.0, 50.0])), data.draw(st.sampled_from([0.5, 10.0, 1000.0])),
                 data.draw(st.sampled_from([2.0, 20.0, 1e4]))).scaled()
    hw.pcie.copy_engines = data.draw(st.sampled_from([1, 2]))
    hw.pcie.copy_slows_compute = data.draw(st.sampled_from([0.0, 0.3]))
    hw.pcie.copy_slows_cpu = data.draw(st.sampled_from([0.0, 0.4]))
    hw.cpu.gpu_contention = data.draw(st.sampled_from([0.0, 0.8]))
    hw.cpu.pool_contention = data.draw(st.sampled_from([None, 0.0, 0.3]))   # None: symmetric
    s = checked("oracle", w, options(w, data.draw(st.integers(1, w.num_experts)), hw=hw))
    costs = schedule_costs(w, s, hw)
    f, l, e = w.expert_tokens.shape
    r = rank_experts(w.expert_tokens)
    counts = np.take_along_axis(w.expert_tokens, r.order, axis=2).reshape(f * l, e)
    active = (w.expert_tokens > 0).sum(axis=2).reshape(-1)
    free = (s.resident_before() & (w.expert_tokens > 0)).sum(axis=2).reshape(-1)
    split = (s.placement == GPU).sum(axis=2).reshape(-1)
    mine = layer_times(counts, r.order.reshape(f * l, e), active, free, split, w.model, hw).reshape(f, l)
    assert np.allclose((mine + costs.gpu.layer_fixed[:, None]).sum(axis=0), simulate(costs).layer_time,
                       rtol=1e-9, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(w=workloads(), data=st.data())
def test_never_slower_than_online_policies_in_the_simulator(w, data) -> None:  # type: ignore[no-untyped-def]
    hw = profile(data.draw(st.sampled_from([5.0, 50.0])), data.draw(st.sampled_from([0.5, 10.0, 1000.0])),
                 data.draw(st.sampled_from([2.0, 20.0, 1e4])))
    budget = data.draw(st.integers(1, w.num_experts))
    bound = _sim_total(w, checked("oracle", w, options(w, budget, hw=hw)), hw)
    for name in ("full-swap", "cpu-routing", "fiddler", "tide", "tide-reference", "tide-split"):
        for tau, refresh in ((1, "sync"), (2, "async")):
            online = _sim_total(w, checked(name, w, options(w, budget, tau, refresh, hw=hw)), hw)
            assert bound <= online * (1 + 1e-9), (name, tau, refresh)
