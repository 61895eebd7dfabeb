"""`tidesim generate`: the run folder and its files, the summary, a previous run replaced, and every
bad input refused with exit 2 and one line before any work (no folder written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")

from tidesim.cli import main  # noqa: E402
from tidesim.plan import load_plan  # noqa: E402
from tidesim.schedule import schedule_problems  # noqa: E402
from tidesim.schedule_io import load_schedule  # noqa: E402
from tidesim.trace.io import read_trace  # noqa: E402
from tidesim.workload import workload_from_trace  # noqa: E402

BASE = ["generate", "--config", "tiny", "--gen-length", "8", "--block-length", "4"]


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text("5 17 300 42 7\n9 8 7\n")
    return p


def test_generate_writes_every_file_with_prediction_and_lossless_check(tmp_path: Path, prompts: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = [*BASE, "--prompts", str(prompts), "--policy", "tide", "--tau", "2", "--budget", "6",
            "--hw", "dev-2core-cpu", "--check-lossless", "--device", "cpu", "-o", str(out), "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == sorted(summary["files"])
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [g["prompt_tokens"] for g in gens] == [[5, 17, 300, 42, 7], [9, 8, 7]]
    trace = read_trace(out / "trace.parquet")
    frame = pd.read_parquet(out / "forwards.parquet")
    schedule = load_schedule(out / "schedule.npz")
    assert schedule_problems(schedule, workload_from_trace(trace)) == []
    assert len(frame) == trace.num_forwards == summary["totals"]["forwards"]
    assert summary["lossless"]["identical"] is True
    p = summary["prediction"]
    assert p["predicted_total_s"] == pytest.approx(frame["predicted_s"].sum())
    assert p["measured_total_s"] == pytest.approx(frame["time_s"].sum())
    assert p["median_abs_error_per_forward"] == pytest.approx(np.median(np.abs(frame["error"])))
    assert summary["totals"]["generated_tokens"] == sum(len(g["tokens"]) for g in gens)
    assert summary["totals"]["gpu_tokens"] == int(frame["gpu_tokens"].sum())
    # a previous run is replaced; the table output names the folder
    assert main([*BASE, "--prompts", str(prompts), "--policy", "full-swap", "--budget", "4", "--device", "cpu",
                 "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["setup"]["policy"] == "full-swap"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def bad_cases(tmp_path: Path, prompts: Path) -> list[tuple[list[str], str]]:
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    plan = tmp_path / "plan.json"
    from test_plan import make_plan  # a plan made for llada2-mini

    make_plan().save(plan)
    load_plan(plan)
    bad_prompts = tmp_path / "bad.txt"
    bad_prompts.write_text("hello world\n")
    run = tmp_path / "run"
    return [
        (["--prompts", str(prompts), "--policy", "lru", "-o", str(run)], "unknown policy 'lru'"),
        (["--prompts", str(prompts), "--policy", "oracle", "-o", str(run)], "oracle is a bound"),
        (["--prompts", str(prompts), "--plan", str(plan), "-o", str(run)], "the plan was made for model"),
        (["--prompts", str(prompts), "--policy", "tide", "--budget", "99", "-o", str(run)], "--budget must lie in 0."),
        (["--prompts", str(bad_prompts), "--policy", "tide", "-o", str(run)], "--prompts"),
        (["--prompts", str(prompts), "--policy", "tide", "-o", str(other)], "is not a previous `tidesim generate` run"),
        (["--prompts", str(prompts), "--policy", "cpu-routing", "-o", str(run)], "give --static-from"),
        (["--prompts", str(prompts), "--policy", "fiddler", "-o", str(run)], "give --hw PROFILE"),
        (["--prompts", str(prompts), "--policy", "tide", "--tau", "0", "-o", str(run)], "--tau must be at least 1"),
        (["--prompts", str(prompts), "--policy", "tide", "--threshold", "nan", "-o", str(run)], "--threshold"),
        (["--prompts", str(prompts), "--policy", "tide", "--device", "cuda", "-o", str(run)], ""),
    ]


def test_bad_input_is_exit_2_one_line_before_any_work(tmp_path: Path, prompts: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    for args, message in bad_cases(tmp_path, prompts):
        if "cuda" in args and torch.cuda.is_available():
            continue
        assert main([*BASE, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (args, err)
        assert not (tmp_path / "run").exists()


def test_an_input_inside_the_output_folder_is_refused(tmp_path: Path, prompts: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main([*BASE, "--prompts", str(prompts), "--policy", "tide", "--budget", "6", "--device", "cpu",
                 "-o", str(out)]) == 0
    capsys.readouterr()
    args = [*BASE, "--prompts", str(prompts), "--policy", "cpu-routing", "--budget", "6", "--static-from", str(out),
            "--device", "cpu", "-o", str(out)]
    assert main(args) == 2
    assert "inside the output folder" in capsys.readouterr().err
    # the same static set from the previous run, written elsewhere, works
    assert main([*args[:-1], str(tmp_path / "run2")]) == 0


def test_a_model_that_does_not_fit_names_the_option(tmp_path: Path, prompts: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from tidesim_runtime.engine.device import host_memory_available

    if host_memory_available() > 60 * 2**30:
        pytest.skip("this machine holds mini's experts in float32")
    args = ["generate", "--config", "llada2-mini", "--prompts", str(prompts), "--policy", "tide", "--device", "cpu",
            "-o", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "GiB of host memory" in err and "--layers" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


# each mode once; the H100 preset (no copy slowdown) takes the one-layer search (split.RowSplit), where
# asynchronous refresh copies are also taken on demand (they stay resident)
@pytest.mark.parametrize(("kv", "refresh", "hw"), [("none", "async", "dev-2core-cpu"),
                                                   ("prefix", "sync", "dev-2core-cpu"),
                                                   ("prefix", "async", "h100-sxm-pcie5")])
def test_tide_split_decodes_losslessly_with_copies_on_demand(tmp_path: Path, prompts: Path, kv: str, refresh: str,
                                                            hw: str, capsys: pytest.CaptureFixture[str]) -> None:
    """tide-split live: its on-demand copies happen (some experts copied in, used once, dropped)
    and the tokens equal the all-GPU reference decode, with either KV mode and refresh mode."""
    out = tmp_path / "run"
    args = ["generate", "--config", "tiny", "--gen-length", "16", "--block-length", "8", "--threshold", "1.0",
            "--prompts", str(prompts), "--policy", "tide-split", "--tau", "8", "--budget", "6", "--refresh", refresh,
            "--kv-cache", kv, "--hw", hw, "--check-lossless", "--device", "cpu", "-o", str(out), "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["lossless"]["identical"] is True
    schedule = load_schedule(out / "schedule.npz")
    assert schedule.policy == "tide-split" and (schedule.copy == 1).sum() > 0
    if hw == "h100-sxm-pcie5":
        assert ((schedule.copy == 1) & schedule.resident).sum() > 0       # refresh copies taken on demand
    assert schedule_problems(schedule, workload_from_trace(read_trace(out / "trace.parquet"))) == []
