"""The prepared GPU measurement (bench/gpu/measure.py) in its dry run: the same steps and output
files as on a lent GPU machine, on the CPU at tiny sizes, so the script cannot rot between loans."""

from __future__ import annotations

import json
import os
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
    assert [s["step"] for s in env["steps"]] == ["install", "traces", "calibrate", "plan", "validate prefix",
                                                 "validate none", "validate window", "throughput", "live"]
    assert all(s["status"] == "ok" for s in env["steps"])
    for name, kv in (("prefix", "prefix"), ("none", "none"), ("window", "prefix")):
        data = json.loads((out / f"validate_{name}.json").read_text())
        assert data["setup"]["kv_cache"] == kv
        # one process per trace: cpu-routing, fiddler, full-swap x 2 budgets, tide x 2 budgets x sync and
        # async, all-gpu once (11), and the planned policy on the prefix trace
        configs = [r["config"] for r in data["rows"]]
        assert len(configs) == (12 if name == "prefix" else 11), configs
        assert {r["budget"] for r in data["rows"]} == {4, 8, 16}
        assert {"tide B=4 tau=4", "tide B=4 tau=4 async", "tide B=8 tau=4 async"} <= set(configs)
    assert json.loads((out / "validate_window.json").read_text())["setup"]["window"] == "after-first-block"
    prefix = json.loads((out / "validate_prefix.json").read_text())
    assert all(len(c["measured_step_s"]) == 2 for c in prefix["configurations"])    # the dry run's repeats
    tp = prefix["throughput"]
    configs = {r["config"] for r in tp}
    # the plan's memory holds 8 experts per layer, shared evenly: planned runs at budget 8 too
    assert {"tide B=8 tau=4", "tide B=8 tau=4 async", "planned B=8", "full-swap B=8"} <= configs
    assert all(r["tokens_per_s"] > 0 for r in tp)
    live = json.loads((out / "live.json").read_text())
    assert [r["policy"] for r in live["rows"]] == ["tide", "cpu-routing"]
    assert all(r["identical"] for r in live["rows"])   # CPU: bit-identical to the plain decode
    check = live["float32_check"]      # one plain decode, every policy through the executor, float32
    assert [r["policy"] for r in check] == ["tide", "tide async", "full-swap", "fiddler", "cpu-routing"]
    assert all(r["identical"] and r["tokens"] > 0 for r in check), check
    summary = (out / "summary.txt").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])   # the table prints last
    assert "DRY RUN" in summary and "this run took" in summary


def test_a_cut_off_validation_keeps_the_configurations_it_finished(tmp_path: Path) -> None:
    """What validate wrote after each configuration is read back when the process was stopped,
    including a last line cut in half."""
    path = tmp_path / "configurations.jsonl"
    rows = [{"config": f"c{i}", "row": {"config": f"c{i}", "error": e}} for i, e in enumerate([0.02, -0.05])]
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"config": "c2", "ro')
    kept = measure.partial_results(path)
    assert kept["partial"] is True and [r["config"] for r in kept["rows"]] == ["c0", "c1"]
    assert kept["summary"]["configurations"] == 2 and kept["summary"]["max_abs_error"] == 0.05
    assert measure.partial_results(tmp_path / "absent.jsonl")["rows"] == []


def test_output_files_fit_what_a_lent_machine_returns() -> None:
    """At most 8 files, named in letters, digits, '.', '_' and '-' (the device tool's limits)."""
    assert len(measure.OUTPUT_FILES) <= 8
    assert all(all(c.isalnum() or c in "._-" for c in name) for name in measure.OUTPUT_FILES)
    gpu = measure.GPU
    assert gpu.budgets == (64, 128) and gpu.device == "cuda" and set(gpu.traces) == {"prefix", "none"}
    assert len(gpu.policies.split(",")) * len(gpu.budgets) * len(gpu.traces) >= 12


def test_each_step_runs_in_its_own_forked_process_with_its_exit_status_output_and_timeout(tmp_path: Path) -> None:
    """The fork server's children (measure.StepProcesses): the step's stdout, stderr, exit status
    and working folder are its own; a step past its timeout is killed and reported as a timeout,
    and the next step still runs."""
    procs = measure.StepProcesses({"MPLBACKEND": "Agg"}, tmp_path)
    ok = procs.run(["-c", "import os, sys; print(os.getcwd(), sys.argv[1:]); print('e', file=sys.stderr); "
                          "sys.exit(3)", "a", "b"], 120)
    assert ok.returncode == 3
    assert ok.stdout.split() == [str(tmp_path), "['a',", "'b']"] and ok.stderr.strip() == "e"
    failed = procs.run(["-c", "raise ValueError('boom')"], 60)
    assert failed.returncode == 1 and "ValueError: boom" in failed.stderr
    with pytest.raises(subprocess.TimeoutExpired):
        procs.run(["-c", "import time; time.sleep(60)"], 1.0)
    cli = procs.run(["tidesim", "--version"], 60)
    assert cli.returncode == 0 and cli.stdout.startswith("tidesim ")


def test_a_forked_step_imports_from_the_runs_pythonpath(tmp_path: Path) -> None:
    """On a lent machine the project is not installed: the steps import it, and the carried
    wheels, from PYTHONPATH (Run.env). multiprocessing gives each child the PARENT's sys.path,
    so StepProcesses must put those folders there too."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "zz_step_probe.py").write_text("VALUE = 42\n")
    env_before, path_before = dict(os.environ), list(sys.path)
    procs = measure.StepProcesses({"PYTHONPATH": str(lib), "ZZ_STEP_FLAG": "on"}, tmp_path)
    probe = procs.run(["-c", "import os, zz_step_probe; print(zz_step_probe.VALUE, os.environ['ZZ_STEP_FLAG'])"], 120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "42 on"
    # the caller keeps its own environment and import path (the run's are the steps' only)
    assert "ZZ_STEP_FLAG" not in os.environ and os.environ.get("PYTHONPATH") == env_before.get("PYTHONPATH")
    assert str(lib) not in sys.path and "zz_step_probe" not in sys.modules
    assert [p for p in sys.path if p in path_before] == [p for p in path_before if p in sys.path]


FAILS_WHEN_FORKED = """
import multiprocessing, sys
if multiprocessing.current_process().name.startswith("tidesim-step"):
    print("RuntimeError: Cannot re-initialize CUDA in forked subprocess.", file=sys.stderr)
    sys.exit(1)
print("fresh interpreter", sys.argv[1:])
"""


def test_a_step_that_cannot_start_cuda_when_forked_runs_again_in_a_fresh_interpreter(tmp_path: Path) -> None:
    run = measure.Run(out=tmp_path, work=tmp_path, sizes=measure.DRY, dry=True, budget_s=600.0, site=tmp_path / "site")
    proc = run.python(FAILS_WHEN_FORKED, 0.5, "probe", ["x"])
    assert proc.returncode == 0 and proc.stdout.strip() == "fresh interpreter ['x']"
    assert run.fork is False and any("fresh interpreters" in line for line in run.log_lines)
    # from then on every step starts fresh; --no-fork-server starts there
    assert run.tidesim(["--version"], 0.5).stdout.startswith("tidesim ")
    assert measure.fork_trouble("torch.AcceleratorError: CUDA error: initialization error")
    assert not measure.fork_trouble("ValueError: CUDA out of memory") and not measure.fork_trouble("")
