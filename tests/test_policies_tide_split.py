"""tide-split: tide's residency, and per layer-forward the fastest copy-or-CPU split of its misses."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_cases import checked, layer_by_layer, options, profile, workload, workloads

from tidesim.layermodel import layer_phases
from tidesim.policies import build_schedule
from tidesim.policies.tide_split import decision_order
from tidesim.schedule import (
    COPY_ASYNC_REFRESH,
    COPY_ON_DEMAND,
    COPY_SYNC_REFRESH,
    CPU,
    GPU,
    IDLE,
    Schedule,
    schedule_problems,
)
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


def test_hand_async_refresh_copy_taken_on_demand_when_it_pays() -> None:
    """Async refresh, budget 1, empty GPU: tide copies expert 0 (6 tokens) in the background and runs
    it on the CPU now: activations out (6 pairs, 10 us on the preset's D2H curve) + 6 x 10 + results
    back (20.03 us on the test's H2D curve) = 90.03 us. tide-split takes that same copy on demand
    (nothing queued ahead of it): it lands at 30 us and runs 5 + 4 x 5 = 25 us: 55 us; the expert
    stays resident, as in tide's schedule, and no extra copy is made."""
    w = one_layer([6, 0, 0, 0])
    hw = profile(10.0, 10.0, 30.0)
    opts = options(w, 1, tau=4, refresh="async", hw=hw)
    tide, split = checked("tide", w, opts), checked("tide-split", w, opts)
    assert tide.copy[0, 0].tolist() == [COPY_ASYNC_REFRESH, 0, 0, 0]
    assert split.copy[0, 0].tolist() == [COPY_ON_DEMAND, 0, 0, 0]
    assert split.placement[0, 0].tolist() == [GPU, IDLE, IDLE, IDLE]
    assert split.resident.tolist() == tide.resident.tolist()
    pairs = 6 * w.model.activation_bytes_per_token
    cpu_side = float(hw.d2h_time(pairs)) + 60 * US + float(hw.h2d_time(pairs))
    assert cpu_side == pytest.approx(90.03 * US, abs=0.01 * US)
    assert expert_phase(w, tide, hw)[0, 0] == pytest.approx(cpu_side, abs=1e-12)
    assert expert_phase(w, split, hw)[0, 0] == pytest.approx(55 * US, abs=1e-12)


def _random_profile(data: st.DataObject):  # type: ignore[no-untyped-def]
    hw = profile(data.draw(st.sampled_from([5.0, 50.0])), data.draw(st.sampled_from([0.5, 10.0, 1000.0])),
                 data.draw(st.sampled_from([2.0, 20.0, 1e4]))).scaled()
    hw.pcie.copy_engines = data.draw(st.sampled_from([1, 2]))
    hw.pcie.copy_slows_compute = data.draw(st.sampled_from([0.0, 0.3]))
    hw.pcie.copy_slows_cpu = data.draw(st.sampled_from([0.0, 0.4]))
    hw.cpu.gpu_contention = data.draw(st.sampled_from([0.0, 0.8]))
    hw.cpu.pool_contention = data.draw(st.sampled_from([None, 0.0, 0.3]))   # None: symmetric
    return hw


@settings(max_examples=60, deadline=None)
@given(w=workloads(), data=st.data())
def test_never_slower_than_tide_with_the_same_resident_set(w, data) -> None:  # type: ignore[no-untyped-def]
    """Layer-forward by layer-forward, in the executors' layer model, tide-split is never slower
    than tide's choice with the same resident set (every expert outside it on the CPU: the same
    schedule with its on-demand copies undone), which is one of its candidates. Its resident sets
    are tide's refresh with history ties (test_activation_history_breaks_the_refresh_ties)."""
    hw = _random_profile(data)
    budget = data.draw(st.lists(st.integers(0, w.num_experts), min_size=w.num_layers, max_size=w.num_layers))
    tau = data.draw(st.integers(1, 3))
    refresh = data.draw(st.sampled_from(["sync", "async"]))
    opts = options(w, budget, tau, refresh, hw=hw)
    split = checked("tide-split", w, opts)
    theirs = without_splits(split)
    assert schedule_problems(theirs, w) == []
    assert (expert_phase(w, split, hw) <= expert_phase(w, theirs, hw) * (1 + 1e-9) + 1e-15).all()


def test_history_orders_by_recency_then_earlier_uses() -> None:
    """Budget 2, a refresh every forward. Forwards 0-2 activate {0, 1}, {2}, {0, 3}; forward 3
    activates only 2 (resident {0, 3} before it; 2 is copied in) and one of 0 and 3 stays. Both were
    last activated in forward 2; 0 was also activated in forward 0, 3 was not: 0 stays (history
    101 against 100, most recent bit first). TIDE keeps 0 too (by id); forward 4 activates 1 and
    the idle residents are 0 (history 0101) and 2 (1010): 2 stays, TIDE keeps 0 (id)."""
    counts = np.array([[[1, 1, 0, 0]], [[0, 0, 1, 0]], [[1, 0, 0, 1]], [[0, 0, 1, 0]], [[0, 1, 0, 0]]])
    w = workload(counts)
    opts = options(w, 2, tau=1, hw=profile())
    tide, split = checked("tide", w, opts), checked("tide-split", w, opts)
    assert split.resident[3, 0].tolist() == [True, False, True, False]
    assert split.resident[4, 0].tolist() == [False, True, True, False]
    assert tide.resident[4, 0].tolist() == [True, True, False, False]


def without_splits(s: Schedule) -> Schedule:
    """tide's choice on a tide-split schedule's resident sets: every on-demand copy undone (the
    expert runs on the CPU; a refresh copy taken on demand goes back to the background)."""
    od = s.copy == COPY_ON_DEMAND
    copy = np.where(od, np.where(s.resident, COPY_ASYNC_REFRESH, 0), s.copy).astype(s.copy.dtype)
    return replace(s, placement=np.where(od, CPU, s.placement).astype(s.placement.dtype), copy=copy)


def test_activation_history_breaks_the_refresh_ties() -> None:
    """Budget 2, a refresh every forward, 4 experts, one token per activated expert. Forward 0
    activates 2 and 3 (both copied in); forward 1 activates 0, and one idle resident stays: 2 and
    3 were last used in the same forward, so the id decides (2), as in TIDE. Forward 2 activates 3
    (resident {0, 3} both ways). Forward 3 activates 1, and one of the idle residents 0 (last used
    in forward 1) and 3 (forward 2) stays: tide-split keeps 3, the more recent; TIDE keeps 0, the
    lower id. (A tie in the last use goes to the use before it: test_history_orders_by_recency.)"""
    counts = np.array([[[0, 0, 1, 1]], [[1, 0, 0, 0]], [[0, 0, 0, 1]], [[0, 1, 0, 0]]])
    w = workload(counts)
    opts = options(w, 2, tau=1, hw=profile())
    tide, split = checked("tide", w, opts), checked("tide-split", w, opts)
    assert np.array_equal(tide.resident[:3], split.resident[:3])
    assert split.resident[1, 0].tolist() == [True, False, True, False]        # 2 and 3 tie (forward 0): id
    assert split.resident[3, 0].tolist() == [False, True, False, True]        # 3 (forward 2) over 0 (forward 1)
    assert tide.resident[3, 0].tolist() == [True, True, False, False]         # TIDE: 0 over 3 by id


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
def test_async_refresh_keeps_its_refresh_copies_and_runs_to_its_end(w, data) -> None:  # type: ignore[no-untyped-def]
    """With asynchronous refresh, undoing tide-split's on-demand copies leaves only asynchronous
    refresh copies, each of an expert resident after its forward (a refresh copy taken on demand
    stays resident too); every other on-demand copy only passes through; and the simulator runs
    the schedule to its end (at or above the analytic model's lower bound)."""
    from tidesim.costmodel import lower_bound
    from tidesim.sim.engine import simulate

    hw = _random_profile(data)
    opts = options(w, data.draw(st.integers(1, w.num_experts)), data.draw(st.integers(1, 3)), "async", hw=hw)
    s = checked("tide-split", w, opts)
    theirs = without_splits(s)
    assert set(np.unique(theirs.copy).tolist()) <= {0, COPY_ASYNC_REFRESH}
    assert s.resident[theirs.copy == COPY_ASYNC_REFRESH].all()
    assert not theirs.copy[(s.copy == COPY_ON_DEMAND) & ~s.resident].any()
    costs = schedule_costs(w, s, hw)
    assert simulate(costs).total_s >= lower_bound(costs) * (1 - 1e-9)


@pytest.mark.parametrize(("backlog_us", "split"), [(0.0, 2), (10.0, 2), (1000.0, 1)])
def test_hand_on_demand_copy_charged_for_the_background_copies_it_overtakes(backlog_us: float, split: int) -> None:
    """test_hand_split_copies_the_big_miss's layer-forward at the split's level: expert 0 at the
    gate, 1 (5 tokens) and 2 (1) movable, no slot free. Running both on the CPU: activations out
    (6 pairs, 10 us) + 50 + results back (20.03 us) = 80.03 us; copying expert 1 in: 55 us, plus
    the background copies it overtakes, min(backlog, 1 x 30 us): 55 (no backlog), 65 (10 us
    queued), 85 (1 ms queued: more than tide's choice, which wins). Both paths decide alike."""
    from tidesim.policies.split import ExpertTimes, RowSplit, Slots, best_split

    spec = one_layer([6, 5, 1, 0]).model
    hw = profile(10.0, 10.0, 30.0)
    counts, experts = np.array([6, 5, 1]), np.array([0, 1, 2])
    times = ExpertTimes(spec, hw)
    backlog = backlog_us * US
    slots = Slots(np.array([0]), np.array([0]), np.array([0]), None, backlog)
    batched = best_split(counts[None], experts[None], np.array([3]), np.array([1]), spec, hw, slots, np.array([3]),
                         keep_resident=True, try_all=False, times=times)
    assert batched.tolist() == [split]
    assert RowSplit(spec, hw, times).one(counts, experts, 1, 3, 0, 0, None, backlog) == split


def test_pool_estimate_is_the_layer_models_bound() -> None:
    """Seven equal tasks of 1 on 3 workers: the mean load (7/3) and the longest task (1) say less
    than the longest-first makespan, ceil(7 / 3) = 3 rounds, which the bound's rounds term gives;
    one long task (5) and six of 1: the longest task."""
    from tidesim.layermodel import Rates
    from tidesim.policies.split import pool_estimate

    r = replace(Rates.of(profile(), one_layer([1]).model), workers=3)
    got = pool_estimate(r, np.array([7.0, 11.0]), np.array([1.0, 5.0]), np.array([1.0, 1.0]), np.array([7, 7]))
    assert got.tolist() == [3.0, 5.0]


def test_backlog_drains_by_the_forwards_lower_bound() -> None:
    """Two copies of 30 us queued; a forward that lasts at least 40 us leaves 20 us, the next
    at least 25 us leaves none (hand-computed)."""
    from tidesim.layermodel import Rates
    from tidesim.policies.tide_split import Backlog
    from tidesim.schedule import COPY_ASYNC_REFRESH

    w = one_layer([6, 5, 1, 0])
    b = Backlog(Rates.of(profile(10.0, 10.0, 30.0), w.model))
    b.next_forward(0)
    b.add(np.array([[COPY_ASYNC_REFRESH, COPY_ASYNC_REFRESH, 0, 0]]), [40e-6])
    b.next_forward(1)
    assert b.seconds == pytest.approx(20e-6)
    b.add(np.zeros((1, 4)), [25e-6])
    b.next_forward(2)
    assert b.seconds == 0.0


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 4), st.integers(0, 4)),
                     min_size=1, max_size=5))
def test_slot_spares_match_the_slot_rule(rows) -> None:  # type: ignore[no-untyped-def]
    """The closed form of the spare slots (every on-demand copy passes through) equals
    tidesim.layermodel.slot_tags' count, row by row and batched."""
    from tidesim.layermodel import slot_tags
    from tidesim.policies.rowsplit import slot_spares_one
    from tidesim.policies.split import slot_spares

    n_od, n_as, free, deferred = (np.array(col, np.int64) for col in zip(*rows, strict=True))
    od_g = np.repeat(np.arange(len(rows)), n_od)
    as_g = np.repeat(np.arange(len(rows)), n_as)
    _, _, spare = slot_tags(od_g, np.ones(od_g.size, bool), as_g, free, deferred)
    assert slot_spares(n_od, n_as, free, deferred).tolist() == spare.tolist()
    assert [int(slot_spares_one(*map(int, r))) for r in rows] == spare.tolist()


@settings(max_examples=200, deadline=None)
@given(passes=st.lists(st.booleans(), max_size=8), n_async=st.integers(0, 6), free=st.integers(0, 4),
       deferred=st.integers(0, 4))
def test_row_slot_rule_matches_the_slot_rule(passes, n_async, free, deferred) -> None:  # type: ignore[no-untyped-def]
    """The scalar slot rule gives tidesim.layermodel.slot_tags' release tags and spare count, with
    copies that stay resident (no slot reuse) among those that pass through."""
    from tidesim.layermodel import slot_tags
    from tidesim.policies.rowsplit import slot_rule

    tags, spare = slot_tags(np.zeros(len(passes), np.int64), np.array(passes, bool), np.zeros(n_async, np.int64),
                            np.array([free]), np.array([deferred]))[0::2]
    got = np.empty(len(passes), np.int64)
    assert int(slot_rule(np.array(passes, np.bool_), n_async, free, deferred, got)) == int(spare[0])
    assert got.tolist() == tags.tolist()


@settings(max_examples=200, deadline=None)
@given(times=st.lists(st.sampled_from([0.1, 0.2, 0.3, 1e-3, 355e-6, 7.0]), max_size=30), workers=st.integers(1, 8))
def test_lpt_span_equals_the_batched_makespan(times, workers) -> None:  # type: ignore[no-untyped-def]
    """The scalar longest-first makespan is bit for bit tidesim.sim.lpt.lpt_makespans' (ties in time
    included, whatever the expert ids)."""
    from tidesim.sim.lpt import lpt_makespan, lpt_makespans

    t = np.array(times, float)
    keys = np.arange(t.size)[::-1].copy()
    batched = lpt_makespans(np.zeros(t.size, np.int64), t, keys, 1, workers)[0]
    assert lpt_makespan(times, workers) == batched


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_row_split_decides_as_the_batched_search(data) -> None:  # type: ignore[no-untyped-def]
    """RowSplit (one layer-forward in scalar code, the live engine's path) picks the split that
    best_split(keep_resident, without "all on the GPU") picks, on random rows (half of them of
    equal tasks), slots, backlogs and profiles without copy slowdown (which RowSplit leaves to
    best_split)."""
    from tidesim.policies.split import ExpertTimes, RowSplit, Slots, best_split

    hw = _random_profile(data)
    hw.pcie.copy_slows_compute = 0.0
    hw.pcie.copy_slows_cpu = 0.0
    hw.cpu.workers = data.draw(st.sampled_from([1, 3, 8]))
    spec = workload(np.ones((1, 1, 4), np.int64)).model
    k = data.draw(st.integers(1, 40))
    counts = np.array(data.draw(st.lists(st.integers(1, 9), min_size=k, max_size=k)), np.int64)
    if data.draw(st.booleans()):      # equal tasks: the pool's bound is its rounds term
        counts[:] = counts[0]
    nf = data.draw(st.integers(0, k))
    top = data.draw(st.integers(nf, k))
    counts[:nf] = np.sort(counts[:nf])[::-1]
    counts[nf:top] = np.sort(counts[nf:top])[::-1]
    experts = np.array(data.draw(st.permutations(range(64)))[:k], np.int64)
    free, deferred = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3))
    stay = np.zeros(k, bool)
    stay[nf:top] = data.draw(st.lists(st.booleans(), min_size=top - nf, max_size=top - nf))
    n_async = int(stay.sum()) + data.draw(st.integers(0, 3))
    backlog = data.draw(st.sampled_from([0.0, 1e-5, 1e-3]))
    times = ExpertTimes(spec, hw)
    slots = Slots(np.array([free]), np.array([deferred]), np.array([n_async]), stay[None] if stay.any() else None,
                  backlog)
    batched = best_split(counts[None], experts[None], np.array([k]), np.array([nf]), spec, hw, slots, np.array([top]),
                         keep_resident=True, try_all=False, times=times)
    row = RowSplit(spec, hw, times).one(counts, experts, nf, top, free, deferred, stay if stay.any() else None, backlog)
    assert row == batched[0]


@pytest.mark.parametrize(("trace", "budget", "refresh"), [("llada2-mini_prefix_g1024", 64, "sync"),
                                                        ("llada2-mini_prefix_g1024", 64, "async"),
                                                        ("llada2-mini_none_g1024", 128, "sync")])
def test_live_equals_offline_on_the_bundled_mini_trace(trace: str, budget: int, refresh: str) -> None:
    """At real sizes (about 70 activated experts per layer, 64 resident, H100 preset; without a
    cache about 180 activated, 128 resident) the live engine's path (RowSplit.tide_split_layer,
    compiled) makes the offline builder's decisions, forward by forward."""
    from tidesim.bundled.paths import resolve_trace
    from tidesim.hardware import get_profile
    from tidesim.trace.io import read_trace
    from tidesim.workload import workload_from_trace

    w = workload_from_trace(read_trace(resolve_trace(trace))).select(np.arange(24))
    opts = options(w, budget, 2, refresh, hw=get_profile("h100-sxm-pcie5"))
    offline, live = checked("tide-split", w, opts), layer_by_layer("tide-split", w, opts)
    assert (offline.copy == COPY_ON_DEMAND).sum() > 50 or refresh == "async"
    for f in ("placement", "copy", "demote", "resident"):
        assert np.array_equal(getattr(live, f), getattr(offline, f)), f


@pytest.mark.parametrize(("trace", "preset", "tau", "refresh"),
                         [("llada2-mini_prefix_g1024", "h100-sxm-pcie5", 8, "async"),
                          ("llada2-mini_none_g1024", "a100-80gb-pcie4", 2, "async"),
                          ("llada2-flash_prefix_g256", "h100-sxm-pcie5", 2, "async"),
                          ("llada2-flash_none_g256", "a100-80gb-pcie4", 8, "sync")])
def test_live_equals_offline_on_whole_bundled_traces(trace: str, preset: str, tau: int, refresh: str) -> None:
    """Every forward of each bundled trace at `tidesim compare`'s default budget: the live
    engine's compiled path and the offline builder decide alike (with asynchronous refresh the
    backlog then runs for hundreds of forwards, so a difference in its terms would show). The
    whole grid (both presets, tau 2 and 8, sync and async: 32 cases) is
    bench/check_online_identity.py."""
    from tidesim.scenario import resolve

    base = resolve(trace, preset, ["tide-split"], tau=1)
    w = base.workload
    opts = options(w, base.budget, tau, refresh, hw=base.hw)
    offline, live = build_schedule("tide-split", w, opts), layer_by_layer("tide-split", w, opts)
    assert (offline.copy == COPY_ON_DEMAND).sum() > 1000
    for f in ("placement", "copy", "demote", "resident"):
        assert np.array_equal(getattr(live, f), getattr(offline, f)), f


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_compiled_refresh_equals_the_batched_refresh(data) -> None:  # type: ignore[no-untyped-def]
    """The one-layer refresh (rowsplit.refresh_row, written without a sort) keeps the set that
    residency.refresh_sets keeps with tide-split's ranking (tokens, history, id: a lexsort), ties
    in tokens and history included."""
    from tidesim.policies.residency import refresh_sets
    from tidesim.policies.rowsplit import refresh_row

    e = data.draw(st.integers(1, 40))
    counts = np.array(data.draw(st.lists(st.integers(0, 4), min_size=e, max_size=e)), np.int64)
    current = np.array(data.draw(st.lists(st.booleans(), min_size=e, max_size=e)), bool)
    history = np.array(data.draw(st.lists(st.sampled_from([0, 1, 2, 1 << 61, (1 << 62) | 1]), min_size=e,
                                          max_size=e)), np.int64)
    budget = data.draw(st.integers(0, e + 2))
    order = np.lexsort((np.arange(e), -history, -counts))[None, :]
    _, expected = refresh_sets(current[None], counts[None], np.array([budget]), order)
    assert refresh_row(counts, current, history, budget).tolist() == expected[0].tolist()


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(0, 1e3, allow_nan=False), max_size=700))
def test_compiled_sum_is_numpys(values) -> None:  # type: ignore[no-untyped-def]
    """rowsplit.np_sum adds in numpy's pairwise order: bit for bit np.sum, past 128 entries too."""
    from tidesim.policies.rowsplit import np_sum

    a = np.array(values, float)
    assert np_sum(a) == a.sum()


def test_one_layer_calls_take_the_batched_search_without_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where numba is not installed (an image that lacks it), a one-layer call takes the batched
    search instead of the compiled step: the same decisions as the offline builder."""
    import importlib.util

    from tidesim.bundled.paths import resolve_trace
    from tidesim.hardware import get_profile
    from tidesim.policies.split import ExpertTimes, RowSplit
    from tidesim.trace.io import read_trace
    from tidesim.workload import workload_from_trace

    hw = get_profile("h100-sxm-pcie5")
    w = workload_from_trace(read_trace(resolve_trace("llada2-mini_prefix_g1024"))).select(np.arange(6))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba" else find_spec(name, *a))
    assert not RowSplit(w.model, hw, ExpertTimes(w.model, hw)).usable
    opts = options(w, 64, 2, "sync", hw=hw)
    offline, live = checked("tide-split", w, opts), layer_by_layer("tide-split", w, opts)
    for f in ("placement", "copy", "resident"):
        assert np.array_equal(getattr(live, f), getattr(offline, f)), f
