"""`tidesim simulate`: one policy on one trace and hardware profile, with an optional timeline.

The input flags (trace, profile, budget, tau, prompts, model check) are shared with `tidesim compare`,
which imports them from here; both resolve them with tidesim.scenario.resolve.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
from tqdm import tqdm

from tidesim.cli.guard import Output, declare_outputs, number
from tidesim.cli.output import announce, format_table, print_json
from tidesim.errors import InputError
from tidesim.evaluate import evaluate
from tidesim.metrics import Metrics
from tidesim.plan import Plan, load_plan
from tidesim.policies.options import REFRESH_MODES
from tidesim.policies.registry import check_policies, plan_policy, plan_runner, policy_names
from tidesim.run import ENGINES
from tidesim.scenario import Scenario, decode_label, resolve


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


def load_setup(args: argparse.Namespace, policies: list[str], plan: Plan | None = None) -> Scenario:
    """The flags of add_input_args resolved into a Scenario (tidesim.scenario.resolve); its
    warnings are said on stderr."""
    scenario = resolve(args.trace, args.hw, policies, budget=args.budget, gpu_mem_gib=args.gpu_mem_gib, tau=args.tau,
                       refresh=args.refresh, engine=args.engine, prompts=args.prompts, model=args.model,
                       allow_roofline=args.allow_roofline, plan=plan, force=getattr(args, "force", False))
    warn(list(scenario.warnings))
    return scenario


def warn(lines: list[str]) -> None:
    """Warnings (a forced plan on other inputs) on stderr, one line each."""
    for line in lines:
        print(f"tidesim: warning: {line}", file=sys.stderr)


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
    runner = plan_runner(plan.policy) if plan is not None else None
    if plan is not None and args.policy not in (None, runner):
        raise InputError(f"--plan runs the policy {runner} (the plan is for {plan.policy}); leave out --policy")
    if plan is None and args.policy in (None, planned):
        raise InputError(f"give --policy P, or --plan FILE for the {planned} policy (make one with `tidesim plan`)")
    args.policy = args.policy or runner or planned
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
        metrics = evaluate(setup, args.policy, timeline=args.timeline, on_forward=advance).metrics
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


def render(setup: Scenario, m: Metrics) -> str:
    d = setup.describe()
    budget = (f"budget per layer from the plan ({d['expert_slots']})" if "expert_slots" in d
              else f"budget {d['budget']} experts/layer [{d['budget_source']}]")
    tau = f"tau {d['tau']}, " if setup.tau_choice or setup.plan else ""
    head = (f"{m.policy} on {d['model']} ({decode_label(d)}, {d['generated_tokens']} tokens, "
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
