"""Offload policies, one module each, behind one registry (see base.py and docs/policies.md)."""

from tidesim.policies.base import PolicyOptions, build_schedule, policy_names, register_policy, uniform

# Importing each policy module registers it; keep this list in the order tables should show them.
POLICY_MODULES: list[str] = [
    "tidesim.policies.all_gpu",
    "tidesim.policies.full_swap",
    "tidesim.policies.cpu_routing",
    "tidesim.policies.fiddler",
    "tidesim.policies.tide",
    "tidesim.policies.tide_reference",
    "tidesim.policies.planned",
    "tidesim.policies.tide_split",
    "tidesim.policies.oracle",
]

for _name in POLICY_MODULES:
    __import__(_name)

__all__ = ["PolicyOptions", "build_schedule", "policy_names", "register_policy", "uniform"]
