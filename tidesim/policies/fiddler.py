"""fiddler: a static resident set plus one streaming slot; each activated non-resident expert
runs on the CPU, or is copied in on demand and run on the GPU, whichever the hardware profile
says is cheaper for its token count (Fiddler's rule):

    copy  iff  h2d_time(expert bytes) + gpu_expert_time(tokens) < cpu_expert_latency(tokens)

where cpu_expert_latency is one expert computed with the whole CPU (Fiddler runs CPU experts one
at a time on all cores, and profiles that latency), not the time of one worker among several.

Streamed experts are used once and dropped (the host keeps the weights), so residency stays the
static set. The streaming slot comes out of the budget: the static set has budget - 1 experts
(all experts when the budget is every expert, so nothing needs streaming; none and no slot when
the budget is 0). A given static set (options.static_resident) may hold at most `budget`
experts per layer; a layer whose given set fills its budget has no streaming slot (its misses
all run on the CPU). The static set comes from a warm-up prefix like cpu-routing's (profiling-run
assumption).
"""

from __future__ import annotations

import numpy as np

from tidesim.hardware import HardwareProfile
from tidesim.models import ModelSpec
from tidesim.policies.base import PolicyOptions, register_policy
from tidesim.policies.residency import by_count, int_list, make_schedule, static_set, warmup_forwards
from tidesim.schedule import COPY_ON_DEMAND, NO_COPY, Schedule
from tidesim.workload import Workload


def copy_is_cheaper(tokens: np.ndarray, spec: ModelSpec, hw: HardwareProfile) -> np.ndarray:
    """bool, same shape as tokens: streaming the expert in beats computing it on the CPU
    (entries with no tokens are never asked about and come out False)."""
    h2d = float(hw.h2d_time(float(spec.expert_bytes)))
    copy = by_count(lambda t: h2d + hw.gpu_expert_time(t, spec), tokens)
    cpu = by_count(lambda t: hw.cpu_expert_latency(t, spec), tokens)
    # Strictly cheaper: a tie (within float rounding) stays on the CPU and spends no PCIe time.
    return (np.asarray(tokens) > 0) & (copy < cpu * (1 - 1e-9))


def static_size(budget: np.ndarray, experts: int) -> np.ndarray:
    """Static slots per layer: budget - 1 (one slot streams), all experts when budget = experts."""
    return np.where(budget >= experts, experts, np.maximum(budget - 1, 0))


@register_policy("fiddler", "static popular experts; each miss on the CPU or copied in, whichever is cheaper")
def fiddler(workload: Workload, options: PolicyOptions) -> Schedule:
    f, l, e = workload.expert_tokens.shape
    budget = np.asarray(options.budget, dtype=np.int64)
    size = budget if options.static_resident is not None else static_size(budget, e)
    static = static_set(workload, options.static_resident, size, options.warmup_fraction)
    streaming = static.sum(axis=1) < budget                          # [L]: a free slot to stream through
    activated = workload.activated
    miss = activated & ~static[None]
    stream = miss & streaming[None, :, None] & copy_is_cheaper(workload.expert_tokens, workload.model, options.hw)
    copy = np.where(stream, COPY_ON_DEMAND, NO_COPY).astype(np.int8)
    return make_schedule(
        "fiddler", workload, budget=budget, initial=static, gpu=(activated & static[None]) | stream, copy=copy,
        resident=np.broadcast_to(static, (f, l, e)).copy(),
        params={"budget": int_list(budget), "static_experts": int_list(static.sum(axis=1)),
                "static_given": options.static_resident is not None,
                "warmup_forwards": warmup_forwards(workload, options.warmup_fraction)},
    )
