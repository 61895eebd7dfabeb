"""The analytic cost model: exact where resources do not overlap (same numbers as the simulator),
bounded everywhere, and its documented approximations."""

import numpy as np
import pytest
from simkit import MS, all_cpu, all_gpu, blank, on_demand, profile, random_schedule, workload

from tidesim.costmodel import _clamp_scan, estimate, lower_bound
from tidesim.run import run
from tidesim.schedule import COPY_ASYNC_REFRESH, GPU, schedule_problems
from tidesim.sim.costs import schedule_costs

W = workload([[[1, 0, 2, 0], [0, 3, 0, 1]], [[2, 2, 0, 0], [1, 0, 0, 1]], [[0, 4, 1, 1], [2, 2, 2, 2]]])


@pytest.mark.parametrize("make", [all_gpu, all_cpu, on_demand])
@pytest.mark.parametrize("engines", [1, 2])
def test_exact_without_overlap(make, engines):
    hw = profile(workers=1, engines=engines)
    sim, ana = run(W, make(W), hw), run(W, make(W), hw, engine="analytic")
    assert ana.total_time_s == pytest.approx(sim.total_time_s, rel=1e-9)
    for key, value in sim.breakdown_s.items():
        assert ana.breakdown_s[key] == pytest.approx(value, rel=1e-9, abs=1e-12)
    assert ana.layer_time_s == pytest.approx(sim.layer_time_s, rel=1e-9)


# unequal CPU tasks that do not pack evenly on 2 workers (3, 1, 2 tokens: 5, 3, 4 ms; LPT 7, the old
# pool bound 6): with these the 2-worker schedules below hit layer-forwards where the two differ
W_UNEVEN = workload([[[3, 1, 2, 0], [5, 4, 3, 3]], [[1, 2, 4, 1], [2, 0, 3, 1]], [[4, 1, 1, 2], [3, 3, 1, 2]]])


@pytest.mark.parametrize("w", [W, W_UNEVEN], ids=["W", "uneven"])
@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_exact_for_sync_schedules(seed, workers, w):
    # both engines charge the CPU pool's longest-first makespan, so without background copies they
    # agree for any pool size (until issue 28's pool fix, only with one worker or equal tasks)
    sched = random_schedule(w, budget=2, seed=seed, allow_async=False)
    assert schedule_problems(sched, w) == []
    for engines in (1, 2):
        hw = profile(workers=workers, engines=engines)
        assert run(w, sched, hw, engine="analytic").total_time_s == pytest.approx(
            run(w, sched, hw).total_time_s, rel=1e-9)


def test_cpu_pool_time_is_the_longest_first_makespan_in_both_engines():
    # CPU expert 2 + t ms on 2 workers, activations and results 0.125 ms per routed pair each way.
    # f0 l0: tokens 3, 1, 2 -> tasks 5, 3, 4 ms: 5 -> w0, 4 -> w1, 3 -> w1 (4 < 5): makespan 7
    #        (the old bound max(12 / 2, 5, 2 x 3) = 6); 6 pairs: 0.75 out, 0.75 back -> 8.5 ms
    # f0 l1: tokens 5, 4, 3, 3 -> 7, 6, 5, 5: 7 -> w0, 6 -> w1, 5 -> w1 (11), 5 -> w0 (12): 12
    #        (bound max(23 / 2, 7, 2 x 5) = 11.5); 15 pairs: 1.875 each way -> 15.75 ms
    # f1 l0: tokens 1, 1, 1, 1 -> four 3 ms tasks: 3, 3 then 6, 6: 6; 4 pairs -> 7 ms
    # f1 l1: tokens 2 -> one 4 ms task; 2 pairs -> 4.5 ms
    # fixed: 1 ms dense + 2 x 1 ms MoE layers per forward -> 6 ms
    w = workload([[[3, 1, 2, 0], [5, 4, 3, 3]], [[1, 1, 1, 1], [0, 2, 0, 0]]])
    hand = (6 + 8.5 + 15.75 + 7 + 4.5) * MS
    for engine in ("sim", "analytic"):
        assert run(w, all_cpu(w), profile(workers=2), engine=engine).total_time_s == pytest.approx(hand, rel=1e-12)
    # the lower bound keeps the pool's bound, which any pool order respects: 7.5 + 15.25 instead
    assert lower_bound(schedule_costs(w, all_cpu(w), profile(workers=2))) == pytest.approx(
        (6 + 7.5 + 15.25 + 7 + 4.5) * MS, rel=1e-12)


@pytest.mark.parametrize(("workers", "hand_ms"), [
    (1, 6 + 13.5 + 26.75 + 13 + 4.5),     # one worker: the sums 12, 23, 12, 4
    (3, 6 + 6.5 + 13.75 + 7 + 4.5),       # f0 l0: 3 tasks on 3 workers: 5; f0 l1: 7, 6, 5, then 5 -> 10;
                                          # f1 l0: 3, 3, 3, then 3 -> 6
    (8, 6 + 6.5 + 10.75 + 4 + 4.5),       # more workers than tasks: the longest task, 5, 7, 3, 4
])
def test_cpu_pool_makespan_by_hand_for_other_pool_sizes(workers, hand_ms):
    w = workload([[[3, 1, 2, 0], [5, 4, 3, 3]], [[1, 1, 1, 1], [0, 2, 0, 0]]])
    for engine in ("sim", "analytic"):
        assert run(w, all_cpu(w), profile(workers=workers), engine=engine).total_time_s == pytest.approx(
            hand_ms * MS, rel=1e-12)


def test_pool_bound_counts_rounds_of_equal_tasks():
    w = workload([[[1, 1, 1, 0], [0, 0, 0, 0]]])
    # three 3 ms tasks on 2 workers: two rounds, 6 ms, in both engines
    for engine in ("sim", "analytic"):
        m = run(w, all_cpu(w), profile(workers=2), engine=engine)
        assert m.total_time_s == pytest.approx((3 + 0.375 + 6 + 0.375) * MS)


def test_lower_bound_hand_computed():
    c = schedule_costs(W, on_demand(W), profile())
    # per layer: fixed + max(GPU work, copies + cheapest on-demand expert)
    f0 = (1 + 6.6) + (1 + 6.6)
    f1 = (1 + 6.7) + (1 + 6.6)
    f2 = (1 + 9.6) + (1 + 12.7)   # 3 copies + 0.6 ; 4 copies + 0.7
    assert lower_bound(c) == pytest.approx((3 + f0 + f1 + f2) * MS)


def test_estimate_never_below_the_bound():
    for seed in range(8):
        sched = random_schedule(W, budget=2, seed=seed)
        c = schedule_costs(W, sched, profile(workers=2, gbs=0.0002))
        assert estimate(c).total_s >= lower_bound(c) * (1 - 1e-12)


def test_layer_times_add_up():
    sched = random_schedule(W, budget=3, seed=3)
    m = run(W, sched, profile(workers=2), engine="analytic")
    assert sum(m.breakdown_s.values()) == pytest.approx(m.total_time_s)
    fixed_fwd = 3 * MS
    assert np.sum(m.layer_time_s) + fixed_fwd <= m.total_time_s * (1 + 1e-12)


def test_refresh_burst_after_the_backlog_emptied_waits_again():
    # Profile (tests/simkit.py): 1 ms dense work per forward and fixed work per MoE layer, GPU
    # expert 0.5 + 0.1 t ms, an expert copy 3 ms, two engines; MoE layer 1 idle (1 ms). Budget 4.
    # f0: dense [0, 1], L0 fixed [1, 2], expert 0 [2, 2.6]; background copies of 1 [2, 5],
    #     2 [5, 8], 3 [8, 11]; L1 [2.6, 3.6].
    # f1: dense [3.6, 4.6], L0 fixed [4.6, 5.6]; runs expert 3: waits to 11 (5.4 ms), [11, 11.6];
    #     L1 [11.6, 12.6]. The backlog is empty from 11 on.
    # f2: dense [12.6, 13.6], L0 fixed [13.6, 14.6]; expert 0 [14.6, 15.2]; a new burst replaces
    #     1 and 2 (idle now): copies of 4 [14.6, 17.6], 5 [17.6, 20.6]; L1 [15.2, 16.2].
    # f3: dense [16.2, 17.2], L0 fixed [17.2, 18.2]; runs expert 5: waits to 20.6 (2.4 ms),
    #     [20.6, 21.2]; L1 [21.2, 22.2]. Total 22.2 ms, 5.4 + 2.4 = 7.8 ms of it waiting.
    # (A queue that keeps f1's 5.4 ms of stretch as credit after the backlog emptied sees no wait
    # in f3 and gives 19.8 ms.)
    idle = [0] * 6
    rows = [[1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]]
    w = workload([[r, idle] for r in rows])
    s = blank(w, budget=4)
    s.initial_resident[0, 0] = True
    s.placement[w.expert_tokens > 0] = GPU
    s.copy[0, 0, [1, 2, 3]] = COPY_ASYNC_REFRESH
    s.copy[2, 0, [4, 5]] = COPY_ASYNC_REFRESH
    s.resident[:2, 0, [0, 1, 2, 3]] = True
    s.resident[2:, 0, [0, 3, 4, 5]] = True
    assert schedule_problems(s, w) == []
    hw = profile(workers=1, engines=2)
    for engine in ("sim", "analytic"):
        m = run(w, s, hw, engine=engine)
        assert m.total_time_s == pytest.approx(22.2 * MS)
        assert m.breakdown_s["copy_stall"] == pytest.approx(7.8 * MS)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000])
def test_clamp_scan_equals_the_step_by_step_recursion(n):
    rng = np.random.default_rng(n)
    b = rng.normal(size=n)
    hi = b + np.where(rng.random(n) < 0.3, np.inf, 2.0 * rng.random(n))
    lo = np.maximum(np.where(rng.random(n) < 0.5, -np.inf, rng.normal(size=n)) + b, 0.0)
    x, expected = 0.0, []
    for k in range(n):
        x = max(min(x + b[k], hi[k]), lo[k])
        expected.append(x)
    assert _clamp_scan(b, hi, lo) == pytest.approx(expected, abs=1e-12)
