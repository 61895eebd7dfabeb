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
