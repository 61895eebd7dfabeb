"""`tidesim sweep GRID.yaml -o results.parquet`: what-if grids, locally in parallel or on Dask."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pandas as pd

from tidesim.cli.guard import Output, declare_outputs
from tidesim.cli.output import announce, format_table, print_json, progress
from tidesim.html_report import Link, Report, Section, Table, write_report
from tidesim.policies.registry import policy_names
from tidesim.sweep.executors import EXECUTORS
from tidesim.sweep.figures import speedup_table, write_figures
from tidesim.sweep.grid import load_grid
from tidesim.sweep.runner import SweepPaths, SweepReport, run_sweep


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="what-if grids over hardware, model shapes, decode settings and policies",
        description="Evaluate every point of a grid file (docs/sweeps.md; examples in docs/examples/) into one "
                    "Parquet table (one row per point) plus figures in RESULTS.figures/. A killed sweep resumes: "
                    "run the same command again and only the missing points run.")
    p.add_argument("grid", metavar="GRID.yaml", help="grid file")
    p.add_argument("-o", "--output", required=True, metavar="RESULTS.parquet", help="results table to write")
    p.add_argument("--workers", type=int, default=None,
                   help=f"parallel workers (default: all cores, here {os.cpu_count()})")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local process pool (default) or a Dask distributed cluster")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="Dask scheduler address, e.g. tcp://10.0.0.5:8786 (default: start a local cluster)")
    p.add_argument("--fresh", action="store_true", help="discard finished points of an interrupted run")
    p.add_argument("--no-figures", action="store_true", help="write the table only")
    p.add_argument("--dry-run", action="store_true", help="check the grid and list its points; run nothing")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
    declare_outputs(p, Output("output", "--output", (".parquet",)))


def run(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid)
    if args.dry_run:
        return _dry_run(grid.points, grid.axes, args.json)
    # lazy: the start line waits for the first point, so the sweep's own input checks stay one line
    with announce("sweep", f"{grid.name}: {len(grid.points)} points into {args.output}", lazy=True) as done:
        report = run_sweep(grid, args.output, executor=args.executor, workers=args.workers,
                           scheduler=args.scheduler, fresh=args.fresh,
                           progress=lambda items, desc, total: done.wrap(progress(items, desc, total)))
        done.summary = f"{report.evaluated} evaluated, {report.reused} resumed, {report.errors} with an error"
    figures = [] if args.no_figures else write_figures(pd.read_parquet(report.results),
                                                      SweepPaths(report.results).figures)
    summary = _summary(report)
    headline = (f"{grid.name}: {report.points} points ({report.evaluated} evaluated, {report.reused} resumed, "
                f"{report.errors} with an error), {report.traces_made} traces synthesized")
    page = write_page(SweepPaths(report.results).figures, Path(report.results), headline, summary, figures) \
        if figures else None
    if args.json:
        print_json({"results": str(report.results), "figures": [str(f) for f in figures],
                    "points": report.points, "evaluated": report.evaluated, "reused": report.reused,
                    "errors": report.errors, "traces_synthesized": report.traces_made, "policies": summary,
                    "report": str(page) if page else None})
        return 0
    print(headline)
    if summary:
        cols = list(summary[0])
        print(format_table(cols, [[row[c] for c in cols] for row in summary]))
    if report.errors:
        first = next(r for r in report.rows if r.get("error"))
        print(f"first error (point {first['point_id']}): {first['error']}")
    print(f"results: {report.results}")
    if figures:
        print(f"figures: {SweepPaths(report.results).figures}/ ({', '.join(f.name for f in figures)})")
        print(f"report page: {page}")
    return 0


def write_page(folder: Path, results: Path, headline: str, summary: list[dict[str, Any]],
               figures: list[Path]) -> Path:
    """index.html in the figures folder: the summary table, every figure, a link to the results."""
    cols = list(summary[0]) if summary else []
    rel = os.path.relpath(results, folder)
    section = Section("summary per policy", paragraphs=[
        headline, "speedup: the best tide (or planned) tokens/s over the best baseline at each setting; "
                  "figures hold the axes they do not show at the grid's first point (said in each title)."],
        tables=[Table(cols, [[row[c] for c in cols] for row in summary])] if summary else [],
        figures=[f.name for f in figures],
        links=[Link(rel, results.name, "one row per point, every input and metric a column (pandas.read_parquet)")])
    return write_report(Report(f"tidesim sweep: {headline.split(':')[0]}", sections=[section]), folder)


def _summary(report: SweepReport) -> list[dict[str, Any]]:
    """Per policy: points, errors, throughput range, and TIDE's speedup over the best baseline."""
    df = pd.DataFrame(report.rows)
    if df.empty:
        return []
    ok = df[df["error"].isna()] if "tokens_per_s" in df else df.iloc[0:0]
    speedups = {}
    for name in policy_names(speedup_figure=True):
        table = speedup_table(ok, name) if not ok.empty else pd.DataFrame()
        if not table.empty:
            speedups[name] = table["speedup"]
    out = []
    for policy, rows in df.groupby("policy", sort=False):
        good = ok[ok["policy"] == policy]["tokens_per_s"] if not ok.empty else pd.Series(dtype=float)
        sp = speedups.get(str(policy))
        out.append({
            "policy": policy, "points": len(rows), "errors": int(rows["error"].notna().sum()),
            "tok_s_min": float(good.min()) if len(good) else float("nan"),
            "tok_s_median": float(good.median()) if len(good) else float("nan"),
            "tok_s_max": float(good.max()) if len(good) else float("nan"),
            "speedup_median": float(sp.median()) if sp is not None else float("nan"),
            "speedup_max": float(sp.max()) if sp is not None else float("nan"),
        })
    return out


DRY_RUN_LIST = 200      # a dry run lists up to this many points; a bigger grid gets a summary


def _dry_run(points: list[Any], axes: list[str], as_json: bool) -> int:
    if len(points) > DRY_RUN_LIST:
        return _dry_run_summary(points, axes, as_json)
    if as_json:
        print_json([{"point_id": p.id, **p.params} for p in points])
        return 0
    cols = ["point_id", *axes]
    print(format_table(cols, [[p.id, *[_cell(p.params[a]) for a in axes]] for p in points]))
    print(f"{len(points)} points")
    return 0


def _dry_run_summary(points: list[Any], axes: list[str], as_json: bool) -> int:
    """A big grid: how many points, and the values of each axis (first and last few), not every point."""
    values = {a: list(dict.fromkeys(_cell(p.params[a]) for p in points)) for a in axes}
    if as_json:
        print_json({"points": len(points), "axes": values})
        return 0
    rows = [[a, len(v), _shorten(v)] for a, v in values.items()]
    print(format_table(["axis", "values", "which"], rows))
    print(f"{len(points):,} points (more than {DRY_RUN_LIST}: axes shown, not every point; --json gives the "
          "axes' values)")
    return 0


def _shorten(values: list[Any]) -> str:
    shown = [str(v) for v in values]
    return ", ".join(shown) if len(shown) <= 8 else ", ".join([*shown[:4], "...", *shown[-3:]])


def _cell(value: Any) -> Any:
    return "-" if value is None else value
