"""The prepared GPU measurement (bench/gpu/measure.py) in its dry run: the same steps and output
files as on a lent GPU machine, on the CPU at tiny sizes, so the script cannot rot between loans."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench" / "gpu"))
import measure  # noqa: E402


@pytest.mark.slow
def test_dry_run_writes_every_output_file_and_every_step_succeeds(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu/measure.py"), "--dry-run", "--out", str(out),
                           "--wheels", str(tmp_path / "no-wheels")], capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(measure.OUTPUT_FILES)
    assert len(measure.OUTPUT_FILES) <= 8
    env = json.loads((out / "env.json").read_text())
    assert env["dry_run"] is True and env["source"] and env["torch"]["torch"]
    assert [s["step"] for s in env["steps"]] == ["install", "traces", "calibrate", "validate prefix",
                                                 "validate none", "plan", "throughput", "live"]
    assert all(s["status"] == "ok" for s in env["steps"])
    for kv in ("prefix", "none"):
        data = json.loads((out / f"validate_{kv}.json").read_text())
        assert data["setup"]["kv_cache"] == kv
        # 4 policies x 2 budgets + all-gpu once: 9 configurations per KV mode (18 >= 12 in all)
        assert len(data["rows"]) == 9 and {r["budget"] for r in data["rows"]} == {4, 8, 16}
    tp = json.loads((out / "throughput.json").read_text())
    configs = {r["config"] for r in tp["rows"]}
    # the plan's memory holds 8 experts per layer, shared evenly: planned runs at budget 8 too
    assert {"tide B=8 tau=4", "tide B=8 tau=4 async", "planned B=8"} <= configs
    assert all(r["tokens_per_s"] > 0 for r in tp["rows"])
    live = json.loads((out / "live.json").read_text())
    assert [r["policy"] for r in live["rows"]] == ["tide", "cpu-routing"]
    assert all(r["identical"] for r in live["rows"])   # CPU: bit-identical to the plain decode
    summary = (out / "summary.txt").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])   # the table prints last
    assert "DRY RUN" in summary


def test_output_files_fit_what_a_lent_machine_returns() -> None:
    """At most 8 files, named in letters, digits, '.', '_' and '-' (the device tool's limits)."""
    assert len(measure.OUTPUT_FILES) <= 8
    assert all(all(c.isalnum() or c in "._-" for c in name) for name in measure.OUTPUT_FILES)
    gpu = measure.GPU
    assert gpu.budgets == (64, 128) and gpu.device == "cuda" and set(gpu.traces) == {"prefix", "none"}
    assert len(gpu.policies.split(",")) * len(gpu.budgets) * len(gpu.traces) >= 12
