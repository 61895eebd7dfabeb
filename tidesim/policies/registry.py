"""The policy registry: each policy's name, one-line summary and traits, filled by the policy modules
themselves (`@register_policy` in the module that defines the policy).

The traits are the one place that says what kind of policy a name is: a baseline TIDE is measured
against, a policy, or a bound; whether it runs with the uniform refresh interval tau, computes
experts on the CPU, keeps a static resident set, reads the hardware profile, takes a plan, gets a
speedup figure in sweeps. Tables, figures, sweep columns, commands and tests ask the registry
(`traits`, `policy_names(...)`, `baselines`) instead of spelling lists of names. Whether a policy
can run online follows from what was registered: a PolicyStep class decides forward by forward; a
function (workload, options) -> Schedule needs the whole trace (a bound such as oracle).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np

from tidesim.errors import InputError

Role = Literal["baseline", "policy", "bound"]
ROLES: tuple[Role, ...] = ("baseline", "policy", "bound")


@dataclass(frozen=True)
class PolicyTraits:
    """What callers need to know about a policy without running it.

    role: "baseline" (a system TIDE is measured against; the best one sets the speedups), "policy"
        (what is being evaluated) or "bound" (a limit, shown but never deployed).
    order: where the policy appears in tables (ascending).
    uses_tau: runs with the uniform refresh interval tau (the default-tau rule searches it).
    needs_cpu: computes some experts on the CPU (a measured profile needs CPU expert curves).
    static_set: keeps a static resident set (profiled on a warm-up or given, --static-from).
    reads_profile: its decisions read the hardware profile (so it needs one even live).
    needs_plan: runs a plan's per-layer settings (`tidesim plan`, --plan); left out without one.
    speedup_figure: sweeps draw its speedup over the best baseline and summarize it.
    ignores_budget: keeps every expert on the GPU whatever the budget (validated once, at every expert).
    plannable: `tidesim plan --policy` plans its per-layer tau and budgets: it runs TIDE's interval
        refresh with per-layer tau and budget arrays, decides each layer from its own routing and
        state, and reads a plan from options.extra["plan"] (docs/planner.md section 7).
    reference: the TIDE policy this project reproduces (exactly one): the default-tau rule searches
        its interval, the planner's fast residency pass and Lagrangian bound model it, its plans run
        through the plan policy, the demo headlines it.
    static_size: the static policies' rule for how many of a layer's budget slots hold the static
        set ("budget": all of them; "budget-1": one slot streams misses in, all when the budget is
        every expert), so a live run's --static-from picks the set the offline policy would.
    """

    role: Role
    order: int
    uses_tau: bool = False
    needs_cpu: bool = False
    static_set: bool = False
    reads_profile: bool = False
    needs_plan: bool = False
    speedup_figure: bool = False
    ignores_budget: bool = False
    plannable: bool = False
    reference: bool = False
    static_size: Literal["budget", "budget-1"] = "budget"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")


@dataclass(frozen=True)
class Entry:
    name: str
    summary: str
    traits: PolicyTraits
    impl: Any           # a PolicyStep subclass (online) or a function (workload, options) -> Schedule (bound)


Registered = TypeVar("Registered")
_REGISTRY: dict[str, Entry] = {}


def register_policy(name: str, summary: str, traits: PolicyTraits) -> Callable[[Registered], Registered]:
    """Decorator: add a policy to the registry under `name`, with a one-line summary and its traits.
    It takes a PolicyStep subclass (an online policy) or a function (workload, options) -> Schedule
    (a bound, offline only)."""
    def wrap(obj: Registered) -> Registered:
        if isinstance(obj, type):
            obj.name = name  # type: ignore[attr-defined]
            obj.is_bound = traits.role == "bound"  # type: ignore[attr-defined]
        _REGISTRY[name] = Entry(name, summary, traits, obj)
        return obj
    return wrap


def _load_all() -> None:
    """Import every module of tidesim.policies: each policy module registers itself on import (the
    shared ones, step, residency, ..., register nothing)."""
    import tidesim.policies as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def entries() -> list[Entry]:
    """Every registered policy, in table order."""
    _load_all()
    return sorted(_REGISTRY.values(), key=lambda e: (e.traits.order, e.name))


def policy_names(**wanted: Any) -> list[str]:
    """Registered names in table order; keyword filters keep the policies whose traits equal them,
    e.g. policy_names(role="baseline"), policy_names(uses_tau=True)."""
    return [e.name for e in entries() if all(getattr(e.traits, k) == v for k, v in wanted.items())]


def baselines() -> list[str]:
    """The systems TIDE is measured against; the fastest of them sets the speedups."""
    return policy_names(role="baseline")


def entry(name: str, offer: list[str] | None = None) -> Entry:
    """The registered policy `name`; an unknown name is refused with the list of known ones (or of
    `offer`, the ones the caller can run: the one unknown-policy rule)."""
    names = policy_names()                # imports every policy module, so the registry is full
    if name not in _REGISTRY:
        raise InputError(f"unknown policy {name!r}; use one of {', '.join(offer or names)}")
    return _REGISTRY[name]


def traits(name: str) -> PolicyTraits:
    return entry(name).traits


def policy_summary(name: str) -> str:
    return entry(name).summary


def check_policies(names: list[str]) -> list[str]:
    """Refuse unknown names (one line listing the known ones); return the names unchanged."""
    for name in names:
        entry(name)
    return names


def role_of(name: str, is_bound: bool = False) -> Role:
    """A result's kind: a bound when its schedule says so, else its policy's role (a policy for a
    name the registry does not know, e.g. a results table from elsewhere)."""
    if is_bound:
        return "bound"
    _load_all()
    known = _REGISTRY.get(name)
    return known.traits.role if known else "policy"


def plan_policy() -> str:
    """The policy that runs a plan's per-layer settings (`--plan`)."""
    return policy_names(needs_plan=True)[0]


def plan_runner(policy: str) -> str:
    """The registered policy that runs a plan made for `policy` (the plan in options.extra["plan"]):
    the plan policy for the reference policy (tide with per-layer settings), the policy itself
    otherwise (tide-split reads a plan the same way)."""
    return plan_policy() if policy == reference_policy() else policy


def reference_policy() -> str:
    """The TIDE policy the project reproduces (PolicyTraits.reference)."""
    return policy_names(reference=True)[0]


def static_set_size(name: str, budget: np.ndarray, experts: int) -> np.ndarray:
    """Static slots per layer that policy `name` fills from its warm-up (PolicyTraits.static_size)."""
    budget = np.asarray(budget, dtype=np.int64)
    if traits(name).static_size == "budget-1":
        return np.where(budget >= experts, experts, np.maximum(budget - 1, 0))
    return budget
