"""The planner: per-layer refresh intervals and GPU expert budgets under one memory budget.

docs/planner.md has the formulation. In short: a cost table C[l, tau, B] (predicted seconds of MoE
layer l when `tide` runs it with interval tau and budget B) is computed once from the analytic cost
model, then a multiple-choice knapsack picks one (tau, B) per layer under the memory row, solved
exactly by CBC through PuLP. A Lagrangian lower bound over all refresh schedules with the chosen
budgets says how far the plan can be from any policy of that kind.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pulp
from pulp.apis import coin_api

from tidesim.budget import expert_memory_bytes
from tidesim.errors import InputError
from tidesim.hardware import US, HardwareProfile
from tidesim.metrics import Metrics
from tidesim.models import ModelSpec
from tidesim.plan import (
    Evaluation,
    Fingerprints,
    Plan,
    SolverInfo,
    file_fingerprint,
    model_fingerprint,
    profile_fingerprint,
)
from tidesim.workload import Workload

# ----- cost table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostTable:
    """Predicted seconds per MoE layer for every candidate (tau, budget), over one workload.

    layer_cost_s[l, i, k]: layer l with interval taus[i] and budget budgets[k].
    other_s: time outside the MoE layers, the same for every plan.
    """

    taus: np.ndarray
    budgets: np.ndarray
    layer_cost_s: np.ndarray
    other_s: float
    generated_tokens: int

    def __post_init__(self) -> None:
        shape = (self.layer_cost_s.shape[0], len(self.taus), len(self.budgets))
        if self.layer_cost_s.ndim != 3 or self.layer_cost_s.shape != shape:
            raise ValueError(f"layer_cost_s must be [L, {len(self.taus)}, {len(self.budgets)}]")

    @property
    def num_layers(self) -> int:
        return int(self.layer_cost_s.shape[0])

    def total_s(self, tau: np.ndarray, budget: np.ndarray) -> float:
        """Predicted total time of a per-layer choice (values must be candidates)."""
        ti = _index_of(self.taus, tau, "tau")
        bi = _index_of(self.budgets, budget, "budget")
        layers = np.arange(self.num_layers)
        return float(self.other_s + self.layer_cost_s[layers, ti, bi].sum())

    def uniform_total_s(self) -> np.ndarray:
        """[T, K]: total time of every single-tau, uniform-budget setting."""
        return self.other_s + self.layer_cost_s.sum(axis=0)


def _index_of(values: np.ndarray, wanted: np.ndarray, name: str) -> np.ndarray:
    pos = {int(v): i for i, v in enumerate(values)}
    try:
        return np.array([pos[int(w)] for w in np.asarray(wanted).ravel()], dtype=np.int64)
    except KeyError as exc:
        raise InputError(f"{name} {exc.args[0]} is not among the candidates") from None


def distinct_taus(workload: Workload, taus: list[int]) -> dict[int, int]:
    """Map every candidate tau to the smallest candidate with the same refresh forwards.

    A tau longer than every block's steps refreshes only at step 0, like all longer ones; those
    give identical schedules, so the cost table evaluates one of them and copies it.
    """
    from tidesim.policies.residency import refresh_steps

    seen: dict[bytes, int] = {}
    out: dict[int, int] = {}
    for tau in sorted(taus):
        key = refresh_steps(workload, np.array([tau]))[:, 0].tobytes()
        out[tau] = seen.setdefault(key, tau)
    return out


def cost_table(workload: Workload, hw: HardwareProfile, taus: list[int], budgets: list[int],
               max_cells: int = 4_000_000, progress: Callable[[Iterable[int]], Iterable[int]] | None = None
               ) -> CostTable:
    """C[l, tau, B]: the analytic cost model's time of MoE layer l under `tide` with synchronous
    refresh, interval tau and budget B, for every candidate pair.

    With synchronous refresh the analytic model is additive over MoE layers (a layer-forward's
    time depends on that layer's schedule only; docs/planner.md section 2) and `tide` decides each
    layer alone, so all options are stepped through the forwards together, vectorised over
    (option, layer, expert), keeping only the per-layer-forward sums the cost model needs.
    tests/test_planner.py checks every entry against `tide` + `run(engine="analytic")`.
    max_cells bounds options x layers x experts per step (memory).
    """
    if not taus or not budgets:
        raise InputError("give at least one candidate tau and one candidate budget")
    if max(budgets) > workload.num_experts or min(budgets) < 0:
        raise InputError(f"candidate budgets must lie in 0..{workload.num_experts} (experts per layer)")
    same = distinct_taus(workload, taus)
    options = [(tau, b) for tau in sorted(set(same.values())) for b in budgets]
    per_chunk = max(1, min(max_cells // max(1, workload.num_layers * workload.num_experts),
                           max_cells // 4 // max(1, workload.num_forwards * workload.num_layers)))
    chunks = [options[i:i + per_chunk] for i in range(0, len(options), per_chunk)]
    inputs = _TideInputs.of(workload, hw)
    found: dict[tuple[int, int], np.ndarray] = {}
    indices: Iterable[int] = range(len(chunks))
    if progress is not None:
        indices = progress(indices)
    for i in indices:
        times = _tide_layer_times(inputs, workload, chunks[i])
        for k, option in enumerate(chunks[i]):
            found[option] = times[k]
    sorted_taus = sorted(taus)
    cost = np.stack([np.stack([found[(same[t], b)] for b in budgets], axis=1) for t in sorted_taus], axis=1)
    return CostTable(taus=np.array(sorted_taus, dtype=np.int64), budgets=np.array(budgets, dtype=np.int64),
                     layer_cost_s=cost, other_s=inputs.other_s, generated_tokens=workload.generated_tokens)


@dataclass(frozen=True)
class _TideInputs:
    """Per (forward, layer, expert) what the cost model charges an expert on either side."""

    activated: np.ndarray        # bool [F, L, E]
    rank: np.ndarray             # int [F, L, E] rank by tokens (ties: lower id first)
    gpu_s: np.ndarray            # [F, L, E] expert on the GPU, kernel launch excluded
    cpu_s: np.ndarray            # [F, L, E] expert on one CPU worker
    tokens: np.ndarray           # [F, L, E]
    layer_fixed_s: np.ndarray    # [F]
    other_s: float
    hw: HardwareProfile
    model: ModelSpec

    @classmethod
    def of(cls, workload: Workload, hw: HardwareProfile) -> _TideInputs:
        from tidesim.policies.residency import rank_experts

        oc = oracle_costs(workload, hw)
        return cls(workload.activated, rank_experts(workload.expert_tokens).rank, oc.gpu_s, oc.cpu_s,
                   workload.expert_tokens.astype(float), oc.layer_fixed_s, oc.other_s, hw, workload.model)


def _tide_layer_times(inp: _TideInputs, workload: Workload, options: list[tuple[int, int]]) -> np.ndarray:
    """[options, L] seconds per MoE layer over the workload, for tide (sync) with each (tau, B).

    The refresh rule is tide's: the target is the top-B activated experts; when B or more experts
    are activated the new set is exactly the top B, otherwise all activated ones plus the residents
    with no tokens that fit, lowest id first (what keeping the best B of residents and target by
    rank amounts to). Only per-layer-forward sums are kept; the cost model turns them into times.
    """
    from tidesim.policies.residency import refresh_steps

    f_count, layers, experts = inp.activated.shape
    n = len(options)
    tau = np.array([t for t, _ in options], dtype=np.int64)
    budget = np.array([b for _, b in options], dtype=np.int64)[:, None]          # [n, 1]
    refresh = refresh_steps(workload, tau)                                        # [F, n]
    current = np.zeros((n, layers, experts), dtype=bool)
    shape = (f_count, n, layers)
    copies, gpu_sum, gpu_n = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    cpu_sum, cpu_max, cpu_min = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    cpu_n, cpu_tok = np.zeros(shape), np.zeros(shape)
    span = _contention_span(inp, shape)
    for f in range(f_count):
        act = inp.activated[f]
        rows = np.flatnonzero(refresh[f])
        if rows.size:
            old = current[rows]
            b = budget[rows]                                                      # [r, 1]
            n_act = act.sum(axis=-1)[None, :]                                     # [1, L]
            idle = old & ~act
            room = (b - n_act)[..., None]
            keep_idle = idle & (np.cumsum(idle, axis=-1) <= room)
            new = np.where((n_act >= b)[..., None], inp.rank[f][None] < b[..., None], act | keep_idle)
            copies[f, rows] = (new & ~old).sum(axis=-1)
            current[rows] = new
        on_cpu = act & ~current
        on_gpu = act & current
        cpu_part = np.where(on_cpu, inp.cpu_s[f], np.inf)
        gpu_sum[f] = np.einsum("nle,le->nl", on_gpu, inp.gpu_s[f])
        gpu_n[f] = on_gpu.sum(axis=-1)
        cpu_n[f] = on_cpu.sum(axis=-1)
        cpu_sum[f] = np.einsum("nle,le->nl", on_cpu, inp.cpu_s[f])
        low = cpu_part.min(axis=-1)
        cpu_min[f] = np.where(np.isfinite(low), low, 0.0)
        cpu_max[f] = np.where(on_cpu, inp.cpu_s[f], 0.0).max(axis=-1)
        cpu_tok[f] = np.einsum("nle,le->nl", on_cpu, inp.tokens[f])
        if span is not None:
            span[f] = _cpu_makespans(inp, on_cpu, cpu_sum[f], f)
    return _sync_layer_time(inp, copies, gpu_sum, gpu_n, cpu_sum, cpu_max, cpu_min, cpu_n, cpu_tok, span)


def _contention_span(inp: _TideInputs, shape: tuple[int, int, int]) -> np.ndarray | None:
    """Room for the CPU pool's makespans, which cpu.gpu_contention needs (None when it is 0)."""
    return np.zeros(shape) if inp.hw.cpu.gpu_contention > 0 else None


def _cpu_makespans(inp: _TideInputs, on_cpu: np.ndarray, cpu_sum: np.ndarray, f: int) -> np.ndarray:
    """[n, L] longest-first makespans of forward f's CPU tasks (the simulator's rule and sums)."""
    from tidesim.sim.lpt import lpt_makespans

    workers = max(int(inp.hw.cpu.workers), 1)
    if workers == 1:
        return cpu_sum
    n, layers, _ = on_cpu.shape
    opt, layer, expert = np.nonzero(on_cpu)
    span = lpt_makespans(opt * layers + layer, inp.cpu_s[f][layer, expert], expert, n * layers, workers)
    return span.reshape(n, layers)


def _sync_layer_time(inp: _TideInputs, copies: np.ndarray, gpu_sum: np.ndarray, gpu_n: np.ndarray,
                     cpu_sum: np.ndarray, cpu_max: np.ndarray, cpu_min: np.ndarray, cpu_n: np.ndarray,
                     cpu_tok: np.ndarray, span: np.ndarray | None = None) -> np.ndarray:
    """[n, L] per-layer totals from the cost model itself (tidesim.costmodel.estimate): the sums
    are packed into its ScheduleCosts, with the n options' layers as n x L virtual layers (exact
    because with synchronous copies only, a layer-forward's time depends on its own sums).
    span: [F, n, L] CPU pool makespans, for cpu.gpu_contention (charged like schedule_costs does)."""
    from tidesim.costmodel import estimate
    from tidesim.sim.costs import ScheduleCosts, charge_contention

    hw = inp.hw
    f_count, n, layers = copies.shape
    g = f_count * n * layers
    flat = lambda a: np.ascontiguousarray(a, dtype=float).reshape(g)  # noqa: E731
    launch = hw.gpu.launch_overhead_us * US
    act_bytes = flat(cpu_tok) * inp.model.activation_bytes_per_token
    res_h2d = np.asarray(hw.h2d_time(act_bytes), float)
    grouped = flat(gpu_sum) + np.where(flat(gpu_n) > 0, launch, 0.0)
    slows = float(hw.pcie.copy_slows_compute)
    expert_copy = float(hw.h2d_time(float(inp.model.expert_bytes)))
    zeros = np.zeros(g)
    none_i = np.zeros(0, dtype=np.int64)
    none_f = np.zeros(0)
    costs = ScheduleCosts(
        forwards=f_count, layers=n * layers, experts=inp.activated.shape[2], workers=max(int(hw.cpu.workers), 1),
        engines=1 if hw.pcie.copy_engines <= 1 else 2, slows=slows, launch_s=launch,
        expert_copy_s=expert_copy, expert_demote_s=float(hw.d2h_time(float(inp.model.expert_bytes))),
        fwd_fixed=np.zeros(f_count), layer_fixed=inp.layer_fixed_s.astype(float),
        sync_h2d=flat(copies) * expert_copy, demote_d2h=zeros, async_h2d=zeros, n_async=zeros,
        act_d2h=np.asarray(hw.d2h_time(act_bytes), float), res_h2d=res_h2d, grouped=grouped,
        slow_extra=slows * np.minimum(grouped, res_h2d) if slows > 0 else zeros,
        cpu_sum=flat(cpu_sum), cpu_max=flat(cpu_max), cpu_min=flat(cpu_min), cpu_n=flat(cpu_n),
        od_copy_sum=zeros, od_compute_sum=zeros, od_n=zeros,
        cpu_g=none_i, cpu_expert=none_i, cpu_time=none_f, od_g=none_i, od_expert=none_i, od_compute=none_f,
        gpu_g=none_i, gpu_expert=none_i, gpu_time=none_f, async_g=none_i, async_expert=none_i,
    )
    if span is not None:
        charge_contention(costs, float(hw.cpu.gpu_contention), flat(span))
    layer_time = estimate(costs).layer_time
    assert layer_time is not None
    return np.asarray(layer_time, dtype=float).reshape(n, layers)


# ----- memory -------------------------------------------------------------------------------------


def expert_slots(model: ModelSpec, gpu_mem_gib: float) -> int:
    """Expert slots (over all MoE layers) the memory budget holds next to the non-expert weights
    and the reserve; InputError when not even one expert per layer fits."""
    if not gpu_mem_gib > 0:
        raise InputError(f"GPU memory must be positive, got {gpu_mem_gib} GiB")
    free = expert_memory_bytes(model, gpu_mem_gib)
    slots = int(free // model.expert_bytes) if free > 0 else 0
    if slots < model.num_moe_layers:
        need = (model.non_expert_bytes + model.expert_bytes * model.num_moe_layers) / 2**30
        raise InputError(
            f"{gpu_mem_gib:g} GiB of GPU memory does not hold {model.name}'s non-expert weights plus one expert "
            f"per MoE layer and the reserve (needs {need:.2f} GiB plus the reserve of max(1.5 GB, 10%)); "
            "give more memory with --gpu-mem-gib"
        )
    return slots


def uniform_budget(slots: int, layers: int, experts: int) -> int:
    """The budget every layer gets when the slots are shared evenly (what the public code uses)."""
    return min(slots // layers, experts)


def default_budgets(slots: int, layers: int, experts: int) -> list[int]:
    """Candidate budgets: a grid around the uniform budget u from u/4 to 2u (within 1..experts),
    always containing u itself, so the uniform single-tau setting is a feasible point."""
    u = uniform_budget(slots, layers, experts)
    factors = (0.25, 0.5, 0.625, 0.75, 0.875, 1.0, 1.125, 1.25, 1.5, 1.75, 2.0)
    values = {min(max(round(u * f), 1), experts) for f in factors} | {u}
    return sorted(values)


def parse_int_list(text: str, name: str, allow_zero: bool = False) -> list[int]:
    """'1..32', '1,2,4,8' or '8..64:8' (start..stop:step) -> sorted unique positive integers
    (non-negative with allow_zero, for prompt ids)."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if ".." in part:
                rng, _, step = part.partition(":")
                lo, hi = (int(v) for v in rng.split(".."))
                out.update(range(lo, hi + 1, int(step) if step else 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise InputError(f"{name} must be integers like 1..32, 4,8,16 or 8..96:8, got {text!r}") from None
    if not out or min(out) < (0 if allow_zero else 1):
        kind = "non-negative" if allow_zero else "positive"
        raise InputError(f"{name} must be {kind} integers, got {text!r}")
    return sorted(out)


# ----- the multiple-choice knapsack ---------------------------------------------------------------


@dataclass
class MilpResult:
    """One solve: the choice per layer, its predicted total and what CBC said."""

    tau: np.ndarray
    budget: np.ndarray
    objective_s: float
    status: str              # optimal | feasible | not-solved | infeasible
    proven_optimal: bool
    wall_time_s: float
    bound_s: float           # lower bound on the optimum (objective when proven optimal)


def _check_capacity(table: CostTable, slots: int) -> None:
    need = int(table.budgets.min()) * table.num_layers
    if need > slots:
        raise InputError(
            f"even the smallest candidate budget ({int(table.budgets.min())} per layer, {need} slots) exceeds "
            f"the {slots} expert slots the memory budget holds; give smaller --budgets or more memory"
        )


def solve_plan(table: CostTable, slots: int, global_tau: bool = False,
               time_limit_s: float | None = None) -> MilpResult:
    """Choose one (tau, budget) per layer minimising the predicted total under the slot limit.

    global_tau: one tau for all layers. The program of docs/planner.md is solved by enumerating
    the distinct intervals and solving the per-layer-budget knapsack for each (CBC's search on the
    joint program with linking rows is slow: its LP relaxation spreads y over several taus); the
    best of these proven optima is the proven optimum of the joint program.
    """
    _check_capacity(table, slots)
    if not global_tau:
        return _solve(table, slots, time_limit_s)
    start = time.perf_counter()
    c = table.layer_cost_s
    distinct = [i for i in range(len(table.taus)) if not any(np.array_equal(c[:, i], c[:, j]) for j in range(i))]
    results: list[MilpResult] = []
    for i in distinct:
        left = None if time_limit_s is None else max(time_limit_s - (time.perf_counter() - start), 0.1)
        sub = CostTable(table.taus[i:i + 1], table.budgets, c[:, i:i + 1], table.other_s, table.generated_tokens)
        results.append(_solve(sub, slots, left))
    wall = time.perf_counter() - start
    solved = [r for r in results if r.status in ("optimal", "feasible")]
    bound = min(r.bound_s for r in results)
    if not solved:
        return MilpResult(np.zeros(0, np.int64), np.zeros(0, np.int64), float("nan"), results[0].status, False,
                          wall, bound)
    best = min(solved, key=lambda r: (r.objective_s, int(r.tau[0])))
    optimal = all(r.proven_optimal for r in results)
    return MilpResult(best.tau, best.budget, best.objective_s, "optimal" if optimal else "feasible", optimal, wall,
                      best.objective_s if optimal else min(bound, best.objective_s))


def _solve(table: CostTable, slots: int, time_limit_s: float | None) -> MilpResult:
    """The per-layer program (one tau and budget per layer) through CBC."""
    start = time.perf_counter()
    prob, pick = _per_layer_program(table, slots, relax=False)
    prob.solve(cbc(time_limit_s))
    wall = time.perf_counter() - start
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        status = "infeasible" if prob.sol_status == pulp.LpSolutionInfeasible else "not-solved"
        return MilpResult(np.zeros(0, np.int64), np.zeros(0, np.int64), float("nan"), status, False, wall,
                          _relaxation_bound(table, slots))
    tau, budget = pick()
    objective = table.total_s(tau, budget)
    optimal = prob.sol_status == pulp.LpSolutionOptimal
    bound = objective if optimal else _relaxation_bound(table, slots)
    return MilpResult(tau, budget, objective, "optimal" if optimal else "feasible", optimal, wall, bound)


def _cheapest_tau(table: CostTable) -> tuple[np.ndarray, np.ndarray]:
    """Per (layer, budget) the best cost over tau and the index of the first tau reaching it."""
    idx = table.layer_cost_s.argmin(axis=1)                      # [L, K], first minimum
    best = np.take_along_axis(table.layer_cost_s, idx[:, None, :], axis=1)[:, 0, :]
    return best, idx


def cbc(time_limit_s: float | None = None) -> pulp.LpSolver:
    """CBC, the solver bundled with PuLP, on one thread so that results are deterministic."""
    bundled = Path(coin_api.pulp_cbc_path)
    path = str(bundled) if bundled.exists() else None
    return pulp.COIN_CMD(path=path, msg=False, timeLimit=time_limit_s, threads=1)


def _var(prob: pulp.LpProblem, name: str, relax: bool) -> pulp.LpVariable:
    return prob.add_variable(name, 0, 1, pulp.LpContinuous if relax else pulp.LpBinary)


def _undominated(cost: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """bool [..., K]: options no smaller budget matches or beats (only those can be optimal; the
    smallest budget always stays, so every choice row keeps an option)."""
    order = np.argsort(budgets, kind="stable")
    ordered = cost[..., order]
    before = np.minimum.accumulate(ordered, axis=-1)
    keep_ordered = np.ones(ordered.shape, dtype=bool)
    keep_ordered[..., 1:] = ordered[..., 1:] < before[..., :-1]
    keep = np.empty_like(keep_ordered)
    keep[..., order] = keep_ordered
    return keep


def _per_layer_program(table: CostTable, slots: int, relax: bool
                       ) -> tuple[pulp.LpProblem, Callable[[], tuple[np.ndarray, np.ndarray]]]:
    best, tau_idx = _cheapest_tau(table)
    layers, k = best.shape
    keep = _undominated(best, table.budgets)
    prob = pulp.LpProblem("per_layer_plan", pulp.LpMinimize)
    x = {(lay, j): _var(prob, f"x_{lay}_{j}", relax) for lay in range(layers) for j in range(k) if keep[lay, j]}
    prob += pulp.lpSum(float(best[lay, j]) * v for (lay, j), v in x.items())
    for lay in range(layers):
        prob += pulp.lpSum(v for (ly, _), v in x.items() if ly == lay) == 1, f"one_choice_{lay}"
    prob += pulp.lpSum(int(table.budgets[j]) * v for (_, j), v in x.items()) <= slots, "memory"

    def pick() -> tuple[np.ndarray, np.ndarray]:
        chosen = np.array([_argmax_value({j: v for (ly, j), v in x.items() if ly == lay}) for lay in range(layers)])
        taus = table.taus[tau_idx[np.arange(layers), chosen]]
        return taus.astype(np.int64), table.budgets[chosen].astype(np.int64)
    return prob, pick


def _argmax_value(variables: dict[int, pulp.LpVariable]) -> int:
    """The key of the variable set to 1 (the largest value, for safety against solver round-off)."""
    return max(variables, key=lambda key: (variables[key].value() or 0.0, -key))


def _relaxation_bound(table: CostTable, slots: int) -> float:
    """The LP relaxation's optimum: a lower bound on the MILP optimum when CBC stopped early."""
    prob, _ = _per_layer_program(table, slots, relax=True)
    prob.solve(cbc())
    if prob.status != pulp.LpStatusOptimal:
        return float("nan")
    return float(table.other_s + pulp.value(prob.objective))


# ----- oracle bound -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OracleCosts:
    """What any refresh schedule pays per (forward, MoE layer, expert), as lower bounds of what
    the cost model charges: GPU time of the expert's tokens without the kernel launch, CPU time
    on one worker, one expert's H2D copy; plus the work no schedule changes."""

    layer_fixed_s: np.ndarray    # [F] attention + shared expert + gate of one MoE layer
    gpu_s: np.ndarray            # [F, L, E] (0 where no tokens are routed)
    cpu_s: np.ndarray            # [F, L, E]
    workers: int
    copy_s: float
    other_s: float               # outside the MoE layers (dense layers, lm_head)


def oracle_costs(workload: Workload, hw: HardwareProfile) -> OracleCosts:
    """Charge every activated (forward, layer, expert) once on each side, from the profile."""
    spec = workload.model
    tokens = workload.tokens.astype(float)
    context = workload.context.astype(float)
    et = workload.expert_tokens.astype(np.int64)
    present = np.unique(et[et > 0])
    launch = hw.gpu.launch_overhead_us * US
    gpu_table = np.zeros(int(et.max()) + 1)
    cpu_table = np.zeros(int(et.max()) + 1)
    if present.size:
        gpu_table[present] = np.maximum(hw.gpu_expert_time(present, spec) - launch, 0.0)
        cpu_table[present] = hw.cpu_expert_time(present, spec)
    fixed = np.broadcast_to(np.asarray(hw.gpu_layer_fixed_time(tokens, context, spec), float),
                            tokens.shape).copy()
    other = np.broadcast_to(np.asarray(hw.gpu_forward_fixed_time(tokens, context, spec), float), tokens.shape)
    return OracleCosts(fixed, gpu_table[et], cpu_table[et], max(int(hw.cpu.workers), 1),
                       float(hw.h2d_time(float(spec.expert_bytes))), float(other.sum()))


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


# ----- evaluation and the whole planning run ------------------------------------------------------


def evaluate_plan(workload: Workload, hw: HardwareProfile, tau: np.ndarray, budget: np.ndarray,
                  engine: str = "analytic") -> Metrics:
    """Run the `planned` policy with these per-layer settings through an executor."""
    from tidesim.policies import PolicyOptions, build_schedule
    from tidesim.run import run

    options = PolicyOptions(budget=np.asarray(budget, np.int64), tau=np.asarray(tau, np.int64), hw=hw,
                            refresh="sync")
    return run(workload, build_schedule("planned", workload, options), hw, engine=engine)


def single_tau_sweep(workload: Workload, hw: HardwareProfile, taus: list[int], budget: int,
                     engine: str = "analytic") -> dict[int, float]:
    """Total time of `tide` with one tau and a uniform budget, for every candidate tau (the paper's
    setting). Analytic: read off a one-budget cost table; sim: one simulation per distinct tau."""
    from tidesim.policies import PolicyOptions, build_schedule, uniform
    from tidesim.run import run

    if engine == "analytic":
        table = cost_table(workload, hw, taus, [budget])
        return {int(t): float(v) for t, v in zip(table.taus, table.uniform_total_s()[:, 0], strict=True)}
    same = distinct_taus(workload, taus)
    times: dict[int, float] = {}
    layers = workload.num_layers
    for tau in sorted(set(same.values())):
        options = PolicyOptions(budget=uniform(budget, layers), tau=uniform(tau, layers), hw=hw, refresh="sync")
        times[tau] = run(workload, build_schedule("tide", workload, options), hw, engine=engine).total_time_s
    return {t: times[same[t]] for t in sorted(taus)}


def compare_on(workload: Workload, hw: HardwareProfile, prompts: list[int], tau: np.ndarray, budget: np.ndarray,
               taus: list[int], uniform_b: int, engine: str) -> Evaluation:
    """The plan against the best single-tau tide (chosen on these same prompts) with the same memory."""
    plan_s = evaluate_plan(workload, hw, tau, budget, engine).total_time_s
    sweep = single_tau_sweep(workload, hw, taus, uniform_b, engine)
    best_tau = min(sweep, key=lambda t: (sweep[t], t))
    tokens = workload.generated_tokens
    best_s = sweep[best_tau]
    return Evaluation(prompts=prompts, engine=engine, generated_tokens=tokens, plan_time_s=plan_s,
                      plan_tokens_per_s=tokens / plan_s, best_single_tau=best_tau, best_single_tau_budget=uniform_b,
                      best_single_tau_time_s=best_s, best_single_tau_tokens_per_s=tokens / best_s,
                      speedup=best_s / plan_s)


@dataclass
class PlanOutcome:
    """The plan plus what the command shows next to it."""

    plan: Plan
    table: CostTable
    uniform_budget: int
    tau_sweep: dict[int, float]          # calibration: total time of single-tau tide, uniform budget


def split_prompts(all_prompts: list[int], calibrate: list[int] | None) -> tuple[list[int], list[int]]:
    """Calibration prompts (default: the first half, at least one) and the held-out rest."""
    if calibrate is None:
        calibrate = all_prompts[: max(1, len(all_prompts) // 2)]
    unknown = sorted(set(calibrate) - set(all_prompts))
    if unknown:
        raise InputError(f"prompt {unknown[0]} is not in the trace (it has prompts {all_prompts})")
    return sorted(set(calibrate)), [p for p in all_prompts if p not in set(calibrate)]


def robust_plan(workload: Workload, hw: HardwareProfile, calib: list[int], table: CostTable, result: MilpResult,
                slots: int, uniform_b: int, best_tau: int, global_tau: bool, time_limit_s: float | None
                ) -> tuple[MilpResult, str]:
    """Keep the optimum only if it is at least as fast as the best single tau (uniform budget) on
    every calibration prompt by itself, not just on their sum; otherwise fall back to per-layer
    intervals with the uniform budget, and failing that to the best single tau itself.

    Moving slots between layers can fit one prompt's routing and lose on the next (the gains are
    often a fraction of a percent); this check is what keeps such plans off held-out prompts.
    """
    if len(calib) < 2:
        return result, ""
    layers = workload.num_layers
    single = (np.full(layers, best_tau, np.int64), np.full(layers, uniform_b, np.int64))
    per_prompt = [workload.select_prompts([p]) for p in calib]
    base = [evaluate_plan(w, hw, *single).total_time_s for w in per_prompt]

    def holds(candidate: MilpResult) -> bool:
        return all(evaluate_plan(w, hw, candidate.tau, candidate.budget).total_time_s <= b * (1 + 1e-12)
                   for w, b in zip(per_prompt, base, strict=True))

    if holds(result):
        return result, ""
    k = int(np.flatnonzero(table.budgets == uniform_b)[0])
    uniform_table = CostTable(table.taus, table.budgets[k:k + 1], table.layer_cost_s[:, :, k:k + 1], table.other_s,
                              table.generated_tokens)
    intervals = solve_plan(uniform_table, slots, global_tau=global_tau, time_limit_s=time_limit_s)
    why = "the MILP optimum lost to the best single tau on a calibration prompt by itself"
    if intervals.status in ("optimal", "feasible") and holds(intervals):
        return intervals, f"{why}; kept per-layer intervals with the uniform budget {uniform_b}"
    objective = table.total_s(*single)
    fallback = MilpResult(single[0], single[1], objective, result.status, result.proven_optimal,
                          result.wall_time_s, min(result.bound_s, objective))
    return fallback, f"{why}, and so did per-layer intervals; kept the best single tau {best_tau}"


def make_plan(trace_path: Path, trace_name: str, hw: HardwareProfile, gpu_mem_gib: float, *,
              global_tau: bool = False, taus: list[int] | None = None, budgets: list[int] | None = None,
              time_limit_s: float | None = None, calibrate_prompts: list[int] | None = None,
              engine: str = "analytic", oracle_iterations: int = 80,
              progress: Callable[[Iterable[int]], Iterable[int]] | None = None) -> PlanOutcome:
    """Everything `tidesim plan` does: cost table on the calibration prompts, MILP, oracle bound,
    evaluation on calibration and held-out prompts, fingerprints."""
    from tidesim.trace.io import read_trace
    from tidesim.workload import workload_from_trace

    if time_limit_s is not None and time_limit_s <= 0:
        raise InputError(f"--time-limit must be positive, got {time_limit_s}")
    trace = read_trace(trace_path)
    model = trace.model
    workload = workload_from_trace(trace)
    calib, held = split_prompts(trace.prompt_ids, calibrate_prompts)
    slots = expert_slots(model, gpu_mem_gib)
    layers, experts = model.num_moe_layers, model.num_experts
    taus = taus or list(range(1, 33))
    budgets = budgets or default_budgets(slots, layers, experts)
    if max(budgets) > experts:
        raise InputError(f"--budgets must not exceed the model's {experts} experts per layer")
    u = uniform_budget(slots, layers, experts)
    calib_w = workload.select_prompts(calib)
    table = cost_table(calib_w, hw, taus, sorted(set(budgets) | {u}), progress=progress)
    result = solve_plan(table, slots, global_tau=global_tau, time_limit_s=time_limit_s)
    if result.status not in ("optimal", "feasible"):
        raise InputError(f"the solver found no plan ({result.status}); give a longer --time-limit")
    sweep = {int(t): float(v) for t, v in
             zip(table.taus, table.uniform_total_s()[:, int(np.flatnonzero(table.budgets == u)[0])], strict=True)}
    best_tau = min(sweep, key=lambda t: (sweep[t], t))
    result, robust_note = robust_plan(workload, hw, calib, table, result, slots, u, best_tau, global_tau,
                                      time_limit_s)
    layer_upper = table.layer_cost_s[np.arange(layers), _index_of(table.taus, result.tau, "tau"),
                                     _index_of(table.budgets, result.budget, "budget")]
    bound = oracle_bound(oracle_costs(calib_w, hw), result.budget, oracle_iterations, layer_upper)
    calibration = compare_on(calib_w, hw, calib, result.tau, result.budget, taus, u, engine)
    heldout = (compare_on(workload.select_prompts(held), hw, held, result.tau, result.budget, taus, u, engine)
               if held else None)
    notes = [robust_note] if robust_note else []
    if engine == "analytic" and abs(calibration.plan_time_s - result.objective_s) > 1e-6 * result.objective_s:
        notes.append(f"the cost model's time of the plan ({calibration.plan_time_s:.6g} s) differs from the "
                     f"table's prediction ({result.objective_s:.6g} s): layer additivity does not hold")
    plan = Plan(
        model=model.name, hw=hw.name, trace=trace_name, mode="global-tau" if global_tau else "per-layer",
        gpu_mem_gib=float(gpu_mem_gib), expert_slots=slots,
        tau=[int(t) for t in result.tau], budget=[int(b) for b in result.budget],
        objective_s=result.objective_s, oracle_bound_s=bound.bound_s,
        gap=result.objective_s / bound.bound_s - 1 if bound.bound_s > 0 else None,
        solver=SolverInfo("cbc (PuLP)", result.status, result.proven_optimal, result.wall_time_s, time_limit_s,
                          result.bound_s),
        fingerprints=Fingerprints(file_fingerprint(trace_path), profile_fingerprint(hw), model_fingerprint(model)),
        taus=[int(t) for t in table.taus], budgets=[int(b) for b in table.budgets],
        calibration=calibration, heldout=heldout, notes=notes,
    )
    return PlanOutcome(plan=plan, table=table, uniform_budget=u, tau_sweep=sweep)
