"""Offload policies, one module each, behind one registry (registry.py, docs/policies.md).

A policy module registers itself with its traits (`@register_policy(name, summary, PolicyTraits(...))`);
the registry imports every module of this package, so adding a policy is adding its module (and its
test). options.py holds what policies receive, step.py the online step, driver.py how a registered
policy is run, residency.py the resident-set rules they share.
"""

from tidesim.policies.driver import build_schedule, online_policy
from tidesim.policies.options import PolicyOptions, uniform
from tidesim.policies.registry import PolicyTraits, policy_names, register_policy

__all__ = ["PolicyOptions", "PolicyTraits", "build_schedule", "online_policy", "policy_names", "register_policy",
           "uniform"]
