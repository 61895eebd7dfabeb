"""The one-layer calls of the online step (the live engine's: 1-D rows, the refresh rule read once
per forward, full-swap's LRU on the experts used) decide exactly what the all-layers call does,
on the 19-layer mini trace, over budgets that reach every branch (evictions, warm starts, empty
and full budgets, per-layer settings)."""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest
from policy_cases import layer_by_layer

from tidesim.bundled.paths import bundled_traces
from tidesim.errors import InputError
from tidesim.hardware import get_profile
from tidesim.policies import PolicyOptions, build_schedule, uniform
from tidesim.policies.driver import online_policy
from tidesim.policies.residency import first_true
from tidesim.policies.step import ForwardMeta
from tidesim.trace.io import read_trace
from tidesim.workload import Workload, workload_from_trace

FIELDS = ("budget", "initial_resident", "placement", "copy", "demote", "resident")


@functools.lru_cache(maxsize=1)
def mini() -> Workload:
    return workload_from_trace(read_trace(bundled_traces()["llada2-mini_prefix_g1024"])).select(np.arange(60))


def per_layer_budget(layers: int, experts: int) -> np.ndarray:
    return np.clip(np.arange(layers) * 37 % (experts + 1), 1, experts).astype(np.int64)


CASES = [
    ("full-swap", 1, "sync", None), ("full-swap", 8, "sync", "warm"), ("full-swap", 64, "sync", None),
    ("full-swap", 0, "sync", None),
    ("cpu-routing", 1, "sync", None), ("cpu-routing", 64, "sync", None),
    ("fiddler", 1, "sync", None), ("fiddler", 64, "sync", None), ("fiddler", 256, "sync", None),
    ("tide", 64, "sync", None), ("tide", 3, "async", None), ("tide", 0, "sync", None),
    ("tide-reference", 64, "sync", None), ("tide-reference", 0, "sync", None),
    ("planned", 0, "async", None), ("all-gpu", 64, "sync", None),
]


@pytest.mark.parametrize(("name", "budget", "refresh", "start"), CASES)
def test_one_layer_calls_decide_as_the_all_layers_call(name: str, budget: int, refresh: str,
                                                        start: str | None) -> None:
    """budget 0 stands for per-layer budgets (1 .. 256); tau differs per layer (1 to 4)."""
    w = mini()
    layers, experts = w.num_layers, w.num_experts
    b = per_layer_budget(layers, experts) if budget == 0 else uniform(budget, layers)
    options = PolicyOptions(budget=b, tau=np.arange(layers) % 4 + 1, hw=get_profile("h100-sxm-pcie5"),
                            refresh=refresh)
    if name in ("cpu-routing", "fiddler"):
        options = replace(options, static_resident=build_schedule(name, w, options).initial_resident)
    if start == "warm":
        warm = np.zeros((layers, experts), dtype=bool)
        warm[:, np.random.default_rng(0).permutation(experts)[:5]] = True
        options = replace(options, static_resident=warm)
    offline = build_schedule(name, w, options)
    live = layer_by_layer(name, w, options)
    for f in FIELDS:
        assert np.array_equal(getattr(live, f), getattr(offline, f)), (name, f)
    assert live.params.get("refresh_forwards") == offline.params.get("refresh_forwards")


def test_first_true_is_the_running_count_cut() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        row = rng.random(rng.integers(0, 40)) < rng.random()
        limit = int(rng.integers(0, 45))
        expected = row & (np.cumsum(row) <= limit)
        assert np.array_equal(first_true(row.copy(), limit), expected)


def test_layers_out_of_range_are_refused() -> None:
    w = mini()
    options = PolicyOptions(budget=uniform(8, w.num_layers), tau=uniform(2, w.num_layers),
                            hw=get_profile("h100-sxm-pcie5"))
    policy = online_policy("tide", w.model, options, layers=w.num_layers)
    meta = ForwardMeta(0, 0, -1, 0, "prefill")
    counts = w.expert_tokens[0, :1]
    for bad in ([-1], [w.num_layers], [0, w.num_layers + 3]):
        rows = counts if len(bad) == 1 else w.expert_tokens[0, :2]
        with pytest.raises(InputError, match="MoE layers must lie in"):
            policy.step(meta, rows, np.array(bad))
