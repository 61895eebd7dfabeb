"""The online policy step: looped over a trace it gives exactly the schedules the policies gave
before they became steps (digests pinned from the former vectorised builders on bundled-trace
excerpts), and it decides layer by layer as well as for all layers at once."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
from policy_cases import layer_by_layer

from tidesim.bundled.paths import bundled_traces
from tidesim.errors import InputError
from tidesim.hardware import get_profile
from tidesim.policies import PolicyOptions, build_schedule, uniform
from tidesim.policies.driver import online_names, online_policy
from tidesim.policies.step import ForwardMeta, forward_metas
from tidesim.schedule import COPY_SYNC_REFRESH, CPU, GPU, IDLE, Schedule
from tidesim.trace.io import read_trace
from tidesim.workload import Workload, workload_from_trace

# (trace, forwards, policy, budget, tau, refresh, digest of the schedule the vectorised builders
# made before the policies became online steps, main at 783fa8c, on the traces regenerated for
# issue 16; h100-sxm-pcie5 profile)
PINNED = [
    ("llada2-mini_prefix_g1024", 120, "all-gpu", 256, 1, "sync", "0febe2d8cf9dace6"),
    ("llada2-mini_prefix_g1024", 120, "full-swap", 32, 1, "sync", "4d2f72d7859e89cf"),
    ("llada2-mini_prefix_g1024", 120, "cpu-routing", 64, 1, "sync", "f1aacabe46296951"),
    ("llada2-mini_prefix_g1024", 120, "fiddler", 64, 1, "sync", "6991b78974abbfe2"),
    ("llada2-mini_prefix_g1024", 120, "tide", 64, 2, "sync", "a64f07c545797fc5"),
    ("llada2-mini_prefix_g1024", 120, "tide", 32, 3, "async", "418447cf24cdd0b8"),
    ("llada2-mini_prefix_g1024", 120, "tide-reference", 64, 2, "sync", "40330aa06a7d478c"),
    ("llada2-mini_prefix_g1024", 120, "planned", 48, 4, "async", "c42176c6ebffa88a"),
    ("llada2-mini_none_g1024", 80, "all-gpu", 256, 1, "sync", "6f1a08dca4924586"),
    ("llada2-mini_none_g1024", 80, "full-swap", 32, 1, "sync", "53cdd478a175af60"),
    ("llada2-mini_none_g1024", 80, "cpu-routing", 64, 1, "sync", "0846694c1562d017"),
    ("llada2-mini_none_g1024", 80, "fiddler", 64, 1, "sync", "268efc805bc70095"),
    ("llada2-mini_none_g1024", 80, "tide", 64, 2, "sync", "baa75fc7675680da"),
    ("llada2-mini_none_g1024", 80, "tide", 32, 3, "async", "2de7a2fe2997d24e"),
    ("llada2-mini_none_g1024", 80, "tide-reference", 64, 2, "sync", "d97fe02e618e0fe6"),
    ("llada2-mini_none_g1024", 80, "planned", 48, 4, "async", "4e1eb40fe72a4a5a"),
    ("llada2-mini-4layer_captured_prefix_g256", 163, "all-gpu", 256, 1, "sync", "830953ff612db8db"),
    ("llada2-mini-4layer_captured_prefix_g256", 163, "full-swap", 32, 1, "sync", "b180f0def222d9ed"),
    ("llada2-mini-4layer_captured_prefix_g256", 163, "cpu-routing", 64, 1, "sync", "e2ab498e69be086e"),
    ("llada2-mini-4layer_captured_prefix_g256", 163, "fiddler", 64, 1, "sync", "e018c7cf08b9017c"),
    ("llada2-mini-4layer_captured_prefix_g256", 163, "tide", 64, 2, "sync", "cc9c8848df1f2011"),
    ("llada2-mini-4layer_captured_prefix_g256", 163, "tide", 32, 3, "async", "1ca259021bdda29a"),
    ("llada2-mini-4layer_captured_prefix_g256", 163, "tide-reference", 64, 2, "sync", "af313180b996438f"),
    ("llada2-mini-4layer_captured_prefix_g256", 163, "planned", 48, 4, "async", "3a386f56cd9fd8d4"),
]


def digest(s: Schedule) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(s.params, sort_keys=True).encode())
    h.update(repr((s.policy, s.is_bound, s.feasible)).encode())
    for a in (s.budget, s.initial_resident, s.placement, s.copy, s.demote, s.resident):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def excerpt(name: str, forwards: int) -> Workload:
    return workload_from_trace(read_trace(bundled_traces()[name])).select(np.arange(forwards))


@pytest.mark.parametrize(("trace", "forwards", "policy", "budget", "tau", "refresh", "expected"), PINNED)
def test_schedule_matches_the_former_vectorised_builder(trace: str, forwards: int, policy: str, budget: int,
                                                        tau: int, refresh: str, expected: str) -> None:
    w = excerpt(trace, forwards)
    layers = w.num_layers
    options = PolicyOptions(budget=uniform(budget, layers), tau=uniform(tau, layers),
                            hw=get_profile("h100-sxm-pcie5"), refresh=refresh)
    assert digest(build_schedule(policy, w, options)) == expected


ONLINE = online_names()      # every registered policy with a step, a new one included


@pytest.mark.parametrize("name", ONLINE)
@pytest.mark.parametrize("refresh", ["sync", "async"])
def test_layer_by_layer_online_equals_the_offline_builder(name: str, refresh: str) -> None:
    w = excerpt("llada2-mini-4layer_captured_prefix_g256", 163)
    layers = w.num_layers
    offline_opts = PolicyOptions(budget=uniform(40, layers), tau=np.array([1, 2, 3]),
                                 hw=get_profile("dev-2core-cpu"), refresh=refresh)
    offline = build_schedule(name, w, offline_opts)
    # online there is no warm-up prefix: the static policies get the offline run's set up front
    static = offline.initial_resident if name in ("cpu-routing", "fiddler") else None
    online_opts = replace(offline_opts, static_resident=static)
    if static is not None:
        offline = build_schedule(name, w, online_opts)
    live = layer_by_layer(name, w, online_opts)
    for f in ("budget", "initial_resident", "placement", "copy", "demote", "resident"):
        assert np.array_equal(getattr(live, f), getattr(offline, f)), (name, f)
    assert live.summary() == offline.summary()


def test_bounds_and_static_policies_without_a_set_are_refused_online() -> None:
    opts = PolicyOptions(budget=uniform(8, 3), tau=uniform(2, 3), hw=get_profile("dev-2core-cpu"))
    model = excerpt("llada2-mini-4layer_captured_prefix_g256", 163).model
    with pytest.raises(InputError, match="oracle is a bound.*cannot run online"):
        online_policy("oracle", model, opts, layers=3)
    for name in ("cpu-routing", "fiddler"):
        with pytest.raises(InputError, match="must be given"):
            online_policy(name, model, opts, layers=3)
    with pytest.raises(InputError, match="unknown policy"):
        online_policy("lru", model, opts, layers=3)
    with pytest.raises(InputError, match="budget must give one value per MoE layer"):
        online_policy("tide", model, opts, layers=4)


def test_forward_metas_name_prefill_steps_and_commits() -> None:
    w = excerpt("llada2-mini-4layer_captured_prefix_g256", 163)
    metas = forward_metas(w)
    assert metas[0] == ForwardMeta(index=0, prompt=0, block=-1, step=0, phase="prefill")
    assert metas[0].first_block and metas[1].first_block and metas[1].phase == "step"
    trace = read_trace(bundled_traces()["llada2-mini-4layer_captured_prefix_g256"])
    assert [m.phase for m in metas] == trace.forwards["phase"].tolist()


def test_tide_step_by_hand() -> None:
    """Two layers, four experts, budget 2, tau 2, a block after the first: step 0 refreshes (sync:
    the new experts run on the GPU now), step 1 does not (tokens of non-residents on the CPU)."""
    from policy_cases import MODEL

    opts = PolicyOptions(budget=uniform(2, 2), tau=uniform(2, 2), hw=get_profile("dev-2core-cpu"))
    tide = online_policy("tide", MODEL, opts, layers=2)
    d0 = tide.step(ForwardMeta(0, 0, 1, 0, "step"), np.array([[3, 0, 2, 1]]), np.array([1]))
    assert d0.copy.tolist() == [[COPY_SYNC_REFRESH, 0, COPY_SYNC_REFRESH, 0]]
    assert d0.placement.tolist() == [[GPU, IDLE, GPU, CPU]]
    d1 = tide.step(ForwardMeta(1, 0, 1, 1, "step"), np.array([[0, 4, 1, 1]]), np.array([1]))
    assert d1.copy.tolist() == [[0, 0, 0, 0]]
    assert d1.placement.tolist() == [[IDLE, CPU, GPU, CPU]]
    assert tide.current.tolist() == [[False] * 4, [True, False, True, False]]
