"""The `tidesim` command: parse, call the library, print a table (or JSON with --json).

Each command group lives in its own module with a `register(subparsers)` function; bad input
anywhere raises InputError, which becomes exit status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from tidesim import __version__
from tidesim.cli.guard import check_numbers, check_outputs
from tidesim.errors import InputError, describe_os_error

# Command modules, in the order their commands are listed by --help.
COMMAND_MODULES = [
    "tidesim.cli.demo_cmd",
    "tidesim.cli.trace_cmd",
    "tidesim.cli.hw_cmd",
    "tidesim.cli.simulate_cmd",
    "tidesim.cli.compare_cmd",
    "tidesim.cli.plan_cmd",
    "tidesim.cli.sweep_cmd",
    "tidesim.cli.calibrate_cmd",
    "tidesim.cli.validate_cmd",
    "tidesim.cli.generate_cmd",
]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit status 2, pointing to the help of
    the (sub)command that was run."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(f"{message} (see `{self.prog} --help`)")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        ns, extras = super().parse_known_args(args, namespace)
        if not hasattr(ns, "_help_prog"):     # the innermost subcommand parses first
            ns._help_prog = self.prog
        return ns, extras

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            raise InputError(f"unrecognized arguments: {' '.join(extras)} (see `{ns._help_prog} --help`)")
        return ns


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tidesim",
        description="Predict, plan and check expert offloading for MoE diffusion LLMs on one GPU + CPU.",
    )
    parser.add_argument("--version", action="version", version=f"tidesim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    register_modules(sub, COMMAND_MODULES)
    return parser


def register_modules(sub: argparse._SubParsersAction, modules: list[str]) -> None:
    """Let each command module add its parsers (one module per command or group)."""
    for name in modules:
        importlib.import_module(name).register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        check_numbers(args)
        check_outputs(args)
        result = args.func(args)
        return int(result or 0)
    except InputError as exc:
        print(f"tidesim: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("tidesim: error: out of memory; make the input smaller (see docs/limits.md)", file=sys.stderr)
        return 2
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            return 0
        print(f"tidesim: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tidesim: interrupted", file=sys.stderr)
        return 130
