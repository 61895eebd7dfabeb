"""Offload policies, one module each, behind one registry (see base.py and docs/policies.md)."""

from tidesim.policies.base import PolicyOptions, build_schedule, policy_names, register_policy, uniform

# Importing each policy module registers it; keep this list in the order tables should show them.
POLICY_MODULES: list[str] = []

for _name in POLICY_MODULES:
    __import__(_name)

__all__ = ["PolicyOptions", "build_schedule", "policy_names", "register_policy", "uniform"]
