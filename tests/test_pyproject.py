"""Every package folder ships in the wheel: pyproject's explicit package list stays complete."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tidesim").rglob("__init__.py")}
    runtime = ROOT / "runtime"
    found |= {".".join(p.parent.relative_to(runtime).parts) for p in (runtime / "tidesim_runtime").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject packages: {sorted(found - listed)}"
