"""`tidesim trace list`: the bundled traces and how they were made."""

from __future__ import annotations

import argparse

from tidesim.bundled.paths import bundled_traces
from tidesim.cli.output import format_table, print_json
from tidesim.trace.io import read_trace


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list the bundled traces", description="List the bundled traces.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = []
    for name, path in bundled_traces().items():
        t = read_trace(path)
        m = t.meta
        rows.append({
            "name": name, "model": m.model.name, "kv_cache": m.kv_cache, "gen_length": m.gen_length,
            "prompts": len(t.prompt_ids), "forwards": t.num_forwards, "source": m.source, "path": str(path),
        })
    if args.json:
        print_json(rows)
    else:
        cols = ["name", "model", "kv_cache", "gen_length", "prompts", "forwards", "source"]
        print(format_table(cols, [[r[c] for c in cols] for r in rows]))
    return 0
