"""Running a registered policy: over a whole trace (build_schedule, the one entry point every
executor and command uses) or live, forward by forward (online_policy).

An online policy is a PolicyStep class (tidesim.policies.step): build_schedule loops its step over
the forwards of a trace. A bound (oracle) is a function (workload, options) -> Schedule that needs
the whole trace and cannot run online. Either way a policy decides once; the simulator, the cost
model and the runtime only execute what it decided.
"""

from __future__ import annotations

from tidesim.errors import InputError
from tidesim.models import ModelSpec
from tidesim.policies.options import PolicyOptions
from tidesim.policies.registry import entry, policy_names
from tidesim.policies.step import PolicyStep, Setup, offline_schedule
from tidesim.schedule import Schedule
from tidesim.workload import Workload


def is_online(name: str) -> bool:
    """Whether the named policy decides forward by forward (has a step); bounds do not."""
    impl = entry(name).impl
    return isinstance(impl, type) and issubclass(impl, PolicyStep)


def online_names() -> list[str]:
    return [n for n in policy_names() if is_online(n)]


def check_online(name: str) -> None:
    """Refuse a policy that cannot decide live: unknown (offering the online ones) or a bound (it
    needs routing that has not happened yet)."""
    entry(name, online_names())
    if not is_online(name):
        raise InputError(f"{name} is a bound: it needs the whole decode's routing in advance and cannot run online; "
                         f"use one of {', '.join(online_names())}")


def build_schedule(name: str, workload: Workload, options: PolicyOptions) -> Schedule:
    """Run the named policy over a whole workload. An online policy's step is looped over the
    forwards (step.offline_schedule)."""
    impl = entry(name).impl
    options.check(workload)
    if not is_online(name):
        schedule: Schedule = impl(workload, options)
        return schedule
    setup = Setup(workload.model, workload.num_layers, workload.num_experts, options, workload)
    return offline_schedule(impl(setup), workload)


def online_policy(name: str, model: ModelSpec, options: PolicyOptions, layers: int | None = None) -> PolicyStep:
    """The named policy, ready to decide live forward by forward for `layers` MoE layers (default:
    all of the model's). A bound is refused: it needs routing that has not happened yet."""
    impl = entry(name).impl
    check_online(name)
    layers = model.num_moe_layers if layers is None else layers
    options.check_shape(layers, model.num_experts)
    step: PolicyStep = impl(Setup(model, layers, model.num_experts, options, None))
    return step
