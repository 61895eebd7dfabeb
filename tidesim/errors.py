"""One exception type for bad input (the CLI turns it into exit status 2 and one line), and the
readers of user files that raise it."""

from __future__ import annotations

import errno
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
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a readable {what} (not text: a binary file?)") from None
    except OSError as exc:
        raise InputError(f"{path}: not a readable {what} ({os_problem(exc)})") from None


_OS_PROBLEMS = {
    errno.EISDIR: "is a folder, not a file",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOENT: "no such file or folder",
    errno.ENOSPC: "no space left on the disk",
    errno.EROFS: "the file system is read-only",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
}


def os_problem(exc: OSError) -> str:
    """An operating-system error in words (never a Python class name)."""
    if exc.errno in _OS_PROBLEMS:
        return _OS_PROBLEMS[exc.errno]
    return (exc.strerror or "input/output error").lower()


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError that reached the command line: the file and the problem in words."""
    where = exc.filename if exc.filename is not None else "a file"
    return f"{where}: {os_problem(exc)}"


def parse_yaml(text: str, source: str) -> Any:
    """YAML to Python values; a syntax error is one InputError line with its line number."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise InputError(f"{source}: not valid YAML{where}") from None
