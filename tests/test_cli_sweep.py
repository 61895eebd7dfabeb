"""`tidesim sweep`: bad grid files fail before any point runs; a real sweep writes the table and
non-empty PNG figures; the Dask executor gives the local run's bytes."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from browser import check_page

from tidesim.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = {"name": "small", "parameters": {
    "model": "tiny", "gen_length": 64, "prompts": 2, "prompt_length": 40, "budget": 6,
    "pcie_gen": [3, 4, 5], "cpu_cores_scale": [1, 2], "policy": ["tide", "full-swap", "cpu-routing"]}}


def write_grid(tmp_path, data, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


BAD = [
    ("parameters: {model: tiny, cpu_cores: [1, 2]}", "unknown parameter 'cpu_cores'"),
    ("parameters: {model: tiny, tau: {from: 4, to: 2}}", "empty range"),
    ("parameters: {model: tiny, tau: []}", "empty list"),
    ("parameters: {model: tiny, gpu_speed: fast}", "expected a number"),
    ("parameters: {model: tiny, policy: [tide, lfu]}", "unknown policy 'lfu'"),
    ("parameters: {model: llada9}", "unknown model 'llada9'"),
    ("parameters: {model: tiny, hw: tpu-v5}", "unknown hardware profile 'tpu-v5'"),
    ("parameters: {model: tiny, tau: [1, 2\n", "not valid YAML"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m for _, m in BAD])
def test_bad_grid_exits_2_with_one_line_before_any_point_runs(tmp_path, capsys, text, message):
    grid = write_grid(tmp_path, text)
    out = tmp_path / "r.parquet"
    assert main(["sweep", str(grid), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(grid) in err
    assert list(tmp_path.iterdir()) == [grid]            # no results, parts, traces or figures


def test_missing_grid_file(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "none.yaml"), "-o", str(tmp_path / "r.parquet")]) == 2
    assert "no such grid file" in capsys.readouterr().err


def test_scheduler_needs_dask_and_workers_positive(tmp_path, capsys):
    grid = write_grid(tmp_path, SMALL)
    assert main(["sweep", str(grid), "-o", str(tmp_path / "r.parquet"), "--scheduler", "tcp://h:1"]) == 2
    assert "--scheduler only applies to --executor dask" in capsys.readouterr().err
    assert main(["sweep", str(grid), "-o", str(tmp_path / "r.parquet"), "--workers", "0"]) == 2
    assert not (tmp_path / "r.parquet").exists()


def test_dry_run_lists_points(tmp_path, capsys):
    grid = write_grid(tmp_path, SMALL)
    assert main(["sweep", str(grid), "-o", str(tmp_path / "r.parquet"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "18 points" in out and "pcie_gen" in out and "cpu_cores_scale" in out
    assert main(["sweep", str(grid), "-o", str(tmp_path / "r.parquet"), "--dry-run", "--json"]) == 0
    points = json.loads(capsys.readouterr().out)
    assert len(points) == 18 and len({p["point_id"] for p in points}) == 18
    assert not (tmp_path / "r.parquet").exists()


def test_sweep_writes_table_and_figures(tmp_path, capsys):
    grid = write_grid(tmp_path, SMALL)
    out = tmp_path / "r.parquet"
    assert main(["sweep", str(grid), "-o", str(out), "--workers", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["points"] == 18 and report["evaluated"] == 18 and report["errors"] == 0
    df = pd.read_parquet(out)
    assert len(df) == 18 and df["tokens_per_s"].gt(0).all()
    names = sorted(p.split("/")[-1] for p in report["figures"])
    assert names == ["speedup_tide.png", "throughput_vs_cpu_cores_scale.png", "throughput_vs_hw_h2d_gbs.png",
                     "time_breakdown.png"]
    for path in report["figures"]:
        with open(path, "rb") as fh:
            data = fh.read()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    # the figures folder has a page to open, with every figure, the summary and a link to the table
    page = tmp_path / "r.figures" / "index.html"
    assert report["report"] == str(page)
    check_page(page, tmp_path / "browser", figures=4, tables=1)
    assert 'href="../r.parquet"' in page.read_text()
    # table mode: the per-policy summary, and a rerun of a finished sweep evaluates every point again
    assert main(["sweep", str(grid), "-o", str(out), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "small: 18 points (18 evaluated, 0 resumed, 0 with an error)" in text
    assert "tide" in text and "speedup_median" in text and f"results: {out}" in text


def test_dask_executor_matches_the_local_run(tmp_path, capsys):
    distributed = pytest.importorskip("dask.distributed")
    grid = write_grid(tmp_path, SMALL)
    assert main(["sweep", str(grid), "-o", str(tmp_path / "local.parquet"), "--no-figures", "--json"]) == 0
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        assert main(["sweep", str(grid), "-o", str(tmp_path / "dask.parquet"), "--executor", "dask",
                     "--scheduler", cluster.scheduler_address, "--no-figures", "--json"]) == 0
    capsys.readouterr()
    local = pd.read_parquet(tmp_path / "local.parquet").sort_values("point_id")
    dask = pd.read_parquet(tmp_path / "dask.parquet").sort_values("point_id")
    pd.testing.assert_frame_equal(local, dask)
    assert (tmp_path / "local.parquet").read_bytes() == (tmp_path / "dask.parquet").read_bytes()
