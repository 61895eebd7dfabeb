"""GPU expert budgets from GPU memory, the way the public TIDE code sizes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tidesim.errors import InputError
from tidesim.models import ModelSpec

GIB = 2**30


def reserve_bytes(gpu_mem_bytes: float) -> float:
    """Memory kept free for activations and the allocator: max(1.5 GB, 10% of the card)."""
    return max(1.5e9, 0.10 * gpu_mem_bytes)


def expert_memory_bytes(model: ModelSpec, gpu_mem_gib: float) -> float:
    """Bytes left for routed-expert slots after the non-expert weights and the reserve."""
    total = gpu_mem_gib * GIB
    return total - model.non_expert_bytes - reserve_bytes(total)


def expert_slots(model: ModelSpec, gpu_mem_gib: float) -> int:
    """Expert slots (over all MoE layers) `gpu_mem_gib` holds next to the non-expert weights and the
    reserve: the one memory rule (the uniform budget and the planner's knapsack row both read it).
    InputError when not even one expert per layer fits."""
    if not gpu_mem_gib > 0:
        raise InputError(f"GPU memory must be positive, got {gpu_mem_gib} GiB")
    free = expert_memory_bytes(model, gpu_mem_gib)
    slots = int(free // model.expert_bytes) if free > 0 else 0
    if slots < model.num_moe_layers:
        need = (model.non_expert_bytes + model.expert_bytes * model.num_moe_layers) / GIB
        raise InputError(
            f"{gpu_mem_gib:g} GiB of GPU memory does not hold {model.name}'s non-expert weights plus one expert "
            f"per MoE layer and the reserve (needs {need:.2f} GiB plus the reserve of max(1.5 GB, 10%)); "
            "give more memory"
        )
    return slots


def budget_for_memory(model: ModelSpec, gpu_mem_gib: float, max_per_layer: int | None = None) -> int:
    """Uniform expert slots per MoE layer that fit: min(max_per_layer, expert_slots / layers).

    Raises InputError when not even one expert per layer fits.
    """
    per_layer = expert_slots(model, gpu_mem_gib) // model.num_moe_layers
    cap = model.num_experts if max_per_layer is None else min(max_per_layer, model.num_experts)
    return min(per_layer, cap)


def live_budget(experts: int) -> int:
    """The budget where no GPU memory sets one (a live run, validate, trace statistics without the
    TIDE scripts' cap): half the experts per layer; the runtime checks the device's memory itself."""
    return experts // 2


def check_budget(budget: int, experts: int, flag: str = "--budget", model: str | None = None) -> None:
    """The one range check of a GPU expert budget per layer (--budget, a --budgets grid, a policy's
    per-layer budget): 0..the model's experts per layer."""
    if not 0 <= budget <= experts:
        where = f" for {model}" if model else ""
        raise InputError(f"{flag} must lie in 0..{experts} experts per layer{where} "
                         f"(it must not exceed the model's experts), got {budget}")


def memory_for_budget(model: ModelSpec, per_layer: int) -> float:
    """GiB of GPU memory that holds the non-expert weights, `per_layer` experts in every MoE layer and
    the reserve: the memory budget equivalent to a uniform expert budget (inverse of budget_for_memory).
    Half an expert more than exact, so that rounding in the GiB conversion never leaves the room one
    byte short of per_layer x layers experts (the planner's slots must equal tide's budget)."""
    weights = model.non_expert_bytes + (per_layer * model.num_moe_layers + 0.5) * model.expert_bytes
    return max(weights + 1.5e9, weights / 0.9) / GIB


# Per-layer caps the public TIDE code's evaluation scripts use (docs/sources.md).
TIDE_MAX_EXPERTS_PER_LAYER = {"llada2-mini": 128, "llada2-flash": 96}


@dataclass(frozen=True)
class BudgetChoice:
    """A uniform GPU expert budget per MoE layer and where it came from (printed with it)."""

    slots: int
    reason: str


def default_budget(model: ModelSpec, memory_gib: float, source: str, cap: int | None | Literal["tide"] = "tide"
                   ) -> BudgetChoice:
    """The default-budget rule of every command: as many experts per layer as `memory_gib` of GPU
    memory holds (budget_for_memory), capped as the public TIDE code's scripts cap this model
    (`cap` "tide"; a sweep may give its own cap, or None for none). `source` says where the memory
    figure came from (a flag, a profile)."""
    cap = TIDE_MAX_EXPERTS_PER_LAYER.get(model.name) if cap == "tide" else cap
    slots = budget_for_memory(model, memory_gib, cap)
    reason = f"{source} ({memory_gib:g} GiB" + (f", capped at {cap} as in the TIDE scripts)" if cap else ")")
    return BudgetChoice(slots, reason)
