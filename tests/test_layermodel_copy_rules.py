"""The layer model's copy rules (docs/costmodel.md, issue 28), each on a tiny hand-computed case:
which background copies a forward waits for, which freed slot a copy takes, where the copy
slowdown sits and what it charges, and one timeline slice per expert copy.

Profile (tests/simkit.py): 1 ms fixed GPU work per forward (dense layer) and per MoE layer, GPU
expert 0.5 + 0.1 t ms (no launch overhead), CPU expert 2 + t ms on one worker, an expert copy
3 ms each way, 0.125 ms per activation vector each way, separate H2D and D2H engines. MoE
layer 1 is idle (its fixed 1 ms only). Times below are ms from the start of the run.
"""

from pathlib import Path

import numpy as np
import pytest
from simkit import MS, blank, profile, workload

from tidesim.layermodel import AFTER_GROUPED, ONDEMAND_LAUNCHES_PER_EXPERT, background_waits, copy_releases
from tidesim.run import run
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_ON_DEMAND, COPY_SYNC_REFRESH, CPU, GPU, Schedule
from tidesim.sim.timeline import Timeline
from tidesim.workload import Workload

HW = profile(workers=1, engines=2)
IDLE_LAYER = [0, 0, 0, 0]


def layer0(rows: list[list[int]], budget: int, initial: list[int]) -> tuple[Workload, Schedule]:
    """Forwards with MoE layer 0's counts as given; every activated expert on the GPU."""
    w = workload([[r, IDLE_LAYER] for r in rows])
    s = blank(w, budget=budget)
    s.initial_resident[0, initial] = True
    s.placement[w.expert_tokens > 0] = GPU
    return w, s


def prefetched(budget: int, second: list[int] | None = None) -> tuple[Workload, Schedule]:
    """Forward 0 runs expert 0 (1 token, 0.6 ms) and prefetches the idle experts 1, 2 (and 3 if
    the budget holds it) asynchronously into free slots; they stay resident. Forward 1's layer-0
    counts: `second` (expert 0 again by default), all on the GPU."""
    w, s = layer0([[1, 0, 0, 0], second or [1, 0, 0, 0]], budget=budget, initial=[0])
    copied = [1, 2, 3][:budget - 1]
    s.copy[0, 0, copied] = COPY_ASYNC_REFRESH
    s.resident[:, 0, [0, *copied]] = True
    return w, s


# ----- 1. the GPU waits only for the background copies of the experts it runs ----------------------

@pytest.mark.parametrize("engine", ["sim", "analytic"])
@pytest.mark.parametrize("runs, total_ms, stall_ms", [(1, 8.0, 0.8), (2, 9.6, 2.4)])
def test_gpu_waits_only_for_copies_of_the_experts_it_runs(engine: str, runs: int, total_ms: float,
                                                          stall_ms: float) -> None:
    # f0: dense [0, 1], L0 fixed [1, 2], expert 0 [2, 2.6]; background copies of 1 [2, 5] and of
    # 2 [5, 8]; L1 fixed [2.6, 3.6]. f1: dense [3.6, 4.6], L0 fixed [4.6, 5.6], then the grouped
    # kernel runs expert `runs` (1 token, 0.6 ms) and no other.
    # runs = 1: its copy landed at 5, no wait: [5.6, 6.2], L1 [6.2, 7.2]; the run then drains the
    #   copy of expert 2 (nobody runs it): total 8.0, 0.8 of it stall. (Waiting for every earlier
    #   copy, as before issue 28, gave 9.6.)
    # runs = 2: its copy lands at 8: wait 2.4, [8, 8.6], L1 [8.6, 9.6]: total 9.6.
    w, s = prefetched(budget=3, second=[1 if e == runs else 0 for e in range(4)])
    use, freed = background_waits(s, np.flatnonzero(s.copy.reshape(-1) == COPY_ASYNC_REFRESH))
    assert use.tolist() == [2 if e == runs else -1 for e in (1, 2)] and freed.tolist() == [-1, -1]
    m = run(w, s, HW, engine=engine)
    assert m.total_time_s == pytest.approx(total_ms * MS)
    assert m.breakdown_s["copy_stall"] == pytest.approx(stall_ms * MS)


@pytest.mark.parametrize("engine", ["sim", "analytic"])
def test_demand_copies_wait_for_background_copies_into_their_slots(engine: str) -> None:
    # f0 as above with budget 4: copies of 1 [2, 5], 2 [5, 8], 3 [8, 11]. f1: L0 fixed [4.6, 5.6];
    # expert 3 leaves without having run and is demoted: the D2H copy reads its slot, so it waits
    # at the gate for the copy of expert 3 (5.4 ms), runs [11, 14]; the grouped kernel (expert 0)
    # [14, 14.6]; L1 [14.6, 15.6].
    w, s = prefetched(budget=4)
    s.demote[1, 0, 3] = True
    s.resident[1, 0, 3] = False
    use, freed = background_waits(s, np.flatnonzero(s.copy.reshape(-1) == COPY_ASYNC_REFRESH))
    assert use.tolist() == [-1, -1, -1] and freed.tolist() == [-1, -1, 2]
    m = run(w, s, HW, engine=engine)
    assert m.total_time_s == pytest.approx(15.6 * MS)
    assert m.breakdown_s["copy_stall"] == pytest.approx(5.4 * MS)
    assert m.breakdown_s["sync_refresh"] == pytest.approx(3 * MS)


def test_oracle_prefetches_are_waited_for_by_no_one() -> None:
    w, s = prefetched(budget=3)
    s.free_async_copies = True
    use, freed = background_waits(s, np.flatnonzero(s.copy.reshape(-1) == COPY_ASYNC_REFRESH))
    assert use.tolist() == freed.tolist() == [-1, -1]


# ----- 2. which freed slot a copy takes: first in, first out ---------------------------------------

@pytest.mark.parametrize("engine", ["sim", "analytic"])
def test_freed_slots_are_taken_first_in_first_out(engine: str) -> None:
    # Budget 2, experts 0 (3 tokens, 0.8) and 3 (1 token, 0.6) resident, both run in the grouped
    # kernel [2, 3.4] and leave; experts 1 and 2 (1 token each, 0.6) are copied on demand, 1 only
    # passes through. Slots free in the order: 0's and 3's after the grouped kernel, then 1's
    # after its run. Copy 1 takes 0's slot: [3.4, 6.4], runs [6.4, 7.0]. Copy 2 takes the next
    # slot in that order, 3's (free at 3.4), so it follows on the engine: [6.4, 9.4], runs
    # [9.4, 10.0]; L1 fixed [10, 11]. (Taking the latest freed slot, 1's, would start it at 7.0
    # and end the run at 11.6.)
    w, s = layer0([[3, 1, 1, 1]], budget=2, initial=[0, 3])
    s.copy[0, 0, [1, 2]] = COPY_ON_DEMAND
    s.resident[0, 0, 2] = True
    od, _ = copy_releases(s)
    assert od.tolist() == [AFTER_GROUPED, AFTER_GROUPED]
    assert run(w, s, HW, engine=engine).total_time_s == pytest.approx(11.0 * MS)


def test_the_runtime_slot_plan_takes_freed_slots_in_the_same_order() -> None:
    slots = pytest.importorskip("tidesim_runtime.engine.slots")
    w, s = layer0([[3, 1, 1, 1]], budget=2, initial=[0, 3])
    s.copy[0, 0, [1, 2]] = COPY_ON_DEMAND
    s.resident[0, 0, 2] = True
    plan = slots.plan_slots(s)
    first = plan.initial_slots[0]                       # expert -> slot before the run
    ops = [(op.expert, op.slot, op.wait) for op in plan.layers[0][0].on_demand]
    assert ops == [(1, first[0], slots.AFTER_GROUPED), (2, first[3], slots.AFTER_GROUPED)]


# ----- 3. the copy slowdown: only real overlap, on the piece of work it overlaps ------------------

def background_copy_scene(budget: int) -> tuple[Workload, Schedule]:
    """Expert 0 (3 tokens) resident and in the grouped kernel, expert 1 (1 token) on the CPU and
    copied in the background for later; with budget 1 the copy takes expert 0's slot."""
    w = workload([[[3, 1, 0, 0], IDLE_LAYER]])
    s = blank(w, budget=budget)
    s.initial_resident[0, 0] = True
    s.placement[0, 0, :2] = [GPU, CPU]
    s.copy[0, 0, 1] = COPY_ASYNC_REFRESH
    s.resident[0, 0, 1] = True
    s.resident[0, 0, 0] = budget == 2
    return w, s


@pytest.mark.parametrize("engine", ["sim", "analytic"])
@pytest.mark.parametrize("budget, extra_ms", [(2, 0.4), (1, 0.0)])
def test_copy_slowdown_counts_only_copies_that_run_with_the_kernel(engine: str, budget: int,
                                                                   extra_ms: float) -> None:
    # Expert 0 (3 tokens, 0.8) runs in the grouped kernel [2, 2.8]; expert 1 (1 token) runs on the
    # CPU (activations [2, 2.125], CPU [2.125, 5.125]) and is copied in the background for later.
    # budget 2: a slot is free, the copy runs [2, 5] under the whole kernel: 0.8 ms overlapped,
    #   slowdown 0.5 x 0.8 = 0.4 ms on the grouped kernel (hidden: the CPU side ends the layer).
    # budget 1: the copy takes expert 0's slot, so it starts after the kernel [2.8, 5.8]; the
    #   results copy [5.8, 5.925] starts after it too: nothing overlaps, no slowdown (the charge
    #   before issue 28 was 0.5 x min(0.8, 3.125) = 0.4 ms).
    w, s = background_copy_scene(budget)
    base = run(w, s, HW, engine=engine)
    slow = run(w, s, profile(workers=1, engines=2, slows=0.5), engine=engine)
    assert slow.busy_s["gpu"] == pytest.approx(base.busy_s["gpu"] + extra_ms * MS)
    assert slow.total_time_s == pytest.approx(base.total_time_s)


@pytest.mark.parametrize("engine", ["sim", "analytic"])
@pytest.mark.parametrize("budget, overlap_ms, total_ms", [(2, 2.875, 7.4), (1, 2.325, 7.18)])
def test_copies_slow_the_cpu_pool_only_while_they_run_beside_it(engine: str, budget: int, overlap_ms: float,
                                                                total_ms: float) -> None:
    # pcie.copy_slows_cpu = 0.4, the scene above: the CPU pool runs [2.125, 5.125].
    # budget 2: the copy [2, 5] overlaps it 2.875 ms: the pool grows by 0.4 x 2.875 = 1.15 ms and
    #   ends at 6.275, its results copy [6.275, 6.4]; with layer 1's 1 ms the forward ends at 7.4.
    # budget 1: the copy [2.8, 5.8] overlaps it 2.325 ms: +0.93 ms, the pool ends at 6.055, its
    #   results copy [6.055, 6.18] (the engine is free from 5.8): 7.18.
    w, s = background_copy_scene(budget)
    base = run(w, s, HW, engine=engine)
    hw = profile(workers=1, engines=2)
    hw.pcie.copy_slows_cpu = 0.4
    slow = run(w, s, hw, engine=engine)
    assert slow.busy_s["cpu"] == pytest.approx(base.busy_s["cpu"] + 0.4 * overlap_ms * MS)
    assert slow.busy_s["gpu"] == pytest.approx(base.busy_s["gpu"])
    assert slow.total_time_s == pytest.approx(total_ms * MS)


def test_copy_slowdown_sits_at_the_end_of_the_grouped_kernel() -> None:
    # budget 2 case above: the grouped kernel's slice grows from 0.8 to 1.2 ms, [2, 3.2]
    w = workload([[[3, 1, 0, 0], IDLE_LAYER]])
    s = blank(w, budget=2)
    s.initial_resident[0, 0] = True
    s.placement[0, 0, :2] = [GPU, CPU]
    s.copy[0, 0, 1] = COPY_ASYNC_REFRESH
    s.resident[0, 0, :2] = True
    tl = Timeline()
    run(w, s, profile(workers=1, engines=2, slows=0.5), timeline=tl)
    grouped = [(start / MS, dur / MS) for _, start, dur, name, _ in tl.events if "grouped" in name]
    assert grouped == [(pytest.approx(2.0), pytest.approx(1.2))]


# ----- 4. the cost table's on-demand launches ------------------------------------------------------

def test_cost_terms_table_states_the_on_demand_launches() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "costmodel.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| on-demand expert |"))
    assert f"+ {ONDEMAND_LAUNCHES_PER_EXPERT} x launch" in row


# ----- 5. one timeline slice per expert copy ------------------------------------------------------

def test_sync_copies_and_demotions_are_one_slice_each() -> None:
    # Budget 2, experts 0 and 1 resident and demoted; 2 and 3 (1 token each) copied in
    # synchronously. From the gate at 2: H2D expert 2 [2, 5], expert 3 [5, 8]; D2H expert 0
    # [2, 5], expert 1 [5, 8]; then the grouped kernel [8, 9.2].
    w, s = layer0([[0, 0, 1, 1]], budget=2, initial=[0, 1])
    s.copy[0, 0, [2, 3]] = COPY_SYNC_REFRESH
    s.demote[0, 0, [0, 1]] = True
    s.resident[0, 0, [2, 3]] = True
    tl = Timeline()
    m = run(w, s, HW, timeline=tl)
    copies = sorted((tl.rows[row], name, round(start / MS, 9), round(dur / MS, 9))
                    for row, start, dur, name, _ in tl.events if "sync refresh" in name or "demotion" in name)
    assert copies == [("D2H copy engine", "f0 moe0: expert 0 demotion", 2.0, 3.0),
                      ("D2H copy engine", "f0 moe0: expert 1 demotion", 5.0, 3.0),
                      ("H2D copy engine", "f0 moe0: expert 2 sync refresh", 2.0, 3.0),
                      ("H2D copy engine", "f0 moe0: expert 3 sync refresh", 5.0, 3.0)]
    assert m.total_time_s == pytest.approx((9.2 + 1) * MS)
