"""The one rule for the refresh interval when the user gives none (demo, simulate, compare, sweep,
validate): the plan's best single tau when a plan is given, else the best single tau for this
trace, hardware profile, budget and refresh mode by the analytic cost model.

Why a rule rather than a constant: the best interval depends on the trace (no KV cache or prefix
cache), the link and the CPU, from 1 to 16 and more on the bundled cases; a fixed tau 2 (the public
TIDE notebook's setting) made `compare` show TIDE behind where `demo` showed it ahead. Every
command prints the choice with its reason, e.g. "tau 16: best single tau for this trace and profile
(analytic model, candidates 1..32)".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tidesim.hardware import HardwareProfile
from tidesim.limits import check_tau
from tidesim.lru import LRU
from tidesim.notes import cached
from tidesim.plan import Plan
from tidesim.workload import Workload

# Candidate intervals: TIDE's evaluation swept 1..31; a coarse grid over the same range keeps the
# choice to one cost table (about a second on the bundled traces).
CANDIDATE_TAUS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


@dataclass(frozen=True)
class TauChoice:
    """The interval a command runs tide with, where it came from and why."""

    tau: int
    source: str                                   # "--tau", "plan" or "analytic"
    reason: str
    tokens_per_s: dict[int, float] = field(default_factory=dict)   # analytic tide per candidate

    @property
    def line(self) -> str:
        return f"tau {self.tau}: {self.reason}"

    def to_dict(self) -> dict[str, object]:
        return {"tau": self.tau, "source": self.source, "reason": self.reason,
                "tokens_per_s": {str(t): v for t, v in self.tokens_per_s.items()}}


def given_tau(tau: int) -> TauChoice:
    check_tau(tau)
    return TauChoice(tau=tau, source="--tau", reason="given with --tau")


def plan_tau(plan: Plan) -> TauChoice:
    """The plan's single interval: its best single tau on the prompts it was evaluated on (the
    held-out ones, else the calibration ones: where the planner checks that the plan is not slower
    than any single tau), or its most common tau for a plan without an evaluation."""
    ev, which = (plan.heldout, "held-out") if plan.heldout is not None else (plan.calibration, "calibration")
    if ev is not None:
        return TauChoice(tau=ev.best_single_tau, source="plan",
                         reason=f"the plan's best single tau ({which} prompts {_ids(ev.prompts)}, "
                                f"{'simulator' if ev.engine == 'sim' else ev.engine + ' model'})")
    return TauChoice(tau=max(set(plan.tau), key=lambda t: (plan.tau.count(t), -t)), source="plan",
                     reason="the plan's most common per-layer tau")


_SEARCHED: LRU[tuple[object, ...], tuple[TauChoice, frozenset[str]]] = LRU(256)


def best_tau(workload: Workload, hw: HardwareProfile, budget: int, refresh: str = "sync",
             taus: tuple[int, ...] = CANDIDATE_TAUS) -> TauChoice:  # the reference policy's (tide)
    """The tau that maximises tide's tokens/s under the analytic cost model (ties: the smaller).
    The search runs once per process for inputs of the same content (a sweep's tide and
    tide-reference points on one profile, compare after a sweep); its notes are said each time."""
    key = (workload.digest, hw.fingerprint(), int(budget), refresh, tuple(int(t) for t in taus))
    return cached(_SEARCHED, key, lambda: _search(workload, hw, budget, refresh, taus))


def _search(workload: Workload, hw: HardwareProfile, budget: int, refresh: str, taus: tuple[int, ...]
            ) -> TauChoice:
    tps = tide_tokens_per_s(workload, hw, budget, refresh, taus)
    tau = fastest_tau(tps)
    span = f"{min(taus)}..{max(taus)}"
    return TauChoice(tau=tau, source="analytic", tokens_per_s=tps,
                     reason=f"best single tau for this trace and profile (analytic model, budget {budget}, "
                            f"{refresh} refresh, candidates {span})")


def fastest_tau(tokens_per_s: dict[int, float]) -> int:
    """The tau with the most tokens/s (ties: the smaller, which refreshes more often)."""
    return max(tokens_per_s, key=lambda t: (tokens_per_s[t], -t))


def tide_tokens_per_s(workload: Workload, hw: HardwareProfile, budget: int, refresh: str,
                      taus: tuple[int, ...] | list[int], policy: str | None = None) -> dict[int, float]:
    """Predicted tokens/s of tide (or another plannable policy that uses tau) at each tau with a
    uniform budget (analytic cost model). Sync refresh reads one cost table (the planner's); async
    runs the policy once per tau (taus with the same refresh steps once)."""
    from tidesim.planner import distinct_taus, single_tau_sweep
    from tidesim.policies import PolicyOptions, build_schedule, uniform
    from tidesim.policies.registry import reference_policy
    from tidesim.run import run

    tokens = workload.generated_tokens
    if refresh == "sync":
        return {t: tokens / s for t, s in single_tau_sweep(workload, hw, list(taus), budget,
                                                           policy=policy or reference_policy()).items()}
    layers = workload.num_layers
    same = distinct_taus(workload, [int(t) for t in taus])     # taus with identical refresh steps
    done: dict[int, float] = {}
    tide = policy or reference_policy()
    for tau in sorted(set(same.values())):
        options = PolicyOptions(budget=uniform(budget, layers), tau=uniform(tau, layers), hw=hw, refresh=refresh)
        done[tau] = run(workload, build_schedule(tide, workload, options), hw, engine="analytic").tokens_per_s
    return {t: done[same[t]] for t in sorted(same)}


def choose_tau(workload: Workload, hw: HardwareProfile, budget: int, refresh: str = "sync",
               given: int | None = None, plan: Plan | None = None) -> TauChoice:
    """--tau when given, else the plan's, else the analytic best."""
    if given is not None:
        return given_tau(given)
    if plan is not None:
        return plan_tau(plan)
    return best_tau(workload, hw, budget, refresh)


def _ids(prompts: list[int]) -> str:
    return ",".join(map(str, prompts))
