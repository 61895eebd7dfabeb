"""Cost table C[l, tau, B]: the predicted time of `tide` per MoE layer, refresh interval and budget,
from the analytic cost model (docs/planner.md, section 1)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from tidesim.errors import InputError
from tidesim.hardware import HardwareProfile
from tidesim.models import ModelSpec
from tidesim.planner.bound import fixed_costs
from tidesim.planner.occupancy import CellPairs, Residency
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


def plan_policies() -> list[str]:
    """The policies the planner plans for (the registry's `plannable` trait): each runs TIDE's
    interval refresh with per-layer tau and budget and is additive over MoE layers with synchronous
    refresh. tide has a fast table (below); any other is costed by running it (_schedule_table)."""
    from tidesim.policies.registry import policy_names

    return policy_names(plannable=True)


def check_plan_policy(policy: str) -> None:
    names = plan_policies()
    if policy not in names:
        raise InputError(f"the planner plans for {', '.join(names)}, not {policy!r}; give --policy one of those")


def cost_table(workload: Workload, hw: HardwareProfile, taus: list[int], budgets: list[int],
               max_cells: int = 4_000_000, progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
               policy: str = "tide") -> CostTable:
    """C[l, tau, B]: the analytic cost model's time of MoE layer l under `policy` (default tide)
    with synchronous refresh, interval tau and budget B, for every candidate pair.

    With synchronous refresh the analytic model is additive over MoE layers (a layer-forward's
    time depends on that layer's schedule only; docs/planner.md section 2) and `tide` decides each
    layer alone. Which experts are resident does not depend on the profile: tide's residency per
    option is stepped once per workload (tidesim.planner.occupancy, kept for later profiles), then
    the profile's charges turn its per-layer-forward sums into times (layer model phases).
    tests/test_planner.py checks every entry against `tide` + `run(engine="analytic")`.
    max_cells bounds options x layers x experts per step, and options x activated cells (memory).
    """
    from tidesim.planner.occupancy import residencies

    if not taus or not budgets:
        raise InputError("give at least one candidate tau and one candidate budget")
    if max(budgets) > workload.num_experts or min(budgets) < 0:
        raise InputError(f"candidate budgets must lie in 0..{workload.num_experts} (experts per layer)")
    check_plan_policy(policy)
    same = distinct_taus(workload, taus)
    options = [(tau, b) for tau in sorted(set(same.values())) for b in budgets]
    layer_fixed, other = fixed_costs(workload, hw)
    from tidesim.policies.registry import reference_policy

    if policy == reference_policy():            # the fast residency pass models the reference policy only
        found = dict(zip(options, residencies(workload, options, max_cells, progress), strict=True))
        times = _option_layer_times(workload, hw, [found[o] for o in options], layer_fixed, max_cells)
    else:
        times = _schedule_table(workload, hw, options, policy, progress)
    by_option = dict(zip(options, times, strict=True))
    sorted_taus = sorted(taus)
    cost = np.stack([np.stack([by_option[(same[t], b)] for b in budgets], axis=1) for t in sorted_taus], axis=1)
    return CostTable(taus=np.array(sorted_taus, dtype=np.int64), budgets=np.array(budgets, dtype=np.int64),
                     layer_cost_s=cost, other_s=other, generated_tokens=workload.generated_tokens)


def _schedule_table(workload: Workload, hw: HardwareProfile, options: list[tuple[int, int]], policy: str,
                    progress: Callable[[Iterable[int]], Iterable[int]] | None, max_cells: int = 32_000_000
                    ) -> list[np.ndarray]:
    """[L] seconds per MoE layer for each (tau, budget): the policy's own schedule with that tau
    and budget in every layer, run through the analytic model (its per-layer times), so the table
    costs exactly the policy's step and the layer model's terms, with no formula of its own.

    Options are run side by side as virtual layers of one workload (options_as_layers): the
    policies the planner plans for decide each layer from its own routing and state, and with
    synchronous refresh a layer's time depends only on its own schedule, so each virtual layer
    costs what that layer costs under that option alone (tests check both against separate runs).
    max_cells bounds forwards x virtual layers x experts per run (memory)."""
    from tidesim.policies import PolicyOptions, build_schedule
    from tidesim.run import run

    layers = workload.num_layers
    per_chunk = max(1, max_cells // max(1, workload.expert_tokens.size))
    chunks = [options[i:i + per_chunk] for i in range(0, len(options), per_chunk)]
    indices: Iterable[int] = range(len(chunks))
    if progress is not None:
        indices = progress(indices)
    out: list[np.ndarray] = []
    for i in indices:
        chunk = chunks[i]
        tiled = options_as_layers(workload, len(chunk))
        tau = np.repeat(np.array([t for t, _ in chunk], np.int64), layers)
        budget = np.repeat(np.array([b for _, b in chunk], np.int64), layers)
        chosen = PolicyOptions(budget=budget, tau=tau, hw=hw, refresh="sync")
        metrics = run(tiled, build_schedule(policy, tiled, chosen), hw, engine="analytic")
        out.extend(np.asarray(metrics.layer_time_s, dtype=float).reshape(len(chunk), layers))
    return out


def options_as_layers(workload: Workload, n: int) -> Workload:
    """The workload with its MoE layers repeated n times (layer k * L + l is layer l of option k),
    under a model with that many MoE layers: n options of a per-layer policy in one run."""
    import dataclasses

    if n == 1:
        return workload
    model = workload.model
    spec = dataclasses.replace(model, num_layers=model.first_dense_layers + n * workload.num_layers)
    return dataclasses.replace(workload, model=spec, expert_tokens=np.tile(workload.expert_tokens, (1, n, 1)))


@dataclass(frozen=True)
class _Charges:
    """What the profile charges the experts of every (layer-forward, token count) pair."""

    gpu_s: np.ndarray            # [P] one expert's grouped share on the GPU
    cpu_s: np.ndarray            # [P] one expert on one CPU worker
    layer_fixed_s: np.ndarray    # [F]
    hw: HardwareProfile
    model: ModelSpec


def _option_layer_times(workload: Workload, hw: HardwareProfile, res: list[Residency], layer_fixed: np.ndarray,
                        max_cells: int) -> list[np.ndarray]:
    """[L] seconds per MoE layer for each option's residency, costed a few options at a time."""
    from tidesim.layermodel import Rates, grouped_share, per_count
    from tidesim.planner.occupancy import cell_pairs

    pairs = cell_pairs(workload)
    spec = workload.model
    r = Rates.of(hw, spec)
    charges = _Charges(grouped_share(r, per_count(lambda t: hw.gpu_expert_time(t, spec), pairs.count)),
                       per_count(lambda t: hw.cpu_expert_time(t, spec), pairs.count), layer_fixed, hw, spec)
    per_chunk = max(1, max_cells // max(1, pairs.g.size))
    out: list[np.ndarray] = []
    for i in range(0, len(res), per_chunk):
        out.extend(_layer_times(charges, pairs, res[i:i + per_chunk], workload.num_layers))
    return out


def _layer_times(c: _Charges, pairs: CellPairs, res: list[Residency], layers: int) -> np.ndarray:
    """[n, L] seconds per MoE layer over the workload for n options: the per-layer-forward sums
    the layer model needs, by (layer-forward, token count) pair."""
    n, groups = len(res), pairs.n_active.size
    gpu_mult = np.stack([x.gpu_mult for x in res]).astype(float)                  # [n, P]
    cpu_mult = pairs.mult - gpu_mult
    on_cpu = cpu_mult > 0

    def per_group(values: np.ndarray, ufunc: np.ufunc = np.add) -> np.ndarray:
        out = np.zeros((n, groups))
        if pairs.starts.size:
            out[:, pairs.groups] = ufunc.reduceat(values, pairs.starts, axis=1)
        return out

    stack = lambda name: np.stack([getattr(x, name) for x in res]).astype(float)  # noqa: E731
    gpu_n, gpu_tokens = stack("gpu_n"), stack("gpu_tokens")
    low = per_group(np.where(on_cpu, c.cpu_s, np.inf), np.minimum)
    sums = _Sums(copies=stack("copies"), gpu_sum=per_group(gpu_mult * c.gpu_s), gpu_n=gpu_n,
                 cpu_sum=per_group(cpu_mult * c.cpu_s), cpu_max=per_group(np.where(on_cpu, c.cpu_s, 0.0), np.maximum),
                 cpu_min=np.where(np.isfinite(low), low, 0.0), cpu_n=pairs.n_active - gpu_n,
                 cpu_tok=pairs.tokens - gpu_tokens)
    return _sync_layer_time(c, sums, layers, _cpu_makespans(c, pairs, res, sums.cpu_sum))


@dataclass(frozen=True)
class _Sums:
    """Per option and layer-forward [n, G] (g = f * L + l): what the layer model's phases read."""

    copies: np.ndarray
    gpu_sum: np.ndarray
    gpu_n: np.ndarray
    cpu_sum: np.ndarray
    cpu_max: np.ndarray
    cpu_min: np.ndarray
    cpu_n: np.ndarray
    cpu_tok: np.ndarray


def _cpu_makespans(c: _Charges, pairs: CellPairs, res: list[Residency], cpu_sum: np.ndarray) -> np.ndarray:
    """[n, G] the CPU pool's longest-first makespans of the n options (tidesim.sim.lpt.lpt_makespans:
    the rule and the floats the simulator and the analytic model charge), all options in one call
    (option k's layer-forward g is task set k * G + g). The workload's activated cells are sorted
    into the rule's order once; an option's CPU tasks are a subset, in the same order."""
    from tidesim.sim.lpt import lpt_makespans_sorted

    workers = max(int(c.hw.cpu.workers), 1)
    if workers == 1:
        return cpu_sum
    n, groups = cpu_sum.shape
    g, expert = np.divmod(pairs.cells, pairs.experts)
    time = c.cpu_s[pairs.cell_pair]
    order = np.lexsort((expert, -time, g))          # the rule's order, once: each option's tasks keep it
    on_cpu = ~np.stack([x.gpu_cells(pairs.cells.size) for x in res])[:, order]
    option, at = np.nonzero(on_cpu)
    task = order[at]
    return lpt_makespans_sorted(option * groups + g[task], time[task], n * groups, workers).reshape(n, groups)


def _sync_layer_time(c: _Charges, sums: _Sums, layers: int, span: np.ndarray) -> np.ndarray:
    """[n, L] per-layer totals from the layer model's phases (tidesim.layermodel.layer_phases, as
    the analytic model charges them): the n options' layers are n x L virtual layers (exact
    because with synchronous copies only, a layer-forward's time depends on its own sums).
    span: [n, G] the CPU pool's makespans."""
    from tidesim.layermodel import (
        CopyCosts,
        CpuCosts,
        GpuCosts,
        Rates,
        activation_copies,
        charge_contention,
        copy_overlaps,
        copy_slowdown,
        grouped_kernel,
        layer_phases,
    )

    r = Rates.of(c.hw, c.model)
    n, groups = sums.copies.shape
    f_count = groups // layers
    g = f_count * n * layers
    # forward-major (f, option, layer): each forward's n x L virtual layers share its fixed work
    flat = lambda a: np.ascontiguousarray(  # noqa: E731
        np.asarray(a, dtype=float).reshape(n, f_count, layers).transpose(1, 0, 2)).reshape(g)
    act_d2h, res_h2d = activation_copies(r, c.hw, flat(sums.cpu_tok))
    grouped = grouped_kernel(r, flat(sums.gpu_sum), flat(sums.gpu_n))
    zeros = np.zeros(g)
    cpu = CpuCosts(total=flat(sums.cpu_sum), longest=flat(sums.cpu_max), shortest=flat(sums.cpu_min),
                   n=flat(sums.cpu_n))
    slow = zeros
    if r.slows > 0:           # only the results copy can run while the grouped kernel does (not the pool)
        none = np.zeros(0, np.int64)
        slow = copy_slowdown(r, grouped, copy_overlaps(r, grouped, None, none, none, act_d2h, res_h2d,
                                                       flat(span), cpu.n)[0])
    gpu = GpuCosts(fwd_fixed=np.zeros(f_count), layer_fixed=c.layer_fixed_s.astype(float), grouped=grouped,
                   od_compute_sum=zeros, slow_extra=slow)
    moves = CopyCosts(sync_h2d=flat(sums.copies) * r.expert_copy_s, demote_d2h=zeros, async_h2d=zeros,
                      n_async=zeros, act_d2h=act_d2h, res_h2d=res_h2d, od_n=zeros, od_copy_sum=zeros)
    charge_contention(r, gpu, cpu, flat(span))
    assert cpu.span is not None
    layer = layer_phases(r, gpu, moves, cpu.n, cpu.span, None, n * layers)["layer"]
    return layer.reshape(f_count, n, layers).sum(axis=0)
