"""`tidesim plan`: choose per-layer refresh intervals and GPU expert budgets (MILP) -> plan.json."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tidesim.cli.guard import Output, declare_outputs, number
from tidesim.cli.output import announce, format_table, print_json, progress
from tidesim.errors import InputError
from tidesim.plan import Evaluation, plan_slots
from tidesim.planner import PlanOutcome, parse_int_list, plan_policies, plan_workload
from tidesim.run import ENGINES
from tidesim.scenario import resolve_plan


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="choose per-layer refresh intervals and GPU expert budgets (MILP) -> plan.json",
        description="Build a cost table of the policy (default tide) per MoE layer, interval and budget with the "
                    "analytic cost model on the calibration prompts, pick one (tau, budget) per layer under the "
                    "GPU memory budget with a multiple-choice knapsack solved exactly (a dynamic program over "
                    "the slots), then run that optimum, the per-layer intervals with the uniform budget and every "
                    "single tau with the --engine executor on the evaluation prompts (the held-out ones; the "
                    "calibration ones when none are held out) and keep the fastest, so the plan is never slower "
                    "there than the best single tau it considered. Bound it from below with a Lagrangian bound "
                    "over every refresh schedule with these budgets (not the `oracle` policy, which may also copy "
                    "on demand and prefetch for free). Plans are for synchronous refresh. See docs/planner.md.")
    p.add_argument("--trace", required=True, metavar="T", help="trace file, or a bundled trace name")
    p.add_argument("--hw", required=True, metavar="H", help="hardware profile name (`tidesim hw list`) or YAML path")
    p.add_argument("--gpu-mem-gib", type=number(float, 0, 4096, low_open=True), required=True, metavar="G",
                   help="GPU memory budget in GiB (non-expert weights, experts and a reserve of max(1.5 GB, 10%%))")
    p.add_argument("--global-tau", action="store_true", help="one interval for all layers (budgets still per layer)")
    p.add_argument("--taus", default="1..32", metavar="LIST", help="candidate intervals, e.g. 1..32 or 1,2,4,8")
    p.add_argument("--budgets", metavar="LIST",
                   help="candidate budgets per layer, e.g. 42,84,126 or 21..168:21 (default: a grid from a "
                        "quarter to twice the uniform budget that fits)")
    p.add_argument("--time-limit", type=float, metavar="S",
                   help="accepted for old commands and recorded in the plan, but unused: the exact solver "
                        "needs no time limit")
    p.add_argument("--calibrate-prompts", metavar="0,1",
                   help="prompts the plan is chosen on (default: the first half); the rest are held out")
    p.add_argument("--engine", choices=ENGINES, default="analytic",
                   help="executor that chooses among the candidate plans on the evaluation prompts and evaluates "
                        "the plan (default: analytic)")
    p.add_argument("--policy", choices=plan_policies(), default="tide",
                   help="policy to plan intervals and budgets for (default: tide; a tide plan runs as `planned`, "
                        "another as that policy)")
    p.add_argument("--oracle-iterations", type=number(int, 1, 100_000), default=80, metavar="N",
                   help="subgradient steps of the Lagrangian lower bound (default: 80)")
    p.add_argument("--allow-roofline", action="store_true",
                   help="plan with a measured profile that has no expert curve for this model's experts (roofline "
                        "estimates instead of refusing)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="plan file to write (JSON)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=main)
    declare_outputs(p, Output("output", "--output", (".json",)))


def main(args: argparse.Namespace) -> int:
    if args.oracle_iterations < 1:
        raise InputError("--oracle-iterations must be at least 1")
    output = Path(args.output)
    if output.is_dir():
        raise InputError(f"{output} is a folder; give a file name for the plan")
    calibrate = parse_int_list(args.calibrate_prompts, "--calibrate-prompts", allow_zero=True) \
        if args.calibrate_prompts is not None else None
    taus = parse_int_list(args.taus, "--taus", allow_zero=True)          # at least 1: the --tau rule
    budgets = parse_int_list(args.budgets, "--budgets") if args.budgets is not None else None
    inputs = resolve_plan(args.trace, args.hw, args.gpu_mem_gib, args.policy, calibrate_prompts=calibrate, taus=taus,
                          budgets=budgets, allow_roofline=args.allow_roofline)
    hw = inputs.hw
    what = f"cost table, MILP and Lagrangian bound for {inputs.trace.name} on {hw.name}"
    with announce("plan", what, lazy=True) as done:     # starts with the cost table, after the input checks
        outcome = plan_workload(
            inputs.workload, inputs.trace, args.trace, hw, inputs.gpu_mem_gib, inputs.slots, inputs.calibration,
            inputs.heldout, inputs.taus, inputs.budgets, global_tau=args.global_tau, time_limit_s=args.time_limit,
            engine=args.engine, oracle_iterations=args.oracle_iterations, policy=args.policy,
            progress=lambda items: done.wrap(progress(items, desc="cost table")),
        )
        done.summary = f"solver {outcome.plan.solver.status}, {plan_slots(outcome.plan)}"
    outcome.plan.save(output)
    if args.json:
        print_json({"plan_file": str(output), "plan": outcome.plan.to_dict(), "uniform_budget": outcome.uniform_budget,
                    "tau_sweep": [{"tau": t, "time_s": s, "tokens_per_s": outcome.table.generated_tokens / s}
                                  for t, s in outcome.tau_sweep.items()]})
        return 0
    print_report(outcome, output)
    return 0


def _eval_row(name: str, ev: Evaluation | None) -> list[Any]:
    if ev is None:
        return [name, "-", "-", "-", "-", "-"]
    best = f"tau {ev.best_single_tau}, B {ev.best_single_tau_budget}"
    return [name, ",".join(map(str, ev.prompts)), ev.plan_tokens_per_s, best, ev.best_single_tau_tokens_per_s,
            f"{ev.speedup:.3f}x"]


def print_report(outcome: PlanOutcome, output: Path) -> None:
    p = outcome.plan
    s = p.solver
    print(f"{p.model} on {p.hw}, {p.gpu_mem_gib:g} GiB: the plan for {p.policy} uses {plan_slots(p)} "
          f"(uniform budget {outcome.uniform_budget} per layer); mode {p.mode}")
    print(f"solver: {s.status} in {s.wall_time_s:.2f} s ({s.solver}); knapsack optimum {s.milp_bound_s:.4f} s, "
          f"kept plan {p.objective_s:.4f} s predicted on the calibration prompts")
    if p.oracle_bound_s is None:
        print(f"Lagrangian lower bound: none for {p.policy} (it covers schedules that run every miss on the CPU; "
              "docs/planner.md section 3)")
    else:
        gap = "-" if p.gap is None else f"{100 * p.gap:.1f}%"
        print(f"Lagrangian lower bound (no refresh schedule with these budgets is faster; not the oracle policy): "
              f"{p.oracle_bound_s:.4f} s; gap {gap}")
    print()
    rows = [[i, t, b] for i, (t, b) in enumerate(zip(p.tau, p.budget, strict=True))]
    print(format_table(["moe layer", "tau", "budget"], rows))
    print()
    print(format_table(["prompts", "ids", "plan tok/s", "best single tau", "its tok/s", "speedup"],
                       [_eval_row("calibration", p.calibration), _eval_row("held-out", p.heldout)]))
    print()
    if p.selection is not None:
        sel = p.selection
        print(f"kept: {sel.chosen}, the fastest of {len(sel.candidates)} candidates on the evaluation prompts "
              f"{','.join(map(str, sel.prompts))} ({sel.engine}); the plans among them:")
        print(format_table(["candidate", "time s"], [[c.name, c.time_s] for c in sel.candidates
                                                     if not c.name.startswith("tau ")]))
        print()
    tokens = outcome.table.generated_tokens
    print(f"single-tau {p.policy} on the calibration prompts, budget {outcome.uniform_budget} per layer:")
    print(format_table(["tau", "time s", "tok/s"], [[t, v, tokens / v] for t, v in outcome.tau_sweep.items()]))
    for note in p.notes:
        print(f"note: {note}")
    print(f"plan: {output}")
