"""cpu-routing: a static resident set on the GPU; tokens for every other expert run on the CPU
(Fiddler / kTransformers / llama.cpp --n-cpu-moe style). No expert is ever copied after start.

The static set is options.static_resident, or offline per layer the `budget` experts with the
most tokens over a warm-up prefix of the trace (options.warmup_fraction of the forwards, at least
one). Those first forwards are therefore chosen with their own routing: the usual assumption of a
profiling run made before deployment. Online (live decode) the set must be given up front
(step.static_for).
"""

from __future__ import annotations

import numpy as np

from tidesim.policies.registry import PolicyTraits, register_policy, static_set_size
from tidesim.policies.residency import int_list, warmup_forwards
from tidesim.policies.step import Choice, ForwardMeta, PolicyStep, Rows, Setup, cpu_code, no_copies, static_for


def static_params(step: PolicyStep) -> dict[str, object]:
    """The static policies' params: whether the set was given, and the warm-up prefix (offline)."""
    setup = step.setup
    return {"budget": int_list(step.budget), "static_given": setup.options.static_resident is not None,
            "warmup_forwards": (None if setup.workload is None
                                else warmup_forwards(setup.workload, setup.options.warmup_fraction))}


@register_policy("cpu-routing", "static popular experts on the GPU, every other expert's tokens on the CPU",
                 PolicyTraits(role="baseline", order=30, needs_cpu=True, static_set=True))
class CpuRouting(PolicyStep):
    def __init__(self, setup: Setup) -> None:
        budget = np.asarray(setup.options.budget, dtype=np.int64)
        super().__init__(setup, static_for(setup, static_set_size(self.name, budget, setup.experts), self.name))
        self.code = cpu_code(self.initial)  # the GPU set never changes: placement = activated x code

    def decide(self, meta: ForwardMeta, rows: Rows, counts: np.ndarray) -> Choice:
        return ((counts > 0).view(np.int8) * self.code[rows], no_copies(counts), np.zeros(counts.shape, dtype=bool),
                self.initial[rows].copy())

    def params(self) -> dict[str, object]:
        return static_params(self)
