"""cpu-routing: a static resident set on the GPU; tokens for every other expert run on the CPU
(Fiddler / kTransformers / llama.cpp --n-cpu-moe style). No expert is ever copied after start.

The static set is options.static_resident, or per layer the `budget` experts with the most tokens
over a warm-up prefix of the trace (options.warmup_fraction of the forwards, at least one). Those
first forwards are therefore chosen with their own routing: the usual assumption of a profiling
run made before deployment.
"""

from __future__ import annotations

import numpy as np

from tidesim.policies.base import PolicyOptions, register_policy
from tidesim.policies.residency import int_list, make_schedule, static_set, warmup_forwards
from tidesim.schedule import NO_COPY, Schedule
from tidesim.workload import Workload


@register_policy("cpu-routing", "static popular experts on the GPU, every other expert's tokens on the CPU")
def cpu_routing(workload: Workload, options: PolicyOptions) -> Schedule:
    f, l, e = workload.expert_tokens.shape
    budget = np.asarray(options.budget, dtype=np.int64)
    static = static_set(workload, options.static_resident, budget, options.warmup_fraction)
    activated = workload.activated
    return make_schedule(
        "cpu-routing", workload, budget=budget, initial=static, gpu=activated & static[None],
        copy=np.full((f, l, e), NO_COPY, dtype=np.int8), resident=np.broadcast_to(static, (f, l, e)).copy(),
        params={"budget": int_list(budget), "static_given": options.static_resident is not None,
                "warmup_forwards": warmup_forwards(workload, options.warmup_fraction)},
    )
