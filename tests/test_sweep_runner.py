"""Sweep runner: rows and columns, error rows, resume after an interruption (and a real kill),
identical bytes from the inline, process-pool and Dask executors, and the real evaluation path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tidesim.errors import InputError
from tidesim.metrics import Metrics
from tidesim.sweep.grid import Point, parse_grid
from tidesim.sweep.hardware import build_hardware
from tidesim.sweep.point import Evaluation, evaluate_point
from tidesim.sweep.runner import SweepPaths, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def fake_metrics(point: Point) -> Metrics:
    """Deterministic stand-in metrics from the effective hardware: tokens/s = 10 x H2D GB/s + tau."""
    p = point.params
    hw = build_hardware(p)
    tps = 10.0 * hw.pcie.h2d_gbs + p["tau"]
    return Metrics(engine=p["engine"], policy=p["policy"], total_time_s=100 / tps, generated_tokens=100,
                   forwards=10, tokens_per_s=tps, step_time_s=10 / tps, gpu_tokens=90, cpu_tokens=10,
                   hit_ratio=0.9, h2d_bytes=1e6, d2h_bytes=0.0, expert_copies=3, refresh_copies=2,
                   copy_stall_s=0.0, cpu_share=0.1, busy_s={"gpu": 1.0, "h2d": 0.5},
                   breakdown_s={"gpu_fixed": 100 / tps}, lower_bound_s=50 / tps, notes=["fake"])


def fake_evaluator(point: Point, cache_dir: Path) -> Evaluation:
    if point.params["gpu_memory_gib"] is not None and point.params["gpu_memory_gib"] < 1:
        raise InputError(f"{point.params['gpu_memory_gib']:g} GiB is too small")
    return Evaluation(metrics=fake_metrics(point), derived={"hw_h2d_gbs": build_hardware(point.params).pcie.h2d_gbs})


class Interrupted(Exception):
    pass


class Counting:
    """Records the ids it evaluates; raises Interrupted after `stop_after` points (a kill)."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.seen: list[str] = []
        self.stop_after = stop_after

    def __call__(self, point: Point, cache_dir: Path) -> Evaluation:
        if self.stop_after is not None and len(self.seen) >= self.stop_after:
            raise Interrupted()
        self.seen.append(point.id)
        return fake_evaluator(point, cache_dir)


GRID = {"parameters": {"model": "tiny", "gen_length": 64, "pcie_gen": [3, 4, 5], "tau": [1, 2],
                       "gpu_memory_gib": [0.5, 80]}}


def make_grid():
    return parse_grid(GRID, source="g.yaml", check_policies=False)


def test_one_row_per_point_every_input_and_metric_a_column(tmp_path):
    g = make_grid()
    report = run_sweep(g, tmp_path / "r.parquet", workers=1, evaluator=fake_evaluator)
    df = pd.read_parquet(tmp_path / "r.parquet")
    assert len(df) == report.points == 12 and report.evaluated == 12 and report.reused == 0
    assert df["point_id"].tolist() == [p.id for p in g.points]
    for col in ["tau", "pcie_gen", "gpu_memory_gib", "policy", "engine", "tokens_per_s", "hit_ratio",
                "busy_gpu_s", "busy_h2d_s", "breakdown_gpu_fixed_s", "lower_bound_s", "is_bound", "notes", "error"]:
        assert col in df.columns
    ok = df[df["error"].isna()]
    assert len(ok) == 6 and (ok["gpu_memory_gib"] == 80).all()
    # hand-computed: 10 x typical pinned bandwidth of the generation + tau
    expected = ok["pcie_gen"].map({3: 12.0, 4: 25.0, 5: 50.0}) * 10 + ok["tau"].astype(int)   # a number or "best"
    assert np.allclose(ok["tokens_per_s"], expected)
    bad = df[df["error"].notna()]
    assert len(bad) == 6 and report.errors == 6
    assert (bad["error"] == "0.5 GiB is too small").all() and bad["tokens_per_s"].isna().all()
    assert not SweepPaths(tmp_path / "r.parquet").parts.exists()


def test_same_grid_same_bytes(tmp_path):
    run_sweep(make_grid(), tmp_path / "a.parquet", workers=1, evaluator=fake_evaluator)
    run_sweep(make_grid(), tmp_path / "b.parquet", workers=1, evaluator=fake_evaluator)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_interrupted_sweep_resumes_only_the_missing_points(tmp_path):
    out = tmp_path / "r.parquet"
    first = Counting(stop_after=5)
    with pytest.raises(Interrupted):
        run_sweep(make_grid(), out, workers=1, evaluator=first)
    assert not out.exists()
    parts = sorted(p.stem for p in SweepPaths(out).parts.glob("*.json"))
    assert sorted(first.seen) == parts and len(parts) == 5
    second = Counting()
    report = run_sweep(make_grid(), out, workers=1, evaluator=second)
    all_ids = [p.id for p in make_grid().points]
    assert sorted(second.seen) == sorted(set(all_ids) - set(parts))
    assert report.evaluated == 7 and report.reused == 5
    run_sweep(make_grid(), tmp_path / "clean.parquet", workers=1, evaluator=fake_evaluator)
    assert out.read_bytes() == (tmp_path / "clean.parquet").read_bytes()


def test_fresh_discards_finished_points(tmp_path):
    out = tmp_path / "r.parquet"
    with pytest.raises(Interrupted):
        run_sweep(make_grid(), out, workers=1, evaluator=Counting(stop_after=3))
    again = Counting()
    run_sweep(make_grid(), out, workers=1, evaluator=again, fresh=True)
    assert len(again.seen) == 12


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from tidesim.sweep.grid import parse_grid
    from tidesim.sweep.runner import run_sweep
    from test_sweep_runner import GRID, fake_evaluator

    def slow(point, cache_dir):
        time.sleep(0.3)
        return fake_evaluator(point, cache_dir)

    run_sweep(parse_grid(GRID, check_policies=False), sys.argv[1], workers=2, evaluator=slow)
""")


def test_killed_subprocess_sweep_restarts_with_only_the_missing_points(tmp_path):
    out = tmp_path / "r.parquet"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out)], env=env, start_new_session=True)
    parts_dir = SweepPaths(out).parts
    deadline = time.monotonic() + 60
    try:
        while len(list(parts_dir.glob("*.json"))) < 4:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    finished = {p.stem for p in parts_dir.glob("*.json")}
    assert 4 <= len(finished) < 12
    again = Counting()
    report = run_sweep(make_grid(), out, workers=1, evaluator=again)
    assert set(again.seen) == {p.id for p in make_grid().points} - finished
    assert report.reused == len(finished)
    run_sweep(make_grid(), tmp_path / "clean.parquet", workers=1, evaluator=fake_evaluator)
    assert out.read_bytes() == (tmp_path / "clean.parquet").read_bytes()


def test_process_pool_gives_the_same_bytes(tmp_path):
    run_sweep(make_grid(), tmp_path / "inline.parquet", workers=1, evaluator=fake_evaluator)
    report = run_sweep(make_grid(), tmp_path / "pool.parquet", workers=2, evaluator=fake_evaluator)
    assert report.evaluated == 12
    assert (tmp_path / "inline.parquet").read_bytes() == (tmp_path / "pool.parquet").read_bytes()


def test_dask_local_cluster_gives_the_same_bytes(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    run_sweep(make_grid(), tmp_path / "local.parquet", workers=2, evaluator=fake_evaluator)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        report = run_sweep(make_grid(), tmp_path / "dask.parquet", executor="dask",
                           scheduler=cluster.scheduler_address, evaluator=fake_evaluator)
    assert report.evaluated == 12
    assert (tmp_path / "local.parquet").read_bytes() == (tmp_path / "dask.parquet").read_bytes()


def test_executor_arguments_are_checked(tmp_path):
    with pytest.raises(InputError, match="--scheduler only applies"):
        run_sweep(make_grid(), tmp_path / "r.parquet", workers=2, scheduler="tcp://x:1", evaluator=fake_evaluator)
    with pytest.raises(InputError, match="workers must be at least 1"):
        run_sweep(make_grid(), tmp_path / "r.parquet", workers=-1, evaluator=fake_evaluator)
    (tmp_path / "dir.parquet").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        run_sweep(make_grid(), tmp_path / "dir.parquet", workers=1, evaluator=fake_evaluator)


def test_hardware_what_ifs():
    g = parse_grid({"parameters": {"model": "tiny", "gen_length": 64, "hw": "a100-80gb-pcie4",
                                   "gpu_memory_gib": 40, "gpu_speed": 2, "cpu_cores_scale": 0.5,
                                   "cpu_mem_bw_scale": 3, "pcie_gbs": [8, 32]}}, check_policies=False)
    from tidesim.hardware import get_profile

    base = get_profile("a100-80gb-pcie4")
    for point, gbs in zip(g.points, [8.0, 32.0], strict=True):
        hw = build_hardware(point.params)
        assert hw.pcie.h2d_gbs == pytest.approx(gbs)
        assert hw.pcie.d2h_gbs == pytest.approx(base.pcie.d2h_gbs * gbs / base.pcie.h2d_gbs)
        assert hw.gpu.memory_gib == 40
        assert hw.gpu.bf16_tflops == pytest.approx(2 * base.gpu.bf16_tflops)
        assert hw.cpu.cores == max(1, round(base.cpu.cores * 0.5))
        assert hw.cpu.mem_bandwidth_gbs == pytest.approx(3 * base.cpu.mem_bandwidth_gbs)
    scaled = parse_grid({"parameters": {"model": "tiny", "gen_length": 64, "pcie_scale": 0.5}},
                        check_policies=False).points[0]
    h100 = get_profile("h100-sxm-pcie5")
    assert build_hardware(scaled.params).pcie.h2d_gbs == pytest.approx(0.5 * h100.pcie.h2d_gbs)


# ----- the real path: synthesized traces, policies, run() --------------------------------------------------
REAL = {"parameters": {"model": "tiny", "gen_length": 64, "prompts": 2, "prompt_length": 40,
                       "pcie_gen": [3, 5], "policy": ["tide", "full-swap", "cpu-routing"], "budget": 6,
                       "engine": ["analytic", "sim"]}}


def test_real_evaluation_matches_a_direct_run(tmp_path):
    from tidesim.policies import PolicyOptions, build_schedule, uniform
    from tidesim.run import run
    from tidesim.trace.io import read_trace
    from tidesim.workload import workload_from_trace

    g = parse_grid(REAL, source="real.yaml")
    report = run_sweep(g, tmp_path / "r.parquet", workers=1)
    df = pd.read_parquet(tmp_path / "r.parquet")
    assert report.errors == 0 and report.traces_made == 1 and len(df) == 12
    assert df["tokens_per_s"].gt(0).all() and df["hit_ratio"].between(0, 1).all()
    assert (df["budget_used"] == 6).all()
    assert sorted(df["hw_h2d_gbs"].unique()) == pytest.approx([12.0, 50.0])
    traces = list(SweepPaths(tmp_path / "r.parquet").traces.glob("*.parquet"))
    assert len(traces) == 1 and df["trace_file"].unique().tolist() == [traces[0].name]
    # independent evaluation of one point
    point = next(p for p in g.points if p.params["policy"] == "tide" and p.params["engine"] == "sim"
                 and p.params["pcie_gen"] == 3)
    workload = workload_from_trace(read_trace(traces[0]))
    hw = build_hardware(point.params)
    layers = workload.num_layers
    row = df[df["point_id"] == point.id].iloc[0]
    # the grid leaves tau at its default, `best`: the default-tau rule of every command
    from tidesim.default_tau import best_tau

    tau = best_tau(workload, hw, 6, "sync").tau
    assert row["tau"] == "best" and row["tau_used"] == tau
    schedule = build_schedule("tide", workload, PolicyOptions(budget=uniform(6, layers), tau=uniform(tau, layers),
                                                              hw=hw))
    direct = run(workload, schedule, hw, engine="sim")
    assert row["tokens_per_s"] == direct.tokens_per_s and row["total_time_s"] == direct.total_time_s
    assert row["h2d_bytes"] == direct.h2d_bytes and row["cpu_tokens"] == direct.cpu_tokens
    # a second sweep into the same folder reuses the cached trace and gives the same bytes
    first = (tmp_path / "r.parquet").read_bytes()
    again = run_sweep(g, tmp_path / "r.parquet", workers=2)
    assert again.traces_made == 0 and (tmp_path / "r.parquet").read_bytes() == first


def test_real_memory_too_small_is_an_error_row(tmp_path):
    g = parse_grid({"parameters": {"model": "llada2-mini", "gen_length": 32, "prompts": 1, "prompt_length": 16,
                                   "gpu_memory_gib": [2, 80], "policy": "tide"}})
    report = run_sweep(g, tmp_path / "r.parquet", workers=1)
    df = pd.read_parquet(tmp_path / "r.parquet")
    assert report.errors == 1
    small = df[df["gpu_memory_gib"] == 2].iloc[0]
    assert "does not hold llada2-mini" in small["error"] and np.isnan(small["tokens_per_s"])
    big = df[df["gpu_memory_gib"] == 80].iloc[0]
    assert pd.isna(big["error"]) and big["budget_used"] == 128          # the public code's cap for mini


def test_results_metadata_records_the_grid(tmp_path):
    run_sweep(make_grid(), tmp_path / "r.parquet", workers=1, evaluator=fake_evaluator)
    meta = json.loads(pq.read_schema(tmp_path / "r.parquet").metadata[b"tidesim.sweep"])
    assert meta["format"] == 1 and meta["grid"]["parameters"] == [GRID["parameters"]]


def test_default_evaluator_is_the_real_one():
    import inspect

    assert inspect.signature(run_sweep).parameters["evaluator"].default is evaluate_point


def test_schedules_are_reused_only_when_the_policy_ignored_the_hardware(tmp_path, monkeypatch):
    # the schedule cache (tidesim.evaluate) keys a policy by the profile only when its traits say it
    # reads it; rows equal those evaluated with nothing kept
    from tidesim import evaluate as ev
    from tidesim.sweep import point as runner

    monkeypatch.setattr(ev.SCHEDULES, "size", 16)
    g = parse_grid({"parameters": {"model": "tiny", "gen_length": 64, "prompts": 2, "prompt_length": 40,
                                   "budget": 6, "pcie_gbs": [4, 64], "cpu_cores_scale": [0.25, 4],
                                   "policy": ["cpu-routing", "fiddler"]}})
    uncached = {}
    for point in g.points:
        ev.SCHEDULES.clear()
        uncached[point.id] = runner.evaluate_row(point, tmp_path, evaluate_point)
    ev.SCHEDULES.clear()
    cached = {p.id: runner.evaluate_row(p, tmp_path, evaluate_point) for p in g.points}
    assert cached == uncached
    keys = [json.loads(key) for key in ev.SCHEDULES.kept_keys()]
    policies = [key[1] for key in keys]
    # cpu-routing never reads the profile: one schedule for all four hardware variants;
    # fiddler compares CPU and copy costs: one per profile
    assert policies.count("cpu-routing") == 1 and policies.count("fiddler") == 4
    assert all((key[-1] is None) == (key[1] == "cpu-routing") for key in keys)


def test_planned_point_runs_the_solved_per_layer_plan(tmp_path):
    from tidesim.planner import expert_slots
    from tidesim.policies import PolicyOptions, build_schedule
    from tidesim.run import run
    from tidesim.sweep.workloads import load_workload

    g = parse_grid({"parameters": {"model": "tiny", "gen_length": 64, "prompts": 2, "prompt_length": 40,
                                   "gpu_memory_gib": 1.4, "policy": ["planned", "tide"]}})
    run_sweep(g, tmp_path / "r.parquet", workers=1)
    df = pd.read_parquet(tmp_path / "r.parquet").set_index("policy")
    assert df["error"].isna().all()
    plan = json.loads(df.loc["planned", "per_layer"])
    tau, budget = np.array(plan["tau"]), np.array(plan["budget"])
    model = g.points[0].model()
    assert len(tau) == len(budget) == model.num_moe_layers and (tau >= 1).all()
    assert budget.sum() <= expert_slots(model, 1.4) == plan["slots"]            # the memory row holds
    assert df.loc["planned", "budget_used"] == pytest.approx(budget.mean())
    # the row is the plan's per-layer tau and budgets run as given
    workload = load_workload(g.points[0], SweepPaths(tmp_path / "r.parquet").traces)
    hw = build_hardware(g.points[0].params)
    schedule = build_schedule("planned", workload, PolicyOptions(budget=budget, tau=tau, hw=hw))
    direct = run(workload, schedule, hw, engine="analytic")
    assert df.loc["planned", "tokens_per_s"] == direct.tokens_per_s
    assert df.loc["planned", "total_time_s"] == pytest.approx(plan["predicted_s"], rel=1e-6)
    # in-sample the plan is never slower than tide at tau 2 with the same memory's uniform budget
    assert df.loc["tide", "budget_used"] == plan["slots"] // model.num_moe_layers < model.num_experts
    assert df.loc["planned", "tokens_per_s"] >= df.loc["tide", "tokens_per_s"] * (1 - 1e-9)


def test_best_tau_is_searched_once_per_workload_profile_and_budget(tmp_path, monkeypatch):
    # tide and tide-reference on one profile share the search (tidesim.default_tau keeps it by
    # content); rows equal those evaluated with nothing kept, notes included
    import tidesim.default_tau
    from tidesim.sweep import point as runner

    g = parse_grid({"parameters": {"model": "tiny", "gen_length": 64, "prompts": 2, "prompt_length": 40,
                                   "budget": 6, "pcie_gbs": [4, 64], "policy": ["tide", "tide-reference"]}})
    calls = []
    search = tidesim.default_tau.tide_tokens_per_s
    monkeypatch.setattr(tidesim.default_tau, "tide_tokens_per_s",
                        lambda *a, **k: calls.append(a[1]) or search(*a, **k))
    uncached = {}
    for point in g.points:
        tidesim.default_tau._SEARCHED.clear()
        uncached[point.id] = runner.evaluate_row(point, tmp_path, evaluate_point)
    assert len(calls) == len(g.points)
    calls.clear()
    tidesim.default_tau._SEARCHED.clear()
    cached = {p.id: runner.evaluate_row(p, tmp_path, evaluate_point) for p in g.points}
    assert cached == uncached and len(calls) == 2
