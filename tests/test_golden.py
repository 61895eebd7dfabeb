"""Byte-exact outputs of the commands on the bundled traces, pinned in tests/golden/.

A refactor that changes no rule must change no number: this test runs simulate, compare, plan,
sweep and demo on small slices of the bundled traces (seconds, not minutes) and compares what they
print and write, byte for byte, with the files in tests/golden/. Only wall-clock solver times
(`wall_time_s`) and the temporary folder's path are masked.

When a change is meant to move numbers (a fixed rule), regenerate the files and say so, with the
fix, in the commit message and the docs:

    TIDESIM_UPDATE_GOLDEN=1 .venv/bin/pytest -q tests/test_golden.py

then review `git diff tests/golden/` and commit it with the change.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tidesim.cli import main

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("TIDESIM_UPDATE_GOLDEN") == "1"
TMP = "<tmp>"
REPO = "<repo>"
ROOT = str(Path(__file__).resolve().parent.parent)   # bundled traces are named by their path in this checkout
BIG = 200_000

MINI4 = "llada2-mini-4layer_captured_prefix_g256"      # 4 MoE layers, 163 forwards: the fast one
MINI = "llada2-mini_none_g1024"
HW = "h100-sxm-pcie5"

SWEEP_GRID = f"""\
name: golden
description: the golden sweep (tests/test_golden.py)
parameters:
  trace: {MINI4}
  hw: {HW}
  engine: [analytic, sim]
  gpu_memory_gib: [3, 6]
  pcie_gen: 5
  cpu_cores_scale: [0.5, 2]
  policy: [tide, tide-reference, full-swap, cpu-routing, fiddler, all-gpu, oracle]
"""


def _mask(value: Any, tmp: str) -> Any:
    """The temporary folder's path becomes <tmp>, the checkout's <repo>; wall-clock times are dropped."""
    if isinstance(value, dict):
        return {k: _mask(v, tmp) for k, v in value.items() if k != "wall_time_s"}
    if isinstance(value, list):
        return [_mask(v, tmp) for v in value]
    if isinstance(value, str):
        return value.replace(tmp, TMP).replace(ROOT, REPO)
    return value


def _canonical(data: Any, tmp: Path) -> str:
    return json.dumps(_mask(data, str(tmp)), indent=2, sort_keys=True, allow_nan=True) + "\n"


def _check(name: str, text: str) -> None:
    if len(text) > BIG:       # a long file (a timeline) is pinned by its digest, to keep the repository small
        text = f"sha256 {hashlib.sha256(text.encode()).hexdigest()} of {len(text)} characters\n"
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.is_file(), f"no golden file {path}; create it with TIDESIM_UPDATE_GOLDEN=1 (see the docstring)"
    assert text == path.read_text(), f"{name} differs from the golden file (see this module's docstring)"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code = main(list(argv))
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def _file_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _table(path: Path) -> Any:
    """A Parquet table as its rows and its metadata (the file's bytes carry the writer's version)."""
    table = pq.read_table(path)
    meta = {k.decode(): json.loads(v) for k, v in (table.schema.metadata or {}).items()}
    return {"columns": [f"{f.name}: {f.type}" for f in table.schema], "metadata": meta, "rows": table.to_pylist()}


CASES: dict[str, tuple[list[str], dict[str, Callable[[Path], Any]]]] = {
    "simulate_tide_sim": (
        ["simulate", "--trace", MINI4, "--hw", HW, "--budget", "64", "--policy", "tide", "--json"], {}),
    "simulate_fiddler_timeline": (
        ["simulate", "--trace", MINI4, "--hw", HW, "--budget", "96", "--tau", "4", "--policy", "fiddler",
         "--timeline", "{tmp}/timeline.json", "--json"], {"timeline": lambda t: _file_json(t / "timeline.json")}),
    "simulate_tide_analytic_async": (
        ["simulate", "--trace", MINI, "--prompts", "2", "--hw", HW, "--gpu-mem-gib", "24", "--policy", "tide",
         "--refresh", "async", "--engine", "analytic", "--json"], {}),
    "compare_sim": (
        ["compare", "--trace", MINI4, "--hw", HW, "--budget", "64", "--json"], {}),
    "compare_mini_analytic": (
        ["compare", "--trace", MINI, "--prompts", "0", "--hw", HW, "--budget", "64", "--tau", "8",
         "--engine", "analytic", "--json"], {}),
    "plan_mini": (
        ["plan", "--trace", MINI, "--hw", HW, "--gpu-mem-gib", "24", "--taus", "1,4,16", "--budgets", "64,96,128",
         "--calibrate-prompts", "0", "-o", "{tmp}/plan.json", "--json"],
        {"plan_file": lambda t: _file_json(t / "plan.json")}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_command_output_is_pinned(case: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv, files = CASES[case]
    out = _run(capsys, *(a.replace("{tmp}", str(tmp_path)) for a in argv))
    _check(f"{case}.json", _canonical(out, tmp_path))
    for label, read in files.items():
        _check(f"{case}.{label}.json", _canonical(read(tmp_path), tmp_path))


def test_compare_with_plan_is_pinned(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A plan made by `tidesim plan`, then run as policy planned next to the others."""
    plan = tmp_path / "plan.json"
    _run(capsys, "plan", "--trace", MINI4, "--hw", HW, "--gpu-mem-gib", "3", "--taus", "1,2,4,8", "-o", str(plan),
         "--json")
    out = _run(capsys, "compare", "--trace", MINI4, "--hw", HW, "--gpu-mem-gib", "3", "--plan", str(plan),
               "--engine", "analytic", "--json")
    _check("compare_planned.json", _canonical(out, tmp_path))


def test_sweep_is_pinned(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(SWEEP_GRID)
    monkeypatch.chdir(tmp_path)
    out = _run(capsys, "sweep", str(grid), "-o", "results.parquet", "--workers", "1", "--no-figures", "--json")
    _check("sweep.json", _canonical(out, tmp_path))
    _check("sweep.table.json", _canonical(_table(tmp_path / "results.parquet"), tmp_path))


def test_demo_is_pinned(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's whole path (plan, every policy, tau sweep) on the bundled 4-layer trace."""
    import tidesim.cli.demo_cmd as demo_cmd
    from tidesim.demo import run_demo

    monkeypatch.setattr(demo_cmd, "run_demo", functools.partial(run_demo, cases=(("llada2-mini-4layer", MINI4),)))
    out = _run(capsys, "demo", "-o", str(tmp_path / "report"), "--workers", "1", "--json")
    _check("demo.json", _canonical(out, tmp_path))
    _check("demo.summary.json", _canonical(_file_json(tmp_path / "report" / "summary.json"), tmp_path))
