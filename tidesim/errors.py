"""One exception type for bad input (the CLI turns it into exit status 2 and one line), and the
readers of user files that raise it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class InputError(Exception):
    """Bad input from the user (file, flag, format); the message is the one line shown."""


def read_input_text(path: str | Path, what: str, hint: str) -> str:
    """The text of a user's input file; a missing, unreadable or binary file is one InputError line
    naming the file (`what` names the kind of file, `hint` says what to do when it is missing)."""
    path = Path(path)
    try:
        return path.read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what}; {hint}") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as exc:
        raise InputError(f"{path}: not a readable {what} ({exc.__class__.__name__})") from None


def parse_yaml(text: str, source: str) -> Any:
    """YAML to Python values; a syntax error is one InputError line with its line number."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise InputError(f"{source}: not valid YAML{where}") from None
