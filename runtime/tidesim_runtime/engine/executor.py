"""The executor: runs a Schedule on a real GPU (or the CPU playing it) and a CPU worker pool.

Per forward: the dense layers, then for every MoE layer the execution model the simulator
charges (docs/costmodel.md), in the same order:

1. attention, shared expert and router on the GPU (real kernels at the trace's token count and
   context); the router's per-expert counts are read on the host (one sync, as any runtime that
   splits tokens between devices must);
2. synchronous refresh copies (H2D) and demotions (D2H) of the layer; the GPU waits for them;
3. every routed pair's input is gathered once (pair order); activations of CPU-placed experts go
   to the host (D2H), the CPU pool computes those experts longest first while the GPU works;
   on-demand copies whose slot is free are issued at once;
4. the GPU waits for the asynchronous refresh copies (from earlier forwards) of the experts its
   grouped kernel runs, and only those (one event per copy; a copy into a slot that a background
   copy still writes waits for that copy, slot by slot), runs them as ONE grouped kernel, then each on-demand
   expert after its copy lands (ONDEMAND_LAUNCHES kernels each); an on-demand copy into a slot
   that frees later in the layer waits for that (named in the slot plan, slots.SlotWait);
5. the layer's asynchronous refresh copies are queued in the background (served one at a time,
   streams.BackgroundFeeder), each after the grouped kernel that last used its slot;
6. CPU results come back (H2D) and are added; the layer ends.
Then the final norm and lm_head. Executor.moe_layer runs these phases, one method each.

Routing: in trace replay the tokens per expert come from the trace (the router still runs, for
its cost); in live mode (tidesim_runtime.measure.live) the model's own router decides and the executor
only places and computes. Either way every routed (token, expert) pair is computed exactly once.
Times: CUDA events on the compute stream (phase boundaries) and the host clock (total); on the
cpu-as-gpu path the host clock throughout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tidesim.errors import InputError
from tidesim.layermodel import ONDEMAND_LAUNCHES_PER_EXPERT
from tidesim.metrics import Metrics
from tidesim.models import ModelSpec
from tidesim.schedule import Schedule, schedule_problems
from tidesim.workload import Workload
from tidesim_runtime.engine.cpu_pool import CPUPool, ExpertTask, LayerJob, expert_task_runner
from tidesim_runtime.engine.device import DeviceInfo, PinnedThreads, host_memory_available, host_memory_total
from tidesim_runtime.engine.kernels import (
    KVBuffer,
    LayerWeights,
    combine_index,
    combine_pairs,
    dense_layer,
    gate_logits,
    grouped_experts,
    grouped_impl,
    layer_front,
    pair_rows,
    random_layer_weights,
    random_matrix,
    rms_norm,
    rotary_tables,
    swiglu_into,
)
from tidesim_runtime.engine.pinned import PINNED_SHARE, HostPinning, IndexStaging, pinned_bytes
from tidesim_runtime.engine.slots import (
    AFTER_GROUPED,
    FREE,
    CopyOp,
    ExpertBank,
    LayerPlan,
    SlotPlan,
    SlotWait,
    after_on_demand,
    expert_bytes,
    plan_slots,
    random_host_experts,
)
from tidesim_runtime.engine.streams import D2H, H2D, Backend, Marker, make_backend
from tidesim_runtime.reference.gate import route

# Kernels the runtime launches per on-demand expert (swiglu_into: gate/up GEMM, SiLU, product,
# down GEMM written in place): the layer model's figure, one constant for both.
ONDEMAND_LAUNCHES = ONDEMAND_LAUNCHES_PER_EXPERT
BREAKDOWN_KEYS = ("gpu_fixed", "gpu_experts", "copy_stall", "cpu_wait", "sync_refresh", "other")
GIB = 2**30


@dataclass
class LayerRouting:
    """Routed pairs of one layer-forward, sorted by expert: token row and weight of each pair,
    tokens per expert (host), and each token's pairs in summation order (combine_index)."""

    tokens: torch.Tensor      # int64 [P] on the device
    weights: torch.Tensor     # [P] on the device, float32 as the router gives them (combined in float32)
    counts: np.ndarray        # int64 [E]
    combine: torch.Tensor     # int64 [T, k_max] on the device: pair indices per token, padded with P

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)])


def replay_routing(counts: np.ndarray, tokens: int, top_k: int, device: torch.device) -> LayerRouting:
    """Pairs for tokens-per-expert counts from a trace: the pairs, in expert order, take the rows
    0, 1, 2, ... mod tokens, so expert e's c_e <= tokens pairs are distinct tokens and every token
    gets about top_k pairs, as a router gives them (all starting at row 0 would give row 0 a pair
    of every expert, and the combine a [tokens, experts] index); weights 1/top_k (values do not
    change timing)."""
    counts = np.asarray(counts, dtype=np.int64)
    n = max(tokens, 1)
    rows = np.arange(int(counts.sum()), dtype=np.int64) % n
    w = torch.full((int(counts.sum()),), 1.0 / top_k, dtype=torch.float32, device=device)
    return LayerRouting(torch.from_numpy(rows).to(device), w, counts,
                        torch.from_numpy(combine_index(rows, n)).to(device))


def router_routing(idx: torch.Tensor, weights: torch.Tensor, num_experts: int, device: torch.device
                   ) -> LayerRouting:
    """The pairs of a live router's choice idx [T, k] with its weights (kept in float32: the
    model sums them in float32), on `device`. The host reads the counts (one sync)."""
    flat = idx.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts).cpu().numpy().astype(np.int64)
    order = torch.argsort(flat, stable=True)
    k = idx.shape[1]
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    combine = pos.view(-1, k).sort(dim=1).values   # pair order is expert order within a token
    return LayerRouting((order // k).to(device), weights.reshape(-1)[order].float().to(device), counts,
                        combine.to(device))


def on_demand_by_wait(ops: list[CopyOp]) -> dict[SlotWait, list[int]]:
    """Indices of the on-demand copies per slot wait, in issue order (one pass)."""
    out: dict[SlotWait, list[int]] = {}
    for k, op in enumerate(ops):
        out.setdefault(op.wait, []).append(k)
    return out


@dataclass
class LayerStep:
    """The state one MoE layer-forward passes from phase to phase."""

    layer: int
    plan: LayerPlan
    r: LayerRouting
    moe_in: torch.Tensor
    base: torch.Tensor | None       # residual + shared expert (trace replay); None in live mode
    offs: np.ndarray                # pair offsets per expert
    x_sorted: torch.Tensor          # gathered inputs, pair order
    y_sorted: torch.Tensor          # expert outputs, pair order
    slots: ExpertBank
    host: ExpertBank
    busy: dict[int, list[Marker]]   # slot -> what must finish before it is overwritten
    t0: Any
    tp: Any = None
    job: LayerJob | None = None
    pos_cpu: torch.Tensor | None = None
    n_cpu: int = 0
    od_marks: dict[int, Marker] = field(default_factory=dict)
    od_waits: dict[SlotWait, list[int]] = field(default_factory=dict)   # on-demand copies by slot wait


@dataclass
class RunRecord:
    """What one run measured, before it becomes Metrics."""

    total_s: float
    breakdown: dict[str, float]
    layer_time: list[float]
    busy: dict[str, float]
    h2d_bytes: float
    d2h_bytes: float
    expert_copies: int
    refresh_copies: int
    notes: list[str] = field(default_factory=list)


def workspace_bytes(spec: ModelSpec, max_tokens: int, max_context: int, el: int) -> int:
    """Device bytes of one layer-forward's transient tensors at the largest forward: the pair
    buffers (gathered inputs, CPU activations and results, expert outputs), the grouped kernel's
    intermediates, the float32 weighted combine, attention (QKV and, as an upper bound, float32
    scores when SDPA falls back to its math kernel) and the rotary tables."""
    t, h, i = max_tokens, spec.hidden_size, spec.moe_intermediate_size
    p = t * spec.top_k
    pair_buffers = 4 * p * h * el
    grouped = p * (3 * i + h) * el
    combine = (t * h + 2 * p * h) * 4
    attention = (t * (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim * el
                 + spec.num_heads * t * max_context * 4 + 2 * t * h * el)
    rotary = 2 * max_context * spec.head_dim * 4
    return int(pair_buffers + grouped + combine + attention + rotary + t * h * el)


def memory_needs(spec: ModelSpec, layers: int, device: DeviceInfo, slots_per_layer: int | list[int],
                 max_tokens: int, max_context: int, forward_fixed: bool = True, routing_pairs: int = 0
                 ) -> dict[str, int]:
    """Bytes the executor allocates: host (all routed experts of `layers` layers and the pinned
    staging buffers, plus the GPU side when the CPU plays the GPU), of which `pinned` is
    page-locked (CUDA only, whole pages), and device (slot pools with their spare slots,
    non-expert weights, KV buffers, per-forward routing tensors kept for the run, workspaces).

    slots_per_layer: one count for every layer, or each layer's pool size (budget + spare);
    routing_pairs: routed (token, expert) pairs of every forward and layer held on the device.
    """
    eb = expert_bytes(spec, device.dtype)
    el = torch.empty(0, dtype=device.dtype).element_size()
    pools = [slots_per_layer] * layers if isinstance(slots_per_layer, int) else list(slots_per_layer)
    bank = spec.num_experts * eb
    staging = 2 * max(1, max_tokens) * spec.top_k * spec.hidden_size * el
    host_experts = layers * bank
    per_layer_weights = (spec.attention_params + spec.shared_expert_params) * el + spec.gate_params * 4
    fixed = 0
    if forward_fixed:
        fixed = spec.first_dense_layers * (spec.attention_params + spec.dense_mlp_params) * el
        fixed += spec.vocab_size * spec.hidden_size * el
    kv = (layers + spec.first_dense_layers) * 2 * spec.num_kv_heads * spec.head_dim * max_context * el
    routing = routing_pairs * (8 + el)
    device_bytes = (sum(max(n, 1) for n in pools) * eb + layers * per_layer_weights + fixed + kv + routing
                    + workspace_bytes(spec, max_tokens, max_context, el))
    pinned = layers * pinned_bytes(bank) + 2 * pinned_bytes(staging // 2) if device.is_cuda else 0
    host = host_experts + staging + (0 if device.is_cuda else device_bytes)
    return {"host": int(host), "pinned": int(pinned), "device": int(device_bytes if device.is_cuda else 0)}


def check_memory(spec: ModelSpec, layers: int, device: DeviceInfo, slots_per_layer: int | list[int],
                 max_tokens: int, max_context: int, forward_fixed: bool = True, routing_pairs: int = 0) -> None:
    """InputError (before anything is allocated) when host, pinned or GPU memory is too small."""
    need = memory_needs(spec, layers, device, slots_per_layer, max_tokens, max_context, forward_fixed,
                        routing_pairs)
    avail = host_memory_available()
    per_layer = spec.num_experts * expert_bytes(spec, device.dtype)
    if avail and need["host"] > 0.9 * avail:
        fit = max(0, int((0.9 * avail - (need["host"] - layers * per_layer)) // per_layer))
        raise InputError(
            f"{layers} MoE layers of {spec.name} need {need['host'] / GIB:.1f} GiB of host memory "
            f"({device.dtype_name}) but {avail / GIB:.1f} GiB is available; use --layers {max(fit, 1)} or fewer"
            + ("" if device.is_cuda else " (cpu-as-gpu keeps the GPU side in host memory too)"))
    cap = PINNED_SHARE * host_memory_total()
    if need["pinned"] and cap and need["pinned"] > cap:
        staging = need["pinned"] - layers * pinned_bytes(per_layer)
        fit = max(1, int((cap - staging) // pinned_bytes(per_layer)))
        raise InputError(
            f"{layers} MoE layers of {spec.name} need {need['pinned'] / GIB:.1f} GiB of pinned host memory, "
            f"more than {PINNED_SHARE:.0%} of this host's {host_memory_total() / GIB:.0f} GiB; use --layers {fit} "
            "or fewer")
    if device.is_cuda:
        free, _ = torch.cuda.mem_get_info(device.torch_device)
        if need["device"] > 0.95 * free:
            raise InputError(
                f"the plan needs {need['device'] / GIB:.1f} GiB on {device.name} but {free / GIB:.1f} GiB is free; "
                f"use a smaller --budgets value or fewer --layers")


class Executor:
    """Owns the weights, the slot pools, the streams and the CPU pool for one model shape.

    host_experts: per MoE layer bank of all experts, in the executor's dtype (random when not
    given); on CUDA the executor pins them (exactly their pages, pinned.py) and unpins them in
    close(). The calling thread and the threads started here run on device.cpu_set (physical
    cores of one NUMA node) until close(). Call close() when done.
    """

    def __init__(self, spec: ModelSpec, layers: int, device: DeviceInfo, max_tokens: int, max_context: int,
                 seed: int = 0, forward_fixed: bool = True, host_experts: list[ExpertBank] | None = None,
                 layer_weights: list[LayerWeights] | None = None) -> None:
        self.spec = spec
        self.layers = layers
        self.device = device
        self.dev = device.torch_device
        self.dtype = device.dtype
        self.forward_fixed = forward_fixed
        self.max_tokens = max(1, max_tokens)
        self.max_context = max(self.max_tokens, max_context)
        if host_experts is not None and any(b.flat.dtype != self.dtype for b in host_experts):
            raise ValueError(f"host expert banks must be in the executor's dtype {device.dtype_name}")
        gen = torch.Generator().manual_seed(seed)
        self._threads_before = torch.get_num_threads()
        self._affinity = PinnedThreads(device.cpu_set)   # first: banks are first-touched on the node
        if not device.is_cuda:
            torch.set_num_threads(device.gpu_threads)
        self.pinning = HostPinning(device.is_cuda)
        self.host = host_experts if host_experts is not None else random_host_experts(
            spec, layers, self.dtype, seed=seed + 1)
        for bank in self.host:
            self.pinning.pin(bank.flat)
        self.lw = layer_weights if layer_weights is not None else [
            random_layer_weights(spec, self.dev, self.dtype, gen) for _ in range(layers)]
        self.dense_lw = [random_layer_weights(spec, self.dev, self.dtype, gen, dense=True)
                         for _ in range(spec.first_dense_layers if forward_fixed else 0)]
        self.final_norm = torch.ones(spec.hidden_size, device=self.dev, dtype=self.dtype)
        self.lm_head = (random_matrix(spec.vocab_size, spec.hidden_size, gen, self.dev, self.dtype)
                        if forward_fixed else None)
        self.kv = [KVBuffer(spec, self.max_context, self.dev, self.dtype)
                   for _ in range(layers + len(self.dense_lw))]
        self.cos, self.sin = rotary_tables(spec, self.max_context, self.dev)
        self.inputs = (torch.randn(self.max_tokens, spec.hidden_size, generator=gen)).to(self.dev, self.dtype)
        pairs = self.max_tokens * spec.top_k
        self.act_host = self.pinning.empty((pairs, spec.hidden_size), self.dtype).zero_()
        self.res_host = self.pinning.empty((pairs, spec.hidden_size), self.dtype).zero_()
        self.x_dev = torch.zeros((pairs, spec.hidden_size), dtype=self.dtype, device=self.dev)
        self.act_dev = torch.zeros_like(self.x_dev)
        self.res_dev = torch.zeros_like(self.x_dev)
        self.y_dev = torch.zeros_like(self.x_dev)
        self.backend: Backend = make_backend(self.dev)
        self.pool = CPUPool(device.cpu_workers, device.cpu_threads_per_worker)
        self.impl = grouped_impl(self.dev, self.dtype)
        self.stage = IndexStaging(pairs + spec.num_experts + 1, self.dev, self.pinning)
        self.slots: list[ExpertBank] = []
        self._slot_sizes: list[int] = []
        self.expert_bytes_model = float(spec.expert_bytes)

    # ----- setup ----------------------------------------------------------------------------
    def close(self) -> None:
        self.pool.close()
        self.backend.close()
        self.pinning.release()
        self._affinity.restore()
        torch.set_num_threads(self._threads_before)

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prepare_slots(self, plan: SlotPlan) -> None:
        """Allocate the slot pools (reused when the sizes match) and load the initial residents
        (untimed, as the Schedule says)."""
        if self._slot_sizes != plan.pool_size:
            self.slots = []
            if self.device.is_cuda:
                torch.cuda.empty_cache()
            self.slots = [ExpertBank.empty(self.spec, n, self.dev, self.dtype) for n in plan.pool_size]
            self._slot_sizes = list(plan.pool_size)
        for layer, mapping in enumerate(plan.initial_slots):
            for e, s in mapping.items():
                self.slots[layer].flat[s].copy_(self.host[layer].flat[e])

    # ----- trace replay -----------------------------------------------------------------------
    def replay(self, workload: Workload, schedule: Schedule, warmup: int = 1) -> Metrics:
        """Run `schedule` on `workload` (routing from the trace) and measure it.

        warmup: forwards run first, untimed, to warm caches and kernels (residency is reset after).
        """
        self._check(workload, schedule)
        F_, L, _ = workload.expert_tokens.shape
        routing = [[replay_routing(workload.expert_tokens[f, l], int(workload.tokens[f]), self.spec.top_k,
                                   self.dev) for l in range(L)] for f in range(F_)]
        plan = plan_slots(schedule)
        if warmup > 0:
            self.prepare_slots(plan)
            self._run(workload, schedule, plan, routing, forwards=range(min(warmup, F_)))
        self.prepare_slots(plan)
        record = self._run(workload, schedule, plan, routing, forwards=range(F_))
        return self.metrics(workload, schedule, record, plan)

    def _check(self, workload: Workload, schedule: Schedule) -> None:
        if workload.num_layers != self.layers:
            raise InputError(f"the executor holds {self.layers} MoE layers but the workload has "
                             f"{workload.num_layers}")
        if int(workload.tokens.max(initial=0)) > self.max_tokens:
            raise InputError(f"the workload has forwards of {int(workload.tokens.max())} tokens; the executor was "
                             f"built for at most {self.max_tokens}")
        problems = schedule_problems(schedule, workload)
        if problems:
            raise InputError(f"policy {schedule.policy!r} produced an invalid schedule: {problems[0]}")

    def _run(self, workload: Workload, schedule: Schedule, plan: SlotPlan,
             routing: list[list[LayerRouting]], forwards: range) -> RunRecord:
        self.begin()
        with torch.inference_mode():
            for f in forwards:
                self._forward(workload, schedule, plan, routing, f)
        return self.finish()

    def begin(self) -> None:
        """Reset counters and in-flight state; the clock starts."""
        be = self.backend
        be.synchronize()
        be.reset_counters()
        self.pool.busy_s = 0.0
        self._spans: list[tuple[str, Any, Any]] = []
        self._layer_spans: list[tuple[int, Any, Any]] = []
        # per layer, expert -> its latest background copy: the GPU waits for those it runs
        self._pending: list[dict[int, Marker]] = [{} for _ in range(self.layers)]
        self._slot_busy: list[dict[int, list[Marker]]] = [{} for _ in range(self.layers)]
        self._counts = {"h2d": 0.0, "d2h": 0.0, "copies": 0, "refresh": 0}
        self._wall0 = time.perf_counter()
        self._t_start = be.timepoint()

    def finish(self) -> RunRecord:
        """Wait for background copies still in flight (they are paid for), stop the clock."""
        be = self.backend
        tail = be.timepoint()
        for layer in range(self.layers):
            be.compute_wait(list(self._pending[layer].values()))
        t_end = be.timepoint()
        self._spans.append(("copy_stall", tail, t_end))
        be.synchronize()
        wall = time.perf_counter() - self._wall0
        total = be.elapsed(self._t_start, t_end) if be.is_cuda else wall
        breakdown = dict.fromkeys(BREAKDOWN_KEYS, 0.0)
        gpu_busy = 0.0
        for cat, a, b in self._spans:
            dt = be.elapsed(a, b)
            breakdown[cat] += dt
            if cat in ("gpu_fixed", "gpu_experts"):
                gpu_busy += dt
        breakdown["other"] = total - sum(v for k, v in breakdown.items() if k != "other")
        layer_time = [0.0] * self.layers
        for layer, a, b in self._layer_spans:
            layer_time[layer] += be.elapsed(a, b)
        copies = be.copy_busy_s()
        busy = {"gpu": gpu_busy, "h2d": copies[H2D], "d2h": copies[D2H],
                "cpu": self.pool.busy_s / self.pool.workers}
        notes = [f"measured by the runtime on {self.device.describe()}; "
                 + ("CUDA events on the compute stream" if be.is_cuda else "host clock")]
        if be.is_cuda:
            notes.append(f"host wall clock {wall:.6f} s")
        return RunRecord(total, breakdown, layer_time, busy, self._counts["h2d"], self._counts["d2h"],
                         int(self._counts["copies"]), int(self._counts["refresh"]), notes)

    def span_mark(self) -> int:
        """A mark in the list of timed phases (for span_seconds)."""
        return len(self._spans)

    def span_seconds(self, mark: int) -> float:
        """Seconds of the phases timed since `mark` (the backend is synchronized by the caller)."""
        return float(sum(self.backend.elapsed(a, b) for _, a, b in self._spans[mark:]))

    def _span(self, cat: str, a: Any) -> Any:
        b = self.backend.timepoint()
        self._spans.append((cat, a, b))
        return b

    def _forward(self, workload: Workload, schedule: Schedule, plan: SlotPlan,
                 routing: list[list[LayerRouting]], f: int) -> None:
        t = int(workload.tokens[f])
        ctx = int(workload.context[f])
        x = self.inputs[:t].clone()
        tp = self.backend.timepoint()
        for i, lw in enumerate(self.dense_lw):
            x = dense_layer(x, lw, self.kv[self.layers + i], ctx, self.spec, self.cos, self.sin)
        tp = self._span("gpu_fixed", tp)
        for layer in range(self.layers):
            x = self.moe_layer(x, layer, ctx, routing[f][layer], plan.layers[f][layer])
        tp = self.backend.timepoint()
        if self.lm_head is not None:
            F.linear(rms_norm(x, self.final_norm, self.spec.rms_norm_eps), self.lm_head)
        self._span("gpu_fixed", tp)

    # ----- one MoE layer: one method per phase (module docstring) -------------------------------
    def moe_layer(self, x: torch.Tensor, layer: int, ctx: int, r: LayerRouting, plan: LayerPlan,
                  moe_in: torch.Tensor | None = None) -> torch.Tensor:
        """Run one MoE layer; returns the layer output (or, when `moe_in` is given, only the
        routed experts' weighted sum for those normalised inputs: live mode)."""
        st = self._front(x, layer, ctx, r, plan, moe_in)
        self._sync_refresh(st)
        self._start_cpu(st)
        self._issue_on_demand(st, FREE)
        self._grouped(st)
        self._on_demand(st)
        self._background(st)
        return self._combine(st)

    def _front(self, x: torch.Tensor, layer: int, ctx: int, r: LayerRouting, plan: LayerPlan,
               moe_in: torch.Tensor | None) -> LayerStep:
        """Phase 1: attention, shared expert and router (trace replay), the host reads the split;
        every routed pair's input is gathered once, in pair order."""
        spec = self.spec
        t0 = self.backend.timepoint()
        if moe_in is None:
            _, moe_in, out = layer_front(x, self.lw[layer], self.kv[layer], ctx, spec, self.cos, self.sin)
            logits = gate_logits(moe_in, self.lw[layer])
            idx, _ = route(logits, self.lw[layer].gate_bias, spec.top_k, spec.n_group, spec.topk_group,
                           spec.routed_scaling_factor)
            torch.bincount(idx.reshape(-1), minlength=spec.num_experts).cpu()  # the host reads the split
            base: torch.Tensor | None = out
        else:
            base = None
        offs = r.offsets
        pairs = int(offs[-1])
        x_sorted = self.x_dev[:pairs]
        torch.index_select(moe_in, 0, r.tokens, out=x_sorted)
        st = LayerStep(layer, plan, r, moe_in, base, offs, x_sorted, self.y_dev[:pairs],
                       self.slots[layer], self.host[layer], self._slot_busy[layer], t0)
        st.tp = self._span("gpu_fixed", t0)
        return st

    def _sync_refresh(self, st: LayerStep) -> None:
        """Phase 2: demotions (D2H) and synchronous refresh copies (H2D); the GPU waits for them."""
        be, eb = self.backend, self.expert_bytes_model
        marks: list[Marker] = []
        for e, s in st.plan.demotes:
            m = be.copy(st.host.flat[e], st.slots.flat[s], D2H, after=st.busy.get(s, []))
            st.busy[s] = [m]
            marks.append(m)
            self._counts["d2h"] += eb
        for op in st.plan.sync:
            marks.append(self._copy_in(st, op))
            self._counts["refresh"] += 1
        if marks:
            be.compute_wait(marks)
        st.tp = self._span("sync_refresh", st.tp)

    def _copy_in(self, st: LayerStep, op: CopyOp, background: bool = False) -> Marker:
        """One expert H2D into its slot, after whatever last used that slot."""
        m = self.backend.copy(st.slots.flat[op.slot], st.host.flat[op.expert], H2D, background=background,
                              after=st.busy.get(op.slot, []))
        st.busy[op.slot] = [m]
        if not background:          # this copy is the one the expert's runs read from now on
            self._pending[st.layer].pop(op.expert, None)
        self._counts["h2d"] += self.expert_bytes_model
        self._counts["copies"] += 1
        return m

    def _start_cpu(self, st: LayerStep) -> None:
        """Phase 3: activations of CPU-placed experts go to the host; the pool computes them,
        longest first, once they have landed."""
        plan, offs, be = st.plan, st.offs, self.backend
        if not plan.cpu:
            return
        cpu = np.asarray(plan.cpu, dtype=np.int64)
        rows = pair_rows(offs[cpu], offs[cpu + 1] - offs[cpu])
        st.pos_cpu = self.stage(rows)
        st.n_cpu = n = int(rows.size)
        torch.index_select(st.x_sorted, 0, st.pos_cpu, out=self.act_dev[:n])
        down = be.copy(self.act_host[:n], self.act_dev[:n], D2H, after=[be.mark()])
        self._counts["d2h"] += n * self.spec.activation_bytes_per_token
        tasks, start = [], 0
        for e in plan.cpu:
            c = int(st.r.counts[e])
            tasks.append(ExpertTask(e, start, start + c))
            start += c
        st.job = self.pool.submit(tasks, expert_task_runner(self.act_host, self.res_host, st.host.w13, st.host.w2),
                                  before=lambda: be.host_wait(down))

    def _issue_on_demand(self, st: LayerStep, when: SlotWait) -> None:
        """Phase 3/4: issue the on-demand copies whose slot frees at `when` (FREE: at once).
        The copies are grouped by their wait once per layer (on_demand_by_wait), so a layer with
        K on-demand experts looks at each copy once: O(K), not O(K^2)."""
        if when == FREE:
            st.od_waits = on_demand_by_wait(st.plan.on_demand)
        for k in st.od_waits.pop(when, ()):
            st.od_marks[k] = self._copy_in(st, st.plan.on_demand[k])

    def _grouped(self, st: LayerStep) -> None:
        """Phase 4a: wait for the background copies (issued by earlier forwards) of the experts this
        grouped kernel runs, not for the others, then run every expert resident at the gate as ONE
        grouped kernel."""
        be, plan, offs = self.backend, st.plan, st.offs
        pending = self._pending[st.layer]
        needed = [pending.pop(e) for e, _ in plan.grouped if e in pending]
        if needed:
            be.compute_wait(needed)
            st.tp = self._span("copy_stall", st.tp)
        if plan.grouped:
            es = np.fromiter((e for e, _ in plan.grouped), dtype=np.int64, count=len(plan.grouped))
            ss = np.fromiter((s for _, s in plan.grouped), dtype=np.int64, count=len(plan.grouped))
            grouped_experts(st.x_sorted, st.y_sorted, offs, es, ss, st.slots.w13, st.slots.w2, self.impl,
                            self.stage)
            done = be.mark()
            for _, s in plan.grouped:
                st.busy[s] = [done]
            st.tp = self._span("gpu_experts", st.tp)
        self._issue_on_demand(st, AFTER_GROUPED)

    def _on_demand(self, st: LayerStep) -> None:
        """Phase 4b: each on-demand expert once its copy lands: ONDEMAND_LAUNCHES kernels, reading
        its rows of the gathered inputs and writing its rows of the outputs in place."""
        be = self.backend
        for k, op in enumerate(st.plan.on_demand):
            be.compute_wait([st.od_marks[k]])
            st.tp = self._span("copy_stall", st.tp)
            a, b = int(st.offs[op.expert]), int(st.offs[op.expert + 1])
            swiglu_into(st.x_sorted[a:b], st.slots.w13[op.slot], st.slots.w2[op.slot], st.y_sorted[a:b])
            st.busy[op.slot] = [be.mark()]
            st.tp = self._span("gpu_experts", st.tp)
            self._issue_on_demand(st, after_on_demand(k))

    def _background(self, st: LayerStep) -> None:
        """Phase 5: asynchronous refresh copies, served in the background, usable next forward."""
        for op in st.plan.background:
            self._pending[st.layer][op.expert] = self._copy_in(st, op, background=True)
            self._counts["refresh"] += 1

    def _combine(self, st: LayerStep) -> torch.Tensor:
        """Phase 6: CPU results come back (the copy waits until the GPU has read the previous
        layer's results from the same buffer), then every pair's weighted output is added, in
        pair order (expert by expert, float32 accumulation: the reference model's order)."""
        be = self.backend
        if st.job is not None and st.pos_cpu is not None:
            st.job.wait()
            n = st.n_cpu
            up = be.copy(self.res_dev[:n], self.res_host[:n], H2D, after=[be.mark()])
            self._counts["h2d"] += n * self.spec.activation_bytes_per_token
            be.compute_wait([up])
            st.y_sorted.index_copy_(0, st.pos_cpu, self.res_dev[:n])
            st.tp = self._span("cpu_wait", st.tp)
        routed = combine_pairs(st.y_sorted, st.r.weights, st.r.combine, self.spec.hidden_size)
        out = st.base + routed.to(st.base.dtype) if st.base is not None else routed.to(st.moe_in.dtype)
        st.tp = self._span("gpu_fixed", st.tp)
        self._layer_spans.append((st.layer, st.t0, st.tp))
        return out

    # ----- results ------------------------------------------------------------------------------
    def metrics(self, workload: Workload, schedule: Schedule, rec: RunRecord, plan: SlotPlan) -> Metrics:
        """Metrics with the simulator's names and definitions (counts from the schedule; bytes in
        the model's dtype, as the simulator counts them)."""
        et = workload.expert_tokens
        gpu_tokens = int(et[schedule.on_gpu()].sum())
        cpu_tokens = int(et[schedule.on_cpu()].sum())
        pairs = gpu_tokens + cpu_tokens
        notes = list(rec.notes)
        if not self.device.is_cuda:
            notes.append(f"cpu-as-gpu: buffers are {self.device.dtype_name}; bytes are reported in the model's "
                         f"{self.spec.dtype} (what the schedule moves for this model)")
        notes += self.pinning.refused
        if any(plan.spare):
            notes.append(f"the schedule needed spare GPU slots beyond its budget: {plan.spare} per layer")
        total = rec.total_s
        forwards = workload.num_forwards
        generated = workload.generated_tokens
        return Metrics(
            engine="runtime", policy=schedule.policy, total_time_s=total, generated_tokens=generated,
            forwards=forwards, tokens_per_s=generated / total if total > 0 else 0.0,
            step_time_s=total / forwards if forwards else 0.0, gpu_tokens=gpu_tokens, cpu_tokens=cpu_tokens,
            hit_ratio=gpu_tokens / pairs if pairs else 1.0, h2d_bytes=rec.h2d_bytes, d2h_bytes=rec.d2h_bytes,
            expert_copies=rec.expert_copies, refresh_copies=rec.refresh_copies,
            copy_stall_s=rec.breakdown["copy_stall"] + rec.breakdown["sync_refresh"],
            cpu_share=cpu_tokens / pairs if pairs else 0.0, busy_s=rec.busy, breakdown_s=rec.breakdown,
            layer_time_s=rec.layer_time, is_bound=schedule.is_bound, feasible=schedule.feasible, notes=notes,
        )


def first_layers(workload: Workload, layers: int) -> Workload:
    """The workload of the first `layers` MoE layers only (a slice of the model).

    The slice's model has those MoE layers and nothing else: no dense layers and a one-row output
    head (vocab_size 1), so neither the simulator nor the runtime charges the per-forward work
    outside the MoE layers (dense layers, lm_head), which no offload policy changes. Expert,
    attention and router shapes are the model's. The name says what was cut.
    """
    total = workload.num_layers
    if not 1 <= layers <= total:
        raise InputError(f"--layers must lie in 1..{total} (the trace's MoE layers), got {layers}")
    spec = workload.model
    sub = replace(spec, name=f"{spec.name}[{layers} of {total} MoE layers]", num_layers=layers,
                  first_dense_layers=0, vocab_size=1)
    return replace(workload, model=sub, expert_tokens=np.ascontiguousarray(workload.expert_tokens[:, :layers]))
