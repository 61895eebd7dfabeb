"""all-gpu: every routed expert resident on the GPU (the upper bound, MoE with no offloading).

The budget is the number of experts per layer whatever the options say; the schedule is marked
infeasible when the model's weights plus the memory reserve do not fit the profile's GPU, and
it is always a bound, never a deployment.
"""

from __future__ import annotations

import numpy as np

from tidesim.budget import expert_memory_bytes
from tidesim.policies.base import PolicyOptions, register_policy, uniform
from tidesim.policies.residency import make_schedule
from tidesim.schedule import NO_COPY, Schedule
from tidesim.workload import Workload


def fits_gpu(workload: Workload, options: PolicyOptions) -> bool:
    """Whether all routed experts, the non-expert weights and the reserve fit the GPU (sized the
    same way as tidesim.budget, so all-gpu is feasible exactly when that budget is every expert)."""
    model = workload.model
    need = model.expert_bytes * workload.num_experts * workload.num_layers
    return bool(expert_memory_bytes(model, options.hw.gpu.memory_gib) >= need)


@register_policy("all-gpu", "every expert resident on the GPU (upper bound; infeasible when it does not fit)")
def all_gpu(workload: Workload, options: PolicyOptions) -> Schedule:
    f, l, e = workload.expert_tokens.shape
    activated = workload.activated
    feasible = fits_gpu(workload, options)
    return make_schedule(
        "all-gpu", workload, budget=uniform(e, l), initial=np.ones((l, e), dtype=bool),
        gpu=activated, copy=np.full((f, l, e), NO_COPY, dtype=np.int8), resident=np.ones((f, l, e), dtype=bool),
        params={"budget": e}, is_bound=True, feasible=feasible,
    )
