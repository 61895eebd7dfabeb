"""A normal (non-editable) install finds the bundled traces and profiles from any directory."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_bundled_data(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("tidesim-*.whl"))
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(target)
    profiles = [n for n in names if n.startswith("tidesim/bundled/hwprofiles/") and n.endswith(".yaml")]
    traces = [n for n in names if n.startswith("tidesim/bundled/traces/") and n.endswith(".parquet")]
    assert len(profiles) == len(list((ROOT / "hwprofiles").glob("*.yaml")))
    assert len(traces) == len(list((ROOT / "traces").glob("*.parquet")))
    assert any(n.startswith("tidesim_runtime/") for n in names)
    code = ("from tidesim.hardware import bundled_profiles; from tidesim.bundled.paths import bundled_traces;"
            "import tidesim; print(tidesim.__file__); print(len(bundled_profiles()), len(bundled_traces()))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-I", "-c", code.replace("import tidesim;", "import sys; sys.path.insert(0, "
                          f"{str(target)!r}); import tidesim;")],
                         capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout.split("\n")
    assert out[0].startswith(str(target))
    assert out[1] == f"{len(profiles)} {len(traces)}"
