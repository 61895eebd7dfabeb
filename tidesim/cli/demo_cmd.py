"""`tidesim demo`: compare every policy on mini and flash, solve the plan, write a report folder."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tidesim.cli.guard import Output, declare_outputs
from tidesim.cli.output import announce, format_table, print_json
from tidesim.demo import FOOTNOTES, TABLE_COLUMNS, case_lines, result_json, run_demo, table_rows
from tidesim.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the main job: compare policies on the bundled mini and flash traces, plan, report",
        description="On the bundled LLaDA2.0-mini and -flash traces (no KV cache, as the public TIDE code) and "
                    "the H100 preset (plus a measured CUDA profile when one is bundled): solve the per-layer "
                    "plan on the calibration prompts, simulate every policy on the held-out prompts at the GPU "
                    "expert budget the public TIDE code would use, print one table per case and write figures.")
    p.add_argument("-o", "--out", default="tidesim-report", metavar="DIR",
                   help="report folder (default: ./tidesim-report)")
    p.add_argument("--workers", type=int, metavar="N", help="processes (default: one per case, up to the cores)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=main)
    declare_outputs(p, Output("out", "--out", folder=True))


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    started = time.monotonic()  # wall clock only for the "took" line, never for simulated time
    tty = sys.stderr.isatty()

    def step(message: str) -> None:
        if tty:
            print(f"\r\033[K[{time.monotonic() - started:5.1f}s] {message}", end="", file=sys.stderr, flush=True)

    if args.workers is not None and args.workers < 1:
        raise InputError("--workers must be at least 1")
    step("running the cases")
    with announce("demo", f"planning and simulating every policy on the bundled cases into {out}/") as done:
        results = run_demo(out, step, workers=args.workers)
        done.summary = f"{len(results)} cases; report {out / 'index.html'}"
    if tty:
        print("\r\033[K", end="", file=sys.stderr)
    if args.json:
        print_json([result_json(r) for r in results])
        return 0
    for r in results:
        print(f"{r.label}:")
        print(format_table(TABLE_COLUMNS, table_rows(r)))
        for line in case_lines(r):
            print(line)
        print()
    for line in FOOTNOTES:
        print(line)
    print(f"report: {(out / 'index.html').resolve()} (open it in a browser: tables, figures, plans, timelines "
          "that open in Perfetto)")
    return 0
