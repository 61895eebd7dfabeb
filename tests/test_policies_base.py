"""The policy registry and the checks every policy gets through build_schedule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_cases import hand_workload, options, workloads

from tidesim.errors import InputError
from tidesim.policies import POLICY_MODULES, build_schedule, policy_names
from tidesim.policies.base import policy_summary
from tidesim.schedule import schedule_problems

ONLINE = ["full-swap", "cpu-routing", "fiddler", "tide", "tide-reference", "tide-split"]


def test_registry_order_and_summaries() -> None:
    names = policy_names()
    mine = ["all-gpu", "full-swap", "cpu-routing", "fiddler", "tide", "tide-reference", "oracle"]
    assert [n for n in names if n in mine] == mine
    assert all(policy_summary(n) for n in names)
    assert POLICY_MODULES.index("tidesim.policies.tide_reference") < POLICY_MODULES.index("tidesim.policies.oracle")


def test_unknown_policy_and_bad_options() -> None:
    w = hand_workload()
    with pytest.raises(InputError, match="unknown policy"):
        build_schedule("nope", w, options(w, 2))
    with pytest.raises(InputError, match="budget must lie"):
        build_schedule("tide", w, options(w, 5))
    with pytest.raises(InputError, match="tau must be at least 1"):
        build_schedule("tide", w, options(w, 2, tau=0))
    with pytest.raises(InputError, match="refresh"):
        build_schedule("tide", w, options(w, 2, refresh="lazy"))


@settings(max_examples=40, deadline=None)
@given(w=workloads(), data=st.data())
def test_every_policy_keeps_the_contract_and_is_deterministic(w, data) -> None:  # type: ignore[no-untyped-def]
    e = w.num_experts
    budget = data.draw(st.lists(st.integers(1, e), min_size=w.num_layers, max_size=w.num_layers))
    tau = data.draw(st.lists(st.integers(1, 3), min_size=w.num_layers, max_size=w.num_layers))
    refresh = data.draw(st.sampled_from(["sync", "async"]))
    for name in policy_names():
        if name not in ONLINE + ["all-gpu", "oracle"]:
            continue
        opts = options(w, budget, tau, refresh)
        first = build_schedule(name, w, opts)
        assert schedule_problems(first, w) == [], name
        again = build_schedule(name, w, options(w, budget, tau, refresh))
        for field in ("placement", "copy", "demote", "resident", "initial_resident", "budget"):
            assert np.array_equal(getattr(first, field), getattr(again, field)), (name, field)
        assert first.policy == name


@settings(max_examples=40, deadline=None)
@given(w=workloads(), data=st.data())
def test_online_policies_are_causal(w, data) -> None:  # type: ignore[no-untyped-def]
    """Changing the routing after forward f never changes a decision at forward <= f."""
    e, layers = w.num_experts, w.num_layers
    cut = data.draw(st.integers(0, w.num_forwards - 1))
    later = data.draw(st.lists(st.integers(0, 6), min_size=(w.num_forwards - cut - 1) * layers * e,
                               max_size=(w.num_forwards - cut - 1) * layers * e))
    counts = w.expert_tokens.copy()
    counts[cut + 1:] = np.asarray(later, dtype=np.int32).reshape(-1, layers, e)
    changed = type(w)(**{**w.__dict__, "expert_tokens": counts})
    budget = data.draw(st.integers(1, e))
    static = np.zeros((layers, e), dtype=bool)
    static[:, : max(budget - 1, 0)] = True   # given static set: no warm-up profiling involved
    for name in ONLINE:
        for refresh in ("sync", "async"):
            a = build_schedule(name, w, options(w, budget, 2, refresh, static_resident=static))
            b = build_schedule(name, changed, options(changed, budget, 2, refresh, static_resident=static))
            for field in ("placement", "copy", "demote", "resident"):
                assert np.array_equal(getattr(a, field)[: cut + 1], getattr(b, field)[: cut + 1]), (name, field)
