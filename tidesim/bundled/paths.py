"""Find bundled traces and hardware profiles, from a source checkout or an installed wheel."""

from __future__ import annotations

import importlib
from pathlib import Path

from tidesim.errors import InputError


def _folder(package: str, checkout_dir: str) -> Path:
    """The installed package folder, or in a source checkout (editable install) the top-level one."""
    checkout = Path(__file__).resolve().parents[2] / checkout_dir
    if checkout.is_dir() and (checkout.parent / "pyproject.toml").exists():
        return checkout
    try:
        module = importlib.import_module(package)  # a namespace package: data files only
        return Path(next(iter(module.__path__)))
    except (ModuleNotFoundError, StopIteration):
        raise InputError(f"bundled data {package} is missing from this installation; reinstall tidesim") from None


def traces_dir() -> Path:
    return _folder("tidesim.bundled.traces", "traces")


def hwprofiles_dir() -> Path:
    return _folder("tidesim.bundled.hwprofiles", "hwprofiles")


def bundled_traces() -> dict[str, Path]:
    """Bundled trace files by name (file stem)."""
    return {p.stem: p for p in sorted(traces_dir().glob("*.parquet"))}


def resolve_trace(name_or_path: str) -> Path:
    """A path as given if it exists, else a bundled trace by name."""
    path = Path(name_or_path)
    if path.exists() or path.suffix == ".parquet" or "/" in name_or_path:
        return path
    traces = bundled_traces()
    if name_or_path in traces:
        return traces[name_or_path]
    raise InputError(
        f"unknown trace {name_or_path!r}: not a file and not a bundled trace "
        f"({', '.join(traces) or 'none bundled'}); see `tidesim trace list`"
    )
