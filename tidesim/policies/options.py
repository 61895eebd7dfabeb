"""What every offload policy receives: the per-layer budget and interval, the refresh mode and the
hardware profile (PolicyOptions), checked against the model before any policy runs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tidesim.budget import check_budget
from tidesim.errors import InputError
from tidesim.hardware import HardwareProfile
from tidesim.limits import check_tau
from tidesim.workload import Workload

REFRESH_MODES = ("sync", "async")


@dataclass
class PolicyOptions:
    """Knobs shared by the policies; each policy reads the ones it needs (its traits in the registry,
    tidesim.policies.registry, say which).

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
        for value in (int(self.budget.min()), int(self.budget.max())):
            check_budget(value, experts, "budget")
        if self.tau.shape != (layers,):
            raise InputError(f"tau must give one value per MoE layer ({layers})")
        check_tau(int(self.tau.min()), "tau")
        if self.refresh not in REFRESH_MODES:
            raise InputError(f"refresh must be one of {', '.join(REFRESH_MODES)}, got {self.refresh!r}")
        if not 0 < self.warmup_fraction <= 1:
            raise InputError("warmup_fraction must lie in (0, 1]")


def uniform(value: int, layers: int) -> np.ndarray:
    """One value for every MoE layer."""
    return np.full(layers, int(value), dtype=np.int64)
