"""all-gpu: every routed expert resident on the GPU (the upper bound, MoE with no offloading).

The budget is the number of experts per layer whatever the options say; the schedule is marked
infeasible when the model's weights plus the memory reserve do not fit the profile's GPU, and
it is always a bound, never a deployment. It still has an online step (every expert on the GPU
from the start), so a small model can be decoded that way.
"""

from __future__ import annotations

import numpy as np

from tidesim.budget import expert_memory_bytes
from tidesim.models import ModelSpec
from tidesim.policies.options import PolicyOptions, uniform
from tidesim.policies.registry import PolicyTraits, register_policy
from tidesim.policies.step import Choice, ForwardMeta, PolicyStep, Rows, Setup, cpu_code, no_copies


def fits_gpu(model: ModelSpec, layers: int, options: PolicyOptions) -> bool:
    """Whether all routed experts, the non-expert weights and the reserve fit the GPU (sized the
    same way as tidesim.budget, so all-gpu is feasible exactly when that budget is every expert)."""
    need = model.expert_bytes * model.num_experts * layers
    return bool(expert_memory_bytes(model, options.hw.gpu.memory_gib) >= need)


@register_policy("all-gpu", "every expert resident on the GPU (upper bound; infeasible when it does not fit)",
                 PolicyTraits(role="bound", order=10, reads_profile=True, ignores_budget=True))
class AllGpu(PolicyStep):
    def __init__(self, setup: Setup) -> None:
        super().__init__(setup, initial=np.ones((setup.layers, setup.experts), dtype=bool))
        self.budget = uniform(setup.experts, setup.layers)
        self.feasible = fits_gpu(setup.model, setup.layers, setup.options)
        self.code = cpu_code(self.initial)  # the GPU set never changes: placement = activated x code

    def decide(self, meta: ForwardMeta, rows: Rows, counts: np.ndarray) -> Choice:
        return ((counts > 0).view(np.int8) * self.code[rows], no_copies(counts), np.zeros(counts.shape, dtype=bool),
                np.ones(counts.shape, dtype=bool))

    def params(self) -> dict[str, object]:
        return {"budget": self.setup.experts}
