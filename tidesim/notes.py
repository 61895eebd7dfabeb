"""Notes: what a cost lookup had to estimate (a roofline for an unmeasured shape, a curve used
outside its measured range), said with the result instead of being stored on the hardware profile.

A caller opens `collecting()` around the work whose notes it wants; `note(text)` adds to every
collection open in this context (so an outer evaluation sees what an inner cost lookup noted).
Caches keep the notes their value raised (`noting`) and say them again on reuse (`note_all`), so a
cached result carries the same notes as a fresh one. With no collection open a note goes nowhere:
notes are about one evaluation, never state of the inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from tidesim.lru import LRU

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

_OPEN: ContextVar[tuple[set[str], ...]] = ContextVar("tidesim_notes", default=())


def note(text: str) -> None:
    """Say `text` to every collection open in this context."""
    for box in _OPEN.get():
        box.add(text)


def note_all(texts: Iterable[str]) -> None:
    """Say notes again (a cached value's, on reuse)."""
    texts = tuple(texts)
    for box in _OPEN.get():
        box.update(texts)


@contextmanager
def collecting() -> Iterator[set[str]]:
    """The notes said inside the block (they reach the enclosing collections too)."""
    box: set[str] = set()
    token = _OPEN.set((*_OPEN.get(), box))
    try:
        yield box
    finally:
        _OPEN.reset(token)


def noting(fn: Callable[[], T]) -> tuple[T, frozenset[str]]:
    """fn() and the notes it said (for a cache to keep beside the value)."""
    with collecting() as box:
        value = fn()
    return value, frozenset(box)


def cached(cache: LRU[K, tuple[T, frozenset[str]]], key: K, make: Callable[[], T]) -> T:
    """The value kept under `key`, made now (with the notes it said) when missing; its notes are
    said either way, so a cached value reports what a fresh one would."""
    kept = cache.get(key)
    if kept is None:
        kept = noting(make)
        cache.put(key, kept)
    note_all(kept[1])
    return kept[0]
