"""evaluate(): one policy of a resolved Scenario, run by one executor, to a Result (metrics plus
the notes of what had to be estimated). The one step from a scenario to numbers that simulate,
compare, validate, sweeps, the demo, the planner's callers and the benches share.

It mutates none of its inputs: notes are collected (tidesim.notes) and returned, never stored on
the hardware profile. It owns the schedule cache, keyed by content: the workload's digest, the
policy and its options (per-layer budget and tau, refresh, warm-up share, the plan's fingerprint),
and the profile's fingerprint only for a policy whose traits say it reads the profile
(PolicyTraits.reads_profile; tests/test_policies_base.py holds every policy to its trait). The
cost caches below it (tidesim.sim.costs) and the tau search (tidesim.default_tau) are keyed by
content the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tidesim.lru import LRU
from tidesim.metrics import Metrics
from tidesim.notes import cached, collecting, note_all
from tidesim.plan import Plan
from tidesim.policies.driver import build_schedule
from tidesim.policies.options import PolicyOptions
from tidesim.policies.registry import traits
from tidesim.run import run
from tidesim.scenario import Scenario
from tidesim.schedule import Schedule
from tidesim.sim.timeline import Timeline
from tidesim.workload import Workload


@dataclass(frozen=True)
class Result:
    """One policy's run on a scenario: its metrics (metrics.notes = notes) and the notes sorted."""

    policy: str
    metrics: Metrics
    notes: tuple[str, ...]


def evaluate(scenario: Scenario, policy: str, engine: str | None = None, *,
             timeline: str | Path | Timeline | None = None,
             on_forward: Callable[[int], None] | None = None) -> Result:
    """`policy` on `scenario` with `engine` (default: the scenario's). Its notes are the scenario's
    (what resolving estimated) and those of building and costing this run."""
    options = scenario.options(policy)
    with collecting() as raised:
        note_all(scenario.notes)
        schedule, fresh = schedule_for(policy, scenario.workload, options)
        metrics = run(scenario.workload, schedule, scenario.hw, engine=engine or scenario.engine,
                      timeline=timeline, on_forward=on_forward, check=fresh)
    metrics.notes = sorted(raised)
    return Result(policy=policy, metrics=metrics, notes=tuple(metrics.notes))


SCHEDULES: LRU[str, tuple[Schedule, frozenset[str]]] = LRU(8)


def schedule_key(policy: str, workload: Workload, options: PolicyOptions) -> str | None:
    """The content a policy's Schedule depends on (None: options this cache cannot key, which are
    built every time: a given static set, extras other than a plan)."""
    plan = options.extra.get("plan")
    if options.static_resident is not None or set(options.extra) - {"plan"}:
        return None
    plan_digest = plan.digest() if isinstance(plan, Plan) else None
    hw = options.hw.fingerprint() if traits(policy).reads_profile else None
    return json.dumps([workload.digest, policy, options.budget.tolist(), options.tau.tolist(), options.refresh,
                       options.warmup_fraction, plan_digest, hw])


def schedule_for(policy: str, workload: Workload, options: PolicyOptions) -> tuple[Schedule, bool]:
    """The policy's Schedule, built once per content key (see the module docstring); the notes
    building it said are said again on reuse. Returns (schedule, built now)."""
    key = schedule_key(policy, workload, options)
    built: list[Schedule] = []

    def build() -> Schedule:
        built.append(build_schedule(policy, workload, options))
        return built[-1]

    schedule = build() if key is None else cached(SCHEDULES, key, build)
    return schedule, bool(built)
