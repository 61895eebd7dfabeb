"""Validation: the simulator's prediction and the runtime's measurement of the same Schedules.

For every configuration (policy x budget x tau) the policy builds ONE Schedule; the simulator
(tidesim.run, engine "sim") predicts it with the hardware profile and the executor runs it. A
difference is therefore a cost-model error, never a policy drift. Results: one row per
configuration with both Metrics and the step-time error, (predicted - measured) / measured.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tidesim.budget import check_budget
from tidesim.errors import InputError
from tidesim.hardware import HardwareProfile
from tidesim.limits import check_tau
from tidesim.metrics import Metrics
from tidesim.plan import Plan
from tidesim.policies import PolicyOptions, build_schedule, uniform
from tidesim.policies.registry import traits
from tidesim.run import run
from tidesim.schedule import Schedule
from tidesim.workload import Workload
from tidesim_runtime.engine.device import DeviceInfo
from tidesim_runtime.engine.executor import Executor, check_memory
from tidesim_runtime.engine.slots import plan_slots
from tidesim_runtime.engine.streams import Backend
from tidesim_runtime.measure.resources import FixedPath
from tidesim_runtime.measure.timer import Timer


@dataclass(frozen=True)
class Config:
    """One validated configuration."""

    policy: str
    budget: int
    tau: int | None
    refresh: str

    @property
    def label(self) -> str:
        parts = [self.policy, f"B={self.budget}"]
        if self.tau is not None:
            parts.append(f"tau={self.tau}")
        if traits(self.policy).uses_tau and self.refresh != "sync":
            parts.append(self.refresh)
        return " ".join(parts)


@dataclass
class Outcome:
    """Prediction and measurement of one configuration."""

    config: Config
    predicted: Metrics
    measured: Metrics
    repeats_s: list[float] = field(default_factory=list)   # measured step times of every repeat
    probe_s: list[float] = field(default_factory=list)     # the speed probe right before each repeat
    probe_expected_s: float = 0.0                          # what the profile says the probe takes

    @property
    def error(self) -> float:
        """(predicted - measured) / measured step time."""
        m = self.measured.step_time_s
        return (self.predicted.step_time_s - m) / m if m > 0 else float("nan")

    def row(self) -> dict[str, Any]:
        p, m = self.predicted, self.measured
        return {
            "config": self.config.label, "policy": self.config.policy, "budget": self.config.budget,
            "tau": self.config.tau, "refresh": self.config.refresh,
            "predicted_step_ms": p.step_time_s * 1e3, "measured_step_ms": m.step_time_s * 1e3,
            "error": self.error, "abs_error": abs(self.error),
            "measured_spread_ms": (max(self.repeats_s) - min(self.repeats_s)) * 1e3 / 2 if self.repeats_s else 0.0,
            "hit_ratio": m.hit_ratio, "expert_copies": m.expert_copies,
            "predicted_copy_stall_ms": p.copy_stall_s * 1e3, "measured_copy_stall_ms": m.copy_stall_s * 1e3,
            "predicted_cpu_busy_ms": p.busy_s.get("cpu", 0.0) * 1e3,
            "measured_cpu_busy_ms": m.busy_s.get("cpu", 0.0) * 1e3,
            "predicted_gpu_busy_ms": p.busy_s.get("gpu", 0.0) * 1e3,
            "measured_gpu_busy_ms": m.busy_s.get("gpu", 0.0) * 1e3,
        }


def configurations(policies: list[str], budgets: list[int], taus: list[int], refresh: str | list[str],
                   num_experts: int) -> list[Config]:
    """policy x budget x tau x refresh (tau and refresh only for the policies that use tau; a policy
    that ignores the budget once, at every expert). Several refresh modes run in one process, on one
    executor (the host expert banks are filled and pinned once)."""
    modes = [refresh] if isinstance(refresh, str) else list(refresh)
    out: list[Config] = []
    for policy in policies:
        kind = traits(policy)
        if kind.ignores_budget:
            out.append(Config(policy, num_experts, None, "sync"))
            continue
        for b in budgets:
            for tau in (taus if kind.uses_tau else [None]):
                for mode in (modes if kind.uses_tau else ["sync"]):
                    out.append(Config(policy, b, tau, mode))
    return list(dict.fromkeys(out))  # drop repeats, keep the order


def check_inputs(workload: Workload, configs: list[Config], device: DeviceInfo, plan: Plan | None) -> None:
    """Everything that can be refused before any work: budgets, memory, the plan's layers."""
    experts = workload.num_experts
    for c in configs:
        check_budget(c.budget, experts, "--budgets", workload.model.name)
        check_tau(c.tau, "--taus")
    if plan is not None and plan.num_layers < workload.num_layers:
        raise InputError(f"the plan covers {plan.num_layers} MoE layers but {workload.num_layers} are run")
    slots = max([c.budget for c in configs] + ([max(plan.budget)] if plan else []))
    check_memory(workload.model, workload.num_layers, device, slots, int(workload.tokens.max()),
                 int(workload.context.max()))


def build(config: Config, workload: Workload, hw: HardwareProfile, plan: Plan | None) -> Schedule:
    layers = workload.num_layers
    if traits(config.policy).needs_plan:
        if plan is None:
            raise InputError(f"the {config.policy} policy needs --plan FILE (from `tidesim plan`)")
        # the plan was checked against the whole model (validate_cmd); the run may be its first
        # layers (--layers), so its per-layer settings are passed as given rather than the plan
        opts = PolicyOptions(budget=plan.budget_array()[:layers], tau=plan.tau_array()[:layers], hw=hw,
                             refresh=plan.refresh)
    else:
        opts = PolicyOptions(budget=uniform(config.budget, layers), tau=uniform(config.tau or 1, layers), hw=hw,
                             refresh=config.refresh)
    return build_schedule(config.policy, workload, opts)


@dataclass
class SpeedProbe:
    """The machine's speed right before a measurement, against the profile: the executor's fixed
    per-layer path (FixedPath, what calibrate times for gpu.layer_fixed) at the workload's median
    tokens and context, median of PROBE_SAMPLES. Its ratio to the profile's charge for the same
    point says how much faster or slower the machine runs now than when it was calibrated (on a
    VM that drifts by 15% within a run, part of any error is that, not the model)."""

    path: FixedPath
    fn: Callable[[], None]
    timer: Timer
    expected_s: float

    @classmethod
    def of(cls, workload: Workload, hw: HardwareProfile, device: DeviceInfo, backend: Backend) -> SpeedProbe:
        t, c = int(np.median(workload.tokens)), int(np.median(workload.context))
        path = FixedPath(workload.model, device, max(t, c), seed=9)
        expected = float(hw.gpu_layer_fixed_time(np.array([t]), np.array([c]), workload.model)[0])
        return cls(path, path.fn(t, c), Timer(device, backend), expected)

    def sample_s(self) -> float:
        self.fn()                                    # one call first: the allocator, the caches
        return float(statistics.median(self.timer.sample(self.fn) for _ in range(PROBE_SAMPLES)))


PROBE_SAMPLES = 3


def validate(workload: Workload, hw: HardwareProfile, configs: list[Config], device: DeviceInfo,
             repeats: int = 1, plan: Plan | None = None, seed: int = 0,
             on_done: Callable[[Outcome], object] | None = None) -> list[Outcome]:
    """Predict and measure every configuration; repeats are interleaved over configurations (so
    a slow spell of the machine does not land on one of them) and the median run is kept; a speed
    probe (SpeedProbe) runs right before each measurement. `on_done` gets each configuration's
    outcome as soon as its last repeat is measured (so a run cut short keeps what it measured)."""
    schedules = [(c, build(c, workload, hw, plan)) for c in configs]
    pools = {c: plan_slots(s).pool_size for c, s in schedules}
    check_memory(workload.model, workload.num_layers, device, largest_pools(list(pools.values())),
                 int(workload.tokens.max()), int(workload.context.max()),
                 routing_pairs=int(workload.expert_tokens.sum()))
    predicted = {c: run(workload, s, hw, engine="sim") for c, s in schedules}
    runs: dict[Config, list[Metrics]] = {c: [] for c in configs}
    probes: dict[Config, list[float]] = {c: [] for c in configs}
    # the executor's largest slot pool first, so later configurations reuse or shrink memory
    order = sorted(schedules, key=lambda cs: -sum(pools[cs[0]]))
    with Executor(workload.model, workload.num_layers, device, int(workload.tokens.max()),
                  int(workload.context.max()), seed=seed) as ex:
        probe = SpeedProbe.of(workload, hw, device, ex.backend)
        for r in range(max(repeats, 1)):
            for c, s in order:
                with torch.inference_mode():
                    probes[c].append(probe.sample_s())
                runs[c].append(ex.replay(workload, s, warmup=1))
                if r == max(repeats, 1) - 1 and on_done is not None:
                    on_done(outcome(c, predicted[c], runs[c], probes[c], probe.expected_s))
    return [outcome(c, predicted[c], runs[c], probes[c], probe.expected_s) for c in configs]


def outcome(config: Config, predicted: Metrics, runs: list[Metrics], probe_s: list[float] | None = None,
            probe_expected_s: float = 0.0) -> Outcome:
    """The median run of a configuration's repeats, against its prediction (with the speed probe
    taken before each repeat)."""
    ms = sorted(runs, key=lambda m: m.total_time_s)
    return Outcome(config, predicted, ms[len(ms) // 2], [m.step_time_s for m in runs], list(probe_s or []),
                   probe_expected_s)


def window(workload: Workload, forwards: int | None, after_first_block: bool) -> Workload:
    """The forwards validated: the first `forwards` of the trace, or, after_first_block, the
    `forwards` that follow the first generated block of the first prompt (prefill and first
    block skipped: residency settled, as most of a long decode runs)."""
    start = 0
    if after_first_block:
        later = np.flatnonzero(workload.block > 0)
        if later.size == 0:
            raise InputError("--window after-first-block: the trace has no forward after its first block")
        start = int(later[0])
    stop = workload.num_forwards if forwards is None else min(start + forwards, workload.num_forwards)
    if start == 0 and stop == workload.num_forwards:
        return workload
    return workload.select(np.arange(start, stop))


def largest_pools(pools: list[list[int]]) -> list[int]:
    """Per layer, the largest slot pool (budget + spare slots) any configuration needs: the
    executor frees one configuration's pools before allocating the next one's."""
    return [max(p[layer] for p in pools) for layer in range(len(pools[0]))] if pools else []


def summary(outcomes: list[Outcome]) -> dict[str, float]:
    errs = [abs(o.error) for o in outcomes if np.isfinite(o.error)]
    out = {
        "configurations": float(len(outcomes)),
        "median_abs_error": statistics.median(errs) if errs else float("nan"),
        "max_abs_error": max(errs) if errs else float("nan"),
        "mean_error": statistics.fmean([o.error for o in outcomes]) if outcomes else float("nan"),
    }
    return out


def figure(outcomes: list[Outcome], path: Path, title: str) -> None:
    """Predicted vs measured step time, one point per configuration, with y = x and +-10%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tidesim.atomic import atomic_path

    meas = np.array([o.measured.step_time_s * 1e3 for o in outcomes])
    pred = np.array([o.predicted.step_time_s * 1e3 for o in outcomes])
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    hi = float(max(meas.max(), pred.max()) * 1.15) if len(outcomes) else 1.0
    lo = float(min(meas.min(), pred.min()) * 0.85) if len(outcomes) else 0.0
    xs = np.linspace(lo, hi, 10)
    ax.plot(xs, xs, color="black", lw=1, label="predicted = measured")
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="0.85", label="+-10%")
    ax.scatter(meas, pred, zorder=3, label="simulator")
    for o, x, y in zip(outcomes, meas, pred, strict=True):
        ax.annotate(o.config.label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured step time (ms)")
    ax.set_ylabel("predicted step time (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
