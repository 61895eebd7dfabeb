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
assumption); online it must be given (step.static_for).
"""

from __future__ import annotations

import numpy as np

from tidesim.hardware import HardwareProfile
from tidesim.models import ModelSpec
from tidesim.policies.cpu_routing import static_params
from tidesim.policies.registry import PolicyTraits, register_policy, static_set_size
from tidesim.policies.residency import by_count, int_list
from tidesim.policies.step import Choice, ForwardMeta, PolicyStep, Rows, Setup, copies, placement_of, static_for
from tidesim.schedule import COPY_ON_DEMAND


def copy_is_cheaper(tokens: np.ndarray, spec: ModelSpec, hw: HardwareProfile) -> np.ndarray:
    """bool, same shape as tokens: streaming the expert in beats computing it on the CPU
    (entries with no tokens are never asked about and come out False)."""
    h2d = float(hw.h2d_time(float(spec.expert_bytes)))
    copy = by_count(lambda t: h2d + hw.gpu_expert_time(t, spec), tokens)
    cpu = by_count(lambda t: hw.cpu_expert_latency(t, spec), tokens)
    # Strictly cheaper: a tie (within float rounding) stays on the CPU and spends no PCIe time.
    return (np.asarray(tokens) > 0) & (copy < cpu * (1 - 1e-9))


class CheapCopies:
    """copy_is_cheaper as a table over token counts, grown on demand (the cost curves are
    evaluated once per count, not once per forward)."""

    def __init__(self, spec: ModelSpec, hw: HardwareProfile, top: int) -> None:
        self.spec, self.hw = spec, hw
        self.table = copy_is_cheaper(np.arange(max(top, 1) + 1), spec, hw)

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        try:
            return self.table[counts]
        except IndexError:  # a count beyond the table: grow it (rare, so not checked up front)
            top = int(counts.max(initial=0))
            self.table = copy_is_cheaper(np.arange(max(top, 2 * self.table.size) + 1), self.spec, self.hw)
            return self.table[counts]


@register_policy("fiddler", "static popular experts; each miss on the CPU or copied in, whichever is cheaper",
                 PolicyTraits(role="baseline", order=40, needs_cpu=True, static_set=True, reads_profile=True,
                              static_size="budget-1"))
class Fiddler(PolicyStep):
    def __init__(self, setup: Setup) -> None:
        options = setup.options
        budget = np.asarray(options.budget, dtype=np.int64)
        size = budget if options.static_resident is not None else static_set_size(self.name, budget, setup.experts)
        super().__init__(setup, static_for(setup, size, self.name))
        self.streaming = self.initial.sum(axis=1) < budget               # [L]: a free slot to stream through
        self.may_stream = ~self.initial & self.streaming[:, None]         # [L, E]: not static, a slot to stream through
        top = int(setup.workload.expert_tokens.max(initial=0)) if setup.workload is not None else 64
        self.cheap = CheapCopies(setup.model, options.hw, top)

    def decide(self, meta: ForwardMeta, rows: Rows, counts: np.ndarray) -> Choice:
        static = self.initial[rows]
        stream = self.may_stream[rows] & self.cheap(counts)  # cheap is False where there are no tokens
        return (placement_of(counts, static | stream), copies(stream, COPY_ON_DEMAND),
                np.zeros(counts.shape, dtype=bool), static.copy())

    def params(self) -> dict[str, object]:
        return {**static_params(self), "static_experts": int_list(self.initial.sum(axis=1))}
