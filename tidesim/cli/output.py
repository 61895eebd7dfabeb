"""Shared output helpers for commands: a readable table by default, JSON for scripts."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from tidesim.formatting import format_cell, to_jsonable

T = TypeVar("T")


def print_json(value: Any) -> None:
    print(json.dumps(to_jsonable(value), indent=2, sort_keys=True))


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    raw = [list(row) for row in rows]
    cells = [[format_cell(v) for v in row] for row in raw]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    numeric = [
        all(isinstance(r[i], int | float | np.number) for r in raw) if raw else False
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()
    out = [line(list(headers)), line(["-" * w for w in widths])]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A progress bar on a terminal (stderr), silent otherwise."""
    yield from tqdm(items, desc=desc, total=total, disable=not sys.stderr.isatty(), leave=False)


@dataclass
class Announcement:
    """What `announce` prints when the work ends; the caller fills in the summary. With lazy=True the
    start line waits for begin(), so input checks inside the work still fail with one line."""

    command: str
    what: str
    enabled: bool
    summary: str = ""
    started: float | None = None

    def begin(self) -> None:
        if self.enabled and self.started is None:
            print(f"tidesim {self.command}: {self.what}", file=sys.stderr, flush=True)
            self.started = time.monotonic()

    def wrap(self, items: Iterable[T]) -> Iterable[T]:
        """begin() when the wrapped work (e.g. a progress iterator) is reached, then pass it on."""
        self.begin()
        return items


@contextmanager
def announce(command: str, what: str, lazy: bool = False) -> Iterator[Announcement]:
    """When stderr is not a terminal (a script, a CI log), one line when long work starts and one
    with a summary when it ends, so a long run is not silent; on a terminal the progress bars say
    it. Wall-clock time here is for the reader only; simulated time never reads it."""
    note = Announcement(command, what, enabled=not sys.stderr.isatty())
    if not lazy:
        note.begin()
    yield note
    if note.started is not None:
        took = f"done in {time.monotonic() - note.started:.1f} s"
        print(f"tidesim {command}: {took}" + (f"; {note.summary}" if note.summary else ""), file=sys.stderr,
              flush=True)
