"""One colour and one human label per meaning, for every figure tidesim draws.

Two families that never share a colour: where time goes (light tones: what a resource is doing)
and policies (dark tones: who decided). The same meaning has the same colour in the demo's
figures, `compare --figure`, the sweep figures and the timeline PNG; internal names such as
`gpu_fixed` or `sync_refresh` never reach a legend.
"""

from __future__ import annotations

from typing import Any

# ----- where time goes (breakdown keys of the executors, and timeline categories) ----------------
TIME_COLORS = {
    "gpu_fixed": "#b3b3b3",       # attention, shared expert, gate, dense layers, lm_head
    "gpu_experts": "#6baed6",     # routed experts computed on the GPU
    "copy_stall": "#fdae6b",      # the GPU waiting for on-demand expert copies
    "on_demand": "#fdae6b",       # an on-demand expert copy on the copy engine (same meaning)
    "sync_refresh": "#de2d26",    # synchronous refresh copies that block the step
    "async_refresh": "#fcbba1",   # refresh copies overlapped with compute
    "cpu_wait": "#74c476",        # the GPU waiting for experts computed on the CPU
    "cpu": "#74c476",             # CPU expert work and its activation copies (same meaning)
    "other": "#e0e0e0",
    "work": "#e0e0e0",
}
TIME_LABELS = {
    "gpu_fixed": "GPU fixed work (attention, shared expert, gate, dense layers, LM head)",
    "gpu_experts": "experts on the GPU",
    "copy_stall": "waiting for on-demand expert copies",
    "on_demand": "on-demand expert copies",
    "sync_refresh": "synchronous refresh (blocks the step)",
    "async_refresh": "asynchronous refresh (overlapped)",
    "cpu_wait": "waiting for experts on the CPU",
    "cpu": "experts on the CPU (and their activation copies)",
    "other": "other",
    "work": "other work",
}

# ----- policies ---------------------------------------------------------------------------------
POLICY_COLORS = {
    "all-gpu": "#525252",
    "full-swap": "#8c510a",
    "cpu-routing": "#01665e",
    "fiddler": "#762a83",
    "tide": "#08306b",
    "tide-reference": "#2166ac",
    "planned": "#b2182b",
    "tide-split": "#e6550d",
    "oracle": "#000000",
}
OTHER_POLICY = "#737373"
BOUND_HATCH = "//"

# ----- what the sweep figures put on an axis ----------------------------------------------------
HEATMAP_CMAP = "RdYlGn"           # speedup: red below 1 (loses), green above 1 (wins), centred on 1


def time_color(key: str) -> str:
    return TIME_COLORS.get(key, TIME_COLORS["other"])


def time_label(key: str) -> str:
    return TIME_LABELS.get(key, key.replace("_", " "))


def policy_color(name: str) -> str:
    return POLICY_COLORS.get(name, OTHER_POLICY)


def policy_label(name: str, is_bound: bool = False) -> str:
    """A policy's name as the CLI spells it, marked when it is a bound rather than a policy."""
    return f"{name} (bound)" if is_bound else name


def legend_below(fig: Any, handles: list[Any], labels: list[str], ncol: int = 2) -> Any:
    """A legend under the plot, outside every axes, so it never covers a bar or a line. The figure
    must use the constrained layout (plt.subplots(layout="constrained")), which makes room for it."""
    return fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=7, frameon=False)
