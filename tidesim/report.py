"""Reports of simulated runs: the policy comparison table and the "where time goes" figure.

Baselines are the systems TIDE is measured against (the registry's role "baseline"); bounds (role
"bound", or any schedule marked is_bound) are limits, shown but never counted as the best baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidesim.atomic import atomic_path
from tidesim.errors import InputError
from tidesim.metrics import Metrics
from tidesim.policies.registry import baselines, role_of
from tidesim.sim.accounting import BREAKDOWN_KEYS

FIGURE_SUFFIXES = (".png", ".svg", ".pdf")


def kind_of(m: Metrics) -> str:
    return role_of(m.policy, m.is_bound)


@dataclass
class Comparison:
    """Each policy's metrics plus its speedup over the best baseline."""

    metrics: list[Metrics]
    best_baseline: str | None

    def speedup(self, m: Metrics) -> float | None:
        best = self.by_policy(self.best_baseline) if self.best_baseline else None
        if best is None or best.tokens_per_s <= 0:
            return None
        return m.tokens_per_s / best.tokens_per_s

    def by_policy(self, name: str) -> Metrics | None:
        return next((m for m in self.metrics if m.policy == name), None)

    def speedup_over(self, policy: str, baseline: str) -> float | None:
        a, b = self.by_policy(policy), self.by_policy(baseline)
        if a is None or b is None or b.tokens_per_s <= 0:
            return None
        return a.tokens_per_s / b.tokens_per_s


def compare(metrics: list[Metrics]) -> Comparison:
    names = baselines()
    base = [m for m in metrics if m.policy in names and not m.is_bound]
    best = max(base, key=lambda m: (m.tokens_per_s, m.policy)).policy if base else None
    return Comparison(metrics=metrics, best_baseline=best)


TABLE_COLUMNS = ["policy", "kind", "tok/s", "speedup", "ms/step", "hit ratio", "cpu share", "H2D GB",
                 "gpu fixed %", "gpu experts %", "copy wait %", "sync refresh %", "cpu wait %"]


def table_rows(comp: Comparison) -> list[list[Any]]:
    """One row per policy, in the order given; percentages are of the policy's total time."""
    rows = []
    for m in comp.metrics:
        sp = comp.speedup(m)
        total = m.total_time_s or 1.0
        pct = {k: 100.0 * m.breakdown_s.get(k, 0.0) / total for k in BREAKDOWN_KEYS}
        label = kind_of(m) + ("" if m.feasible else ", does not fit")
        rows.append([m.policy, label, m.tokens_per_s, "-" if sp is None else f"{sp:.2f}x", 1e3 * m.step_time_s,
                     m.hit_ratio, m.cpu_share, m.h2d_bytes / 1e9, pct["gpu_fixed"], pct["gpu_experts"],
                     pct["copy_stall"], pct["sync_refresh"], pct["cpu_wait"] + pct["other"]])
    return rows


def comparison_json(comp: Comparison) -> dict[str, Any]:
    out: dict[str, Any] = {"best_baseline": comp.best_baseline, "policies": []}
    for m in comp.metrics:
        row = m.to_dict()
        row["kind"] = kind_of(m)
        row["speedup_over_best_baseline"] = comp.speedup(m)
        row["speedup_over"] = {b: comp.speedup_over(m.policy, b) for b in baselines() if comp.by_policy(b)}
        out["policies"].append(row)
    return out


def build_breakdown_figure(comp: Comparison, title: str = "") -> Any:
    """Stacked bars (zero-based): per policy, ms per generated token by where the time goes, with
    tokens/s on top; colours and labels from tidesim.palette, the legend under the chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tidesim.palette import legend_below, policy_label, time_color, time_label

    ms = comp.metrics
    names = [policy_label(m.policy, m.is_bound) for m in ms]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(ms) + 2), 5.4), layout="constrained")
    bottom = [0.0] * len(ms)
    per_token = {key: [1e3 * max(m.breakdown_s.get(key, 0.0), 0.0) / max(m.generated_tokens, 1) for m in ms]
                 for key in BREAKDOWN_KEYS}
    tallest = max((sum(v) for v in zip(*per_token.values(), strict=True)), default=0.0)
    handles, labels = [], []
    for key in BREAKDOWN_KEYS:
        vals = per_token[key]
        if not any(v > 1e-6 * tallest for v in vals):
            continue
        handles.append(ax.bar(names, vals, bottom=bottom, color=time_color(key)))
        labels.append(time_label(key))
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for x, (m, top) in enumerate(zip(ms, bottom, strict=True)):
        ax.text(x, top, f"{m.tokens_per_s:.1f} tok/s", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per generated token")
    ax.set_ylim(0, tallest * 1.12 if tallest > 0 else 1.0)
    ax.set_title(title or "where decoding time goes", fontsize=9)
    ax.tick_params(axis="x", rotation=20)
    legend_below(fig, handles, labels)
    return fig


def breakdown_figure(comp: Comparison, path: str | Path, title: str = "") -> Path:
    """Write build_breakdown_figure to PNG, SVG or PDF, with no dates in the file."""
    path = Path(path)
    if path.suffix.lower() not in FIGURE_SUFFIXES:
        raise InputError(f"figure file {path} must end in one of {', '.join(FIGURE_SUFFIXES)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.hashsalt"] = "tidesim"      # stable SVG ids
    fig = build_breakdown_figure(comp, title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower(), dpi=120, metadata=_fixed_metadata(path))
    plt.close(fig)
    return path


def _fixed_metadata(path: Path) -> dict[str, Any]:
    """No creation dates or versions in figure files, so identical runs give identical bytes."""
    suffix = path.suffix.lower()
    if suffix == ".png":
        return {"Software": None}
    if suffix == ".svg":
        return {"Date": None, "Creator": None}
    return {"CreationDate": None, "Creator": None, "Producer": None}
