"""The oracle lower bound: a Lagrangian dual of the residency program over every refresh schedule
with the given budgets (docs/planner.md, section 3)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tidesim.hardware import HardwareProfile
from tidesim.layermodel import Rates, grouped_share, per_count
from tidesim.workload import Workload

# ----- oracle bound -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OracleCosts:
    """What any refresh schedule pays per (forward, MoE layer, expert), as lower bounds of what
    the cost model charges (tidesim.layermodel's terms): GPU time of the expert's tokens without
    the kernel launch, CPU time on one worker, one expert's H2D copy; plus the work no schedule
    changes."""

    layer_fixed_s: np.ndarray    # [F] attention + shared expert + gate of one MoE layer
    gpu_s: np.ndarray            # [F, L, E] (0 where no tokens are routed)
    cpu_s: np.ndarray            # [F, L, E]
    workers: int
    copy_s: float
    other_s: float               # outside the MoE layers (dense layers, lm_head)


def oracle_costs(workload: Workload, hw: HardwareProfile) -> OracleCosts:
    """Charge every activated (forward, layer, expert) once on each side, from the profile."""
    spec = workload.model
    r = Rates.of(hw, spec)
    et = workload.expert_tokens
    gpu_s = np.where(et > 0, grouped_share(r, per_count(lambda t: hw.gpu_expert_time(t, spec), et)), 0.0)
    cpu_s = per_count(lambda t: hw.cpu_expert_time(t, spec), et)
    fixed, other = fixed_costs(workload, hw)
    return OracleCosts(fixed, gpu_s, cpu_s, r.workers, r.expert_copy_s, other)


def fixed_costs(workload: Workload, hw: HardwareProfile) -> tuple[np.ndarray, float]:
    """What no placement changes: [F] the GPU work of one MoE layer outside its experts, and the
    seconds outside the MoE layers over the workload."""
    spec = workload.model
    tokens = workload.tokens.astype(float)
    context = workload.context.astype(float)
    fixed = np.broadcast_to(np.asarray(hw.gpu_layer_fixed_time(tokens, context, spec), float),
                            tokens.shape).copy()
    other = np.broadcast_to(np.asarray(hw.gpu_forward_fixed_time(tokens, context, spec), float), tokens.shape)
    return fixed, float(other.sum())


@dataclass
class OracleBound:
    """A lower bound (seconds) on the predicted time of every refresh schedule with the budgets."""

    bound_s: float
    layer_bound_s: np.ndarray    # [L] per MoE layer (the fixed GPU work included)
    iterations: int


def oracle_bound(costs: OracleCosts, budget: np.ndarray, iterations: int = 80,
                 layer_upper_s: np.ndarray | None = None) -> OracleBound:
    """Lagrangian dual of the residency program of docs/planner.md, section 3.

    Per (forward, layer) the max of the GPU and CPU sides is bounded below by theta x GPU +
    (1 - theta) x CPU and the budget row is priced by lambda >= 0; then every expert's residency
    over the forwards is a two-state shortest path (a copy costs copy_s on entering the GPU), solved
    for all (layer, expert) at once. Every (theta, lambda) gives a valid bound; projected subgradient
    steps (Polyak, towards `layer_upper_s`, a known achievable time per layer) improve it.
    """
    f_count, layers, _ = costs.gpu_s.shape
    budget = np.asarray(budget, dtype=float)
    gpu = costs.gpu_s
    cpu = costs.cpu_s / costs.workers
    fixed_total = float(costs.layer_fixed_s.sum())
    all_cpu = cpu.sum(axis=(0, 2)) + fixed_total          # no expert resident: always achievable
    upper = all_cpu if layer_upper_s is None else np.minimum(all_cpu, layer_upper_s)
    theta = (gpu.sum(axis=2) > cpu.sum(axis=2)).astype(float)   # [F, L] the heavier side first
    lam = _initial_prices(gpu, cpu, theta, budget)
    unit = _typical_cost(np.maximum(gpu, cpu))            # [L]
    best = np.full(layers, -np.inf)
    scale = np.ones(layers)
    stale = np.zeros(layers, dtype=int)
    done = 0
    while done < iterations:
        done += 1
        value, resident = _residency_paths(gpu, cpu, theta, lam, costs.copy_s)
        value = value - (lam * budget[None, :]).sum(axis=0) + fixed_total
        improved = value > best + 1e-15
        stale = np.where(improved, 0, stale + 1)
        scale = np.where(stale >= 5, scale / 2, scale)
        stale = np.where(stale >= 5, 0, stale)
        best = np.maximum(best, value)
        g_side = (resident * gpu).sum(axis=2)
        c_side = (~resident * cpu).sum(axis=2)
        sub_theta = g_side - c_side                                   # [F, L]
        sub_lam = resident.sum(axis=2) - budget[None, :]             # [F, L]
        # lambda is stepped in units of a typical expert cost, so both blocks are in seconds.
        norm = (sub_theta**2).sum(axis=0) + unit**2 * (sub_lam**2).sum(axis=0)
        gap = np.maximum(upper - value, 0.0)
        if not (norm > 0).any() or (gap <= 1e-12 * np.maximum(upper, 1e-30)).all():
            break
        step = np.where(norm > 0, scale * gap / np.maximum(norm, 1e-300), 0.0)
        theta = np.clip(theta + step[None, :] * sub_theta, 0.0, 1.0)
        lam = np.maximum(lam + (step * unit**2)[None, :] * sub_lam, 0.0)
    return OracleBound(bound_s=float(best.sum() + costs.other_s), layer_bound_s=best, iterations=done)


def _typical_cost(cost: np.ndarray) -> np.ndarray:
    """[L]: mean cost of an activated expert in each layer (1 where none is activated)."""
    active = cost > 0
    n = active.sum(axis=(0, 2))
    return np.where(n > 0, cost.sum(axis=(0, 2)) / np.maximum(n, 1), 1.0)


def _initial_prices(gpu: np.ndarray, cpu: np.ndarray, theta: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """lambda[f, l]: the saving of the (B+1)-th best expert, so that without copy costs about B
    experts per forward are worth keeping (the copy-free knapsack's price)."""
    saving = (1 - theta)[:, :, None] * cpu - theta[:, :, None] * gpu
    ranked = -np.sort(-saving, axis=2)
    k = np.clip(budget.astype(int), 0, gpu.shape[2] - 1)
    price = np.take_along_axis(ranked, np.broadcast_to(k[None, :, None], (gpu.shape[0], gpu.shape[1], 1)), axis=2)
    return np.maximum(price[:, :, 0], 0.0)


def _residency_paths(gpu: np.ndarray, cpu: np.ndarray, theta: np.ndarray, lam: np.ndarray, copy_s: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Cheapest resident/not path per (layer, expert): value per layer [L] and residency [F, L, E].

    State costs at forward f: resident theta x gpu + lambda, not resident (1 - theta) x cpu; entering
    the resident state costs copy_s. The state before the first forward is free (policies load
    their initial set untimed)."""
    f_count = gpu.shape[0]
    v0 = np.zeros(gpu.shape[1:])
    v1 = np.zeros(gpu.shape[1:])
    from0 = np.zeros(gpu.shape, dtype=bool)      # resident at f, came from not resident
    from1 = np.zeros(gpu.shape, dtype=bool)      # not resident at f, came from resident
    for f in range(f_count):
        th = theta[f][:, None]
        enter = v0 + copy_s
        n1 = np.minimum(v1, enter) + th * gpu[f] + lam[f][:, None]
        n0 = np.minimum(v0, v1) + (1 - th) * cpu[f]
        from0[f] = enter < v1
        from1[f] = v1 < v0
        v0, v1 = n0, n1
    state = v1 < v0
    value = np.minimum(v0, v1).sum(axis=1)
    resident = np.zeros(gpu.shape, dtype=bool)
    for f in range(f_count - 1, -1, -1):
        resident[f] = state
        state = np.where(state, ~from0[f], from1[f])
    return value, resident
