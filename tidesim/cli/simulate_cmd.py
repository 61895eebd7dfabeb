"""`tidesim simulate`: one policy on one trace and hardware profile, with an optional timeline.

The input handling (trace, profile, budget, tau, prompts, model check) is shared with
`tidesim compare`, which imports it from here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from tidesim.budget import TIDE_MAX_EXPERTS_PER_LAYER, budget_for_memory
from tidesim.cli.guard import Output, declare_outputs, number
from tidesim.cli.output import announce, format_table, print_json
from tidesim.default_tau import TauChoice, choose_tau
from tidesim.errors import InputError
from tidesim.hardware import HardwareProfile, get_profile
from tidesim.metrics import Metrics
from tidesim.plan import Plan, load_plan
from tidesim.policies.driver import build_schedule
from tidesim.policies.options import REFRESH_MODES, PolicyOptions, uniform
from tidesim.policies.registry import check_policies, plan_policy, policy_names, traits
from tidesim.report import plan_slots
from tidesim.run import ENGINES, run
from tidesim.workload import Workload


@dataclass
class Setup:
    """Everything a simulate/compare run needs, resolved and checked."""

    trace: str
    workload: Workload
    hw: HardwareProfile
    budget: int
    budget_source: str
    tau: int
    refresh: str
    engine: str
    plan: Plan | None = None         # --plan: per-layer tau and budget for the plan's runner (Plan.runner)
    tau_choice: TauChoice | None = None   # where tau came from (None: no policy run uses it)

    def options(self, policy: str) -> PolicyOptions:
        """The plan's per-layer settings for the policy that runs it (the plan's runner: the plan-running
        policy for a tide plan, the plan's policy otherwise); the uniform budget and tau for the others."""
        layers = self.workload.num_layers
        if self.plan is not None and policy == self.plan.runner:
            return PolicyOptions(budget=self.plan.budget_array(), tau=self.plan.tau_array(), hw=self.hw,
                                 refresh=self.plan.refresh, extra={"plan": self.plan})
        return PolicyOptions(budget=uniform(self.budget, layers), tau=uniform(self.tau, layers), hw=self.hw,
                             refresh=self.refresh)

    def describe(self) -> dict[str, Any]:
        w = self.workload
        return {"trace": self.trace, "model": w.model.name, "kv_cache": w.kv_cache, "forwards": w.num_forwards,
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


def add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, metavar="T",
                   help="trace file, or a bundled trace name (`tidesim trace list`)")
    p.add_argument("--hw", required=True, metavar="H", help="hardware profile name (`tidesim hw list`) or YAML path")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--budget", type=int, metavar="B", help="GPU expert slots per MoE layer")
    group.add_argument("--gpu-mem-gib", type=number(float, 0, 4096, low_open=True), metavar="G",
                       help="size the budget for this much GPU memory, as the TIDE code does "
                            "(default: the profile's GPU memory)")
    p.add_argument("--tau", type=int, default=None, metavar="N",
                   help="refresh interval in denoising steps for tide and tide-reference (default: the plan's "
                        "best single tau with --plan, else the best single tau for this trace, profile and "
                        "budget by the analytic model; printed with its reason)")
    p.add_argument("--refresh", choices=REFRESH_MODES, default="sync",
                   help="tide refresh copies: sync (block the step, as the public TIDE code) or async")
    p.add_argument("--engine", choices=ENGINES, default="sim",
                   help="sim (discrete-event simulator) or analytic (closed-form cost model)")
    p.add_argument("--prompts", metavar="0,1", help="only these prompts of the trace (comma-separated ids)")
    p.add_argument("--model", metavar="M",
                   help="model preset or config.json the trace must match (default: the trace's)")
    p.add_argument("--allow-roofline", action="store_true",
                   help="accept a measured profile without curves for this model's experts (roofline instead)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def load_setup(args: argparse.Namespace, policies: list[str], plan: Plan | None = None) -> Setup:
    """Resolve and check the inputs; every problem is an InputError (exit 2, one line)."""
    from tidesim.bundled.paths import resolve_trace
    from tidesim.models import get_model
    from tidesim.trace.io import read_trace
    from tidesim.workload import workload_from_trace

    path = resolve_trace(args.trace)
    trace = read_trace(path)
    model = get_model(args.model) if args.model else None
    workload = workload_from_trace(trace, model)
    if args.prompts is not None:              # an empty --prompts= is refused, not "all prompts"
        workload = workload.select_prompts(_prompt_ids(args.prompts, trace.prompt_ids))
    hw = get_profile(args.hw)
    if args.tau is not None and args.tau < 1:
        raise InputError(f"--tau must be at least 1, got {args.tau}")
    if plan is not None:         # another model: refused; another trace or profile: refused unless --force
        warn(plan.check_inputs(workload.model, path, hw, force=getattr(args, "force", False)))
    budget, source = _budget(args, workload, hw)
    if not args.allow_roofline:
        _check_curves(hw, workload, policies)
    uses_tau = any(traits(p).uses_tau for p in policies)
    choice = choose_tau(workload, hw, budget, args.refresh, args.tau, plan) if uses_tau else None
    return Setup(trace=str(path), workload=workload, hw=hw, budget=budget, budget_source=source,
                 tau=choice.tau if choice else 1, refresh=args.refresh, engine=args.engine, plan=plan,
                 tau_choice=choice)


def _prompt_ids(text: str, available: list[int]) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--prompts must be comma-separated prompt ids, got {text!r}") from None
    if not ids:
        raise InputError("--prompts is empty; give prompt ids such as 0,1 or leave the flag out for all prompts")
    missing = [i for i in ids if i not in available]
    if missing:
        raise InputError(f"--prompts: prompt {missing[0] if missing else text!r} is not in the trace "
                         f"(it has {', '.join(map(str, available))})")
    return ids


def _budget(args: argparse.Namespace, workload: Workload, hw: HardwareProfile) -> tuple[int, str]:
    spec = workload.model
    experts = workload.num_experts
    if args.budget is not None:
        if not 0 <= args.budget <= experts:
            raise InputError(f"--budget must lie in 0..{experts} experts per layer for {spec.name}, got {args.budget}")
        return args.budget, "--budget"
    cap = TIDE_MAX_EXPERTS_PER_LAYER.get(spec.name)
    memory = args.gpu_mem_gib if args.gpu_mem_gib is not None else hw.gpu.memory_gib
    budget = budget_for_memory(spec, memory, cap)
    where = "--gpu-mem-gib" if args.gpu_mem_gib is not None else f"{hw.name} GPU memory"
    return budget, f"{where} ({memory:g} GiB" + (f", capped at {cap} as in the TIDE scripts)" if cap else ")")


def _check_curves(hw: HardwareProfile, workload: Workload, policies: list[str]) -> None:
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


def warn(lines: list[str]) -> None:
    """Warnings (a forced plan on other inputs) on stderr, one line each."""
    for line in lines:
        print(f"tidesim: warning: {line}", file=sys.stderr)


def run_policy(setup: Setup, policy: str, timeline: str | None = None,
               on_forward: Callable[[int], None] | None = None) -> Metrics:
    schedule = build_schedule(policy, setup.workload, setup.options(policy))
    metrics = run(setup.workload, schedule, setup.hw, engine=setup.engine, timeline=timeline, on_forward=on_forward)
    metrics.notes = sorted(set(metrics.notes) | setup.hw.flags)
    return metrics


# ----- the command ------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="one offload policy on one trace and hardware profile",
                       description="Simulate one expert-offload policy on a trace with a hardware profile: throughput, "
                                   "where the time goes, hit ratio, copies. --timeline writes a Chrome trace "
                                   "(open it in https://ui.perfetto.dev).")
    add_input_args(p)
    names = ", ".join(policy_names(needs_plan=False))
    p.add_argument("--policy", metavar="P",
                   help=f"offload policy: {names} ({plan_policy()}: give --plan; `tidesim compare` runs them all)")
    p.add_argument("--plan", metavar="FILE", help=f"run policy {plan_policy()} with this plan's per-layer tau and "
                                                  "budget (from `tidesim plan`)")
    p.add_argument("--force", action="store_true",
                   help="use --plan although it was made from another trace or hardware profile (warns)")
    p.add_argument("--timeline", metavar="FILE", help="write a Chrome trace JSON of the run (simulator only)")
    p.set_defaults(func=main)
    declare_outputs(p, Output("timeline", "--timeline", (".json",)))


def main(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan) if args.plan else None
    planned = plan_policy()
    if plan is not None and args.policy not in (None, plan.runner):
        raise InputError(f"--plan runs the policy {plan.runner} (the plan is for {plan.policy}); leave out --policy")
    if plan is None and args.policy in (None, planned):
        raise InputError(f"give --policy P, or --plan FILE for the {planned} policy (make one with `tidesim plan`)")
    args.policy = args.policy or (plan.runner if plan is not None else planned)
    check_policies([args.policy])
    if args.timeline and args.engine != "sim":
        raise InputError("--timeline needs the simulator (--engine sim)")
    setup = load_setup(args, [args.policy], plan)
    bar = tqdm(total=setup.workload.num_forwards, desc=f"simulating {args.policy}", unit="fwd", leave=False,
               disable=not sys.stderr.isatty() or setup.engine != "sim")
    def advance(_: int) -> None:
        bar.update(1)

    work = f"{args.policy} on {setup.workload.num_forwards} forwards ({setup.engine})"
    with announce("simulate", work) as done, bar:
        metrics = run_policy(setup, args.policy, timeline=args.timeline, on_forward=advance)
        done.summary = f"{metrics.tokens_per_s:.2f} tokens/s"
    if args.json:
        out = {"inputs": setup.describe(), "metrics": metrics.to_dict()}
        if args.timeline:
            out["timeline"] = args.timeline
        print_json(out)
        return 0
    print(render(setup, metrics))
    if args.timeline:
        print(f"timeline: {args.timeline} (open in https://ui.perfetto.dev)")
    return 0


def render(setup: Setup, m: Metrics) -> str:
    d = setup.describe()
    budget = (f"budget per layer from the plan ({d['expert_slots']})" if "expert_slots" in d
              else f"budget {d['budget']} experts/layer [{d['budget_source']}]")
    tau = f"tau {d['tau']}, " if setup.tau_choice or setup.plan else ""
    head = (f"{m.policy} on {d['model']} ({d['kv_cache']} KV cache, {d['generated_tokens']} tokens, "
            f"{d['forwards']} forwards), {d['hw']}, {budget}, {tau}refresh {d['refresh']}, engine {d['engine']}")
    kind = "bound (not deployable)" if m.is_bound else "policy"
    if not m.feasible:
        kind += "; does not fit the GPU"
    rows: list[list[Any]] = [
        ["kind", kind],
        ["tokens/s", m.tokens_per_s],
        ["total time (s)", m.total_time_s],
        ["time per forward (ms)", 1e3 * m.step_time_s],
        ["lower bound (s)", m.lower_bound_s if m.lower_bound_s is not None else float("nan")],
        ["hit ratio (GPU share of routed pairs)", m.hit_ratio],
        ["GPU / CPU routed pairs", f"{m.gpu_tokens} / {m.cpu_tokens}"],
        ["expert copies (refresh)", f"{m.expert_copies} ({m.refresh_copies})"],
        ["H2D / D2H (GB)", f"{m.h2d_bytes / 1e9:.3f} / {m.d2h_bytes / 1e9:.3f}"],
        ["GPU waiting for copies (s)", m.copy_stall_s],
    ]
    total = m.total_time_s or 1.0
    for key, value in m.breakdown_s.items():
        rows.append([f"time: {key} (s, %)", f"{value:.4f} ({100 * value / total:.1f}%)"])
    for key, value in m.busy_s.items():
        rows.append([f"busy: {key} (s)", value])
    layer = np.asarray(m.layer_time_s)
    if layer.size:
        rows.append(["slowest MoE layer (index, s)", f"{int(layer.argmax())}, {layer.max():.4f}"])
    lines = [head, *([setup.tau_line] if setup.tau_line else []), format_table(["metric", "value"], rows)]
    lines += [f"note: {n}" for n in m.notes]
    return "\n".join(lines)
