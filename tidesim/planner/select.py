"""Which plan `tidesim plan` keeps: every plan it considered, run by one executor on the
evaluation prompts, and the fastest (docs/planner.md, "Choosing the plan").

The knapsack optimum is optimal for the cost table of the calibration prompts. On other prompts
it can lose to a single interval: slots moved between layers fit one prompt's routing, and a
tau chosen among taus that are the same schedule on the calibration prompts refreshes
differently on prompts with longer blocks. Every single tau the planner considered (uniform
budget) is a candidate too, so the kept plan is never slower than the best of them on the
prompts it is evaluated on, by the executor it is evaluated with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tidesim.plan import CandidateTime, Selection

# Candidate kinds, simplest first: on equal times the simpler candidate is kept.
SINGLE, INTERVALS, OPTIMUM = 0, 1, 2


@dataclass(frozen=True)
class Candidate:
    """A per-layer (tau, budget) choice the planner may keep."""

    name: str
    kind: int
    tau: np.ndarray
    budget: np.ndarray


def best_tau_of(times: dict[int, float]) -> int:
    """The tau with the least time. Ties go to the largest: taus with the same time are, in
    practice, the same schedule on these prompts (every tau past the longest block refreshes only
    at block starts), and the largest of them keeps doing that on prompts with longer blocks."""
    return min(times, key=lambda t: (times[t], -t))


def single(tau: int, budget: int, layers: int) -> Candidate:
    return Candidate(f"tau {tau}", SINGLE, np.full(layers, tau, np.int64), np.full(layers, budget, np.int64))


def plan_candidates(optimum: Candidate, intervals: Candidate | None, taus: list[int], budget: int,
                    layers: int) -> list[Candidate]:
    """The knapsack optimum, the per-layer intervals with the uniform budget and every single tau
    with the uniform budget; a plan that is one of the single taus is left out (it is that one)."""
    singles = [single(t, budget, layers) for t in sorted(taus)]
    out: list[Candidate] = []
    for plan in (optimum, intervals):
        if plan is None:
            continue
        if any(np.array_equal(plan.tau, c.tau) and np.array_equal(plan.budget, c.budget) for c in singles + out):
            continue
        out.append(plan)
    return singles + out


def choose(candidates: list[Candidate], times_s: list[float], prompts: list[int], engine: str
           ) -> tuple[Candidate, Selection]:
    """The fastest candidate (ties: the simpler kind, then the larger single tau) and the record
    of the choice."""
    def key(i: int) -> tuple[float, int, int]:
        c = candidates[i]
        return times_s[i], c.kind, -int(c.tau[0]) if c.kind == SINGLE else 0
    best = min(range(len(candidates)), key=key)
    record = Selection(prompts=list(prompts), engine=engine, chosen=candidates[best].name,
                       candidates=[CandidateTime(c.name, float(t)) for c, t in zip(candidates, times_s, strict=True)])
    return candidates[best], record
