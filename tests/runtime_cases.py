"""Tiny runtime cases the runtime test modules share: the tiny model's shapes, a skewed
prefix-cache-like workload, a policy's schedule for it and hand-written one-layer schedules."""

from __future__ import annotations

import numpy as np

from tidesim.hardware import get_profile
from tidesim.models import PRESETS
from tidesim.policies import PolicyOptions, build_schedule, uniform
from tidesim.schedule import Schedule
from tidesim.workload import Workload

SPEC = PRESETS["tiny"]


def tiny_workload(forwards: int = 6, tokens: int = 8, seed: int = 0) -> Workload:
    """Each token picks top_k distinct experts, skewed toward low ids; prefix-cache-like forwards."""
    rng = np.random.default_rng(seed)
    L, E, k = SPEC.num_moe_layers, SPEC.num_experts, SPEC.top_k
    et = np.zeros((forwards, L, E), dtype=np.int32)
    p = np.linspace(2.0, 0.5, E)
    p /= p.sum()
    for f in range(forwards):
        for layer in range(L):
            for _ in range(tokens):
                et[f, layer, rng.choice(E, size=k, replace=False, p=p)] += 1
    ar = np.arange(forwards, dtype=np.int64)
    return Workload(model=SPEC, kv_cache="prefix", tokens=np.full(forwards, tokens), context=np.full(forwards, 24),
                    committed=np.full(forwards, 2), prompt=np.zeros(forwards, np.int64), block=ar // 3,
                    step=ar % 3, expert_tokens=et)


def schedule_for(policy: str, wl: Workload, budget: int = 6, refresh: str = "sync") -> Schedule:
    hw = get_profile("h100-sxm-pcie5")
    opts = PolicyOptions(budget=uniform(budget, wl.num_layers), tau=uniform(2, wl.num_layers), hw=hw,
                         refresh=refresh)
    return build_schedule(policy, wl, opts)


def manual_schedule(placement: list[list[int]], copy: list[list[int]], resident: list[list[bool]],
                    initial: list[bool], budget: int, demote: list[list[bool]] | None = None) -> Schedule:
    """A one-layer schedule from per-forward rows."""
    pl = np.array(placement, dtype=np.int8)[:, None, :]
    f, _, e = pl.shape
    return Schedule(policy="manual", budget=np.array([budget]), initial_resident=np.array([initial]),
                    placement=pl, copy=np.array(copy, dtype=np.int8)[:, None, :],
                    demote=np.zeros((f, 1, e), bool) if demote is None else np.array(demote)[:, None, :],
                    resident=np.array(resident)[:, None, :])
