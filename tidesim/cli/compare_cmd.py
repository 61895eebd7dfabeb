"""`tidesim compare`: every offload policy side by side on one trace and profile, with each one's
speedup over the best baseline and a stacked-bar figure of where the time goes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tidesim.cli.guard import Output, declare_outputs
from tidesim.cli.output import announce, format_table, print_json, progress, to_jsonable
from tidesim.cli.simulate_cmd import add_input_args, load_setup
from tidesim.errors import InputError
from tidesim.evaluate import evaluate
from tidesim.html_report import Report, Section, Table, write_report
from tidesim.plan import load_plan
from tidesim.policies.registry import baselines, check_policies, plan_runner, policy_names, traits
from tidesim.report import (
    FIGURE_SUFFIXES,
    TABLE_COLUMNS,
    Comparison,
    breakdown_figure,
    compare,
    comparison_json,
    table_rows,
)
from tidesim.scenario import decode_label


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="all offload policies side by side (table + figure)",
                       description="Run several expert-offload policies on one trace and profile. Speedups are over "
                                   f"the best baseline ({', '.join(baselines())}); "
                                   f"{' and '.join(policy_names(role='bound'))} are bounds, labelled as such.")
    add_input_args(p)
    p.add_argument("--policies", nargs="+", metavar="P",
                   help=f"policies to run, space- or comma-separated, from: {', '.join(policy_names())} "
                        "(default: all; planned only with --plan)")
    p.add_argument("--plan", metavar="FILE",
                   help="also run policy planned with this plan (`tidesim plan`); without it planned is left out")
    p.add_argument("--force", action="store_true",
                   help="use --plan although it was made from another trace or hardware profile (warns)")
    p.add_argument("--figure", metavar="FILE", help=f"stacked-bar figure ({', '.join(FIGURE_SUFFIXES)})")
    p.set_defaults(func=main)
    declare_outputs(p, Output("figure", "--figure", FIGURE_SUFFIXES))


def main(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan) if args.plan else None
    # with a plan, its runner runs it: `planned` for a tide plan, else the plan's policy (in its own row)
    runner = plan_runner(plan.policy) if plan is not None else None
    default = [n for n in policy_names() if not traits(n).needs_plan or runner == n]
    names = [n for item in (args.policies or default) for n in item.split(",") if n]
    if not names:
        raise InputError("--policies: give at least one policy")
    check_policies(names)
    needing = [n for n in names if traits(n).needs_plan]
    if needing and runner != needing[0]:
        raise InputError(f"policy {needing[0]} needs --plan FILE with a plan it runs (make one with `tidesim plan`)")
    if args.figure and not args.figure.lower().endswith(FIGURE_SUFFIXES):
        raise InputError(f"--figure must end in one of {', '.join(FIGURE_SUFFIXES)}")
    setup = load_setup(args, names, plan)
    metrics, skipped = [], []
    work = f"{len(names)} policies on {setup.workload.num_forwards} forwards ({setup.engine})"
    with announce("compare", work) as done:
        for name in progress(names, desc="policies", total=len(names)):
            try:
                metrics.append(evaluate(setup, name).metrics)
            except InputError as exc:       # e.g. full-swap with a budget of 0: report, run the others
                skipped.append(f"{name} skipped: {exc}")
        done.summary = f"{len(metrics)} ran, {len(skipped)} skipped"
    if not metrics:
        raise InputError(skipped[0])
    comp = compare(metrics)
    d = setup.describe()
    tau = f", tau {d['tau']} ({d['refresh']} refresh)" if setup.tau_choice else ""
    title = f"{d['model']}, {decode_label(d)}, {d['hw']}, budget {d['budget']}{tau}, {d['engine']}"
    notes = skipped + sorted({n for m in metrics for n in m.notes})
    lines = summary_lines(comp, setup.tau_line)
    page = None
    if args.figure:
        breakdown_figure(comp, args.figure, title)
        page = write_page(Path(args.figure), title, d, comp, lines + [f"note: {n}" for n in notes])
    if args.json:
        out = {"inputs": d, **comparison_json(comp), "notes": notes}
        if args.figure:
            out["figure"] = args.figure
            out["report"] = str(page)
        print_json(out)
        return 0
    print(title + f"; {d['generated_tokens']} tokens in {d['forwards']} forwards")
    print(format_table(TABLE_COLUMNS, table_rows(comp)))
    for line in lines:
        print(line)
    for n in notes:
        print(f"note: {n}")
    if args.figure:
        print(f"figure: {args.figure}; report page: {page}")
    return 0


def summary_lines(comp: Comparison, tau_line: str | None) -> list[str]:
    """The lines under the table: how speedups are measured, tide against each baseline, the tau."""
    out = [f"speedup: tokens/s over the best baseline ({comp.best_baseline or 'none run'}); "
           f"bounds ({', '.join(policy_names(role='bound'))}) are limits, not deployable policies"]
    for tide in policy_names(uses_tau=True):
        if comp.by_policy(tide):
            parts = [f"{comp.speedup_over(tide, b):.2f}x over {b}" for b in baselines() if comp.by_policy(b)]
            if parts:
                out.append(f"{tide}: " + ", ".join(parts))
    if tau_line:
        out.append(tau_line)
    return out


def write_page(figure: Path, title: str, inputs: dict[str, Any], comp: Comparison, lines: list[str]) -> Path:
    """The comparison as a page beside its figure, named after it (compare.png -> compare.html), so
    several comparisons can share a folder."""
    rel = figure.name
    section = Section("policies", paragraphs=lines, tables=[Table(TABLE_COLUMNS, table_rows(comp))], figures=[rel])
    facts = Table(["input", "value"], [[k, json.dumps(to_jsonable(v)) if isinstance(v, dict | list) else v]
                                       for k, v in inputs.items()], "inputs")
    report = Report(f"tidesim compare: {title}", sections=[section, Section("inputs", tables=[facts])])
    return write_report(report, figure.parent if str(figure.parent) else Path("."), figure.stem + ".html")
