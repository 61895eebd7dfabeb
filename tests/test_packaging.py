"""A normal (non-editable) install finds the bundled traces and profiles from any directory."""

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_bundled_data(tmp_path):
    # build from a clean copy: setuptools' build/ folder keeps files deleted since the last build
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                ".mypy_cache", ".ruff_cache", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("tidesim-*.whl"))
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(target)
    profiles = [n for n in names if n.startswith("tidesim/bundled/hwprofiles/") and n.endswith(".yaml")]
    traces = [n for n in names if n.startswith("tidesim/bundled/traces/") and n.endswith(".parquet")]
    assert len(profiles) == len(list((ROOT / "hwprofiles").glob("*.yaml")))
    assert len(traces) == len(list((ROOT / "traces").glob("*.parquet")))
    for part in ("reference", "engine", "measure"):
        assert f"tidesim_runtime/{part}/__init__.py" in names
    assert "tidesim_runtime/engine/executor.py" in names
    # -S: no site processing, so the editable install's import hook is not there; the wheel's folder
    # comes first and site-packages (dependencies only) after it.
    site_packages = sysconfig.get_paths()["purelib"]
    code = (f"import sys; sys.path[:0] = [{str(target)!r}, {site_packages!r}];"
            "import tidesim; from tidesim.hardware import bundled_profiles;"
            "from tidesim.bundled.paths import bundled_traces;"
            "print(tidesim.__file__); print(len(bundled_profiles()), len(bundled_traces()))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         check=True).stdout.split("\n")
    assert out[0].startswith(str(target))
    assert out[1] == f"{len(profiles)} {len(traces)}"
