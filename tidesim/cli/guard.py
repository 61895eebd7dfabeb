"""Checks every command gets before it does any work: its output paths and its numeric flags.

A command declares its outputs with `declare_outputs(parser, Output(...))`; `tidesim.cli.main`
then refuses, in one line, an output that cannot be written or that names one of the command's
inputs (any flag value or argument that names an existing file), and any flag given a NaN or an
infinity, before the command runs.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidesim.atomic import check_output_path, input_files
from tidesim.errors import InputError


@dataclass(frozen=True)
class Output:
    """One output flag of a command: a file (with its allowed suffixes) or a folder (with the
    names of the files the command writes into it)."""

    dest: str
    flag: str = "--output"
    suffixes: tuple[str, ...] = ()
    folder: bool = False
    contents: tuple[str, ...] = ()


def declare_outputs(parser: argparse.ArgumentParser, *outputs: Output) -> None:
    parser.set_defaults(_outputs=outputs)


def command_inputs(args: argparse.Namespace) -> list[Path]:
    """Every flag value or argument of the command that names an existing file, outputs excluded."""
    outputs = {o.dest for o in getattr(args, "_outputs", ())}
    return input_files(v for k, v in vars(args).items() if k not in outputs and not k.startswith("_"))


def check_outputs(args: argparse.Namespace, extra_inputs: list[Path] | None = None) -> None:
    """Refuse an output that cannot be written or would write over an input (see module docstring)."""
    outputs: tuple[Output, ...] = getattr(args, "_outputs", ())
    inputs = command_inputs(args) + list(extra_inputs or [])
    seen: dict[str, str] = {}
    for out in outputs:
        value = getattr(args, out.dest, None)
        if value is None:
            continue
        check_output_path(value, flag=out.flag, inputs=inputs, folder=out.folder, suffixes=out.suffixes,
                          contents=out.contents)
        key = str(Path(value).absolute())
        if key in seen:
            raise InputError(f"{out.flag} and {seen[key]} name the same file {value}; give two names")
        seen[key] = out.flag


def check_numbers(args: argparse.Namespace) -> None:
    """No numeric flag takes a NaN or an infinity (argparse's float() accepts both)."""
    for name, value in vars(args).items():
        values: list[Any] = list(value) if isinstance(value, list | tuple) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                flag = "--" + name.replace("_", "-")
                raise InputError(f"{flag} must be a finite number, got {v}")


def number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False
           ) -> Any:
    """An argparse type: an int or a finite float inside [low, high] (low excluded when low_open)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            word = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {word}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'above' if low_open else 'at least'} {low:g}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:g}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse
