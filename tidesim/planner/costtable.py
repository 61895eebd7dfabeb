"""Cost table C[l, tau, B]: the predicted time of `tide` per MoE layer, refresh interval and budget,
from the analytic cost model (docs/planner.md, section 1)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from tidesim.errors import InputError
from tidesim.hardware import HardwareProfile
from tidesim.models import ModelSpec
from tidesim.planner.bound import oracle_costs
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
    counts: np.ndarray           # int [F, L, E] tokens per expert
    order: np.ndarray            # int [F, L, E] experts by rank
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
        ranking = rank_experts(workload.expert_tokens)
        return cls(workload.activated, workload.expert_tokens, ranking.order, ranking.rank, oc.gpu_s, oc.cpu_s,
                   workload.expert_tokens.astype(float), oc.layer_fixed_s, oc.other_s, hw, workload.model)


def _tide_layer_times(inp: _TideInputs, workload: Workload, options: list[tuple[int, int]]) -> np.ndarray:
    """[options, L] seconds per MoE layer over the workload, for tide (sync) with each (tau, B).

    The refresh rule is tide's own (tidesim.policies.tide.refreshed_residents), applied to all
    options at once. Only per-layer-forward sums are kept; the layer model turns them into times.
    """
    from tidesim.policies.residency import refresh_steps
    from tidesim.policies.tide import refreshed_residents

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
            b = np.broadcast_to(budget[rows], (rows.size, layers))               # [r, L]
            new = refreshed_residents(old, inp.counts[f], inp.order[f], inp.rank[f], b)
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
    """[n, L] per-layer totals from the layer model's phases (tidesim.layermodel.layer_phases, as
    the analytic model charges them): the n options' layers are n x L virtual layers (exact
    because with synchronous copies only, a layer-forward's time depends on its own sums).
    span: [F, n, L] CPU pool makespans, for cpu.gpu_contention."""
    from tidesim.layermodel import (
        CopyCosts,
        CpuCosts,
        GpuCosts,
        Rates,
        activation_copies,
        charge_contention,
        copy_slowdown,
        cpu_pool_bound,
        grouped_kernel,
        layer_phases,
    )

    r = Rates.of(inp.hw, inp.model)
    f_count, n, layers = copies.shape
    g = f_count * n * layers
    flat = lambda a: np.ascontiguousarray(a, dtype=float).reshape(g)  # noqa: E731
    act_d2h, res_h2d = activation_copies(r, inp.hw, flat(cpu_tok))
    grouped = grouped_kernel(r, flat(gpu_sum), flat(gpu_n))
    zeros = np.zeros(g)
    gpu = GpuCosts(fwd_fixed=np.zeros(f_count), layer_fixed=inp.layer_fixed_s.astype(float), grouped=grouped,
                   od_compute_sum=zeros, slow_extra=copy_slowdown(r, grouped, res_h2d))
    moves = CopyCosts(sync_h2d=flat(copies) * r.expert_copy_s, demote_d2h=zeros, async_h2d=zeros, n_async=zeros,
                      act_d2h=act_d2h, res_h2d=res_h2d, od_n=zeros, od_copy_sum=zeros)
    cpu = CpuCosts(total=flat(cpu_sum), longest=flat(cpu_max), shortest=flat(cpu_min), n=flat(cpu_n))
    if span is not None:
        charge_contention(r, gpu, cpu, flat(span))
    layer = layer_phases(r, gpu, moves, cpu.n, cpu_pool_bound(r, cpu), None, n * layers)["layer"]
    return layer.reshape(f_count, n, layers).sum(axis=0)
