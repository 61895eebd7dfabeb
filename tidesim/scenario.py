"""One scenario, resolved once: the trace's workload, the hardware profile, the GPU expert budget
and the refresh interval (each with the reason it was chosen), the refresh mode, the executor and an
optional plan (or per-layer settings solved for it), checked together. `resolve` is the one place
that turns what a user gives (names, paths, optional numbers) into a Scenario; `assemble` is the same
for a workload and profile already in memory (a sweep point, a demo case, validate's window). Every
command and job resolves through them, then runs policies with tidesim.evaluate.evaluate.

A Scenario is frozen and hashable by content (`key`: the workload's digest, the profile's
fingerprint, the plan's fingerprint and the resolved numbers), never by object identity, so it can
key a cache and two scenarios built from the same inputs are equal. Warnings (a plan forced onto
other inputs) and notes (what the tau search's cost lookups estimated) are returned in it, not
printed: the caller says them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tidesim.budget import check_budget, default_budget
from tidesim.default_tau import TauChoice, choose_tau
from tidesim.errors import InputError
from tidesim.hardware import HardwareProfile, get_profile
from tidesim.limits import check_tau
from tidesim.notes import collecting
from tidesim.plan import Plan, plan_slots
from tidesim.policies.options import PolicyOptions, uniform
from tidesim.policies.registry import plan_runner, traits
from tidesim.trace.schema import Trace
from tidesim.workload import Workload, check_prompt_ids


@dataclass(frozen=True)
class PerLayer:
    """Per-layer tau and budget solved for one scenario (a sweep's planned point), without a plan file."""

    tau: tuple[int, ...]
    budget: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Scenario:
    """Everything a simulate/compare run needs, resolved and checked (see the module docstring)."""

    trace: str
    workload: Workload
    hw: HardwareProfile
    budget: int
    budget_source: str
    tau: int
    refresh: str
    engine: str
    plan: Plan | None = None              # per-layer tau and budget for the policy that runs a plan
    tau_choice: TauChoice | None = None   # where tau came from (None: no policy run uses it)
    warnings: tuple[str, ...] = field(default=())
    notes: tuple[str, ...] = field(default=())    # what resolving estimated (the tau search's cost lookups)
    warmup_fraction: float = 0.1          # the static policies' warm-up share (PolicyOptions)
    per_layer: PerLayer | None = None     # solved per-layer settings for the plan-running policy

    @cached_property
    def key(self) -> tuple[Any, ...]:
        """The scenario's content: what its hash and equality use."""
        plan = None if self.plan is None else self.plan.digest()
        return (self.workload.digest, self.hw.fingerprint(), self.budget, self.tau, self.refresh,
                self.engine, plan, self.warmup_fraction, self.per_layer)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scenario) and self.key == other.key

    def options(self, policy: str) -> PolicyOptions:
        """The plan's per-layer settings for the policy that runs it (the plan's runner: the plan-running
        policy for a tide plan, the plan's policy otherwise); the uniform budget and tau for the others."""
        layers = self.workload.num_layers
        if self.plan is not None and policy == plan_runner(self.plan.policy):
            return PolicyOptions(budget=self.plan.budget_array(), tau=self.plan.tau_array(), hw=self.hw,
                                 refresh=self.plan.refresh, warmup_fraction=self.warmup_fraction,
                                 extra={"plan": self.plan})
        if self.per_layer is not None and traits(policy).needs_plan:
            return PolicyOptions(budget=np.asarray(self.per_layer.budget, np.int64),
                                 tau=np.asarray(self.per_layer.tau, np.int64), hw=self.hw, refresh=self.refresh,
                                 warmup_fraction=self.warmup_fraction)
        return PolicyOptions(budget=uniform(self.budget, layers), tau=uniform(self.tau, layers), hw=self.hw,
                             refresh=self.refresh, warmup_fraction=self.warmup_fraction)

    def describe(self) -> dict[str, Any]:
        w = self.workload
        return {"trace": self.trace, "model": w.model.name, "kv_cache": w.kv_cache,
                **({"decode": w.decode} if w.decode != "diffusion" else {}),   # diffusion: as before the field
                "forwards": w.num_forwards,
                "generated_tokens": w.generated_tokens, "prompts": sorted({int(p) for p in w.prompt}),
                "hw": self.hw.name, "budget": self.budget, "budget_source": self.budget_source, "tau": self.tau,
                "tau_choice": self.tau_choice.to_dict() if self.tau_choice else None,
                "refresh": self.refresh, "engine": self.engine,
                **({"expert_slots": plan_slots(self.plan)} if self.plan else {}),
                **({"budget": "per layer (plan)", "budget_source": "--plan", "tau": "per layer (plan)",
                    "refresh": self.plan.refresh} if self.plan and self.tau_choice is None else {})}

    @property
    def tau_line(self) -> str | None:
        """The printed tau and its reason, when a policy that was run uses it."""
        return self.tau_choice.line if self.tau_choice else None


def resolve(trace: str, hw: str | HardwareProfile, policies: list[str], *, budget: int | None = None,
            gpu_mem_gib: float | None = None, tau: int | None = None, refresh: str = "sync", engine: str = "sim",
            prompts: str | None = None, model: str | None = None, allow_roofline: bool = False,
            plan: Plan | None = None, force: bool = False) -> Scenario:
    """Resolve and check the inputs for running `policies`; every problem is an InputError (one line
    naming the flag). The trace (a path or bundled name) is read here; the rest is `assemble`."""
    path, data, workload = read_inputs(trace, model)
    if prompts is not None:              # an empty --prompts= is refused, not "all prompts"
        workload = workload.select_prompts(prompt_ids(prompts, data.prompt_ids))
    profile = profile_of(hw)
    warnings: list[str] = []
    check_tau(tau)
    if plan is not None:         # another model: refused; another trace or profile: refused unless force
        warnings += plan.check_inputs(workload.model, path, profile, force=force)
    return assemble(str(path), workload, profile, policies, budget=budget, gpu_mem_gib=gpu_mem_gib, tau=tau,
                    refresh=refresh, engine=engine, allow_roofline=allow_roofline, plan=plan,
                    warnings=tuple(warnings))


def assemble(trace: str, workload: Workload, hw: HardwareProfile, policies: list[str], *,
             budget: int | None = None, gpu_mem_gib: float | None = None,
             budget_cap: int | None | Literal["tide"] = "tide", tau: int | None = None, refresh: str = "sync",
             engine: str = "sim", allow_roofline: bool = False, plan: Plan | None = None,
             warnings: tuple[str, ...] = (), notes: tuple[str, ...] = (), warmup_fraction: float = 0.1,
             per_layer: PerLayer | None = None) -> Scenario:
    """`resolve` for a workload and profile already in memory (a sweep point, the demo, a bench):
    the budget follows the default-budget rule unless given (tidesim.budget.default_budget, with
    `budget_cap`), tau the default-tau rule (tidesim.default_tau) when a policy that uses it is run.
    What the tau search's cost lookups noted is kept in the scenario's notes, with `notes` (what the
    caller's own resolving noted, e.g. a planner run)."""
    check_tau(tau)
    slots, source = resolve_budget(budget, gpu_mem_gib, workload, hw, budget_cap)
    if not allow_roofline:
        check_curves(hw, workload, policies)
    uses_tau = any(traits(p).uses_tau for p in policies)
    with collecting() as raised:
        choice = choose_tau(workload, hw, slots, refresh, tau, plan) if uses_tau else None
    return Scenario(trace=trace, workload=workload, hw=hw, budget=slots, budget_source=source,
                    tau=choice.tau if choice else 1, refresh=refresh, engine=engine, plan=plan, tau_choice=choice,
                    warnings=warnings, notes=tuple(sorted(raised | set(notes))), warmup_fraction=warmup_fraction,
                    per_layer=per_layer)


def profile_of(hw: str | HardwareProfile) -> HardwareProfile:
    """The hardware profile: a bundled name or a YAML path (hardware.get_profile), or one in memory."""
    return hw if isinstance(hw, HardwareProfile) else get_profile(hw)


def read_inputs(trace: str, model: str | None = None) -> tuple[Path, Trace, Workload]:
    """The trace (a path or a bundled name: bundled.paths.resolve_trace), read and reduced to a
    workload of its own model or of `model` (which must match its shapes): the one trace lookup of
    resolve and resolve_plan."""
    from tidesim.bundled.paths import resolve_trace
    from tidesim.models import get_model
    from tidesim.trace.io import read_trace
    from tidesim.workload import workload_from_trace

    path = resolve_trace(trace)
    data = read_trace(path)
    return path, data, workload_from_trace(data, get_model(model) if model else None)


def prompt_ids(text: str, available: list[int], flag: str = "--prompts") -> list[int]:
    """--prompts "0,2" as prompt ids of the trace (refused: empty, not numbers, not in the trace)."""
    ids = int_list(text, flag, "prompt ids",
                   f"{flag} is empty; give prompt ids such as 0,1 or leave the flag out for all prompts")
    check_prompt_ids(ids, available, flag)
    return ids


def int_list(text: str, flag: str, what: str = "integers", empty: str | None = None) -> list[int]:
    """A flag's comma-separated integers, in the order given (--prompts; validate's --budgets and
    --taus); refused: not integers, or none (with `empty`, else "needs at least one value")."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{flag} must be comma-separated {what}, got {text!r}") from None
    if not values:
        raise InputError(empty or f"{flag} needs at least one value")
    return values


@dataclass(frozen=True, eq=False)
class PlanInputs:
    """What `tidesim plan` runs the planner on, resolved and checked by resolve_plan: the trace's
    workload (every prompt), the profile, the knapsack's slots from the memory budget, the
    calibration and held-out prompts, and the candidate grids."""

    trace: Path
    workload: Workload
    hw: HardwareProfile
    gpu_mem_gib: float
    slots: int
    calibration: list[int]
    heldout: list[int]
    taus: list[int]
    budgets: list[int]


def resolve_plan(trace: str, hw: str | HardwareProfile, gpu_mem_gib: float, policy: str, *,
                 calibrate_prompts: list[int] | None = None, taus: list[int] | None = None,
                 budgets: list[int] | None = None, allow_roofline: bool = False) -> PlanInputs:
    """`resolve` for the planner: the same trace lookup, profile lookup and measured-curves check,
    the --calibrate-prompts ids checked as --prompts' are (workload.check_prompt_ids, in
    planner.split_prompts, default the first half), the memory rule (budget.expert_slots) and the --tau and --budget
    checks on the grids (planner.plan_grid). The planner keeps its grids; it sits below this floor."""
    from tidesim.planner import plan_grid, split_prompts

    path, data, workload = read_inputs(trace)
    profile = profile_of(hw)
    calib, held = split_prompts(data.prompt_ids, calibrate_prompts)   # ids checked as --prompts' are
    slots, taus, budgets = plan_grid(workload.model, gpu_mem_gib, taus, budgets)
    if not allow_roofline:
        check_curves(profile, workload, [policy])
    return PlanInputs(trace=path, workload=workload, hw=profile, gpu_mem_gib=gpu_mem_gib, slots=slots,
                      calibration=calib, heldout=held, taus=taus, budgets=budgets)


def resolve_budget(budget: int | None, gpu_mem_gib: float | None, workload: Workload, hw: HardwareProfile,
                   cap: int | None | Literal["tide"] = "tide") -> tuple[int, str]:
    """The budget and its reason: --budget checked (budget.check_budget), else the default-budget
    rule (budget.default_budget) on --gpu-mem-gib or the profile's GPU memory."""
    spec = workload.model
    if budget is not None:
        check_budget(budget, spec.num_experts, model=spec.name)
        return budget, "--budget"
    memory = gpu_mem_gib if gpu_mem_gib is not None else hw.gpu.memory_gib
    where = "--gpu-mem-gib" if gpu_mem_gib is not None else f"{hw.name} GPU memory"
    choice = default_budget(spec, memory, where, cap)
    return choice.slots, choice.reason


def check_curves(hw: HardwareProfile, workload: Workload, policies: list[str]) -> None:
    """A measured profile must have expert curves for this model's expert shape on every device
    the policies use; datasheet presets are roofline by design (and say so in their notes)."""
    if hw.provenance.kind != "measured":
        return
    spec = workload.model
    shape = f"{spec.hidden_size}x{spec.moe_intermediate_size}"
    need = [("gpu", hw.gpu.expert_ffn)]
    cpu_users = sorted(p for p in policies if traits(p).needs_cpu)
    if cpu_users:
        need.append(("cpu", hw.cpu.expert_ffn))
    for device, curves in need:
        if not any(c.matches(spec) for c in curves):
            users = ", ".join(cpu_users) if device == "cpu" else "every policy"
            raise InputError(f"measured profile {hw.name!r} has no {device}.expert_ffn curve for {shape} experts "
                             f"({spec.name}), which {users} needs; run `tidesim calibrate` for this model or pass "
                             "--allow-roofline")


def decode_label(described: dict[str, Any]) -> str:
    """How a header names the decode: the KV-cache mode of a diffusion decode, or "autoregressive"
    (one forward per token after a prefill, always with a KV cache)."""
    if described.get("decode") == "autoregressive":
        return "autoregressive decode, KV cache"
    return f"{described['kv_cache']} KV cache"
