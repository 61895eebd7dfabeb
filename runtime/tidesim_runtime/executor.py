"""The executor: runs a Schedule on a real GPU (or the CPU playing it) and a CPU worker pool.

Per forward: the dense layers, then for every MoE layer the execution model the simulator
charges (docs/costmodel.md), in the same order:

1. attention, shared expert and router on the GPU (real kernels at the trace's token count and
   context); the router's per-expert counts are read on the host (one sync, as any runtime that
   splits tokens between devices must);
2. synchronous refresh copies (H2D) and demotions (D2H) of the layer; the GPU waits for them;
3. activations of CPU-placed experts go to the host (D2H), the CPU pool computes those experts
   longest first while the GPU works; on-demand copies are issued at once;
4. the GPU waits for the layer's asynchronous refresh copies still in flight (from the previous
   forward), runs every expert resident at the gate as ONE grouped kernel, then each on-demand
   expert after its copy lands;
5. the layer's asynchronous refresh copies are queued in the background (low priority);
6. CPU results come back (H2D) and are added; the layer ends.
Then the final norm and lm_head.

Routing: in trace replay the tokens per expert come from the trace (the router still runs, for
its cost); in live mode (tidesim_runtime.live) the model's own router decides and the executor
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
from tidesim.metrics import Metrics
from tidesim.models import ModelSpec
from tidesim.schedule import Schedule, schedule_problems
from tidesim.workload import Workload
from tidesim_runtime.cpu_pool import CPUPool, ExpertTask, LayerJob, expert_task_runner
from tidesim_runtime.device import DeviceInfo, host_memory_available
from tidesim_runtime.gate import route
from tidesim_runtime.kernels import (
    KVBuffer,
    LayerWeights,
    dense_layer,
    gate_logits,
    grouped_experts,
    grouped_impl,
    layer_front,
    random_layer_weights,
    random_matrix,
    rms_norm,
    rotary_tables,
    swiglu,
)
from tidesim_runtime.streams import D2H, H2D, Backend, Marker, make_backend
from tidesim_runtime.weights import AFTER_GROUPED, ExpertBank, LayerPlan, SlotPlan, expert_bytes, plan_slots

BREAKDOWN_KEYS = ("gpu_fixed", "gpu_experts", "copy_stall", "cpu_wait", "sync_refresh", "other")
GIB = 2**30


@dataclass
class LayerRouting:
    """Routed pairs of one layer-forward, sorted by expert: token row and weight of each pair,
    and tokens per expert (host)."""

    tokens: torch.Tensor      # int64 [P] on the device
    weights: torch.Tensor     # [P] on the device, compute dtype
    counts: np.ndarray        # int64 [E]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)])


def replay_routing(counts: np.ndarray, tokens: int, top_k: int, device: torch.device, dtype: torch.dtype
                   ) -> LayerRouting:
    """Pairs for tokens-per-expert counts from a trace: expert e takes rows 0..c_e-1 (mod tokens),
    so no token meets the same expert twice; weights 1/top_k (values do not change timing)."""
    counts = np.asarray(counts, dtype=np.int64)
    rows = np.concatenate([np.arange(c) % max(tokens, 1) for c in counts]) if counts.sum() else np.zeros(0, np.int64)
    tok = torch.from_numpy(rows.astype(np.int64)).to(device)
    w = torch.full((int(counts.sum()),), 1.0 / top_k, dtype=dtype, device=device)
    return LayerRouting(tok, w, counts)


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


def memory_needs(spec: ModelSpec, layers: int, device: DeviceInfo, slots_per_layer: int, max_tokens: int,
                 max_context: int, forward_fixed: bool = True) -> dict[str, int]:
    """Bytes the executor allocates: host (all routed experts of `layers` layers, plus the
    GPU side when the CPU plays the GPU) and device (slots, non-expert weights, KV buffers)."""
    eb = expert_bytes(spec, device.dtype)
    el = torch.empty(0, dtype=device.dtype).element_size()
    host_experts = layers * spec.num_experts * eb
    per_layer_weights = (spec.attention_params + spec.shared_expert_params) * el + spec.gate_params * 4
    fixed = 0
    if forward_fixed:
        fixed = spec.first_dense_layers * (spec.attention_params + spec.dense_mlp_params) * el
        fixed += spec.vocab_size * spec.hidden_size * el
    kv = (layers + spec.first_dense_layers) * 2 * spec.num_kv_heads * spec.head_dim * max_context * el
    act = 16 * max_tokens * spec.hidden_size * 4 * spec.top_k
    device_bytes = layers * (slots_per_layer * eb + per_layer_weights) + fixed + kv + act
    host = host_experts + (0 if device.is_cuda else device_bytes)
    return {"host": int(host), "device": int(device_bytes if device.is_cuda else 0)}


def check_memory(spec: ModelSpec, layers: int, device: DeviceInfo, slots_per_layer: int, max_tokens: int,
                 max_context: int, forward_fixed: bool = True) -> None:
    """InputError (before anything is allocated) when host or GPU memory is too small."""
    need = memory_needs(spec, layers, device, slots_per_layer, max_tokens, max_context, forward_fixed)
    avail = host_memory_available()
    if avail and need["host"] > 0.9 * avail:
        per_layer = spec.num_experts * expert_bytes(spec, device.dtype)
        fit = max(0, int((0.9 * avail - (need["host"] - layers * per_layer)) // per_layer))
        raise InputError(
            f"{layers} MoE layers of {spec.name} need {need['host'] / GIB:.1f} GiB of host memory "
            f"({device.dtype_name}) but {avail / GIB:.1f} GiB is available; use --layers {max(fit, 1)} or fewer"
            + ("" if device.is_cuda else " (cpu-as-gpu keeps the GPU side in host memory too)"))
    if device.is_cuda:
        free, _ = torch.cuda.mem_get_info(device.torch_device)
        if need["device"] > 0.95 * free:
            raise InputError(
                f"the plan needs {need['device'] / GIB:.1f} GiB on {device.name} but {free / GIB:.1f} GiB is free; "
                f"use a smaller --budgets value or fewer --layers")


class Executor:
    """Owns the weights, the slot pools, the streams and the CPU pool for one model shape.

    host_experts: per MoE layer bank of all experts (random when not given). Call close() when done.
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
        gen = torch.Generator().manual_seed(seed)
        self._threads_before = torch.get_num_threads()
        if not device.is_cuda:
            torch.set_num_threads(device.gpu_threads)
        from tidesim_runtime.weights import random_host_experts

        self.host = host_experts if host_experts is not None else random_host_experts(
            spec, layers, self.dtype, pin=device.is_cuda, seed=seed + 1)
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
        self.act_host = torch.zeros((pairs, spec.hidden_size), dtype=self.dtype, pin_memory=device.is_cuda)
        self.res_host = torch.zeros((pairs, spec.hidden_size), dtype=self.dtype, pin_memory=device.is_cuda)
        self.act_dev = torch.zeros((pairs, spec.hidden_size), dtype=self.dtype, device=self.dev)
        self.res_dev = torch.zeros_like(self.act_dev)
        self.y_dev = torch.zeros_like(self.act_dev)
        self.backend: Backend = make_backend(self.dev)
        self.pool = CPUPool(device.cpu_workers, device.cpu_threads_per_worker)
        self.impl = grouped_impl(self.dev, self.dtype)
        self.slots: list[ExpertBank] = []
        self._slot_sizes: list[int] = []
        self.expert_bytes_model = float(spec.expert_bytes)

    # ----- setup ----------------------------------------------------------------------------
    def close(self) -> None:
        self.pool.close()
        self.backend.close()
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
                                   self.dev, self.dtype) for l in range(L)] for f in range(F_)]
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
        self._pending: list[list[Marker]] = [[] for _ in range(self.layers)]
        self._slot_busy: list[dict[int, list[Marker]]] = [{} for _ in range(self.layers)]
        self._counts = {"h2d": 0.0, "d2h": 0.0, "copies": 0, "refresh": 0}
        self._wall0 = time.perf_counter()
        self._t_start = be.timepoint()

    def finish(self) -> RunRecord:
        """Wait for background copies still in flight (they are paid for), stop the clock."""
        be = self.backend
        tail = be.timepoint()
        for layer in range(self.layers):
            be.compute_wait(self._pending[layer])
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

    # ----- one MoE layer ----------------------------------------------------------------------
    def moe_layer(self, x: torch.Tensor, layer: int, ctx: int, r: LayerRouting, plan: LayerPlan,
                  moe_in: torch.Tensor | None = None) -> torch.Tensor:
        """Run one MoE layer; returns the layer output (or, when `moe_in` is given, only the
        routed experts' weighted sum for those normalised inputs: live mode)."""
        be, spec = self.backend, self.spec
        t0 = be.timepoint()
        base_given = moe_in is None
        if moe_in is None:
            _, moe_in, out = layer_front(x, self.lw[layer], self.kv[layer], ctx, spec, self.cos, self.sin)
            logits = gate_logits(moe_in, self.lw[layer])
            idx, _ = route(logits, self.lw[layer].gate_bias, spec.top_k, spec.n_group, spec.topk_group,
                           spec.routed_scaling_factor)
            torch.bincount(idx.reshape(-1), minlength=spec.num_experts).cpu()  # the host reads the split
        else:
            out = moe_in
        tp = self._span("gpu_fixed", t0)
        slots = self.slots[layer]
        host = self.host[layer]
        busy = self._slot_busy[layer]
        eb = self.expert_bytes_model

        # 2. synchronous refresh and demotions
        sync_marks: list[Marker] = []
        for e, s in plan.demotes:
            m = be.copy(host.flat[e], slots.flat[s], D2H, after=busy.get(s, []))
            busy[s] = [m]
            sync_marks.append(m)
            self._counts["d2h"] += eb
        for op in plan.sync:
            m = be.copy(slots.flat[op.slot], host.flat[op.expert], H2D, after=busy.get(op.slot, []))
            busy[op.slot] = [m]
            sync_marks.append(m)
            self._counts["h2d"] += eb
            self._counts["copies"] += 1
            self._counts["refresh"] += 1
        if sync_marks:
            be.compute_wait(sync_marks)
        tp = self._span("sync_refresh", tp)

        offs = r.offsets
        y_sorted = self.y_dev[:int(offs[-1])]  # expert outputs, in the routing's pair order
        # 3. CPU side: activations down, the pool computes, results come back later
        job: LayerJob | None = None
        n_cpu = 0
        pos_cpu: torch.Tensor | None = None
        if plan.cpu:
            rows = np.concatenate([np.arange(offs[e], offs[e + 1]) for e in plan.cpu])
            pos_cpu = torch.from_numpy(rows).to(self.dev, non_blocking=True)
            n_cpu = int(rows.size)
            self.act_dev[:n_cpu] = moe_in[r.tokens[pos_cpu]]
            down = be.copy(self.act_host[:n_cpu], self.act_dev[:n_cpu], D2H, after=[be.mark()])
            self._counts["d2h"] += n_cpu * spec.activation_bytes_per_token
            tasks, start = [], 0
            for e in plan.cpu:
                c = int(r.counts[e])
                tasks.append(ExpertTask(e, start, start + c))
                start += c
            job = self.pool.submit(tasks, expert_task_runner(self.act_host, self.res_host, host.w13, host.w2),
                                   before=lambda m=down: be.host_wait(m))
        od_marks: dict[int, Marker] = {}

        def issue_on_demand(wait: int) -> None:
            for k, op in enumerate(plan.on_demand):
                if op.wait == wait:
                    m = be.copy(slots.flat[op.slot], host.flat[op.expert], H2D, after=busy.get(op.slot, []))
                    busy[op.slot] = [m]
                    od_marks[k] = m
                    self._counts["h2d"] += eb
                    self._counts["copies"] += 1

        issue_on_demand(-2)

        # 4. GPU: wait for last forward's background copies of this layer, grouped kernel, on-demand
        if self._pending[layer]:
            be.compute_wait(self._pending[layer])
            self._pending[layer] = []
            tp = self._span("copy_stall", tp)
        if plan.grouped:
            experts = [e for e, _ in plan.grouped]
            rows = np.concatenate([np.arange(offs[e], offs[e + 1]) for e in experts])
            pos = torch.from_numpy(rows).to(self.dev, non_blocking=True)
            y_sorted[pos] = grouped_experts(moe_in[r.tokens[pos]], [int(r.counts[e]) for e in experts],
                                            [s for _, s in plan.grouped], slots.w13, slots.w2, self.impl)
            done = be.mark()
            for _, s in plan.grouped:
                busy[s] = [done]
            tp = self._span("gpu_experts", tp)
        issue_on_demand(AFTER_GROUPED)
        for k, op in enumerate(plan.on_demand):
            be.compute_wait([od_marks[k]])
            tp = self._span("copy_stall", tp)
            a, b = int(offs[op.expert]), int(offs[op.expert + 1])
            y_sorted[a:b] = swiglu(moe_in[r.tokens[a:b]], slots.w13[op.slot], slots.w2[op.slot])
            busy[op.slot] = [be.mark()]
            tp = self._span("gpu_experts", tp)
            issue_on_demand(k)

        # 5. asynchronous refresh: background copies, usable from the next forward
        for op in plan.background:
            wait = busy.get(op.slot, [])
            m = be.copy(slots.flat[op.slot], host.flat[op.expert], H2D, background=True, after=wait)
            busy[op.slot] = [m]
            self._pending[layer].append(m)
            self._counts["h2d"] += eb
            self._counts["copies"] += 1
            self._counts["refresh"] += 1

        # 6. CPU results back, then every pair's weighted output is added, in pair order (expert
        # by expert, float32 accumulation: the reference model's order)
        if job is not None and pos_cpu is not None:
            job.wait()
            up = be.copy(self.res_dev[:n_cpu], self.res_host[:n_cpu], H2D)
            self._counts["h2d"] += n_cpu * spec.activation_bytes_per_token
            be.compute_wait([up])
            y_sorted[pos_cpu] = self.res_dev[:n_cpu]
            tp = self._span("cpu_wait", tp)
        routed = torch.zeros(moe_in.shape, dtype=torch.float32, device=self.dev)
        routed.index_add_(0, r.tokens, y_sorted.float() * r.weights.float()[:, None])
        out = out + routed.to(out.dtype) if base_given else routed.to(moe_in.dtype)
        tp = self._span("gpu_fixed", tp)
        self._layer_spans.append((layer, t0, tp))
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
