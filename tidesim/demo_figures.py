"""Figures of the demo report: throughput per policy, the interval trade-off, a timeline excerpt.

Each figure has a build_* function that returns the matplotlib Figure (what the tests inspect:
axis ranges, labels, legend placement) and a writer that saves it. Axes start at zero; colours and
labels come from tidesim.palette, the same in every figure.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from tidesim.atomic import atomic_path  # noqa: E402
from tidesim.palette import BOUND_HATCH, legend_below, policy_color, policy_label, time_color, time_label  # noqa: E402
from tidesim.report import Comparison  # noqa: E402
from tidesim.sim.timeline import Timeline  # noqa: E402


def save(fig: Figure, path: Path) -> Path:
    """Write a PNG atomically, without a software stamp, so identical runs give identical bytes."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def build_throughput_figure(comp: Comparison, title: str) -> Figure:
    """Bars of tokens/s per policy (zero-based), one colour per policy, bounds hatched."""
    ms = comp.metrics
    fig, ax = plt.subplots(figsize=(8.0, 4.6), layout="constrained")
    names = [policy_label(m.policy, m.is_bound) for m in ms]
    values = [m.tokens_per_s for m in ms]
    bars = ax.bar(names, values, color=[policy_color(m.policy) for m in ms])
    for bar, m in zip(bars, ms, strict=True):
        if m.is_bound:
            bar.set_hatch(BOUND_HATCH)
            bar.set_edgecolor("white")
    for x, m in enumerate(ms):
        sp = comp.speedup(m)
        ax.text(x, m.tokens_per_s, f"{m.tokens_per_s:.1f}" + (f"\n{sp:.2f}x" if sp else ""), ha="center",
                va="bottom", fontsize=7)
    ax.set_ylabel("generated tokens per second (simulated)")
    ax.set_ylim(0, max(values) * 1.2 if values and max(values) > 0 else 1.0)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", rotation=20)
    best = comp.best_baseline or "none"
    legend_below(fig, [Patch(facecolor="#999999"), Patch(facecolor="#999999", hatch=BOUND_HATCH, edgecolor="white")],
                 [f"policy or baseline (label: tok/s, speedup over the best baseline, {best})",
                  "bound: a limit, not a deployable policy"], ncol=1)
    return fig


def throughput_figure(comp: Comparison, path: Path, title: str) -> Path:
    return save(build_throughput_figure(comp, title), path)


def build_tau_figure(tokens_per_s: dict[int, float], hit_ratio: dict[int, float], title: str,
                     chosen: int | None = None) -> Figure:
    """tide's throughput and hit ratio against the refresh interval, each on its own zero-based axis
    (side by side, not a twin axis), with the interval the run used marked."""
    taus = sorted(tokens_per_s)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.8), layout="constrained")
    color = policy_color("tide")
    tps = [tokens_per_s[t] for t in taus]
    left.plot(taus, tps, "o-", color=color)
    left.set_ylim(0, max(tps) * 1.15 if tps and max(tps) > 0 else 1.0)
    left.set_ylabel("tokens/s (analytic model)")
    right.plot(sorted(hit_ratio), [hit_ratio[t] for t in sorted(hit_ratio)], "s-", color=color)
    right.set_ylim(0, 1.05)
    right.set_ylabel("hit ratio (GPU share of routed pairs)")
    for ax in (left, right):
        ax.set_xlabel("refresh interval tau (denoising steps)")
        ax.set_xlim(0, max(taus) + 1 if taus else 1)
        ax.grid(alpha=0.3)
        if chosen is not None:
            ax.axvline(chosen, color="#999999", linestyle=":", linewidth=1)
    if tps:
        lo, hi = min(tps), max(tps)
        spread = f"; tokens/s varies by {100 * (hi - lo) / hi:.1f}% over these intervals" if hi > 0 else ""
        mark = f"dotted line: the tau the comparison used ({chosen})" if chosen is not None else ""
        left.set_title(f"throughput{spread}", fontsize=8)
        right.set_title(mark, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


def tau_figure(tokens_per_s: dict[int, float], hit_ratio: dict[int, float], path: Path, title: str,
               chosen: int | None = None) -> Path:
    return save(build_tau_figure(tokens_per_s, hit_ratio, title, chosen), path)


def build_timeline_figure(timeline: Timeline, title: str) -> Figure:
    """A Gantt chart of the simulated resources (the same events as the Chrome trace JSON), coloured
    by what the resource is doing, the legend under the chart."""
    rows = max(len(timeline.rows), 1)
    fig, ax = plt.subplots(figsize=(10.0, 0.55 * rows + 2.4), layout="constrained")
    categories = sorted({e[4] or "work" for e in timeline.events})
    spans: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for tid, start, dur, _name, cat in timeline.events:
        spans.setdefault((tid, cat or "work"), []).append((start * 1e3, dur * 1e3))
    for (tid, cat), bars in sorted(spans.items()):
        ax.broken_barh(bars, (tid - 0.3, 0.6), facecolors=time_color(cat))
    ax.set_yticks(range(len(timeline.rows)), timeline.rows)
    ax.set_ylim(len(timeline.rows) - 0.5, -0.5)
    end = max((start + dur for _, start, dur, _, _ in timeline.events), default=0.0) * 1e3
    ax.set_xlim(0, end * 1.01 if end > 0 else 1.0)
    ax.set_xlabel("simulated time (ms)")
    ax.set_title(title, fontsize=9)
    legend_below(fig, [Patch(facecolor=time_color(c)) for c in categories], [time_label(c) for c in categories])
    return fig


def timeline_figure(timeline: Timeline, path: Path, title: str) -> Path:
    return save(build_timeline_figure(timeline, title), path)
