"""The first-run set-up of `make demo` / `make test` says what it does and shows the install
progressing (one line per package), and a failed install stops with a clear line and no stamp.
Runs the real Makefile recipe with a stand-in Python whose pip prints like the real one. CI
installs Chromium for the browser tests and runs `make test`, the README's command."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/usr/bin/env bash
# stand-in for python3: `-m venv DIR` makes DIR/bin/python, whose `-m pip install` prints like pip
if [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin"
  cp "$0" "$3/bin/python"
  exit 0
fi
echo "Obtaining file:///repo"
echo "Collecting numpy>=1.26"
echo "  Downloading numpy-2.0.whl (18 MB)"
echo "Collecting torch==2.13.0"
echo "Successfully installed numpy-2.0 torch-2.13.0"
exit "${FAKE_PIP_RC:-0}"
"""


def run_setup(tmp_path: Path, rc: int) -> subprocess.CompletedProcess[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    fake = tmp_path / "fakepython"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "FAKE_PIP_RC": str(rc)}
    return subprocess.run(["make", "--no-print-directory", ".venv/.installed", f"PYTHON={fake}"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=60)


def test_setup_says_what_happens_and_shows_each_package(tmp_path: Path) -> None:
    proc = run_setup(tmp_path, 0)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("== first-run set-up: creating .venv") and "minutes" in lines[1]
    assert "Collecting numpy>=1.26" in lines and "Collecting torch==2.13.0" in lines
    assert not any("Downloading" in line for line in lines)        # one line per package, not per file
    assert lines[-1].startswith("== set-up done in ") and lines[-1].endswith(" s")
    assert (tmp_path / ".venv" / ".installed").exists()


def test_failed_install_stops_without_a_stamp(tmp_path: Path) -> None:
    proc = run_setup(tmp_path, 3)
    assert proc.returncode != 0
    assert "== set-up failed (pip exit 3); run make again to retry" in proc.stdout
    assert not (tmp_path / ".venv" / ".installed").exists()


def test_ci_installs_chromium_when_missing_and_runs_make_test() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "command -v chromium" in script and "apt-get install -y -qq chromium" in script
    assert script.rstrip().splitlines()[-1] == "make test"
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme
