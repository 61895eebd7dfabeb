"""`tidesim compare`: every offload policy side by side on one trace and profile, with each one's
speedup over the best baseline and a stacked-bar figure of where the time goes."""

from __future__ import annotations

import argparse

from tidesim.cli.guard import Output, declare_outputs
from tidesim.cli.output import format_table, print_json, progress
from tidesim.cli.simulate_cmd import add_input_args, check_policies, load_setup, run_policy, warn
from tidesim.errors import InputError
from tidesim.plan import load_plan
from tidesim.policies.base import policy_names
from tidesim.report import (
    BASELINES,
    FIGURE_SUFFIXES,
    TABLE_COLUMNS,
    breakdown_figure,
    compare,
    comparison_json,
    table_rows,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="all offload policies side by side (table + figure)",
                       description="Run several expert-offload policies on one trace and profile. Speedups are over "
                                   f"the best baseline ({', '.join(BASELINES)}); all-gpu and oracle are bounds, "
                                   "labelled as such.")
    add_input_args(p)
    p.add_argument("--policies", nargs="+", metavar="P",
                   help="policies to run, space- or comma-separated (default: all)")
    p.add_argument("--plan", metavar="FILE",
                   help="also run policy planned with this plan (`tidesim plan`); without it planned is left out")
    p.add_argument("--force", action="store_true",
                   help="use --plan although it was made from another trace or hardware profile (warns)")
    p.add_argument("--figure", metavar="FILE", help=f"stacked-bar figure ({', '.join(FIGURE_SUFFIXES)})")
    p.set_defaults(func=main)
    declare_outputs(p, Output("figure", "--figure", FIGURE_SUFFIXES))


def main(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan) if args.plan else None
    default = [n for n in policy_names() if n != "planned" or plan is not None]
    names = [n for item in (args.policies or default) for n in item.split(",") if n]
    if not names:
        raise InputError("--policies: give at least one policy")
    check_policies(names)
    if "planned" in names and plan is None:
        raise InputError("policy planned needs --plan FILE (make one with `tidesim plan`)")
    if args.figure and not args.figure.lower().endswith(FIGURE_SUFFIXES):
        raise InputError(f"--figure must end in one of {', '.join(FIGURE_SUFFIXES)}")
    setup = load_setup(args, names)
    if plan is not None:
        warn(plan.check_inputs(setup.workload.model, setup.trace, setup.hw, force=args.force))
        setup.plan = plan
    metrics, skipped = [], []
    for name in progress(names, desc="policies", total=len(names)):
        try:
            metrics.append(run_policy(setup, name))
        except InputError as exc:       # e.g. full-swap with a budget of 0: report, run the others
            skipped.append(f"{name} skipped: {exc}")
    if not metrics:
        raise InputError(skipped[0])
    comp = compare(metrics)
    d = setup.describe()
    title = (f"{d['model']}, {d['kv_cache']} KV cache, {d['hw']}, budget {d['budget']}, tau {d['tau']} "
             f"({d['refresh']} refresh), {d['engine']}")
    if args.figure:
        breakdown_figure(comp, args.figure, title)
    notes = skipped + sorted({n for m in metrics for n in m.notes})
    if args.json:
        out = {"inputs": d, **comparison_json(comp), "notes": notes}
        if args.figure:
            out["figure"] = args.figure
        print_json(out)
        return 0
    print(title + f"; {d['generated_tokens']} tokens in {d['forwards']} forwards")
    print(format_table(TABLE_COLUMNS, table_rows(comp)))
    print(f"speedup: tokens/s over the best baseline ({comp.best_baseline or 'none run'}); "
          "bounds are limits, not deployable policies")
    for tide in ("tide", "tide-reference"):
        if comp.by_policy(tide):
            parts = [f"{comp.speedup_over(tide, b):.2f}x over {b}" for b in BASELINES if comp.by_policy(b)]
            if parts:
                print(f"{tide}: " + ", ".join(parts))
    for n in notes:
        print(f"note: {n}")
    if args.figure:
        print(f"figure: {args.figure}")
    return 0
