"""Properties of the simulator and cost model on random small workloads and profiles (hypothesis)."""

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from simkit import SPEC, profile, random_schedule, workload

from tidesim.policies import PolicyOptions, build_schedule, uniform
from tidesim.policies.driver import online_names
from tidesim.policies.registry import policy_names, traits
from tidesim.run import run

POLICIES = policy_names(needs_plan=False)     # every registered policy that runs without a plan
ONLINE = [n for n in online_names() if traits(n).role != "bound" and not traits(n).needs_plan]
MONOTONE = ["all-gpu", "full-swap", "cpu-routing"]


@st.composite
def workloads(draw):
    forwards = draw(st.integers(1, 6))
    counts = draw(st.lists(st.lists(st.lists(st.integers(0, 4), min_size=4, max_size=4), min_size=2, max_size=2),
                           min_size=forwards, max_size=forwards))
    return workload(counts)


profiles = st.builds(lambda w, e, g: profile(workers=w, engines=e, gbs=g), st.integers(1, 3), st.integers(1, 2),
                     st.sampled_from([0.000128, 0.000512, 0.004]))


def schedule(name, w, hw, budget, tau=1, refresh="sync"):
    opts = PolicyOptions(budget=uniform(budget, w.num_layers), tau=uniform(tau, w.num_layers), hw=hw,
                         refresh=refresh, warmup_fraction=0.5)
    return build_schedule(name, w, opts)


@given(workloads(), profiles, st.integers(0, 4), st.integers(0, 10_000))
def test_simulated_time_is_at_least_the_lower_bound(w, hw, budget, seed):
    for sched in [random_schedule(w, budget, seed), schedule("tide", w, hw, budget, refresh="async")]:
        for engine in ("sim", "analytic"):
            m = run(w, sched, hw, engine=engine)
            assert m.total_time_s >= m.lower_bound_s * (1 - 1e-12)
            assert abs(sum(m.breakdown_s.values()) - m.total_time_s) <= 1e-9 * m.total_time_s + 1e-15


@given(workloads(), profiles, st.integers(1, 4), st.integers(1, 3), st.sampled_from(["sync", "async"]))
def test_every_routed_pair_is_computed_once(w, hw, budget, tau, refresh):
    routed = int(w.expert_tokens.sum())
    for name in POLICIES:
        m = run(w, schedule(name, w, hw, budget, tau, refresh), hw)
        assert m.gpu_tokens + m.cpu_tokens == routed
        assert 0.0 <= m.hit_ratio <= 1.0


@settings(max_examples=25)
@given(workloads(), profiles, st.integers(1, 3))
def test_more_resources_never_slow_the_baselines(w, hw, budget):
    for name in MONOTONE:
        base = run(w, schedule(name, w, hw, budget), hw).total_time_s
        faster_link = hw.scaled(pcie=2.0)
        assert run(w, schedule(name, w, faster_link, budget), faster_link).total_time_s <= base * (1 + 1e-12)
        more_workers = hw.scaled(cpu_cores=2.0)
        assert run(w, schedule(name, w, more_workers, budget), more_workers).total_time_s <= base * (1 + 1e-12)
        assert run(w, schedule(name, w, hw, budget + 1), hw).total_time_s <= base * (1 + 1e-12)


@settings(max_examples=25)
@given(workloads(), profiles, st.integers(1, 4), st.integers(1, 3))
def test_oracle_is_never_slower_than_an_online_policy(w, hw, budget, tau):
    oracle = run(w, schedule("oracle", w, hw, budget), hw).total_time_s
    for name in ONLINE:
        for refresh in ("sync", "async"):
            online = run(w, schedule(name, w, hw, budget, tau, refresh), hw).total_time_s
            assert oracle <= online * (1 + 1e-9), (name, refresh)


@settings(max_examples=15)
@given(workloads(), profiles, st.integers(1, 4))
def test_identical_inputs_give_identical_output_bytes(w, hw, budget):
    for name in ("tide", "full-swap"):
        outs = {json.dumps(run(w, schedule(name, w, hw, budget, refresh="async"), hw).to_dict(), sort_keys=True)
                for _ in range(2)}
        assert len(outs) == 1


def test_spec_is_the_two_layer_four_expert_model():
    assert SPEC.num_moe_layers == 2 and SPEC.num_experts == 4
    assert np.array_equal(workload([[[1, 0, 0, 1], [0, 1, 1, 0]]]).expert_tokens.shape, (1, 2, 4))
