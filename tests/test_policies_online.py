"""The online policy step: looped over a trace it gives exactly the schedules the policies gave
before they became steps (digests pinned from the former vectorised builders on bundled-trace
excerpts), and it decides layer by layer as well as for all layers at once."""

from __future__ import annotations

import functools
import hashlib
import json

import numpy as np
import pytest

from tidesim.bundled.paths import bundled_traces
from tidesim.hardware import get_profile
from tidesim.policies import PolicyOptions, build_schedule, uniform
from tidesim.schedule import Schedule
from tidesim.trace.io import read_trace
from tidesim.workload import Workload, workload_from_trace

# (trace, forwards, policy, budget, tau, refresh, digest of the schedule the vectorised builders
# made before the policies became online steps; h100-sxm-pcie5 profile)
PINNED = [
    ("llada2-mini_prefix_g256", 120, "all-gpu", 256, 1, "sync", "c30fe782545ded6a"),
    ("llada2-mini_prefix_g256", 120, "full-swap", 32, 1, "sync", "d550900c70aa6ac5"),
    ("llada2-mini_prefix_g256", 120, "cpu-routing", 64, 1, "sync", "950226b534089e4c"),
    ("llada2-mini_prefix_g256", 120, "fiddler", 64, 1, "sync", "917a4c0ffe7503f1"),
    ("llada2-mini_prefix_g256", 120, "tide", 64, 2, "sync", "d31f98bc8ca1f204"),
    ("llada2-mini_prefix_g256", 120, "tide", 32, 3, "async", "a881e76568df048f"),
    ("llada2-mini_prefix_g256", 120, "tide-reference", 64, 2, "sync", "5dd18c3231b25480"),
    ("llada2-mini_prefix_g256", 120, "planned", 48, 4, "async", "842ebdd047b38247"),
    ("llada2-mini_none_g1024", 80, "all-gpu", 256, 1, "sync", "52242d7ad600eb22"),
    ("llada2-mini_none_g1024", 80, "full-swap", 32, 1, "sync", "01b1977460456e55"),
    ("llada2-mini_none_g1024", 80, "cpu-routing", 64, 1, "sync", "27ca373550f28666"),
    ("llada2-mini_none_g1024", 80, "fiddler", 64, 1, "sync", "9f696d4bc511e917"),
    ("llada2-mini_none_g1024", 80, "tide", 64, 2, "sync", "b5d017f94e46b7cc"),
    ("llada2-mini_none_g1024", 80, "tide", 32, 3, "async", "a13d808df6b0813a"),
    ("llada2-mini_none_g1024", 80, "tide-reference", 64, 2, "sync", "eb6c2e2c64cf11d4"),
    ("llada2-mini_none_g1024", 80, "planned", 48, 4, "async", "7deb4868a41509c6"),
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
