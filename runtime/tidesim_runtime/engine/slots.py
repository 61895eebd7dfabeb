"""Routed-expert weights: every expert in host memory (pinned by the executor on CUDA), a fixed
pool of GPU slots per layer, and the slot plan that says which slot each copy of a Schedule lands in.

The slot pool is preallocated once from the Schedule's budget (plus spare slots only where the
Schedule needs more experts on the GPU at one moment than its budget, which the plan counts and
reports), so no allocation happens while timing. The plan is computed on the host before the run,
deterministically (lowest free slot first), from the Schedule alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from tidesim.errors import InputError
from tidesim.models import ModelSpec
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_ON_DEMAND, COPY_SYNC_REFRESH, GPU, Schedule
from tidesim_runtime.engine.pinned import page_aligned_empty


@dataclass(frozen=True)
class SlotWait:
    """When the slot a copy lands in is free: FREE (now), AFTER_GROUPED (once the layer's
    grouped kernel has run: its expert runs there), or after_on_demand(k) (once the k-th
    on-demand expert of this layer-forward, which passed through that slot, has run)."""

    state: str                 # "free", "after-grouped" or "after-on-demand"
    on_demand: int | None = None

    def __str__(self) -> str:
        return self.state if self.on_demand is None else f"{self.state} {self.on_demand}"


FREE = SlotWait("free")
AFTER_GROUPED = SlotWait("after-grouped")


def after_on_demand(k: int) -> SlotWait:
    return SlotWait("after-on-demand", k)


def expert_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    """Bytes of one routed expert in the runtime's dtype (not the model's)."""
    return 3 * spec.hidden_size * spec.moe_intermediate_size * torch.empty(0, dtype=dtype).element_size()


@dataclass
class ExpertBank:
    """Experts stored one contiguous row each, flat [N, 3 x I x H], so one expert is one copy;
    w13 [N, 2I, H] and w2 [N, H, I] are views of the same memory."""

    flat: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor

    @classmethod
    def empty(cls, spec: ModelSpec, n: int, device: torch.device, dtype: torch.dtype,
              zero: bool = True) -> ExpertBank:
        """zero=True touches every page now (slot pools: no page faults while timing). Host banks
        start on a page boundary, so the executor can pin them at their exact size (pinned.py)."""
        h, i = spec.hidden_size, spec.moe_intermediate_size
        shape = (max(n, 1), 3 * i * h)
        flat = (page_aligned_empty(shape, dtype) if device.type == "cpu"
                else torch.empty(shape, dtype=dtype, device=device))
        if zero:
            flat.zero_()
        return cls(flat, flat[:, :2 * i * h].view(-1, 2 * i, h), flat[:, 2 * i * h:].view(-1, h, i))


def random_host_experts(spec: ModelSpec, layers: int, dtype: torch.dtype, seed: int) -> list[ExpertBank]:
    """All routed experts of `layers` MoE layers in host memory, random.

    Timing depends on shapes, not values: one random expert per layer is generated and copied
    into every expert of that layer, so each expert has its own memory (the working set is the
    real one) and filling many GB is a memcpy rather than a random-number run.
    """
    h, i = spec.hidden_size, spec.moe_intermediate_size
    gen = torch.Generator().manual_seed(seed)
    banks = []
    for _ in range(layers):
        bank = ExpertBank.empty(spec, spec.num_experts, torch.device("cpu"), dtype, zero=False)
        w13 = torch.randn(2 * i, h, generator=gen) / math.sqrt(h)
        w2 = torch.randn(h, i, generator=gen) / math.sqrt(i)
        row = torch.cat([w13.reshape(-1), w2.reshape(-1)]).to(dtype)
        bank.flat.copy_(row.expand_as(bank.flat))
        banks.append(bank)
    return banks


def host_experts_from(spec: ModelSpec, per_layer: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
                      ) -> list[ExpertBank]:
    """Host banks from given weights per layer (w13 [E, 2I, H], w2 [E, H, I]), stored in `dtype`,
    the executor's staging dtype, so a copy into a slot is a plain byte copy."""
    banks = []
    for w13, w2 in per_layer:
        bank = ExpertBank.empty(spec, w13.shape[0], torch.device("cpu"), dtype, zero=False)
        bank.w13.copy_(w13)
        bank.w2.copy_(w2)
        banks.append(bank)
    return banks


@dataclass
class CopyOp:
    """One expert copy into `slot`, issued once the slot is free (`wait`)."""

    expert: int
    slot: int
    wait: SlotWait = FREE


@dataclass
class LayerPlan:
    """What one layer-forward does with slots, in issue order."""

    demotes: list[tuple[int, int]] = field(default_factory=list)     # (expert, slot) D2H
    sync: list[CopyOp] = field(default_factory=list)
    grouped: list[tuple[int, int]] = field(default_factory=list)     # (expert, slot) in the grouped kernel
    on_demand: list[CopyOp] = field(default_factory=list)            # each computed after its copy
    background: list[CopyOp] = field(default_factory=list)           # asynchronous refresh
    cpu: list[int] = field(default_factory=list)                     # experts computed on the CPU


@dataclass
class SlotPlan:
    """Plans [F][L] and the pool size per layer (budget + spare)."""

    layers: list[list[LayerPlan]]
    pool_size: list[int]
    initial_slots: list[dict[int, int]]   # layer -> {expert: slot} before the first forward
    spare: list[int]


def plan_slots(schedule: Schedule) -> SlotPlan:
    """Assign a slot to every copy of the Schedule (lowest free slot first).

    A slot frees when its expert leaves the resident set: at once if that expert does not run on
    the GPU in this forward, else after its run (the grouped kernel, or its own on-demand run when
    it only passed through). A copy with no free slot takes a slot that frees later in this forward
    (and its copy waits for that), and only if none exists, a spare slot beyond the budget.
    """
    F, L, E = schedule.placement.shape
    before_all = schedule.resident_before()
    plans: list[list[LayerPlan]] = [[LayerPlan() for _ in range(L)] for _ in range(F)]
    pool_size, initial_slots, spare = [], [], []
    for layer in range(L):
        budget = int(schedule.budget[layer])
        init = np.flatnonzero(schedule.initial_resident[layer]).tolist()
        slot_of = {e: s for s, e in enumerate(init)}
        initial_slots.append(dict(slot_of))
        size = max(budget, len(init))
        free = sorted(set(range(size)) - set(slot_of.values()))
        for fw in range(F):
            size, free = _plan_layer_forward(plans[fw][layer], schedule, fw, layer, before_all[fw, layer],
                                             slot_of, free, size)
        pool_size.append(size)
        spare.append(size - budget)
    del E
    return SlotPlan(plans, pool_size, initial_slots, spare)


def _plan_layer_forward(plan: LayerPlan, schedule: Schedule, fw: int, layer: int, before: np.ndarray,
                        slot_of: dict[int, int], free: list[int], size: int) -> tuple[int, list[int]]:
    place = schedule.placement[fw, layer]
    copy = schedule.copy[fw, layer]
    after = schedule.resident[fw, layer]
    demote = schedule.demote[fw, layer]
    runs_gpu = place == GPU
    deferred: list[tuple[int, SlotWait]] = []   # (slot, when it frees), in the order they free
    using: dict[int, int] = {}             # expert -> slot for this forward's GPU runs
    for e in np.flatnonzero(before & ~after).tolist():
        s = slot_of.pop(e)
        if demote[e]:
            plan.demotes.append((e, s))
        if runs_gpu[e] and copy[e] == 0:
            using[e] = s
            deferred.append((s, AFTER_GROUPED))
        else:
            free.append(s)
    free.sort()

    def take(allow_deferred: bool) -> tuple[int, SlotWait]:
        nonlocal size
        if free:
            return free.pop(0), FREE
        if allow_deferred and deferred:
            return deferred.pop(0)
        size += 1
        return size - 1, FREE

    for e in np.flatnonzero(copy == COPY_SYNC_REFRESH).tolist():
        s, _ = take(allow_deferred=False)
        plan.sync.append(CopyOp(e, s))
        slot_of[e] = s
    for e in np.flatnonzero(runs_gpu & (copy != COPY_ON_DEMAND)).tolist():
        slot = slot_of.get(e, using.get(e))
        if slot is None:
            raise InputError(f"forward {fw} MoE layer {layer} expert {e} runs on the GPU without a slot; "
                             "the schedule is inconsistent (check it with schedule_problems)")
        plan.grouped.append((e, slot))
    for k, e in enumerate(np.flatnonzero(copy == COPY_ON_DEMAND).tolist()):
        s, wait = take(allow_deferred=True)
        plan.on_demand.append(CopyOp(e, s, wait))
        if after[e]:
            slot_of[e] = s
        else:
            deferred.append((s, after_on_demand(k)))
    for e in np.flatnonzero(copy == COPY_ASYNC_REFRESH).tolist():
        s, wait = take(allow_deferred=True)
        plan.background.append(CopyOp(e, s, wait))
        slot_of[e] = s
    plan.cpu = np.flatnonzero(place == 2).tolist()
    free = sorted(free + [s for s, _ in deferred])
    return size, free
