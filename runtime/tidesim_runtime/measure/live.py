"""Live mode and the lossless check: the reference model decodes with its own routing, and every
MoE layer's routed experts run through the executor, placed as a policy's Schedule says.

1. A plain single-device decode (the model's own expert loop) gives the reference tokens and,
   through the capture hooks, the routing of every forward.
2. The policy turns that routing into a Schedule (policies are causal: each placement depends
   only on routing seen so far, so using the whole decode's routing changes nothing).
3. The same prompt is decoded again with every MoE block's expert runner replaced by the
   executor: GPU-resident experts in slots (grouped kernel), copies through the copy engine,
   CPU experts on the worker pool. At each layer the live routing must equal the routing the
   Schedule was made for (checked), and the decoded tokens must equal the reference tokens.

Any difference is a lossless failure (a pair computed twice, dropped, or with other weights).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import torch

from tidesim.metrics import Metrics
from tidesim.policies import PolicyOptions, build_schedule
from tidesim.schedule import Schedule
from tidesim.workload import Workload, workload_from_trace
from tidesim_runtime.engine.device import DeviceInfo
from tidesim_runtime.engine.executor import Executor, router_routing
from tidesim_runtime.engine.slots import host_experts_from, plan_slots
from tidesim_runtime.measure.kernel_reference import same_kernel_reference
from tidesim_runtime.reference.capture import CaptureSettings, capture_trace
from tidesim_runtime.reference.generate import DecodeConfig, ForwardRecord, generate
from tidesim_runtime.reference.model import ExpertRunner, LLaDA2Model, SparseMoeBlock


class RoutingMismatch(RuntimeError):
    """The live routing differs from the routing the Schedule was made for."""


@dataclass
class LosslessResult:
    """One policy's live decode against the plain decode."""

    policy: str
    kv_cache: str
    identical: bool
    reference_tokens: list[int]
    live_tokens: list[int]
    forwards: int
    metrics: Metrics | None = None
    problems: list[str] = field(default_factory=list)


def stacked_experts(block: SparseMoeBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's experts as w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I]."""
    def weight(m: Any, name: str) -> torch.Tensor:
        return cast(torch.Tensor, getattr(m, name).weight)

    w13 = torch.stack([torch.cat([weight(m, "gate_proj"), weight(m, "up_proj")], dim=0) for m in block.experts])
    w2 = torch.stack([weight(m, "down_proj") for m in block.experts])
    return w13.detach(), w2.detach()


class DeviceForward:
    """The model run on `device`: decoding (generate.py) keeps its token ids and masks on the
    host, so each forward moves its inputs and cache to the model's device and returns the
    logits on the host. The cache stays on the device between forwards."""

    def __init__(self, model: LLaDA2Model, device: torch.device) -> None:
        self.model = model
        self.device = device

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 past: list[tuple[torch.Tensor, torch.Tensor]] | None = None, logits_last: int | None = None
                 ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        d = self.device
        moved = [(k.to(d), v.to(d)) for k, v in past] if past is not None else None
        logits, cache = self.model(input_ids.to(d), positions.to(d), mask.to(d), moved, logits_last)
        return logits.cpu(), cache


def model_on(model: LLaDA2Model, device: DeviceInfo) -> LLaDA2Model:
    """The model on the device's torch device (the same object when it is already there)."""
    return model.to(device.torch_device) if device.is_cuda else model


def reference_decode(model: LLaDA2Model, prompt: Sequence[int], cfg: DecodeConfig,
                     device: DeviceInfo | None = None) -> tuple[list[int], Workload]:
    """Tokens of a plain decode (on `device` when it is CUDA) and the workload of its routing; its
    routed experts run the runtime's CPU expert kernel where that changes the model's bits
    (kernel_reference.py)."""
    settings = CaptureSettings(weights="reference model", compute_dtype=str(model.dtype).replace("torch.", ""))
    forward = DeviceForward(model_on(model, device), device.torch_device) if device and device.is_cuda else None
    with same_kernel_reference(model):
        trace, outputs = capture_trace(model, model.spec, [list(prompt)], cfg, settings, seed=None, forward=forward)
    return outputs[0], workload_from_trace(trace)


def live_device(model: LLaDA2Model, device: DeviceInfo) -> DeviceInfo:
    """The executor's device for live mode: the device, in the model's dtype (so the executor's
    staging banks, slots and kernels compute what the model computes)."""
    return replace(device, dtype=model.dtype)


def live_decode(model: LLaDA2Model, prompt: Sequence[int], cfg: DecodeConfig, workload: Workload,
                schedule: Schedule, device: DeviceInfo) -> tuple[list[int], Metrics]:
    """Decode through the executor with `schedule`'s placement; returns tokens and measured metrics.

    On CUDA the model runs on the GPU (DeviceForward); on either path the expert runner moves
    the hidden states, expert ids and weights it is given to the executor's device and returns
    the result on the caller's device and dtype."""
    spec = model.spec
    dev = live_device(model, device)
    model = model_on(model, device)
    blocks = model.moe_blocks()
    host = host_experts_from(spec, [stacked_experts(b) for _, b in blocks], dev.dtype)
    plan = plan_slots(schedule)
    executor = Executor(spec, len(blocks), dev, max_tokens=int(workload.tokens.max()),
                        max_context=int(workload.context.max()), forward_fixed=False, host_experts=host)
    state = {"forward": 0}
    saved = [b.expert_runner for _, b in blocks]
    target = dev.torch_device

    def runner_for(layer: int) -> ExpertRunner:
        def run(block: SparseMoeBlock, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            f = state["forward"]
            routing = router_routing(idx, w, spec.num_experts, target)
            if f >= workload.num_forwards or not np.array_equal(routing.counts, workload.expert_tokens[f, layer]):
                raise RoutingMismatch(f"forward {f} MoE layer {layer}: the live routing differs from the "
                                      "routing the schedule was made for")
            y = executor.moe_layer(x, layer, 0, routing, plan.layers[f][layer], moe_in=x.to(target, dev.dtype))
            return y.to(x.device, x.dtype)
        return run

    def on_forward(_: ForwardRecord) -> None:
        state["forward"] += 1

    try:
        executor.prepare_slots(plan)
        for i, (_, block) in enumerate(blocks):
            block.expert_runner = runner_for(i)
        executor.begin()
        # TODO(#11): when generate takes a device, pass it instead of wrapping the model here.
        drive = DeviceForward(model, target) if dev.is_cuda else model
        result = generate(drive, list(prompt), cfg, spec.mask_token_id, spec.eos_token_id, on_forward)
        record = executor.finish()
    finally:
        for (_, block), fn in zip(blocks, saved, strict=True):
            block.expert_runner = fn
        executor.close()
    return result.generated, executor.metrics(workload, schedule, record, plan)


def lossless_check(model: LLaDA2Model, prompt: Sequence[int], cfg: DecodeConfig, policy: str,
                   options: PolicyOptions, device: DeviceInfo) -> LosslessResult:
    """Plain decode vs live decode through the executor under `policy`."""
    return lossless_checks(model, prompt, cfg, [(policy, options)], device)[0]


def lossless_checks(model: LLaDA2Model, prompt: Sequence[int], cfg: DecodeConfig,
                    runs: Sequence[tuple[str, PolicyOptions]], device: DeviceInfo, float32: bool = False
                    ) -> list[LosslessResult]:
    """One plain decode, then a live decode per (policy, options), each compared with it.

    float32: check a float32 copy of the model (the timed runs stay in the model's dtype). Both
    decodes then run on the same device in float32, routing weights in float32 and every
    token's routed outputs added in the reference model's order (kernels.combine_pairs), so on a
    GPU too a difference means a pair computed wrongly, not bf16 rounding."""
    if float32 and model.dtype != torch.float32:
        model = copy.deepcopy(model).float()
        model.dtype = torch.float32
    ref_tokens, workload = reference_decode(model, prompt, cfg, device)
    out = []
    for policy, options in runs:
        schedule = build_schedule(policy, workload, options)
        label = policy + (f" {options.refresh}" if options.refresh != "sync" else "")
        try:
            live_tokens, metrics = live_decode(model, prompt, cfg, workload, schedule, device)
        except RoutingMismatch as exc:
            out.append(LosslessResult(label, cfg.kv_cache, False, ref_tokens, [], workload.num_forwards, None,
                                      [str(exc)]))
            continue
        problems: list[str] = []
        if live_tokens != ref_tokens:
            first = next((i for i, (a, b) in enumerate(zip(ref_tokens, live_tokens, strict=False)) if a != b),
                         min(len(ref_tokens), len(live_tokens)))
            problems.append(f"tokens differ from position {first}")
        out.append(LosslessResult(label, cfg.kv_cache, not problems, ref_tokens, live_tokens, workload.num_forwards,
                                  metrics, problems))
    return out
