"""What every offload policy receives, and the registry that names them.

An online policy is a PolicyStep class (tidesim.policies.step): it decides forward by forward
from the routing seen so far, and build_schedule loops that step over a trace. A bound (oracle)
is a function (workload, options) -> Schedule that needs the whole trace and cannot run online.
Either way a policy decides once; the simulator, the cost model and the runtime only execute
what it decided.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from tidesim.errors import InputError
from tidesim.hardware import HardwareProfile
from tidesim.models import ModelSpec
from tidesim.schedule import Schedule
from tidesim.workload import Workload

if TYPE_CHECKING:
    from tidesim.policies.step import PolicyStep

REFRESH_MODES = ("sync", "async")


@dataclass
class PolicyOptions:
    """Knobs shared by the policies; each policy reads the ones it needs.

    budget: GPU expert slots per MoE layer, int [L].
    tau: refresh interval per MoE layer, int [L] (tide, tide-reference, planned).
    refresh: "sync" (block the step, as the public TIDE code) or "async" (overlap with compute).
    warmup_fraction: share of the forwards whose routing picks a static resident set
        (cpu-routing, fiddler) when no static set is given.
    static_resident: bool [L, E] resident set for the static policies, or None.
    hw: the hardware profile, for policies that compare costs (fiddler, oracle).
    """

    budget: np.ndarray
    tau: np.ndarray
    hw: HardwareProfile
    refresh: str = "sync"
    warmup_fraction: float = 0.1
    static_resident: np.ndarray | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def check(self, workload: Workload) -> None:
        self.check_shape(workload.num_layers, workload.num_experts)

    def check_shape(self, layers: int, experts: int) -> None:
        """Refuse options that do not fit a model of `layers` MoE layers of `experts` experts."""
        if self.budget.shape != (layers,):
            raise InputError(f"budget must give one value per MoE layer ({layers})")
        if (self.budget < 0).any() or (self.budget > experts).any():
            raise InputError(f"budget must lie in 0..{experts} experts per layer, got "
                             f"{int(self.budget.min())}..{int(self.budget.max())}")
        if self.tau.shape != (layers,):
            raise InputError(f"tau must give one value per MoE layer ({layers})")
        if (self.tau < 1).any():
            raise InputError(f"tau must be at least 1, got {int(self.tau.min())}")
        if self.refresh not in REFRESH_MODES:
            raise InputError(f"refresh must be one of {', '.join(REFRESH_MODES)}, got {self.refresh!r}")
        if not 0 < self.warmup_fraction <= 1:
            raise InputError("warmup_fraction must lie in (0, 1]")


def uniform(value: int, layers: int) -> np.ndarray:
    """One value for every MoE layer."""
    return np.full(layers, int(value), dtype=np.int64)


PolicyFn = Callable[[Workload, PolicyOptions], Schedule]
Registered = TypeVar("Registered")
_REGISTRY: dict[str, tuple[Any, str]] = {}


def register_policy(name: str, summary: str) -> Callable[[Registered], Registered]:
    """Decorator: add a policy to the registry under `name`, with a one-line summary. It takes a
    PolicyStep subclass (an online policy) or a function (workload, options) -> Schedule (a
    bound, offline only)."""
    def wrap(obj: Registered) -> Registered:
        if isinstance(obj, type):
            obj.name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = (obj, summary)
        return obj
    return wrap


def policy_names() -> list[str]:
    from tidesim import policies  # noqa: F401  (imports every policy module, filling the registry)

    return list(_REGISTRY)


def policy_summary(name: str) -> str:
    policy_names()
    return _REGISTRY[name][1]


def _lookup(name: str) -> Any:
    names = policy_names()
    if name not in _REGISTRY:
        raise InputError(f"unknown policy {name!r}; use one of {', '.join(names)}")
    return _REGISTRY[name][0]


def is_online(name: str) -> bool:
    """Whether the named policy decides forward by forward (has a step); bounds do not."""
    from tidesim.policies.step import PolicyStep

    obj = _lookup(name)
    return isinstance(obj, type) and issubclass(obj, PolicyStep)


def online_names() -> list[str]:
    return [n for n in policy_names() if is_online(n)]


def build_schedule(name: str, workload: Workload, options: PolicyOptions) -> Schedule:
    """Run the named policy over a whole workload; the one entry point every executor and
    command uses. An online policy's step is looped over the forwards (step.offline_schedule)."""
    from tidesim.policies.step import Setup, offline_schedule

    obj = _lookup(name)
    options.check(workload)
    if not is_online(name):
        return obj(workload, options)
    setup = Setup(workload.model, workload.num_layers, workload.num_experts, options, workload)
    return offline_schedule(obj(setup), workload)


def online_policy(name: str, model: ModelSpec, options: PolicyOptions, layers: int | None = None) -> PolicyStep:
    """The named policy, ready to decide live forward by forward for `layers` MoE layers (default:
    all of the model's). A bound is refused: it needs routing that has not happened yet."""
    from tidesim.policies.step import Setup

    obj = _lookup(name)
    if not is_online(name):
        raise InputError(f"{name} is a bound: it needs the whole decode's routing in advance and cannot run online; "
                         f"use one of {', '.join(online_names())}")
    layers = model.num_moe_layers if layers is None else layers
    options.check_shape(layers, model.num_experts)
    return obj(Setup(model, layers, model.num_experts, options, None))
