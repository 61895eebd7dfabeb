"""Figures of the demo report: throughput per policy, the interval trade-off, a timeline excerpt."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from tidesim.atomic import atomic_path  # noqa: E402
from tidesim.report import Comparison, kind_of  # noqa: E402
from tidesim.sim.timeline import Timeline  # noqa: E402

KIND_COLORS = {"baseline": "tab:gray", "policy": "tab:blue", "bound": "tab:green"}


def save(fig: Figure, path: Path) -> Path:
    """Write a PNG atomically, without a software stamp, so identical runs give identical bytes."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def throughput_figure(comp: Comparison, path: Path, title: str) -> Path:
    """Bars of tokens/s per policy, coloured by kind (baseline, policy, bound)."""
    ms = comp.metrics
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    names = [m.policy for m in ms]
    values = [m.tokens_per_s for m in ms]
    colors = [KIND_COLORS[kind_of(m)] for m in ms]
    ax.bar(names, values, color=colors)
    for x, m in enumerate(ms):
        sp = comp.speedup(m)
        ax.text(x, m.tokens_per_s, f"{m.tokens_per_s:.1f}" + (f"\n{sp:.2f}x" if sp else ""), ha="center",
                va="bottom", fontsize=7)
    ax.set_ylabel("generated tokens per second (simulated)")
    ax.set_ylim(0, max(values) * 1.2 if values else 1.0)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", rotation=20)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLORS.values()]
    ax.legend(handles, list(KIND_COLORS), fontsize=7, frameon=False)
    return save(fig, path)


def tau_figure(tokens_per_s: dict[int, float], hit_ratio: dict[int, float], path: Path, title: str) -> Path:
    """Throughput and hit ratio of tide against the refresh interval: the trade-off the planner solves."""
    taus = sorted(tokens_per_s)
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    ax.plot(taus, [tokens_per_s[t] for t in taus], "o-", color="tab:blue", label="tokens/s (analytic)")
    ax.set_xlabel("refresh interval tau (steps)")
    ax.set_ylabel("tokens/s", color="tab:blue")
    twin = ax.twinx()
    twin.plot(taus, [hit_ratio[t] for t in taus], "s--", color="tab:orange", label="hit ratio")
    twin.set_ylabel("hit ratio (GPU share of routed pairs)", color="tab:orange")
    ax.set_title(title, fontsize=9)
    return save(fig, path)


def timeline_figure(timeline: Timeline, path: Path, title: str) -> Path:
    """A Gantt chart of the simulated resources (the same events as the Chrome trace JSON)."""
    fig, ax = plt.subplots(figsize=(10.0, 0.6 * max(len(timeline.rows), 1) + 1.5))
    cmap = plt.get_cmap("tab10")
    categories = sorted({e[4] or "work" for e in timeline.events})
    color = {c: cmap(i % 10) for i, c in enumerate(categories)}
    spans: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for tid, start, dur, _name, cat in timeline.events:
        spans.setdefault((tid, cat or "work"), []).append((start * 1e3, dur * 1e3))
    for (tid, cat), bars in sorted(spans.items()):
        ax.broken_barh(bars, (tid - 0.3, 0.6), facecolors=color[cat])
    ax.set_yticks(range(len(timeline.rows)), timeline.rows)
    ax.invert_yaxis()
    ax.set_xlabel("simulated time (ms)")
    ax.set_title(title, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=color[c]) for c in categories]
    ax.legend(handles, categories, fontsize=7, frameon=False, loc="upper right")
    return save(fig, path)
