"""The figures read right, checked on the Figure objects: zero-based axes, human labels, legends
outside the data, one colour per meaning (tidesim.palette) in every figure, titles that match what
varies."""

from __future__ import annotations

import functools

import matplotlib
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from simkit import profile, workload

from tidesim.demo_figures import build_tau_figure, build_throughput_figure, build_timeline_figure
from tidesim.palette import POLICY_COLORS, TIME_COLORS, TIME_LABELS, policy_color, time_color
from tidesim.policies import PolicyOptions, build_schedule, uniform
from tidesim.report import Comparison, build_breakdown_figure, compare
from tidesim.run import run
from tidesim.sim.timeline import Timeline
from tidesim.sweep import figures as sweep_figures

matplotlib.use("Agg")
COUNTS = [[[1, 1, 2, 0], [0, 2, 1, 1]], [[2, 2, 0, 0], [1, 1, 1, 1]], [[0, 1, 1, 2], [2, 0, 1, 1]]]
SYNONYMS = [{"copy_stall", "on_demand"}, {"cpu_wait", "cpu"}, {"other", "work"}]


@functools.lru_cache(maxsize=1)
def comparison() -> Comparison:
    w = workload(COUNTS)
    hw = profile(workers=2)
    metrics = []
    for policy in ("all-gpu", "full-swap", "cpu-routing", "tide", "oracle"):
        options = PolicyOptions(budget=uniform(2, w.num_layers), tau=uniform(2, w.num_layers), hw=hw)
        metrics.append(run(w, build_schedule(policy, w, options), hw, engine="sim"))
    return compare(metrics)


def timeline() -> Timeline:
    w = workload(COUNTS)
    hw = profile(workers=2)
    options = PolicyOptions(budget=uniform(2, w.num_layers), tau=uniform(2, w.num_layers), hw=hw)
    tl = Timeline()
    run(w, build_schedule("tide", w, options), hw, engine="sim", timeline=tl)
    return tl


def legend_outside_axes(fig: matplotlib.figure.Figure) -> bool:
    """The figure's legends do not overlap any axes' data area (after layout)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends, "figure has no legend"
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            if box.overlaps(ax.get_window_extent(renderer)):
                return False
    return True


def legend_entries(fig: matplotlib.figure.Figure) -> dict[str, str]:
    """legend label -> face colour (hex)."""
    out = {}
    for legend in fig.legends:
        for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
            out[text.get_text()] = to_hex(handle.get_facecolor())
    return out


def test_palette_one_colour_per_meaning() -> None:
    assert not set(TIME_COLORS.values()) & set(POLICY_COLORS.values())
    assert len(set(POLICY_COLORS.values())) == len(POLICY_COLORS)
    by_colour: dict[str, set[str]] = {}
    for key, colour in TIME_COLORS.items():
        by_colour.setdefault(colour, set()).add(key)
    assert sorted(map(sorted, by_colour.values())) == sorted(
        [sorted(s) for s in SYNONYMS] + [[k] for k in TIME_COLORS if not any(k in s for s in SYNONYMS)])
    assert all("_" not in label for label in TIME_LABELS.values())


def test_tau_figure_axes_start_at_zero_and_title_names_what_varies() -> None:
    tps = {1: 3.335, 2: 3.350, 4: 3.358, 16: 3.357}
    hit = {1: 0.8254, 2: 0.8260, 4: 0.8266, 16: 0.8268}
    fig = build_tau_figure(tps, hit, "tide against the refresh interval: mini, h100", chosen=4)
    left, right = fig.axes
    assert left.get_ylim()[0] == 0 and left.get_ylim()[1] >= max(tps.values())
    assert right.get_ylim() == (0, 1.05)
    assert "tau" in left.get_xlabel() and "tau" in right.get_xlabel()
    assert "tokens/s" in left.get_ylabel() and "hit ratio" in right.get_ylabel()
    assert "refresh interval" in fig.get_suptitle() and "tau 4" not in fig.get_suptitle()
    # the spread is stated as a relative change, so a flat line is not mistaken for no data
    assert f"varies by {100 * (3.358 - 3.335) / 3.358:.1f}%" in left.get_title()
    assert any(list(line.get_xdata()) == [4, 4] for line in left.get_lines())      # the tau used
    matplotlib.pyplot.close(fig)


def test_throughput_figure_zero_based_policy_colours_bounds_marked() -> None:
    comp = comparison()
    fig = build_throughput_figure(comp, "t2x4, round, budget 2/layer; tide at tau 2")
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= max(m.tokens_per_s for m in comp.metrics)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["all-gpu (bound)", "full-swap", "cpu-routing", "tide", "oracle (bound)"]
    colours = [to_hex(p.get_facecolor()) for p in ax.patches]
    assert colours == [policy_color(m.policy) for m in comp.metrics]
    assert [bool(p.get_hatch()) for p in ax.patches] == [m.is_bound for m in comp.metrics]
    assert legend_outside_axes(fig)
    matplotlib.pyplot.close(fig)


def test_breakdown_figure_human_labels_and_the_shared_time_colours() -> None:
    fig = build_breakdown_figure(comparison(), "where the time goes")
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0
    entries = legend_entries(fig)
    assert entries and all("_" not in label for label in entries)
    for key, label in TIME_LABELS.items():
        if label in entries:
            assert entries[label] == time_color(key)
    assert legend_outside_axes(fig)
    matplotlib.pyplot.close(fig)


def test_timeline_figure_legend_below_rows_and_same_colours() -> None:
    tl = timeline()
    fig = build_timeline_figure(tl, "tide timeline")
    ax = fig.axes[0]
    assert ax.get_xlim()[0] == 0 and "simulated time" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_yticklabels()] == tl.rows
    entries = legend_entries(fig)
    categories = {e[4] for e in tl.events}
    assert {"sync_refresh", "cpu"} <= categories
    assert entries[TIME_LABELS["sync_refresh"]] == time_color("sync_refresh")
    assert entries[TIME_LABELS["cpu"]] == time_color("cpu") != time_color("sync_refresh")
    assert all("_" not in label for label in entries)
    assert legend_outside_axes(fig)
    matplotlib.pyplot.close(fig)


def sweep_rows() -> pd.DataFrame:
    rows = []
    for i, (policy, gbs) in enumerate((p, g) for p in ("tide", "full-swap") for g in (12.0, 50.0)):
        tps = 100 + gbs if policy == "tide" else 2 * gbs
        rows.append({"index": i, "point_id": f"p{i}", "policy": policy, "pcie_gbs": gbs, "hw_h2d_gbs": gbs,
                     "tau": "best", "tau_used": 2.0, "refresh": "sync", "tokens_per_s": tps, "is_bound": False,
                     "error": None, "breakdown_gpu_fixed_s": 1.0, "breakdown_sync_refresh_s": 0.5})
    return pd.DataFrame(rows)


def test_sweep_throughput_zero_based_policy_colours_legend_outside() -> None:
    fig = sweep_figures.build_throughput_figure(sweep_rows(), "hw_h2d_gbs")
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 150
    assert [to_hex(line.get_color()) for line in ax.get_lines()] == [policy_color("tide"), policy_color("full-swap")]
    assert "PCIe" in ax.get_xlabel()
    assert legend_outside_axes(fig)
    matplotlib.pyplot.close(fig)


def test_sweep_breakdown_uses_the_time_palette() -> None:
    df = sweep_rows()
    cols = ["breakdown_gpu_fixed_s", "breakdown_sync_refresh_s"]
    fig = sweep_figures.build_breakdown_figure(df, cols, "")
    assert fig.axes[0].get_ylim()[0] == 0
    assert legend_entries(fig) == {TIME_LABELS["gpu_fixed"]: time_color("gpu_fixed"),
                                   TIME_LABELS["sync_refresh"]: time_color("sync_refresh")}
    matplotlib.pyplot.close(fig)


@pytest.mark.parametrize("values", [[0.8, 0.9], [1.2, 3.0], [0.4, 1.6]])
def test_speedup_heatmap_is_centred_on_one(tmp_path, values) -> None:
    """Red below 1 and green above 1 whatever the range: the colour map's centre is speedup 1."""
    rows = []
    for i, (gbs, sp) in enumerate(zip((12.0, 50.0), values, strict=True)):
        for policy, tps in (("tide", 10 * sp), ("full-swap", 10.0)):
            rows.append({"index": len(rows), "point_id": f"p{i}{policy}", "policy": policy, "pcie_gbs": gbs,
                         "hw_h2d_gbs": gbs, "tau": 2, "refresh": "sync", "tokens_per_s": tps, "is_bound": False,
                         "error": None})
    [path] = sweep_figures.speedup_figures(pd.DataFrame(rows), tmp_path)
    assert path.name == "speedup_tide.png"
    captured = {}
    original = sweep_figures._save

    def keep(fig, p):
        captured["fig"] = fig
        return original(fig, p)

    sweep_figures._save = keep
    try:
        sweep_figures.speedup_figures(pd.DataFrame(rows), tmp_path)
    finally:
        sweep_figures._save = original
    image = captured["fig"].axes[0].images[0]
    assert image.norm.vcenter == 1.0 and image.norm.vmin < 1 < image.norm.vmax
    assert "1 = equal" in captured["fig"].axes[1].get_ylabel()
