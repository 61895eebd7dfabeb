"""Bad input through the command line: exit status 2, one line on stderr, no traceback, and no new or
changed file (issue #17's classes: outputs over inputs, unwritable outputs, nonsense traces and
profiles, untrusted plans, absurd sizes, non-finite flags, loose ends)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tidesim.cli import main
from tidesim.models import PRESETS
from tidesim.trace.io import write_trace
from tidesim.trace.synth import SynthConfig, synthesize

HW = "h100-sxm-pcie5"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under folder with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def refused(capsys: pytest.CaptureFixture[str], folder: Path, *args: str, expect: str = "") -> str:
    """Run the command in `folder`; it must exit 2 with one stderr line and leave every file as it was."""
    before = snapshot(folder)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        code = main(list(args))
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert code == 2, f"{args}: exit {code}, stderr {err!r}"
    assert err.count("\n") == 1 and err.startswith("tidesim: error: "), err
    assert "Traceback" not in err and "Error)" not in err and "Error:" not in err.split("error:", 1)[1], err
    assert expect in err, err
    assert snapshot(folder) == before, f"{args} changed files"
    return err


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a small trace t.parquet and a stray plain file `afile`."""
    folder = tmp_path_factory.mktemp("bad")
    trace = synthesize(SynthConfig(model=PRESETS["tiny"], prompts=2, gen_length=16, block_length=8,
                                   prompt_length=6, seed=1))
    write_trace(trace, folder / "t.parquet")
    (folder / "afile").write_text("not a folder\n")
    (folder / "g.yaml").write_text(yaml.safe_dump({"parameters": {"trace": "t.parquet", "policy": "tide",
                                                                  "budget": 4}}))
    return folder


# ----- 1 and 2: outputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("args, expect", [
    (["plan", "--trace", "t.parquet", "--hw", HW, "--gpu-mem-gib", "20", "-o", "t.parquet"], ".json"),
    (["simulate", "--trace", "t.parquet", "--hw", HW, "--policy", "tide", "--timeline", "t.parquet"], ".json"),
    (["sweep", "g.yaml", "-o", "g.yaml"], ".parquet"),
    (["trace", "synth", "-o", "x.txt"], "must end in one of .parquet"),
    (["trace", "synth", "--model", "tiny", "-o", "afile/t.parquet"], "is a file, not a folder"),
    (["plan", "--trace", "t.parquet", "--hw", HW, "--gpu-mem-gib", "20", "-o", "afile/p.json"], "not a folder"),
    (["compare", "--trace", "t.parquet", "--hw", HW, "--figure", "afile/f.png"], "not a folder"),
    (["sweep", "g.yaml", "-o", "afile/r.parquet"], "not a folder"),
    (["demo", "-o", "afile"], "is a file, not a folder"),
    (["demo", "-o", "afile/report"], "is a file, not a folder"),
    (["calibrate", "-o", "afile/p.yaml"], "not a folder"),
    (["simulate", "--trace", "t.parquet", "--hw", HW, "--policy", "tide", "--timeline", "."], "is a folder"),
])
def test_outputs_checked_before_work(capsys, work, args, expect) -> None:
    refused(capsys, work, *args, expect=expect)


def test_output_over_an_input_of_the_same_kind(capsys, work) -> None:
    refused(capsys, work, "sweep", "g.yaml", "-o", "t.parquet", expect="would write over the input")
    assert not (work / "t.parts").exists()
    (work / "r").mkdir()
    (work / "r" / "results.parquet").write_bytes((work / "t.parquet").read_bytes())
    refused(capsys, work, "validate", "--trace", "r/results.parquet", "--hw", HW, "-o", "r",
            expect="would write over the input")
    (work / "r" / "results.parquet").unlink()
    (work / "r").rmdir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_folder(capsys, work) -> None:
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        refused(capsys, work, "trace", "synth", "--model", "tiny", "-o", "locked/t.parquet", expect="permission")
    finally:
        locked.chmod(0o700)
        locked.rmdir()


# ----- 3: traces -------------------------------------------------------------------------------------------
def _mutated(work: Path, name: str, change) -> str:
    table = pq.read_table(work / "t.parquet")
    table = change(table)
    pq.write_table(table, work / name)
    return name


def _set(table: pa.Table, column: str, array: pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(column), column, array)


def _tokens(table: pa.Table) -> list:
    return table.column("tokens").to_pylist()


@pytest.mark.parametrize("name, change, expect", [
    ("float_tokens.parquet", lambda t: _set(t, "tokens", pa.array(_tokens(t), pa.float64())), "whole numbers"),
    ("nan_tokens.parquet", lambda t: _set(t, "tokens", pa.array([float("nan") if i == 4 else v
                                                                  for i, v in enumerate(_tokens(t))])),
     "whole numbers"),
    ("null_step.parquet", lambda t: _set(t, "step", pa.array([None if i == 5 else v for i, v in
                                                              enumerate(t.column("step").to_pylist())], pa.int32())),
     "row 5: column 'step' has a missing value"),
    ("uneven_tokens.parquet", lambda t: _set(t, "tokens", pa.array([v + (i % 3 == 2) for i, v in
                                                                    enumerate(_tokens(t))], pa.int32())),
     "differs between its layer rows"),
    ("text_step.parquet", lambda t: _set(t, "step", pa.array([str(v) for v in t.column("step").to_pylist()])),
     "column 'step' must hold whole numbers, got text"),
])
def test_nonsense_traces_refused(capsys, work, name, change, expect) -> None:
    path = _mutated(work, name, change)
    refused(capsys, work, "trace", "stats", path, expect=expect)
    refused(capsys, work, "simulate", "--trace", path, "--hw", HW, "--policy", "tide", expect=expect)
    (work / path).unlink()


# ----- 4: profiles -------------------------------------------------------------------------------------------
def _profile(work: Path, name: str, part: str, field: str, value: object) -> str:
    from tidesim.hardware import get_profile

    data = get_profile("a40-pcie4").to_dict()
    data[part][field] = value
    (work / name).write_text(yaml.safe_dump(data))
    return name


@pytest.mark.parametrize("part, field, value, expect", [
    ("pcie", "h2d_gbs", float("nan"), "pcie.h2d_gbs: must be a finite number, got nan"),
    ("gpu", "mem_bandwidth_gbs", float("inf"), "must be a finite number, got inf"),
    ("pcie", "h2d_gbs", 1e300, "outside the plausible range"),
    ("pcie", "d2h_gbs", 1e-300, "outside the plausible range"),
    ("cpu", "workers", 2.5, "whole number"),
])
def test_nonsense_profiles_refused(capsys, work, part, field, value, expect) -> None:
    name = _profile(work, "bad.yaml", part, field, value)
    refused(capsys, work, "simulate", "--trace", "t.parquet", "--hw", name, "--policy", "tide", expect=expect)
    refused(capsys, work, "hw", "show", name, expect=expect)
    (work / name).unlink()


def test_validate_refuses_a_nan_profile(capsys, work) -> None:
    pytest.importorskip("torch")
    name = _profile(work, "nan.yaml", "pcie", "h2d_gbs", float("nan"))
    refused(capsys, work, "validate", "--trace", "t.parquet", "--hw", name, "--device", "cpu", "-o", "res",
            expect="must be a finite number")
    (work / name).unlink()


# ----- 5: plans ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planned(work: Path) -> Path:
    """A plan made from t.parquet on the H100 preset."""
    from planner_cases import gib_for_slots

    assert main(["plan", "--trace", str(work / "t.parquet"), "--hw", HW, "--gpu-mem-gib", str(gib_for_slots(24)),
                 "--taus", "1,2", "--budgets", "4,8", "--oracle-iterations", "1", "-o",
                 str(work / "plan.json"), "--json"]) == 0
    return work / "plan.json"


def test_plan_on_another_profile_or_trace(capsys, work, planned) -> None:
    capsys.readouterr()
    sim = ["simulate", "--trace", "t.parquet", "--plan", "plan.json", "--engine", "analytic"]
    refused(capsys, work, *sim, "--hw", "a100-80gb-pcie4",
            expect="made for hardware profile 'h100-sxm-pcie5' (sha256")
    other = synthesize(SynthConfig(model=PRESETS["tiny"], prompts=2, gen_length=16, block_length=8,
                                   prompt_length=6, seed=2))
    write_trace(other, work / "other.parquet")
    refused(capsys, work, "compare", "--trace", "other.parquet", "--hw", HW, "--plan", "plan.json",
            "--policies", "planned", "--engine", "analytic", expect="made from trace")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main([*sim, "--hw", "a100-80gb-pcie4", "--force", "--json"]) == 0
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert err.startswith("tidesim: warning: the plan was made for hardware profile 'h100-sxm-pcie5'")
    (work / "other.parquet").unlink()


def test_plan_with_placeholder_fingerprints(capsys, work, planned) -> None:
    import json

    data = json.loads(planned.read_text())
    data["fingerprints"]["trace_sha256"] = "0" * 64
    (work / "zero.json").write_text(json.dumps(data))
    refused(capsys, work, "simulate", "--trace", "t.parquet", "--hw", HW, "--plan", "zero.json",
            expect="fingerprints.trace_sha256 is a placeholder")
    (work / "zero.json").unlink()


# ----- 6 and 7: sizes and numbers ----------------------------------------------------------------------------
@pytest.mark.parametrize("args, expect", [
    (["trace", "synth", "--prompts", "1000000", "-o", "x.parquet"], "prompts 1,000,000 exceeds the limit"),
    (["trace", "synth", "--gen-length", "1000000000", "-o", "x.parquet"], "gen-length 1,000,000,000 exceeds"),
    (["trace", "synth", "--prompt-length", "1000000000", "-o", "x.parquet"], "prompt-length 1,000,000,000"),
    (["trace", "synth", "--prompts", "5000", "--gen-length", "8192", "--block-length", "8", "-o", "x.parquet"],
     "estimated forwards"),
    (["plan", "--trace", "t.parquet", "--hw", HW, "--gpu-mem-gib", "inf", "-o", "p.json"], "finite number, got inf"),
    (["plan", "--trace", "t.parquet", "--hw", HW, "--gpu-mem-gib", "20", "--time-limit", "nan", "-o", "p.json"],
     "finite number, got nan"),
    (["plan", "--trace", "t.parquet", "--hw", HW, "--gpu-mem-gib", "20", "--taus", "1..100000000", "-o", "p.json"],
     "more than the limit"),
    (["simulate", "--trace", "t.parquet", "--hw", HW, "--policy", "tide", "--gpu-mem-gib", "nan"], "finite"),
    (["trace", "synth", "--threshold", "nan", "-o", "x.parquet"], "finite number, got nan"),
])
def test_absurd_sizes_and_numbers(capsys, work, args, expect) -> None:
    refused(capsys, work, *args, expect=expect)


def test_sweep_refuses_absurd_sizes_and_leaves_nothing(capsys, work) -> None:
    (work / "gen.yaml").write_text(yaml.safe_dump({"parameters": {"gen_length": 1_000_000_000, "model": "tiny"}}))
    refused(capsys, work, "sweep", "gen.yaml", "-o", "r.parquet", expect="must be <= 65536")
    (work / "mill.yaml").write_text(yaml.safe_dump({"parameters": {"tau": {"from": 1, "to": 1000},
                                                                   "gpu_speed": {"linspace": [0.5, 2, 1000]}}}))
    refused(capsys, work, "sweep", "mill.yaml", "-o", "r.parquet", "--dry-run", expect="1,000,000 points")
    (work / "gen.yaml").unlink()
    (work / "mill.yaml").unlink()


def test_dry_run_of_a_big_grid_is_a_summary(capsys, work) -> None:
    (work / "big.yaml").write_text(yaml.safe_dump({"parameters": {
        "trace": "t.parquet", "budget": 4, "tau": {"from": 1, "to": 101},
        "policy": ["tide", "fiddler", "cpu-routing"]}}))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main(["sweep", "big.yaml", "-o", "r.parquet", "--dry-run"]) == 0
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "303 points" in out and len(out.splitlines()) < 10
    assert "1, 2, 3, 4, ..., 99, 100, 101" in out
    (work / "big.yaml").unlink()


def test_memory_estimate_refuses_what_does_not_fit() -> None:
    from tidesim.errors import InputError
    from tidesim.limits import check_synth, synth_estimate

    mini = PRESETS["llada2-mini"]
    est = synth_estimate(mini, 4, 256, 32, 300, "prefix")
    # 4 prompts x 8 blocks x (13 steps + commit) + 4 prefills; counts 16 B, routing arrays 24 B per value
    assert est.forwards == 4 * (8 * 14 + 1)
    layers, experts = mini.num_moe_layers, mini.num_experts
    assert est.bytes == est.forwards * layers * experts * 16 + 300 * layers * experts * 24
    assert check_synth(mini, 4, 256, 32, 300, "prefix", available=2**40) == est
    with pytest.raises(InputError, match=r"needs about .* of memory, more than this machine has available"):
        check_synth(mini, 4, 256, 32, 300, "prefix", available=est.bytes)


# ----- 9: interrupts and unreachable schedulers (kill -9 of a sweep: tests/test_procs.py) ---------------------
def test_dask_scheduler_that_answers_nothing(capsys, work, monkeypatch) -> None:
    pytest.importorskip("distributed")
    import socket

    from tidesim.sweep import executors

    monkeypatch.setattr(executors, "DASK_CONNECT_TIMEOUT_S", 1.0)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
    try:
        refused(capsys, work, "sweep", "g.yaml", "-o", "r.parquet", "--executor", "dask", "--scheduler", address,
                expect=f"the Dask scheduler '{address}' did not answer within 1 s")
    finally:
        silent.close()


# ----- 8 and 10: loose ends --------------------------------------------------------------------------------------
def test_empty_prompts_refused(capsys, work) -> None:
    refused(capsys, work, "simulate", "--trace", "t.parquet", "--hw", HW, "--policy", "tide", "--prompts=",
            expect="--prompts is empty")
    refused(capsys, work, "plan", "--trace", "t.parquet", "--hw", HW, "--gpu-mem-gib", "20",
            "--calibrate-prompts=", "-o", "p.json", expect="--calibrate-prompts")


def test_unknown_flag_points_to_the_subcommand_help(capsys, work) -> None:
    refused(capsys, work, "trace", "synth", "--bogus", "-o", "x.parquet", expect="see `tidesim trace synth --help`")
    refused(capsys, work, "simulate", "--trace", "t.parquet", "--frobnicate", expect="see `tidesim simulate --help`")


def test_messages_say_words_not_class_names(capsys, work) -> None:
    (work / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    err = refused(capsys, work, "hw", "show", "binary.yaml", expect="not text")
    assert "UnicodeDecodeError" not in err
    (work / "binary.yaml").unlink()
    (work / "folder.yaml").mkdir()
    err = refused(capsys, work, "hw", "show", "folder.yaml", expect="is a folder")
    assert "IsADirectoryError" not in err
    (work / "folder.yaml").rmdir()


def test_cpu_workers_checked_alike(capsys, work) -> None:
    pytest.importorskip("torch")
    from tidesim.limits import usable_cores

    refused(capsys, work, "validate", "--trace", "t.parquet", "--hw", HW, "--cpu-workers", "0", "-o", "res",
            expect="--cpu-workers must be at least 1")
    refused(capsys, work, "calibrate", "--cpu-workers", str(usable_cores() + 1), "--device", "cpu", "-o", "p.yaml",
            expect=f"more than the {usable_cores()} cores")


def test_a_datasheet_profile_is_not_this_machine() -> None:
    from tidesim.hardware import get_profile, not_this_machine
    from tidesim.limits import usable_cores

    assert "datasheet estimate, not a measurement of this machine" in not_this_machine(get_profile(HW))
    measured = get_profile("dev-2core-cpu")
    measured.cpu.cores = usable_cores() + 1
    assert f"this machine has {usable_cores()}" in not_this_machine(measured)
    measured.cpu.cores = 1
    assert not_this_machine(measured) is None


def test_trace_capture_output_guarded(capsys, work) -> None:
    refused(capsys, work, "trace", "capture", "--config", "tiny", "--prompt-tokens", "4", "-o", "afile/t.parquet",
            expect="is a file, not a folder")
    refused(capsys, work, "trace", "capture", "--config", "tiny", "--prompt-tokens", "4", "-o", "t.txt",
            expect="must end in one of .parquet")


def test_cpu_kernel_checked_alike(capsys, work) -> None:
    """--cpu-kernel: an unknown name, a kernel that cannot run the run's dtype (the cpu-as-gpu
    path computes in float32), and a kernel other than the one the profile was calibrated with."""
    pytest.importorskip("torch")
    from tidesim.hardware import get_profile

    refused(capsys, work, "calibrate", "--cpu-kernel", "fastest", "--device", "cpu", "-o", "p.yaml",
            expect="--cpu-kernel must be one of")
    # kt-kernel runs bf16 only (and, where its package is missing, nothing at all)
    refused(capsys, work, "calibrate", "--cpu-kernel", "kt-kernel", "--device", "cpu", "--cpu-workers", "1",
            "-o", "p.yaml", expect="--cpu-kernel kt-kernel")
    prompts = str(Path(__file__).resolve().parents[1] / "docs/examples/prompts-tiny.txt")
    refused(capsys, work, "generate", "--config", "tiny", "--prompts", prompts, "--policy", "tide",
            "--cpu-kernel", "fastest", "--device", "cpu", "-o", "run", expect="--cpu-kernel must be one of")
    prof = get_profile("dev-2core-cpu")
    prof.cpu.kernel = "linear"
    prof.save(work / "k.yaml")
    try:
        refused(capsys, work, "validate", "--trace", "t.parquet", "--hw", "k.yaml", "--cpu-kernel", "weights-left",
                "--device", "cpu", "-o", "res", expect="differs from the profile's linear")
    finally:
        (work / "k.yaml").unlink()
