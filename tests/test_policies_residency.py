"""Shared policy helpers: rankings, top-B with id tie-breaks, static sets, refresh steps."""

from __future__ import annotations

import numpy as np
import pytest
from policy_cases import hand_workload, workload

from tidesim.errors import InputError
from tidesim.policies.residency import (
    by_count,
    commit_forwards,
    keep_best,
    popular_set,
    rank_experts,
    refresh_sets,
    refresh_steps,
    static_set,
    top_activated,
    warmup_forwards,
)


def test_rank_orders_by_count_then_lower_id() -> None:
    r = rank_experts(np.array([[2, 5, 2, 0, 5]]))
    assert r.order.tolist() == [[1, 4, 0, 2, 3]]
    assert r.rank.tolist() == [[2, 0, 3, 4, 1]]


def test_top_activated_excludes_idle_experts() -> None:
    counts = np.array([[0, 3, 0, 1], [2, 2, 2, 0]])
    r = rank_experts(counts)
    top = top_activated(counts, r.rank, np.array([3, 2]))
    assert top.tolist() == [[False, True, False, True], [True, True, False, False]]


def test_keep_best_keeps_budget_best_candidates() -> None:
    counts = np.array([[0, 0, 0, 4], [1, 1, 1, 1]])
    r = rank_experts(counts)
    cand = np.array([[True, True, True, True], [False, True, True, True]])
    kept = keep_best(cand, r.order, r.rank, np.array([3, 1]))
    # layer 0: expert 3 (4 tokens), then 0 and 1 by id; layer 1: expert 1 is the best candidate
    assert kept.tolist() == [[True, True, False, True], [False, True, False, False]]
    assert keep_best(cand, r.order, r.rank, np.array([0, 0])).sum() == 0


def test_warmup_and_popular_set() -> None:
    w = hand_workload()
    assert warmup_forwards(w, 0.5) == 2
    assert warmup_forwards(w, 0.01) == 1
    assert warmup_forwards(w, 1.0) == 4
    # totals over forwards 0-1: layer 0 [3, 4, 3, 2], layer 1 [1, 1, 1, 7]
    assert popular_set(w, np.array([2, 2]), 0.5).tolist() == [[True, True, False, False],
                                                               [True, False, False, True]]
    # size larger than the experts with tokens: idle experts fill the rest by id
    w1 = workload(np.array([[[0, 0, 5, 0]]]))
    assert popular_set(w1, np.array([3]), 1.0).tolist() == [[True, True, True, False]]


def test_static_set_checks_given_sets() -> None:
    w = hand_workload()
    given = np.array([[True, False, False, False], [False, False, True, True]])
    assert static_set(w, given, np.array([1, 2]), 0.5).tolist() == given.tolist()
    with pytest.raises(InputError, match="MoE layer 1"):
        static_set(w, given, np.array([1, 1]), 0.5)
    with pytest.raises(InputError, match="shape"):
        static_set(w, given[:1], np.array([1, 2]), 0.5)


def test_commit_and_refresh_steps() -> None:
    # prefill, block 0 (2 steps + commit), block 1 (3 steps + commit)
    w = workload(np.ones((8, 2, 4), dtype=np.int32), block=[-1, 0, 0, 0, 1, 1, 1, 1],
                 step=[0, 0, 1, 2, 0, 1, 2, 3], committed=[0, 2, 3, 0, 1, 1, 3, 0])
    assert commit_forwards(w).tolist() == [False, False, False, True, False, False, False, True]
    refresh = refresh_steps(w, np.array([2, 1]))
    assert refresh[:, 0].tolist() == [True, True, True, False, True, False, True, False]
    assert refresh[:, 1].tolist() == [True, True, True, False, True, True, True, False]


def test_by_count_evaluates_a_table() -> None:
    calls: list[int] = []

    def fn(t: np.ndarray) -> np.ndarray:
        calls.append(len(t))
        return t * 2.0

    out = by_count(fn, np.array([[0, 3], [3, 1]]))
    assert out.tolist() == [[0.0, 6.0], [6.0, 2.0]]
    assert calls == [2]   # once, for the distinct counts present (1 and 3)


def test_commit_rule_matches_the_phase_column_of_bundled_traces() -> None:
    from tidesim.bundled.paths import bundled_traces
    from tidesim.trace.io import read_trace
    from tidesim.workload import workload_from_trace

    traces = bundled_traces()
    if not traces:
        pytest.skip("no bundled traces in this checkout")
    for name, path in traces.items():
        trace = read_trace(path)
        phase = trace.forwards["phase"].to_numpy()
        w = workload_from_trace(trace)
        assert np.array_equal(commit_forwards(w), phase == "commit"), name


@pytest.mark.parametrize("seed", range(6))
def test_refresh_sets_is_top_activated_then_keep_best(seed: int) -> None:
    # the one implementation of the refresh rule equals its definition: top_activated, then keep_best
    rng = np.random.default_rng(seed)
    n, e = (1, 9) if seed % 3 == 0 else (int(rng.integers(2, 6)), int(rng.integers(1, 40)))
    counts = np.where(rng.random((n, e)) < 0.5, rng.integers(1, 4, (n, e)), 0)
    current = rng.random((n, e)) < 0.4
    budget = rng.integers(0, e + 2, n)
    ranking = rank_experts(counts)
    target = top_activated(counts, ranking.rank, budget)
    got_target, got = refresh_sets(current, counts, budget)
    np.testing.assert_array_equal(got_target, target)
    np.testing.assert_array_equal(got, keep_best(current | target, ranking.order, ranking.rank, budget))
