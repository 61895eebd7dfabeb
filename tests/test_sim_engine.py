"""The simulator against timelines computed by hand (tests/simkit.py: round-number profile, ms).

Profile: 1 ms fixed GPU work per forward (dense layer 0) and per MoE layer; GPU expert
0.5 + 0.1 t ms; CPU expert 2 + 1 t ms; expert copy 3 ms; activation 0.125 ms per routed pair.
"""

import numpy as np
import pytest
from simkit import MS, all_cpu, all_gpu, blank, on_demand, profile, workload

from tidesim.run import run
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_ON_DEMAND, COPY_SYNC_REFRESH, CPU, GPU

W = workload([[[1, 0, 2, 0], [0, 3, 0, 1]], [[2, 2, 0, 0], [1, 0, 0, 1]]])


def close(value, expected_ms):
    assert value == pytest.approx(expected_ms * MS, rel=1e-3)


def test_all_gpu_by_hand():
    m = run(W, all_gpu(W), profile())
    # 2 forwards x (1 dense + 2 MoE) ms fixed; experts 1.3 + 1.4 + 1.4 + 1.2 ms
    close(m.total_time_s, 6 + 5.3)
    close(m.breakdown_s["gpu_fixed"], 6)
    close(m.breakdown_s["gpu_experts"], 5.3)
    assert m.hit_ratio == 1.0 and m.cpu_tokens == 0 and m.gpu_tokens == int(W.expert_tokens.sum())
    assert m.h2d_bytes == 0 and m.expert_copies == 0
    close(m.layer_time_s[0], (1 + 1.3) + (1 + 1.4))
    close(m.layer_time_s[1], (1 + 1.4) + (1 + 1.2))


def test_all_cpu_one_worker_by_hand():
    m = run(W, all_cpu(W), profile(workers=1))
    # per layer: activations D2H + sum of CPU experts + results H2D
    layers = [0.375 + 7 + 0.375, 0.5 + 8 + 0.5, 0.5 + 8 + 0.5, 0.25 + 6 + 0.25]
    close(m.total_time_s, 6 + sum(layers))
    close(m.breakdown_s["cpu_wait"], sum(layers))
    assert m.cpu_share == 1.0 and m.hit_ratio == 0.0
    assert m.d2h_bytes == m.h2d_bytes == W.expert_tokens.sum() * 64


def test_cpu_workers_longest_first():
    w = workload([[[3, 1, 2, 0], [0, 0, 0, 0]]])
    m = run(w, all_cpu(w), profile(workers=2))
    # tasks 5, 3, 4 ms on 2 workers longest first: 5 | 4 + 3 -> 7 ms
    close(m.total_time_s, 1 + 1 + 0.75 + 7 + 0.75 + 1)


def test_on_demand_pipeline_by_hand():
    m = run(W, on_demand(W), profile())
    # f0 L0: copies end at 3 and 6; computes 0.6 then 0.7 -> 6.7; f0 L1: 3 + 0.8, 6 + 0.6 -> 6.6 ...
    close(m.total_time_s, 6 + 6.7 + 6.6 + 6.7 + 6.6)
    close(m.breakdown_s["copy_stall"], 6.7 + 6.6 + 6.7 + 6.6 - 5.3)
    assert m.expert_copies == 8 and m.refresh_copies == 0
    assert m.h2d_bytes == 8 * 1536


def _sync_schedule():
    w = workload([[[1, 1, 0, 0], [0, 0, 1, 1]]])
    s = blank(w, budget=2)
    s.initial_resident[0, [2, 3]] = True
    s.initial_resident[1, [0, 1]] = True
    s.copy[0, 0, [0, 1]] = COPY_SYNC_REFRESH
    s.demote[0, 0, [2, 3]] = True
    s.placement[0, 0, [0, 1]] = GPU
    s.placement[0, 1, [2, 3]] = CPU
    s.resident[0, 0, [0, 1]] = True
    s.resident[0, 1, [0, 1]] = True
    return w, s


@pytest.mark.parametrize("engines, sync_ms", [(2, 6.0), (1, 12.0)])
def test_sync_refresh_and_demotions_block_the_layer(engines, sync_ms):
    w, s = _sync_schedule()
    m = run(w, s, profile(engines=engines))
    # L0: 1 fixed + sync (two 3 ms copies in, two out) + 1.2 grouped; L1: 1 + 0.25 + 6 + 0.25
    close(m.total_time_s, 1 + (1 + sync_ms + 1.2) + (1 + 6.5))
    close(m.breakdown_s["sync_refresh"], sync_ms)
    close(m.copy_stall_s, sync_ms)
    assert m.refresh_copies == 2 and m.d2h_bytes == 2 * 1536 + 2 * 64


def _mixed():
    w = workload([[[2, 1, 1, 1], [0, 0, 0, 0]]])
    s = blank(w, budget=3)
    s.initial_resident[0, 0] = True
    s.placement[0, 0] = [GPU, GPU, CPU, GPU]
    s.copy[0, 0, [1, 3]] = COPY_ON_DEMAND
    s.resident[0, 0, 0] = True
    return w, s


@pytest.mark.parametrize("engines, layer_ms", [(2, 6.6), (1, 6.725)])
def test_cpu_and_on_demand_share_the_copy_engine(engines, layer_ms):
    w, s = _mixed()
    m = run(w, s, profile(engines=engines))
    # 2 engines: copies [0,3] [3,6]; GPU 0.7, then 3-3.6, 6-6.6; CPU 0.125 + 3 done at 3.125, its
    # results wait for the copies on the H2D engine: [6, 6.125] -> layer side 6.6.
    # 1 engine: activations first [0, 0.125], copies [0.125, 6.125], GPU ends 6.725.
    close(m.total_time_s, 1 + 1 + layer_ms + 1)
    close(m.breakdown_s["gpu_experts"], 1.9)
    close(m.breakdown_s["copy_stall"], layer_ms - 1.9)


def _async(gbs):
    w = workload([[[0, 1, 0, 0], [0, 0, 0, 1]], [[1, 1, 0, 0], [0, 0, 0, 1]]])
    s = blank(w, budget=2)
    s.initial_resident[0, 1] = s.initial_resident[1, 3] = True
    s.placement[w.expert_tokens > 0] = GPU
    s.copy[0, 0, 0] = COPY_ASYNC_REFRESH
    s.resident[:, 0, :2] = True
    s.resident[:, 1, 3] = True
    return w, s, profile(gbs=gbs)


def test_async_refresh_overlaps_when_there_is_time():
    w, s, hw = _async(0.000512)
    m = run(w, s, hw)
    # copy [2, 5] runs while f0 computes (done at 4.2) and f1 starts; f1 L0 experts at 6.2 > 5
    close(m.total_time_s, 4.2 + 1 + 1 + 1.2 + 1 + 0.6)
    assert m.breakdown_s["copy_stall"] == 0.0 and m.refresh_copies == 1


def test_async_refresh_stalls_the_next_forward_when_late():
    w, s, hw = _async(0.000256)          # half the bandwidth: the copy takes 6 ms, [2, 8]
    m = run(w, s, hw)
    # f1 L0 reaches its experts at 6.2 and waits until 8
    close(m.total_time_s, 8 + 1.2 + 1 + 0.6)
    close(m.breakdown_s["copy_stall"], 1.8)
    a = run(w, s, hw, engine="analytic")
    close(a.total_time_s, 10.8)


def test_background_copy_is_not_preempted_by_demand():
    # f0 L0 routes one token to the CPU: its results (t = 5.25) wait for the async copy [2, 8]
    w = workload([[[1, 0, 0, 0], [0, 0, 0, 1]], [[1, 0, 0, 0], [0, 0, 0, 1]]])
    s = blank(w, budget=1)
    s.initial_resident[1, 3] = True
    s.placement[0, 0, 0] = CPU
    s.copy[0, 0, 0] = COPY_ASYNC_REFRESH
    s.placement[1, 0, 0] = GPU
    s.placement[:, 1, 3] = GPU
    s.resident[:, 0, 0] = True
    s.resident[:, 1, 3] = True
    m = run(w, s, profile(gbs=0.000256))
    # f0: act [2, 2.25], CPU [2.25, 5.25], results [8, 8.25]; L1 to 9.85; f1: 10.85, 11.85, 12.45, 14.05
    close(m.total_time_s, 8.25 + 1 + 0.6 + 1 + 1 + 0.6 + 1 + 0.6)
    close(m.breakdown_s["cpu_wait"], 8.25 - 2)


@pytest.mark.parametrize("engine", ["sim", "analytic"])
def test_copies_slow_compute_only_where_they_overlap(engine):
    w, s = _mixed()
    base = run(w, s, profile(engines=2), engine=engine)
    slow = run(w, s, profile(engines=2, slows=0.5), engine=engine)
    # From the sync end: grouped kernel [0, 0.7] under copy 1 [0, 3]: 0.7 overlapped; expert 1
    # runs [3, 3.6] under copy 3 [3, 6]: 0.6; expert 3 runs [6, 6.6] under the CPU results
    # [6, 6.125] (the pool is done at 3.125, the results queue behind the copies): 0.125.
    # Slowdown 0.5 x each: grouped + 0.35, expert 1 + 0.3, expert 3 + 0.0625 = 0.7125 ms of GPU work.
    assert slow.busy_s["gpu"] == pytest.approx(base.busy_s["gpu"] + 0.7125 * MS)
    # grouped [0, 1.05] and expert 1 [3, 3.9] stay hidden behind the copies; expert 3 runs
    # [6, 6.6625]: the layer ends 0.0625 ms later
    assert slow.total_time_s == pytest.approx(base.total_time_s + 0.0625 * MS)


def test_breakdown_sums_to_total_and_busy_is_work():
    for sched in (all_gpu(W), all_cpu(W), on_demand(W)):
        m = run(W, sched, profile(workers=2))
        assert sum(m.breakdown_s.values()) == pytest.approx(m.total_time_s, rel=1e-12)
        assert m.busy_s["gpu"] <= m.total_time_s * (1 + 1e-12)
        assert m.step_time_s == pytest.approx(m.total_time_s / 2)
        assert m.tokens_per_s == pytest.approx(4 / m.total_time_s)
        assert np.sum(m.layer_time_s) + 2 * MS == pytest.approx(m.total_time_s)


def test_free_async_copies_are_counted_not_charged():
    w, s, hw = _async(0.000256)
    s.free_async_copies = True
    for engine in ("sim", "analytic"):
        m = run(w, s, hw, engine=engine)
        close(m.total_time_s, 4.2 + 1 + 1 + 1.2 + 1 + 0.6)
        assert m.refresh_copies == 1 and m.h2d_bytes == 1536 and m.busy_s["h2d"] == 0.0
