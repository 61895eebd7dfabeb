"""Figures from a sweep's results table (PNG, Agg backend).

- throughput_vs_<axis>.png: tokens/s against each numeric axis of the grid, one line per policy.
- speedup_<policy>.png: heatmap of the speedup over the best baseline of each policy whose traits ask
  for one (tide, planned, tide-split).
- time_breakdown.png: where the time goes, per policy (stacked bars).

A grid usually varies more than what one figure shows. The other axes are held at one "slice" (the
value of the grid's first point), stated in the figure's title, so a figure never averages points
that are not comparable. `tide`'s speedup takes its best tau / refresh mode at each setting.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from tidesim.atomic import atomic_path  # noqa: E402
from tidesim.palette import HEATMAP_CMAP, legend_below, policy_color, time_color, time_label  # noqa: E402
from tidesim.policies.registry import baselines, policy_names  # noqa: E402

# Inputs a figure can put on an axis, in order of preference for the heatmap.
AXIS_COLUMNS = ["hw_h2d_gbs", "gpu_memory_gib", "cpu_cores_scale", "cpu_mem_bw_scale", "gpu_speed", "model",
                "block_length", "threshold", "kv_cache", "gen_length", "prompts", "hw", "budget", "budget_cap",
                "warmup_fraction", "seed", "prompt_length", "engine", "trace"]
PER_POLICY = ["tau", "refresh"]
NUMERIC = {"hw_h2d_gbs", "gpu_memory_gib", "cpu_cores_scale", "cpu_mem_bw_scale", "gpu_speed", "block_length",
           "threshold", "gen_length", "tau", "prompts", "warmup_fraction", "prompt_length"}
LABELS = {"hw_h2d_gbs": "PCIe host-to-device bandwidth (GB/s)", "gpu_memory_gib": "GPU memory (GiB)",
          "cpu_cores_scale": "CPU cores (x profile)", "cpu_mem_bw_scale": "CPU memory bandwidth (x profile)",
          "gpu_speed": "GPU speed (x profile)", "block_length": "block length (tokens)",
          "threshold": "commit threshold", "gen_length": "generated tokens per prompt", "tau": "refresh interval tau",
          "prompts": "prompts", "warmup_fraction": "warm-up fraction", "prompt_length": "prompt length"}
BREAKDOWN_PREFIX = "breakdown_"


def varying(df: pd.DataFrame, columns: list[str]) -> list[str]:
    """Columns (in the given order) that take more than one value among the rows."""
    return [c for c in columns if c in df and df[c].astype(str).nunique() > 1]


def axis_columns(df: pd.DataFrame) -> list[str]:
    """The varying inputs figures treat as axes, in order of preference. The effective PCIe
    bandwidth counts only when a PCIe parameter varies (otherwise it merely follows the base
    profile); an input that is a function of the axes kept before it (e.g. the per-model budget
    cap when the model varies) is not an axis of its own."""
    pcie = varying(df, ["pcie_gbs", "pcie_gen", "pcie_scale"])
    kept: list[str] = []
    for col in varying(df, [c for c in AXIS_COLUMNS if pcie or c != "hw_h2d_gbs"]):
        keys = df[kept].astype(str) if kept else None
        if keys is not None and df[col].astype(str).groupby([keys[k] for k in kept]).nunique().max() == 1:
            continue
        kept.append(col)
    return kept


def _slice(df: pd.DataFrame, keep: list[str], columns: list[str] | None = None) -> tuple[pd.DataFrame, str]:
    """Hold every varying axis not in `keep` at its value in the first row; say which."""
    held = []
    out = df
    for col in varying(df, columns if columns is not None else axis_columns(df) + PER_POLICY):
        if col in keep:
            continue
        first = df.sort_values("index")[col].iloc[0]
        out = out[out[col].astype(str) == str(first)]
        held.append(f"{col}={first:g}" if isinstance(first, float) else f"{col}={first}")
    return out, ", ".join(held)


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def _title(ax: plt.Axes, text: str, held: str) -> None:
    ax.set_title(text + (f"\n(at {held})" if held else ""), fontsize=10)


def throughput_axes(df: pd.DataFrame) -> list[str]:
    """The numeric axes that get a throughput figure."""
    return [c for c in varying(df, axis_columns(df) + ["tau"]) if c in NUMERIC]


def build_throughput_figure(df: pd.DataFrame, axis: str) -> plt.Figure:
    """tokens/s (zero-based) against one axis, one line per policy in its palette colour, the other
    axes held at the grid's first point (said in the title), the legend under the chart."""
    data, held = _slice(df, [axis, "policy"])
    fig, ax = plt.subplots(figsize=(7, 4.8), layout="constrained")
    lines, names = [], []
    for policy, rows in data.groupby("policy", sort=False):
        x = _numeric_axis(rows, axis)
        order = np.argsort(x, kind="stable")
        (line,) = ax.plot(x[order], rows["tokens_per_s"].to_numpy(float)[order], marker="o",
                          color=policy_color(str(policy)))
        lines.append(line)
        names.append(str(policy))
    ax.set_xlabel(LABELS.get(axis, axis))
    ax.set_ylabel("throughput (tokens/s)")
    top = float(data["tokens_per_s"].max()) if len(data) else 0.0
    ax.set_ylim(0, top * 1.1 if top > 0 else 1.0)
    ax.grid(alpha=0.3)
    legend_below(fig, lines, names, ncol=min(4, max(len(names), 1)))
    _title(ax, f"throughput vs {LABELS.get(axis, axis)}", held)
    return fig


def _numeric_axis(rows: pd.DataFrame, axis: str) -> np.ndarray:
    """An axis as numbers. tau is read from `tau_used` (what the point ran with) when the table has it,
    since the grid's tau may be the word `best`."""
    if axis == "tau" and "tau_used" in rows:
        return rows["tau_used"].to_numpy(float)
    return pd.to_numeric(rows[axis], errors="coerce").to_numpy(float)


def throughput_figures(df: pd.DataFrame, out: Path) -> list[Path]:
    """tokens/s vs each numeric axis, one line per policy (tide at each tau when tau varies)."""
    return [_save(build_throughput_figure(df, axis), out / f"throughput_vs_{axis}.png") for axis in throughput_axes(df)]


def speedup_table(df: pd.DataFrame, policy: str) -> pd.DataFrame:
    """Per setting (every varying input except policy, tau, refresh): best `policy` tokens/s, best
    baseline tokens/s (the registry's baselines, bounds left out) and their ratio."""
    keys = varying(df, axis_columns(df))
    base_mask = df["policy"].isin(baselines()) & ~df["is_bound"].fillna(False).astype(bool)
    tide = df[df["policy"] == policy]
    base = df[base_mask]
    if tide.empty or base.empty:
        return pd.DataFrame()
    group = keys or (lambda _: 0)
    best_tide = tide.groupby(group, sort=False)["tokens_per_s"].max().rename("tide")
    best_base = base.groupby(group, sort=False)["tokens_per_s"].max().rename("baseline")
    table = pd.concat([best_tide, best_base], axis=1).dropna()
    table["speedup"] = table["tide"] / table["baseline"]
    return table.reset_index() if keys else table.reset_index(drop=True)


def speedup_figures(df: pd.DataFrame, out: Path) -> list[Path]:
    paths = []
    for policy in policy_names(speedup_figure=True):
        table = speedup_table(df, policy)
        if table.empty:
            continue
        axes = varying(table, axis_columns(df))
        x_col = axes[0] if axes else None
        y_col = axes[1] if len(axes) > 1 else None
        data, held = _slice(table.assign(index=np.arange(len(table))), [c for c in (x_col, y_col) if c], axes)
        xs = _ordered(data, x_col)
        ys = _ordered(data, y_col)
        grid = np.full((len(ys), len(xs)), np.nan)
        for _, row in data.iterrows():
            i = ys.index(row[y_col]) if y_col else 0
            j = xs.index(row[x_col]) if x_col else 0
            grid[i, j] = row["speedup"]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(xs), 1.6 + 0.6 * len(ys)))
        # centred on 1 (no speedup): red where the policy loses to the best baseline, green where it wins
        norm = TwoSlopeNorm(vcenter=1.0, vmin=min(0.5, float(np.nanmin(grid))), vmax=max(2.0, float(np.nanmax(grid))))
        image = ax.imshow(grid, cmap=HEATMAP_CMAP, norm=norm, aspect="auto", origin="lower")
        for i in range(len(ys)):
            for j in range(len(xs)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(xs)), [_fmt(v) for v in xs], fontsize=8)
        ax.set_yticks(range(len(ys)), [_fmt(v) for v in ys], fontsize=8)
        ax.set_xlabel(LABELS.get(x_col, x_col) if x_col else "")
        ax.set_ylabel(LABELS.get(y_col, y_col) if y_col else "")
        fig.colorbar(image, ax=ax, label="speedup over the best baseline (x; 1 = equal)")
        _title(ax, f"{policy} over the best baseline", held)
        fig.tight_layout()
        paths.append(_save(fig, out / f"speedup_{policy}.png"))
    return paths


def _ordered(df: pd.DataFrame, col: str | None) -> list[object]:
    if col is None:
        return [None]
    values = list(dict.fromkeys(df[col].tolist()))
    return sorted(values) if col in NUMERIC else values


def _fmt(value: object) -> str:
    if value is None:
        return ""
    return f"{value:g}" if isinstance(value, float) else str(value)


def breakdown_figure(df: pd.DataFrame, out: Path) -> list[Path]:
    """Where the time goes per policy, at the grid's first setting."""
    cols = [c for c in df.columns if c.startswith(BREAKDOWN_PREFIX)]
    if not cols:
        return []
    data, held = _slice(df, ["policy"])
    return [_save(build_breakdown_figure(data, cols, held), out / "time_breakdown.png")]


def build_breakdown_figure(data: pd.DataFrame, cols: list[str], held: str) -> plt.Figure:
    """Stacked bars (zero-based) of seconds by where the time goes, palette colours and labels."""
    data = data.groupby("policy", sort=False)[cols].first()
    fig, ax = plt.subplots(figsize=(7, 5.0), layout="constrained")
    bottom = np.zeros(len(data))
    handles, labels = [], []
    for col in cols:
        values = data[col].fillna(0.0).to_numpy(float)
        if not values.any():
            continue
        key = col[len(BREAKDOWN_PREFIX):-2]
        handles.append(ax.bar(data.index.tolist(), values, bottom=bottom, color=time_color(key)))
        labels.append(time_label(key))
        bottom += values
    ax.set_ylabel("time (s)")
    ax.set_ylim(0, float(bottom.max()) * 1.1 if len(bottom) and bottom.max() > 0 else 1.0)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    legend_below(fig, handles, labels)
    _title(ax, "where the time goes", held)
    return fig


def write_figures(results: pd.DataFrame, out: str | Path) -> list[Path]:
    """All figures the results support, into folder `out`; rows with an error are left out."""
    out = Path(out)
    df = results[results["error"].isna()].copy()
    if df.empty:
        return []
    out.mkdir(parents=True, exist_ok=True)
    return [*throughput_figures(df, out), *speedup_figures(df, out), *breakdown_figure(df, out)]
