"""Write files all at once: to a temporary file beside the target, then rename.

A crash or a bad input half-way leaves no half-written output behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


# ----- the output-path guard: checked before any work -----------------------------------------------
def check_output_path(target: str | Path, *, flag: str = "--output", inputs: Iterable[str | Path] = (),
                      folder: bool = False, suffixes: tuple[str, ...] = (), contents: Iterable[str] = ()) -> Path:
    """Refuse, with one InputError line, an output path that cannot be written or that would write
    over an input: a file where a folder is wanted (or the reverse), a parent that is a file, a folder
    without write permission, a wrong suffix, or the same file as one of `inputs`. `contents` are
    file names written inside a `folder` output; each is checked against the inputs too."""
    from tidesim.errors import InputError

    path = Path(target)
    if not str(target).strip():
        raise InputError(f"{flag}: empty path; give a file name")
    if folder:
        if path.exists() and not path.is_dir():
            raise InputError(f"{flag} {path}: exists and is a file, not a folder; give a folder name")
    else:
        if path.is_dir():
            raise InputError(f"{flag} {path}: is a folder; give a file name")
        if suffixes and path.suffix.lower() not in suffixes:
            raise InputError(f"{flag} must end in one of {', '.join(suffixes)}, got {path}")
    _check_parent(path, flag)
    written = [path] if not folder else [path / name for name in contents]
    for inp in inputs:
        for out in written:
            if _same_file(out, Path(inp)):
                raise InputError(f"{flag} {target}: would write over the input {inp}; give another name")
        if folder and _inside(Path(inp), path):
            raise InputError(f"{flag} {target}: the input {inp} lies inside this output folder; "
                             "give another folder")
    return path


def _check_parent(path: Path, flag: str) -> None:
    from tidesim.errors import InputError

    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: no permission to write in the folder {parent}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        return False
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(inner: Path, folder: Path) -> bool:
    inner_real, folder_real = Path(os.path.realpath(inner)), Path(os.path.realpath(folder))
    return inner_real != folder_real and folder_real in inner_real.parents


def input_files(values: Iterable[object]) -> list[Path]:
    """The values (flag values, file names) that name an existing file: a command's inputs."""
    out = []
    for value in values:
        items = value if isinstance(value, list | tuple) else [value]
        for item in items:
            if isinstance(item, str | Path) and str(item) and os.path.isfile(item):
                out.append(Path(item))
    return out
