"""`tidesim trace ...`: the trace command group; each subcommand lives in its own module."""

from __future__ import annotations

import argparse

from tidesim.cli.guard import Output, declare_outputs

# Subcommand modules of `tidesim trace`, each with register(trace_subparsers).
TRACE_MODULES: list[str] = [
    "tidesim.cli.trace_list",
    "tidesim.cli.trace_synth",
    "tidesim.cli.trace_stats",
    "tidesim.cli.trace_capture",
    "tidesim.cli.trace_convert",
]


def register(sub: argparse._SubParsersAction) -> None:
    from tidesim.cli import register_modules

    parser = sub.add_parser("trace", help="synthesize, capture, inspect and list expert-activation traces",
                            description="Expert-activation traces of block-diffusion decoding.")
    trace_sub = parser.add_subparsers(dest="trace_command", metavar="SUBCOMMAND",
                                      parser_class=type(parser))
    register_modules(trace_sub, TRACE_MODULES)
    # The trace files these subcommands write, checked by the output guard before they start.
    for name in ("synth", "capture", "convert"):
        if name in trace_sub.choices:
            declare_outputs(trace_sub.choices[name], Output("output", "--output", (".parquet",)))
    parser.set_defaults(func=lambda args: parser.print_help())
