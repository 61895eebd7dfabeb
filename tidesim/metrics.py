"""Metrics: the names every executor (simulator, cost model, runtime) reports, so that predicted
and measured runs compare field by field."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Metrics:
    """One run of one Schedule on one workload. Times in seconds, sizes in bytes.

    tokens_per_s = generated_tokens / total_time_s. hit_ratio = gpu_tokens / (gpu_tokens +
    cpu_tokens), counted over routed (token, expert) pairs, as the public TIDE code does.
    busy_s: busy time per resource ("gpu", "h2d", "d2h", "cpu"). breakdown_s: where the critical
    path went, per category ("gpu_fixed", "gpu_experts", "copy_stall", "cpu_wait", "sync_refresh",
    "other"); it sums to total_time_s.
    """

    engine: str
    policy: str
    total_time_s: float
    generated_tokens: int
    forwards: int
    tokens_per_s: float
    step_time_s: float                   # mean time per forward
    gpu_tokens: int
    cpu_tokens: int
    hit_ratio: float
    h2d_bytes: float
    d2h_bytes: float
    expert_copies: int                   # H2D expert weight copies (any reason)
    refresh_copies: int                  # of which refresh copies (sync + async)
    copy_stall_s: float                  # time the GPU waited for expert copies
    cpu_share: float                     # share of routed pairs computed on the CPU
    busy_s: dict[str, float] = field(default_factory=dict)
    breakdown_s: dict[str, float] = field(default_factory=dict)
    layer_time_s: list[float] = field(default_factory=list)   # total per MoE layer
    lower_bound_s: float | None = None   # analytic: no schedule beats the busiest resource
    is_bound: bool = False
    feasible: bool = True
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Metrics:
        return cls(**data)
