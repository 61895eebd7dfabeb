"""The policy registry and the checks every policy gets through build_schedule."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_cases import hand_workload, options, workloads

from tidesim.errors import InputError
from tidesim.policies import build_schedule, policy_names
from tidesim.policies.driver import is_online, online_names
from tidesim.policies.registry import (
    baselines,
    entries,
    plan_policy,
    policy_summary,
    role_of,
    static_set_size,
    traits,
)
from tidesim.schedule import Schedule, schedule_problems

# Online policies that are not bounds (all-gpu is online but keeps everything resident).
ONLINE = [n for n in online_names() if traits(n).role != "bound"]


def test_registry_order_and_summaries() -> None:
    names = policy_names()
    mine = ["all-gpu", "full-swap", "cpu-routing", "fiddler", "tide", "tide-reference", "oracle"]
    assert [n for n in names if n in mine] == mine
    assert all(policy_summary(n) for n in names)
    assert names.index("tide-reference") < names.index("oracle")
    assert [e.traits.order for e in entries()] == sorted(e.traits.order for e in entries())


def test_traits_are_what_the_policies_do() -> None:
    """The registry's traits, checked against the policies' own behaviour and the paper's roles."""
    assert baselines() == ["full-swap", "cpu-routing", "fiddler"]
    assert policy_names(role="bound") == ["all-gpu", "oracle"]
    assert {"tide", "tide-reference"} <= set(policy_names(uses_tau=True))
    tau_users = set(policy_names(uses_tau=True))
    assert not {"full-swap", "cpu-routing", "fiddler", "all-gpu", "oracle", "planned"} & tau_users
    assert policy_names(static_set=True) == ["cpu-routing", "fiddler"]
    assert plan_policy() == "planned"
    assert policy_names(reference=True) == ["tide"]          # exactly one reference policy
    # static sets: cpu-routing fills its budget, fiddler keeps one slot to stream (all when budget = experts)
    budget = np.array([0, 1, 3, 8])
    assert static_set_size("cpu-routing", budget, 8).tolist() == [0, 1, 3, 8]
    assert static_set_size("fiddler", budget, 8).tolist() == [0, 0, 2, 8]
    assert not is_online("oracle") and is_online("tide")
    # a bound's schedules say so; the others' do not
    w = hand_workload()
    for name in policy_names():
        assert build_schedule(name, w, options(w, 2)).is_bound == (traits(name).role == "bound"), name
    assert role_of("tide") == "policy" and role_of("tide", is_bound=True) == "bound"
    assert role_of("not-registered") == "policy"


def test_uses_tau_is_exactly_who_reads_tau() -> None:
    """A policy whose traits say it ignores tau gives the same schedule for any tau; one that uses it does not
    (on the hand workload, budget 2: refreshing every step and every 3 steps differ)."""
    w = hand_workload()
    for name in policy_names(needs_plan=False):
        a, b = build_schedule(name, w, options(w, 2, tau=1)), build_schedule(name, w, options(w, 2, tau=3))
        same = all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("placement", "copy", "resident"))
        assert same != traits(name).uses_tau, name


def same_value(x: object, y: object) -> bool:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype == y.dtype and np.array_equal(x, y)
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(same_value(x[k], y[k]) for k in x)
    return bool(x == y)


def same_schedule(a: Schedule, b: Schedule) -> bool:
    """Every field the schedule cache hands back (all but the builder's sparse record, which is
    derived from the arrays): arrays by value and dtype, the rest by equality."""
    return all(same_value(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(Schedule) if f.compare)


def test_same_schedule_sees_every_field() -> None:
    w = hand_workload()
    a = build_schedule("tide", w, options(w, 2))
    assert same_schedule(a, build_schedule("tide", w, options(w, 2)))
    for change in ({"budget": a.budget + 1}, {"demote": ~a.demote}, {"initial_resident": ~a.initial_resident},
                   {"params": {**a.params, "extra": 1}}, {"feasible": not a.feasible}):
        assert not same_schedule(a, dataclasses.replace(a, **change)), change


def test_a_policy_that_does_not_read_the_profile_decides_the_same_on_any() -> None:
    """reads_profile=False is a promise the schedule cache (tidesim.evaluate) relies on: it reuses
    such a policy's schedule across profiles. Profiles far apart in every cost (a slow link, a fast
    CPU, a slow GPU) must then give the same schedule; every registered policy is held to it."""
    from policy_cases import profile

    w = hand_workload()
    base = profile()
    others = [base.scaled(pcie=0.001), base.scaled(cpu_cores=64, cpu_mem_bw=64), base.scaled(gpu_speed=0.01)]
    for name in policy_names(reads_profile=False, needs_plan=False):
        a = build_schedule(name, w, options(w, 2, hw=base))
        for hw in others:
            b = build_schedule(name, w, options(w, 2, hw=hw))
            assert same_schedule(a, b), name
    # and the trait is not idle: a policy that reads the profile changes its mind on these profiles
    readers = policy_names(reads_profile=True)
    changed = [name for name in readers if not all(
        np.array_equal(getattr(build_schedule(name, w, options(w, 2, hw=base)), f),
                       getattr(build_schedule(name, w, options(w, 2, hw=hw)), f))
        for hw in others for f in ("placement", "copy", "resident"))]
    assert changed


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
    for name in policy_names():      # every registered policy, a new one included
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
