"""Every policy's schedule on a tiny workload, simulated, against timelines computed by hand.

Workload: 3 denoising steps of block 1 (not the first block), 2 MoE layers, 4 experts; budget 2,
tau 2. Profile (tests/simkit.py): 1 ms fixed GPU work per forward and per MoE layer, GPU expert
0.5 + 0.1 t ms, CPU expert 2 + t ms on one worker, expert copy 3 ms, 0.125 ms per activation,
separate H2D and D2H engines. Each case first pins the decisions the hand timeline assumes.
"""

import pytest
from simkit import MS, profile, workload

from tidesim.policies import PolicyOptions, build_schedule, uniform
from tidesim.run import run
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_ON_DEMAND, COPY_SYNC_REFRESH, CPU, GPU

W = workload([[[3, 0, 1, 0], [0, 2, 0, 2]], [[2, 1, 1, 0], [0, 3, 0, 1]], [[0, 1, 3, 0], [1, 2, 0, 1]]], block=1)
HW = profile(workers=1, engines=2)
FIXED = 3 * 3   # per forward: dense layer + 2 MoE layers, 1 ms each


def schedule(name, refresh="sync"):
    opts = PolicyOptions(budget=uniform(2, 2), tau=uniform(2, 2), hw=HW, refresh=refresh, warmup_fraction=0.34)
    return build_schedule(name, W, opts)


def total_ms(s, engine="sim"):
    return run(W, s, HW, engine=engine).total_time_s / MS


def test_all_gpu():
    s = schedule("all-gpu")
    assert s.initial_resident.all() and (s.copy == 0).all()
    layers = [0.8 + 0.6, 0.7 + 0.7, 0.7 + 0.6 + 0.6, 0.8 + 0.6, 0.6 + 0.8, 0.6 + 0.7 + 0.6]
    assert total_ms(s) == pytest.approx(FIXED + sum(layers), rel=1e-3)


def test_full_swap():
    s = schedule("full-swap")
    assert s.copy[0, 0].tolist() == [COPY_ON_DEMAND, 0, COPY_ON_DEMAND, 0]
    assert s.copy[1, 0, 1] == COPY_ON_DEMAND and s.copy[2, 1, 0] == COPY_ON_DEMAND
    # f0: copies into free slots end at 3 and 6, each expert runs after its copy.
    # f1 L0: expert 1's copy goes into the slot of expert 0, which leaves but runs in the grouped
    # kernel (0.7 + 0.6): the copy waits for it, [1.3, 4.3], then expert 1 runs 0.6 (slot rule).
    # f2 L1 likewise: expert 0 takes expert 1's slot after the grouped kernel (0.7 + 0.6).
    layers = [6 + 0.6, 6 + 0.7, 1.3 + 3 + 0.6, 0.8 + 0.6, 0.6 + 0.8, 1.3 + 3 + 0.6]
    assert total_ms(s) == pytest.approx(FIXED + sum(layers), rel=1e-3)
    assert total_ms(s, "analytic") == pytest.approx(FIXED + sum(layers), rel=1e-3)


def test_cpu_routing():
    s = schedule("cpu-routing")
    assert s.initial_resident.tolist() == [[True, False, True, False], [False, True, False, True]]
    assert s.placement[1, 0, 1] == CPU and s.placement[2, 1, 0] == CPU
    cpu_one = 0.125 + 3 + 0.125          # one token: activations, CPU expert, results
    layers = [1.4, 1.4, max(1.3, cpu_one), 1.4, max(0.8, cpu_one), max(1.3, cpu_one)]
    assert total_ms(s) == pytest.approx(FIXED + sum(layers), rel=1e-3)


def test_fiddler():
    s = schedule("fiddler")
    assert s.copy[0, 1, 3] == COPY_ON_DEMAND and s.copy[2, 0, 2] == COPY_ON_DEMAND
    assert s.placement[1, 0, 1] == s.placement[1, 0, 2] == CPU
    two_cpu = 0.25 + 6 + 0.25
    layers = [3.25, 3 + 0.7, two_cpu, max(0.8, 3.25), 3 + 0.8, two_cpu]
    assert total_ms(s) == pytest.approx(FIXED + sum(layers), rel=1e-3)


def test_tide_sync():
    s = schedule("tide")
    assert (s.copy[0] == COPY_SYNC_REFRESH).sum() == 4 and (s.copy[1] == 0).all()
    assert s.copy[2, 0, 1] == s.copy[2, 1, 0] == COPY_SYNC_REFRESH and s.placement[2, 1, 3] == CPU
    # refresh steps 0 and 2 copy synchronously (3 ms each, serial on the H2D engine)
    layers = [6 + 1.4, 6 + 1.4, 3.25, 1.4, 3 + 1.4, 3 + max(1.3, 3.25)]
    assert total_ms(s) == pytest.approx(FIXED + sum(layers), rel=1e-3)
    assert total_ms(s, "analytic") == pytest.approx(FIXED + sum(layers), rel=1e-3)


def test_tide_async():
    s = schedule("tide", refresh="async")
    assert (s.copy[0] == COPY_ASYNC_REFRESH).sum() == 4 and (s.placement[0][s.copy[0] > 0] == CPU).all()
    # f0 L0: copies [2, 8] in the background; CPU 0.5 + 8 -> results [10.5, 11]; L1 likewise to 21.
    # f1: 22-23 fixed, L0 CPU side to 26.25, L1 to 28.65.
    # f2 L0: copy of expert 1 [30.65, 33.65]; CPU side 30.65 + 0.125 + 3 -> results [33.775, 33.9];
    # L1 (starts 34.9): expert 0's copy goes into the slot of expert 3, which leaves but runs in
    # this forward's grouped kernel (0.7 + 0.6), so it starts at 36.2 and holds the engine to 39.2;
    # the CPU results (ready at 38.025) wait for that copy, [39.2, 39.325].
    assert total_ms(s) == pytest.approx(39.325, rel=1e-3)


def test_tide_reference():
    s = schedule("tide-reference")
    assert s.demote[0, 0, 1] and s.copy[0, 0, 2] == COPY_SYNC_REFRESH
    # each refresh: one copy in (H2D) and one demotion (D2H) in parallel: 3 ms
    layers = [3 + 1.4, 3 + 1.4, 3.25, 1.4, 3 + 1.4, 3 + max(1.3, 3.25)]
    assert total_ms(s) == pytest.approx(FIXED + sum(layers), rel=1e-3)
    assert total_ms(s, "analytic") == pytest.approx(FIXED + sum(layers), rel=1e-3)


def test_oracle():
    s = schedule("oracle")
    assert s.is_bound and s.free_async_copies and s.placement[1, 0, 2] == CPU
    layers = [1.4, 1.4, max(1.3, 3.25), 1.4, 1.4, max(1.3, 3.25)]
    assert total_ms(s) == pytest.approx(FIXED + sum(layers), rel=1e-3)
    assert total_ms(s, "analytic") == pytest.approx(FIXED + sum(layers), rel=1e-3)
    assert s.placement[0, 0, 0] == GPU
