"""Longest-first placement of CPU expert tasks."""

from hypothesis import given
from hypothesis import strategies as st

from tidesim.sim.lpt import lpt_assign, lpt_makespan


def test_hand_example():
    # 5 -> w0, 4 -> w1, 3 -> w1 (free at 4), 2 -> w0 (free at 5): makespan 7
    assert lpt_makespan([3.0, 5.0, 2.0, 4.0], [0, 1, 2, 3], 2) == 7.0
    jobs = {j.task: (j.worker, j.start) for j in lpt_assign([3.0, 5.0, 2.0, 4.0], [0, 1, 2, 3], 2)}
    assert jobs == {1: (0, 0.0), 3: (1, 0.0), 0: (1, 4.0), 2: (0, 5.0)}


def test_ties_break_on_expert_id_then_worker():
    jobs = lpt_assign([1.0, 1.0, 1.0], [7, 3, 5], 2)
    assert [(j.task, j.worker, j.start) for j in jobs] == [(1, 0, 0.0), (2, 1, 0.0), (0, 0, 1.0)]


@given(st.lists(st.floats(0.01, 10.0), min_size=0, max_size=30), st.integers(1, 6))
def test_makespan_matches_assignment_and_bounds(times, workers):
    keys = list(range(len(times)))
    span = lpt_makespan(times, keys, workers)
    jobs = lpt_assign(times, keys, workers)
    ends = [j.start + j.duration for j in jobs]
    assert abs(span - (max(ends) if ends else 0.0)) < 1e-9
    if times:
        assert span >= max(sum(times) / workers, max(times)) - 1e-9
        assert span <= sum(times) / workers + max(times) + 1e-9   # greedy list-scheduling bound


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(1, 6)), min_size=0, max_size=40), st.integers(1, 4))
def test_vectorised_makespans_equal_the_scalar_rule(tasks, workers):
    import numpy as np

    from tidesim.sim.lpt import lpt_makespans

    tasks = sorted(set((g, t) for g, t in tasks))          # one task per (group, expert)
    group = np.array([g for g, _ in tasks], dtype=np.int64)
    keys = np.arange(len(tasks), dtype=np.int64)
    times = np.array([0.5 + 0.25 * t for _, t in tasks])
    got = lpt_makespans(group, times, keys, 5, workers)
    for g in range(5):
        sel = [i for i in range(len(tasks)) if group[i] == g]
        assert got[g] == lpt_makespan([float(times[i]) for i in sel], [int(keys[i]) for i in sel], workers)
