"""Deploy: decode prompts with a model while an online policy places its experts forward by forward
(`tidesim generate`).

The model keeps every non-expert weight on the device that plays the GPU; its routed experts live
in (pinned) host banks, and the model's own expert modules are rebound to views of those banks, so
the host holds each expert once. Every MoE block's expert runner is replaced: when the router of
layer l has run, its tokens per expert go to the policy's online step (tidesim.policies.step)
together with the forward's metadata, the step returns that layer's placements, copies and
demotions, the slots are assigned incrementally (OnlineSlots, the replay's slot rule applied one
layer-forward at a time) and the executor carries it out (GPU slots, copies, CPU worker pool).
The routing is never altered, so the tokens are the plain decode's (checked by --check-lossless).

On the way the engine captures the trace (the capture hooks) and records every decision into the
executed Schedule; per forward it measures time, copies, bytes and copy-engine time. Because the
policy is the same step the offline builder loops, build_schedule on the captured trace gives the
executed Schedule back (a test checks it), and the simulator can predict this very run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from tidesim.errors import InputError
from tidesim.hardware import HardwareProfile
from tidesim.metrics import Metrics
from tidesim.models import ModelSpec
from tidesim.policies.step import ForwardMeta, PolicyStep, ScheduleRecorder
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_ON_DEMAND, COPY_SYNC_REFRESH, Schedule, schedule_problems
from tidesim.trace.schema import Trace
from tidesim.workload import Workload, workload_from_trace
from tidesim_runtime.engine.device import DeviceInfo, host_memory_available
from tidesim_runtime.engine.executor import Executor, RunRecord, memory_needs, router_routing
from tidesim_runtime.engine.pinned import pinned_bytes
from tidesim_runtime.engine.slots import (
    ExpertBank,
    LayerPlan,
    SlotPlan,
    _plan_layer_forward,
    expert_bytes,
)
from tidesim_runtime.reference.capture import CaptureSettings, capture_trace
from tidesim_runtime.reference.generate import DecodeConfig
from tidesim_runtime.reference.model import MLP, LLaDA2Model, SparseMoeBlock

GIB = 2**30


# ----- forward metadata, known before the forward runs -----------------------------------------------
class ForwardTracker:
    """Names each forward (prompt, block, step, phase) before it runs, from the decoder's block loop
    (capture_trace's `blocks` hook) and the forward's arguments: a forward before the first block
    is the prefill; in a block, with the prefix cache, a forward asking for the last position's
    logits only is the block's commit forward (a denoising step asks for the whole block; with a
    block of one position, the step is the one that still holds a mask). The names are checked
    against the captured trace after the run."""

    def __init__(self, cfg: DecodeConfig, mask_id: int) -> None:
        self.cfg, self.mask_id = cfg, mask_id
        self.index = -1
        self.prompt = -1
        self.block: int | None = None
        self.first_block_id = 0
        self.step = 0
        self.metas: list[ForwardMeta] = []

    def blocks(self, pid: int, wrap: Callable[[Iterable[int]], Iterator[int]] | None = None
               ) -> Callable[[Iterable[int]], Iterator[int]]:
        """The block-loop hook for prompt `pid` (optionally around another wrapper: a progress bar)."""
        def loop(order: Iterable[int]) -> Iterator[int]:
            self.prompt, self.block, self.step = pid, None, 0
            first = True
            for b in (wrap(order) if wrap is not None else order):
                if first:
                    self.first_block_id, first = b, False
                self.block, self.step = b - self.first_block_id, 0
                yield b
        self.prompt, self.block = pid, None
        return loop

    def next(self, input_ids: torch.Tensor, past: Any, logits_last: int | None) -> ForwardMeta:
        self.index += 1
        if self.block is None:
            meta = ForwardMeta(self.index, self.prompt, -1, 0, "prefill")
        else:
            commit = self.cfg.kv_cache == "prefix" and logits_last == 1 and (
                self.cfg.block_length > 1 or not bool((input_ids == self.mask_id).any()))
            meta = ForwardMeta(self.index, self.prompt, self.block, self.step, "commit" if commit else "step")
            self.step += 1
        self.metas.append(meta)
        return meta


# ----- slots, assigned one layer-forward at a time -----------------------------------------------------
class OnlineSlots:
    """The replay's slot rule (slots.plan_slots: lowest free slot first, a copy waits for a slot
    that frees later in the forward, a spare slot only when none does) applied incrementally, one
    (forward, layer) decision at a time, as the live engine learns them. Spare slots grow the
    layer's pool on the spot (counted in `spare`)."""

    def __init__(self, initial: np.ndarray, budget: np.ndarray) -> None:
        self.budget = np.asarray(budget, dtype=np.int64)
        self.before = np.asarray(initial, dtype=bool).copy()
        self.slot_of: list[dict[int, int]] = []
        self.free: list[list[int]] = []
        self.size: list[int] = []
        for layer in range(initial.shape[0]):
            init = np.flatnonzero(initial[layer]).tolist()
            slot_of = {e: s for s, e in enumerate(init)}
            size = max(int(self.budget[layer]), len(init))
            self.slot_of.append(slot_of)
            self.size.append(size)
            self.free.append(sorted(set(range(size)) - set(slot_of.values())))
        self.initial_slots = [dict(m) for m in self.slot_of]
        self.start_size = list(self.size)

    def slot_plan(self) -> SlotPlan:
        """The SlotPlan of the pools as they stand (for Executor.prepare_slots and metrics)."""
        return SlotPlan([], list(self.size), [dict(m) for m in self.initial_slots],
                        [s - int(b) for s, b in zip(self.size, self.budget, strict=True)])

    def plan(self, layer: int, placement: np.ndarray, copy: np.ndarray, demote: np.ndarray,
             resident: np.ndarray) -> LayerPlan:
        """The slot plan of one layer-forward (arrays [E] of the decision)."""
        one = Schedule(policy="", budget=self.budget[layer:layer + 1], initial_resident=self.before[layer][None],
                       placement=placement[None, None], copy=copy[None, None], demote=demote[None, None],
                       resident=resident[None, None])
        out = LayerPlan()
        self.size[layer], self.free[layer] = _plan_layer_forward(
            out, one, 0, 0, self.before[layer], self.slot_of[layer], self.free[layer], self.size[layer])
        self.before[layer] = resident
        return out


# ----- per-forward statistics --------------------------------------------------------------------------
STAT_COLUMNS = ("forward", "prompt", "block", "step", "phase", "tokens", "time_s", "gpu_tokens", "cpu_tokens",
                "gpu_experts", "cpu_experts", "expert_copies", "copies_on_demand", "copies_sync_refresh",
                "copies_async_refresh", "copy_bytes", "h2d_bytes", "d2h_bytes", "promotions", "demotions",
                "demotion_copies", "copy_time_s", "decide_s")


@dataclass
class DeployResult:
    """What one generate run produced."""

    trace: Trace
    outputs: list[list[int]]
    schedule: Schedule
    metrics: Metrics
    forwards: pd.DataFrame
    decode_s: float
    spare_slots: list[int] = field(default_factory=list)


def decision_counts(schedule: Schedule, expert_tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Per-forward counts of a Schedule over its trace's routing: the statistics the live run
    reports from its decisions (the offline builder's schedule gives the same ones)."""
    gpu, cpu = schedule.on_gpu(), schedule.on_cpu()
    before = schedule.resident_before()
    return {
        "gpu_tokens": (expert_tokens * gpu).sum(axis=(1, 2)),
        "cpu_tokens": (expert_tokens * cpu).sum(axis=(1, 2)),
        "gpu_experts": gpu.sum(axis=(1, 2)),
        "cpu_experts": cpu.sum(axis=(1, 2)),
        "copies_on_demand": (schedule.copy == COPY_ON_DEMAND).sum(axis=(1, 2)),
        "copies_sync_refresh": (schedule.copy == COPY_SYNC_REFRESH).sum(axis=(1, 2)),
        "copies_async_refresh": (schedule.copy == COPY_ASYNC_REFRESH).sum(axis=(1, 2)),
        "promotions": (schedule.resident & ~before).sum(axis=(1, 2)),
        "demotions": (before & ~schedule.resident).sum(axis=(1, 2)),
        "demotion_copies": schedule.demote.sum(axis=(1, 2)),
    }


# ----- memory, before anything is loaded ----------------------------------------------------------------
def deploy_memory(spec: ModelSpec, device: DeviceInfo, budget: np.ndarray, max_tokens: int, max_context: int
                  ) -> dict[str, int]:
    """Bytes generate needs on the host and on the device (0 for cpu-as-gpu, which keeps all on
    the host): the routed experts in host banks (pinned on CUDA over exactly their pages, pinned.py;
    one bank per MoE layer), the model's other weights (on the device), the executor's slots and
    buffers (executor.memory_needs), and the model's keys/values. The banks are counted with one
    more layer's bank: the peak while the model's experts are moved into them."""
    layers = spec.num_moe_layers
    el = torch.empty(0, dtype=device.dtype).element_size()
    bank = spec.num_experts * expert_bytes(spec, device.dtype)
    banks = layers * (pinned_bytes(bank) if device.is_cuda else bank)
    non_expert = spec.non_expert_params * el
    slots = int(np.asarray(budget).max(initial=0))
    ex = memory_needs(spec, layers, device, slots, max_tokens, max_context, forward_fixed=False)
    kv = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * max_context * el * 2  # cache + a step's copy
    device_side = non_expert + ex["device"] + kv if device.is_cuda else 0
    banks += banks // max(layers, 1)  # while binding: the model's experts plus one layer's bank
    host = banks + (0 if device.is_cuda else non_expert + (ex["host"] - layers * spec.num_experts
                                                            * expert_bytes(spec, device.dtype)) + kv)
    return {"host": int(host), "device": int(device_side), "expert_banks": int(banks), "non_expert": int(non_expert)}


def check_deploy_memory(spec: ModelSpec, device: DeviceInfo, budget: np.ndarray, max_tokens: int,
                        max_context: int, host_free: int | None = None, device_free: int | None = None) -> None:
    """InputError naming the option that would make it fit (--layers, a smaller budget), before
    any weight is read. host_free / device_free default to what the machine has free now."""
    need = deploy_memory(spec, device, budget, max_tokens, max_context)
    avail = host_memory_available() if host_free is None else host_free
    if avail and need["host"] > 0.9 * avail:
        per_layer = need["host"] / max(spec.num_moe_layers, 1)
        fit = int(0.9 * avail // per_layer)
        raise InputError(
            f"{spec.name} needs {need['host'] / GIB:.1f} GiB of host memory ({device.dtype_name}, expert banks "
            f"{need['expert_banks'] / GIB:.1f} GiB) but {avail / GIB:.1f} GiB is available; "
            + (f"use --layers {fit} or fewer" if fit >= 1 else "use a machine with more memory"))
    if device.is_cuda:
        free = torch.cuda.mem_get_info(device.torch_device)[0] if device_free is None else device_free
        if need["device"] > 0.95 * free:
            raise InputError(
                f"{spec.name} needs {need['device'] / GIB:.1f} GiB on {device.name} (non-expert weights "
                f"{need['non_expert'] / GIB:.1f} GiB plus expert slots and buffers) but {free / GIB:.1f} GiB is free; "
                "give a smaller --budget or fewer --layers")


# ----- the engine ----------------------------------------------------------------------------------------
def bind_host_experts(model: LLaDA2Model) -> list[ExpertBank]:
    """Host banks of every MoE layer's experts; the model's expert weights become views of them
    (each expert is held once, and the plain decode still runs the same numbers). Experts are
    moved one at a time, so the peak is the model plus one layer's bank. The banks are page-aligned
    host memory; on CUDA the executor pins them at their exact size."""
    banks: list[ExpertBank] = []
    spec = model.spec
    i = spec.moe_intermediate_size
    for _, block in model.moe_blocks():
        first = block.experts[0]
        assert isinstance(first, MLP)
        dtype = first.gate_proj.weight.dtype
        bank = ExpertBank.empty(spec, len(block.experts), torch.device("cpu"), dtype, zero=False)
        for e, m in enumerate(block.experts):
            assert isinstance(m, MLP)
            for proj, view in ((m.gate_proj, bank.w13[e, :i]), (m.up_proj, bank.w13[e, i:]), (m.down_proj, bank.w2[e])):
                view.copy_(proj.weight.data)
                proj.weight.data = view
        banks.append(bank)
    return banks


def move_non_experts(model: LLaDA2Model, device: torch.device) -> LLaDA2Model:
    """Every weight but the routed experts to `device` (the experts stay in their host banks)."""
    held = [(block, block.experts) for _, block in model.moe_blocks()]
    for block, _ in held:
        block.experts = torch.nn.ModuleList()
    try:
        model.to(device)
    finally:
        for block, experts in held:
            block.experts = experts
    return model


class LiveEngine:
    """One model, one policy, one executor: decodes prompts with the policy deciding online."""

    def __init__(self, model: LLaDA2Model, policy: PolicyStep, device: DeviceInfo, banks: list[ExpertBank],
                 max_tokens: int, max_context: int) -> None:
        self.model, self.policy, self.device = model, policy, device
        self.spec = model.spec
        self.blocks = model.moe_blocks()
        layers = len(self.blocks)
        if policy.current.shape != (layers, self.spec.num_experts):
            raise InputError(f"the policy was built for {policy.current.shape[0]} MoE layers, the model has {layers}")
        self.executor = Executor(self.spec, layers, device, max_tokens, max_context, forward_fixed=False,
                                 host_experts=banks)
        self.slots = OnlineSlots(policy.initial, policy.budget)
        self.recorder = ScheduleRecorder(layers, self.spec.num_experts)
        self._layer_index = [np.array([i]) for i in range(layers)]
        self._meta: ForwardMeta | None = None
        self._rows: list[dict[str, Any]] = []
        self._decide = 0.0
        self._model_s = 0.0

    # per layer: the router has run; decide, assign slots, execute
    def _runner(self, layer: int) -> Callable[[SparseMoeBlock, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        spec, ex = self.spec, self.executor

        def run(block: SparseMoeBlock, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            assert self._meta is not None
            routing = router_routing(idx, w, spec.num_experts, x.device)   # weights stay float32
            counts = routing.counts
            t0 = time.perf_counter()
            d = self.policy.step(self._meta, counts[None], self._layer_index[layer])
            self.recorder.add(d)
            plan = self.slots.plan(layer, d.placement[0], d.copy[0], d.demote[0], d.resident[0])
            self._grow(layer)
            self._decide += time.perf_counter() - t0
            return ex.moe_layer(x, layer, 0, routing, plan, moe_in=x)
        return run

    def _grow(self, layer: int) -> None:
        """A spare slot beyond the pool: enlarge the layer's pool (after every copy has landed)."""
        ex = self.executor
        have = int(ex.slots[layer].flat.shape[0])
        want = self.slots.size[layer]
        if want <= have:
            return
        ex.backend.synchronize()
        bank = ExpertBank.empty(self.spec, want, ex.dev, ex.dtype)
        bank.flat[:have].copy_(ex.slots[layer].flat)
        ex.slots[layer] = bank

    def _forward_fn(self, tracker: ForwardTracker) -> Callable[..., Any]:
        model, ex, dev = self.model, self.executor, self.device.torch_device

        def forward(input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                    past: Any = None, logits_last: int | None = None) -> Any:
            meta = tracker.next(input_ids, past, logits_last)
            self._meta = meta
            self.recorder.begin_forward()
            counts0 = dict(ex._counts)
            copies0 = ex.backend.copy_mark()
            decide0 = self._decide
            mark = ex.span_mark()
            t0 = time.perf_counter()
            if dev.type != "cpu":  # the decoder keeps ids, positions and masks on the host
                input_ids, positions, mask = input_ids.to(dev), positions.to(dev), mask.to(dev)
            out = model(input_ids, positions, mask, past, logits_last)
            if dev.type != "cpu":
                out = (out[0].cpu(), out[1])
            # the forward ends when its compute does: asynchronous refresh copies still in flight go
            # on into the next forward, as the simulator lets them (a full synchronize would not)
            ex.backend.compute_synchronize()
            elapsed = time.perf_counter() - t0
            if not self.recorder.complete():
                raise RuntimeError(f"forward {meta.index}: not every MoE layer ran through the engine")
            # the model's own modules (attention, dense layers, norms, router, lm_head) ran outside
            # the executor's phases: the layer model's fixed GPU work
            self._model_s += max(0.0, elapsed - ex.span_seconds(mark) - (self._decide - decide0))
            self._rows.append({
                "forward": meta.index, "prompt": meta.prompt, "block": meta.block, "step": meta.step,
                "phase": meta.phase, "tokens": int(input_ids.shape[-1]), "time_s": elapsed,
                "expert_copies": int(ex._counts["copies"] - counts0["copies"]),
                "h2d_bytes": float(ex._counts["h2d"] - counts0["h2d"]),
                "d2h_bytes": float(ex._counts["d2h"] - counts0["d2h"]),
                "copy_marks": (copies0, ex.backend.copy_mark()),
                "decide_s": self._decide - decide0,
            })
            return out
        return forward

    def run(self, prompts: Sequence[Sequence[int]], cfg: DecodeConfig, settings: CaptureSettings,
            seed: int | None, blocks: Callable[[int], Callable[[Iterable[int]], Iterator[int]]] | None = None
            ) -> DeployResult:
        tracker = ForwardTracker(cfg, self.spec.mask_token_id)
        saved = [b.expert_runner for _, b in self.blocks]
        ex = self.executor
        try:
            ex.prepare_slots(self.slots.slot_plan())
            for i, (_, block) in enumerate(self.blocks):
                block.expert_runner = self._runner(i)
            ex.begin()
            t0 = time.perf_counter()
            trace, outputs = capture_trace(
                self.model, self.spec, prompts, cfg, settings, seed=seed, forward=self._forward_fn(tracker),
                blocks=lambda pid: tracker.blocks(pid, blocks(pid) if blocks is not None else None))
            decode_s = time.perf_counter() - t0
            record: RunRecord = ex.finish()
            for row in self._rows:   # copy-engine time of the copies each forward issued
                row["copy_time_s"] = float(sum(ex.backend.copy_busy_s(*row.pop("copy_marks")).values()))
            attribute_model_time(record, self._model_s)
        finally:
            for (_, block), fn in zip(self.blocks, saved, strict=True):
                block.expert_runner = fn
            ex.close()
        schedule = self.recorder.schedule(self.policy)
        check_names(tracker.metas, trace)
        workload = workload_from_trace(trace)
        problems = schedule_problems(schedule, workload)
        if problems:
            raise RuntimeError(f"the executed schedule breaks an invariant: {problems[0]}")
        slot_plan = self.slots.slot_plan()
        metrics = ex.metrics(workload, schedule, record, slot_plan)
        frame = forward_frame(self._rows, schedule, trace.expert_tokens, float(self.spec.expert_bytes))
        return DeployResult(trace, outputs, schedule, metrics, frame, decode_s, slot_plan.spare)


def attribute_model_time(record: RunRecord, model_s: float) -> None:
    """Move the model's own module time from `other` to `gpu_fixed` (where the layer model and
    every prediction put it); `other` keeps the decoder's host work and the policy's decisions."""
    moved = min(model_s, max(record.breakdown["other"], 0.0))
    record.breakdown["gpu_fixed"] += moved
    record.breakdown["other"] -= moved
    record.busy["gpu"] += moved


def check_names(metas: list[ForwardMeta], trace: Trace) -> None:
    """The names the engine gave each forward before it ran must be the decoder's own."""
    f = trace.forwards
    got = [(m.prompt, m.block, m.step, m.phase) for m in metas]
    want = list(zip(f["prompt"].tolist(), f["block"].tolist(), f["step"].tolist(), f["phase"].tolist(), strict=True))
    if got != want:
        first = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b) if len(got) == len(want) \
            else min(len(got), len(want))
        raise RuntimeError(f"forward {first}: the engine named it {got[first] if first < len(got) else None}, the "
                           f"decoder {want[first] if first < len(want) else None}")


def forward_frame(rows: list[dict[str, Any]], schedule: Schedule, expert_tokens: np.ndarray,
                  expert_nbytes: float) -> pd.DataFrame:
    """Per-forward statistics: the measured columns and the decision counts."""
    frame = pd.DataFrame(rows)
    for name, values in decision_counts(schedule, expert_tokens).items():
        frame[name] = np.asarray(values, dtype=np.int64)
    frame["copy_bytes"] = frame["expert_copies"].astype(float) * expert_nbytes
    return frame[list(STAT_COLUMNS)]


# ----- prediction of the same run ------------------------------------------------------------------------
def predicted_forwards(workload: Workload, schedule: Schedule, hw: HardwareProfile) -> tuple[Metrics, np.ndarray]:
    """The simulator's Metrics for the run and its time per forward (seconds; the time from one
    forward's end to the next; copies still in flight at the end count in the total only)."""
    from tidesim.costmodel import lower_bound
    from tidesim.sim.accounting import build_metrics
    from tidesim.sim.costs import schedule_costs
    from tidesim.sim.engine import Simulator

    costs = schedule_costs(workload, schedule, hw)
    sim = Simulator(costs)
    ends: list[float] = []
    times = sim.run(lambda f: ends.append(float(sim.env.now)))
    metrics = build_metrics("sim", workload, schedule, costs, times, lower_bound(costs))
    return metrics, np.diff(np.concatenate([[0.0], ends]))
