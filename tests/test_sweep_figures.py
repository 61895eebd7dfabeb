"""Sweep figures: the speedup table against hand-computed values; every figure is a non-empty PNG."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from tidesim.sweep.figures import speedup_table, varying, write_figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# tokens/s by (policy, pcie_gbs, cpu_cores_scale, tau); tau only matters for tide
TPS = {"full-swap": lambda g, c, t: 2 * g, "cpu-routing": lambda g, c, t: 40 * c,
       "tide": lambda g, c, t: 2 * g + 40 * c + 10 * t, "all-gpu": lambda g, c, t: 1000.0}


def results() -> pd.DataFrame:
    rows = []
    for i, (policy, gbs, cores, tau) in enumerate(itertools.product(TPS, [10.0, 40.0], [1.0, 2.0], [1, 2])):
        tps = TPS[policy](gbs, cores, tau)
        rows.append({"index": i, "point_id": f"p{i}", "policy": policy, "pcie_gbs": gbs, "hw_h2d_gbs": gbs,
                     "cpu_cores_scale": cores, "tau": tau, "refresh": "sync", "model": "tiny",
                     "tokens_per_s": tps, "is_bound": policy == "all-gpu", "error": None,
                     "breakdown_gpu_fixed_s": 100 / tps, "breakdown_cpu_wait_s": 5 / tps})
    rows.append({**rows[0], "index": len(rows), "point_id": "bad", "gpu_memory_gib": 1.0, "tokens_per_s": np.nan,
                 "error": "too small"})
    return pd.DataFrame(rows)


def test_speedup_is_best_tide_over_best_non_bound_baseline():
    df = results()
    table = speedup_table(df[df["error"].isna()], "tide").set_index(["hw_h2d_gbs", "cpu_cores_scale"])
    for gbs, cores in itertools.product([10.0, 40.0], [1.0, 2.0]):
        best_tide = 2 * gbs + 40 * cores + 20                 # tau = 2 is tide's best
        best_base = max(2 * gbs, 40 * cores)                  # all-gpu is a bound, not a baseline
        assert table.loc[(gbs, cores), "speedup"] == pytest.approx(best_tide / best_base)
    assert len(table) == 4


def test_speedup_needs_both_sides():
    df = results()
    assert speedup_table(df[df["policy"] == "tide"], "tide").empty
    assert speedup_table(df, "planned").empty


def test_every_figure_is_written_as_a_non_empty_png(tmp_path):
    paths = write_figures(results(), tmp_path / "figs")
    names = sorted(p.name for p in paths)
    assert names == ["speedup_tide.png", "throughput_vs_cpu_cores_scale.png", "throughput_vs_hw_h2d_gbs.png",
                     "throughput_vs_tau.png", "time_breakdown.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert not list((tmp_path / "figs").glob(".*.tmp"))


def test_figures_are_deterministic(tmp_path):
    a = write_figures(results(), tmp_path / "a")
    b = write_figures(results(), tmp_path / "b")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_no_successful_rows_no_figures(tmp_path):
    df = results().assign(error="boom")
    assert write_figures(df, tmp_path / "f") == []
    assert varying(results(), ["model", "policy", "tau"]) == ["policy", "tau"]


def test_inputs_that_follow_other_axes_are_not_axes():
    from tidesim.sweep.figures import axis_columns

    mini = results().assign(model="llada2-mini", budget_cap="128")
    flash = results().assign(model="llada2-flash", budget_cap="96")          # the cap follows the model
    df = pd.concat([mini, flash], ignore_index=True).assign(hw="h100-sxm-pcie5")
    df["index"] = np.arange(len(df))
    assert "budget_cap" not in axis_columns(df) and "model" in axis_columns(df)
    # without a PCIe parameter varying, the effective bandwidth merely follows the base profile
    assert "hw_h2d_gbs" in axis_columns(df)
    assert "hw_h2d_gbs" not in axis_columns(df.drop(columns="pcie_gbs"))
