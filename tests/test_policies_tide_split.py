"""tide-split: tide's residency, and per layer-forward the fastest copy-or-CPU split of its misses."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_cases import checked, layer_by_layer, options, profile, workload, workloads

from tidesim.layermodel import layer_phases
from tidesim.policies.tide_split import decision_order
from tidesim.schedule import COPY_ON_DEMAND, COPY_SYNC_REFRESH, CPU, GPU, IDLE, Schedule
from tidesim.sim.costs import schedule_costs
from tidesim.workload import Workload

US = 1e-6


def expert_phase(w: Workload, s: Schedule, hw) -> np.ndarray:  # type: ignore[no-untyped-def]
    """[F, L] sync phase + expert phase of every layer-forward, as the executors' layer model
    charges the schedule (exact longest-first CPU pool, no waits for earlier background copies)."""
    c = schedule_costs(w, s, hw)
    od = c.ondemand() if c.items.od_g.size else None
    parts = layer_phases(c.rates, c.gpu, c.copies, c.cpu.n, c.cpu_span(), od, c.layers)
    return (parts["sync"] + parts["side"]).reshape(w.num_forwards, w.num_layers)


def one_layer(counts: list[int]) -> Workload:
    """One forward of one MoE layer (a denoising step 0 of block 1: tide refreshes)."""
    return workload(np.array([[counts]]))


def test_decision_order() -> None:
    counts = np.array([[1, 5, 0, 3, 5, 2]])
    gate = np.array([[False, False, False, True, False, False]])
    movable = np.array([[True, True, False, False, False, True]])
    # gate: 3; movable by tokens: 1 (5), 5 (2), 0 (1); other activated: 4; idle: 2
    assert decision_order(counts, gate, movable).tolist() == [[3, 1, 5, 0, 4, 2]]


def test_hand_split_copies_the_big_miss_and_leaves_the_small_one_on_the_cpu() -> None:
    """Budget 1, sync refresh: expert 0 (6 tokens) is refreshed in (30 us), 1 (5) and 2 (1) miss.
    GPU expert 10 us (launch 5), CPU 10 us per token (8 workers), expert copy 30 us, two engines.

    tide: CPU side = activations out (6 pairs) + max(50, 10) + results back (20 us), GPU 10 us.
    copy expert 1: its copy takes a spare slot at once and lands at 30, runs 5 + 4 x 5 = 25 us:
        GPU side 55; CPU side = out (1 pair) + 10, but the results wait for the copy engine (30)
        and take 20: 50. Layer side 55.
    copy both: expert 2's copy waits for expert 1's slot (it only passes through): 55 + 30 + 25 = 110.
    """
    w = one_layer([6, 5, 1, 0])
    hw = profile(10.0, 10.0, 30.0)
    assert hw.pcie.copy_engines == 2 and hw.gpu.launch_overhead_us == 5
    opts = options(w, 1, tau=4, hw=hw)
    tide, split = checked("tide", w, opts), checked("tide-split", w, opts)
    assert split.copy[0, 0].tolist() == [COPY_SYNC_REFRESH, COPY_ON_DEMAND, 0, 0]
    assert split.placement[0, 0].tolist() == [GPU, GPU, CPU, IDLE]
    assert split.resident.tolist() == tide.resident.tolist()
    out = lambda pairs: float(hw.d2h_time(pairs * w.model.activation_bytes_per_token))  # noqa: E731
    assert expert_phase(w, tide, hw)[0, 0] == pytest.approx(30 * US + out(6) + 50 * US + 20 * US, abs=1e-12)
    assert expert_phase(w, split, hw)[0, 0] == pytest.approx((30 + 55) * US, abs=1e-12)
    assert split.params["on_demand_copies"] == 1


def test_hand_split_keeps_tides_choice_when_copies_are_slow() -> None:
    """Same forward with a 1 s copy: nothing is copied on demand, the schedule is tide's."""
    w = one_layer([6, 5, 1, 0])
    hw = profile(10.0, 10.0, 1e6)
    opts = options(w, 1, tau=4, hw=hw)
    tide, split = checked("tide", w, opts), checked("tide-split", w, opts)
    assert np.array_equal(split.placement, tide.placement) and np.array_equal(split.copy, tide.copy)


def test_hand_split_with_a_slow_cpu_copies_every_miss() -> None:
    """CPU at 1 ms per token: running the misses on the CPU costs 5 ms and 1 ms, copying both in
    (one after the other through one spare slot) 2 x (30 + 25) us: both are copied."""
    w = one_layer([6, 5, 1, 0])
    hw = profile(10.0, 1000.0, 30.0)
    split = checked("tide-split", w, options(w, 1, tau=4, hw=hw))
    assert split.copy[0, 0].tolist() == [COPY_SYNC_REFRESH, COPY_ON_DEMAND, COPY_ON_DEMAND, 0]
    assert expert_phase(w, split, hw)[0, 0] == pytest.approx((30 + 110) * US, abs=1e-12)


def _random_profile(data: st.DataObject):  # type: ignore[no-untyped-def]
    hw = profile(data.draw(st.sampled_from([5.0, 50.0])), data.draw(st.sampled_from([0.5, 10.0, 1000.0])),
                 data.draw(st.sampled_from([2.0, 20.0, 1e4]))).scaled()
    hw.pcie.copy_engines = data.draw(st.sampled_from([1, 2]))
    hw.pcie.copy_slows_compute = data.draw(st.sampled_from([0.0, 0.3]))
    hw.cpu.gpu_contention = data.draw(st.sampled_from([0.0, 0.8]))
    return hw


@settings(max_examples=60, deadline=None)
@given(w=workloads(), data=st.data())
def test_never_slower_than_tide_with_the_same_resident_set(w, data) -> None:  # type: ignore[no-untyped-def]
    """Layer-forward by layer-forward, in the executors' layer model, tide-split is never slower
    than tide with the same options: the resident sets are tide's and tide's choice is a candidate."""
    hw = _random_profile(data)
    budget = data.draw(st.lists(st.integers(0, w.num_experts), min_size=w.num_layers, max_size=w.num_layers))
    tau = data.draw(st.integers(1, 3))
    refresh = data.draw(st.sampled_from(["sync", "async"]))
    opts = options(w, budget, tau, refresh, hw=hw)
    tide, split = checked("tide", w, opts), checked("tide-split", w, opts)
    assert np.array_equal(split.resident, tide.resident)
    assert (expert_phase(w, split, hw) <= expert_phase(w, tide, hw) * (1 + 1e-9) + 1e-15).all()


@settings(max_examples=25, deadline=None)
@given(w=workloads(), data=st.data())
def test_live_layer_by_layer_equals_the_offline_builder(w, data) -> None:  # type: ignore[no-untyped-def]
    hw = _random_profile(data)
    opts = options(w, data.draw(st.integers(1, w.num_experts)), data.draw(st.integers(1, 3)),
                   data.draw(st.sampled_from(["sync", "async"])), hw=hw)
    offline, live = checked("tide-split", w, opts), layer_by_layer("tide-split", w, opts)
    for f in ("placement", "copy", "demote", "resident"):
        assert np.array_equal(getattr(live, f), getattr(offline, f)), f


@settings(max_examples=25, deadline=None)
@given(w=workloads(), data=st.data())
def test_async_refresh_copies_nothing_on_demand_while_refresh_copies_may_run(w, data) -> None:  # type: ignore[no-untyped-def]
    """With asynchronous refresh, no on-demand copy in a forward in which a layer refreshes; and
    the simulator runs the schedule to its end (at or above the analytic model's lower bound)."""
    from tidesim.costmodel import lower_bound
    from tidesim.policies.step import forward_metas
    from tidesim.policies.tide import refreshes
    from tidesim.sim.engine import simulate

    hw = _random_profile(data)
    opts = options(w, data.draw(st.integers(1, w.num_experts)), data.draw(st.integers(1, 3)), "async", hw=hw)
    s = checked("tide-split", w, opts)
    busy = np.array([bool(refreshes(m, opts.tau).any()) for m in forward_metas(w)])
    assert not (s.copy[busy] == COPY_ON_DEMAND).any()
    costs = schedule_costs(w, s, hw)
    assert simulate(costs).total_s >= lower_bound(costs) * (1 - 1e-9)


def test_backlog_drains_by_the_forwards_lower_bound() -> None:
    """Two copies of 30 us queued; a forward that lasts at least 40 us leaves 20 us, the next
    at least 25 us leaves none (hand-computed)."""
    from tidesim.layermodel import Rates
    from tidesim.policies.tide_split import Backlog
    from tidesim.schedule import COPY_ASYNC_REFRESH

    w = one_layer([6, 5, 1, 0])
    b = Backlog(Rates.of(profile(10.0, 10.0, 30.0), w.model))
    b.next_forward(0)
    b.add(np.array([[COPY_ASYNC_REFRESH, COPY_ASYNC_REFRESH, 0, 0]]), 40e-6)
    b.next_forward(1)
    assert b.seconds == pytest.approx(20e-6)
    b.add(np.zeros((1, 4)), 25e-6)
    b.next_forward(2)
    assert b.seconds == 0.0
