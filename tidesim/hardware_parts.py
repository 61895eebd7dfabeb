"""The parts of a hardware profile as data: the GPU, the PCIe link and the host CPU, with their
measured curves and where each number came from (docs/hardware-profiles.md). What a part costs is
tidesim.curves; the whole profile, its loading and checks, tidesim.hardware."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tidesim.errors import InputError
from tidesim.models import ModelSpec

US = 1e-6


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class Provenance:
    """Where a number came from: a measurement (tool, device, date, repeats) or a datasheet."""

    kind: str = "datasheet"
    source: str = ""
    date: str = ""
    tool_version: str = ""
    device: str = ""
    repeats: int = 0
    notes: str = ""


@dataclass
class Curve:
    """Measured time (microseconds) against one variable (tokens or bytes), median of repeats."""

    x: list[float]
    time_us: list[float]
    spread_us: list[float] = field(default_factory=list)
    provenance: Provenance = field(default_factory=lambda: Provenance(kind="measured"))

    def check(self, where: str) -> None:
        if len(self.x) < 1 or len(self.x) != len(self.time_us):
            raise InputError(f"{where}: x and time_us must be non-empty and of equal length")
        if any(b <= a for a, b in zip(self.x, self.x[1:], strict=False)):
            raise InputError(f"{where}: x must be strictly increasing")
        values = [*self.x, *self.time_us, *self.spread_us]
        if not all(_is_number(v) and math.isfinite(v) for v in values):
            raise InputError(f"{where}: x, time_us and spread_us must be finite numbers")
        if any(v < 0 for v in values):
            raise InputError(f"{where}: values must not be negative")

    def interpolate(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Time in seconds at x (piecewise linear), and a mask of points outside the measured range."""
        xs = np.asarray(self.x, dtype=float)
        ts = np.asarray(self.time_us, dtype=float) * US
        x = np.asarray(x, dtype=float)
        outside = (x < xs[0]) | (x > xs[-1])
        return np.interp(x, xs, ts), outside


@dataclass
class ExpertCurve:
    """Time of one routed expert's FFN vs tokens routed to it, for one expert shape."""

    hidden: int
    intermediate: int
    curve: Curve
    workers: int = 1

    def matches(self, spec: ModelSpec) -> bool:
        return self.hidden == spec.hidden_size and self.intermediate == spec.moe_intermediate_size


@dataclass
class GPUProfile:
    name: str
    memory_gib: float
    mem_bandwidth_gbs: float
    bf16_tflops: float
    mem_efficiency: float = 0.8
    compute_efficiency: float = 0.6
    launch_overhead_us: float = 5.0
    layer_overhead_us: float = 30.0
    expert_ffn: list[ExpertCurve] = field(default_factory=list)
    attention: list[dict[str, Any]] = field(default_factory=list)
    # measured grids of one MoE layer's whole fixed path (norms, attention, shared expert, router,
    # the host reading the split, the pairs' gather and the weighted combine) per layer shape; empty
    # (presets, older profiles): that path is composed from attention, dense rooflines and
    # layer_overhead_us (tidesim.curves.gpu_layer_fixed_time)
    layer_fixed: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PCIeProfile:
    """The host-GPU link. copy_slows_compute: fraction by which GPU expert work slows while H2D
    copies run; copy_slows_cpu: fraction by which the CPU pool's expert tasks slow while H2D
    copies run (the copies read the host memory the pool streams; on the CPU-as-GPU path a copy
    is a memcpy on a core). Both measured by tidesim calibrate, both first order in
    tidesim.layermodel."""

    generation: int
    h2d_gbs: float
    d2h_gbs: float
    copy_overhead_us: float = 10.0
    copy_engines: int = 2
    copy_slows_compute: float = 0.0
    copy_slows_cpu: float = 0.0
    h2d: Curve | None = None
    d2h: Curve | None = None


@dataclass
class CPUProfile:
    """The host CPU's expert pool.

    gpu_contention: fraction by which GPU-side expert work slows while the CPU pool computes
    experts in the same layer-forward (first order, tidesim.layermodel.charge_contention). About 0
    with a discrete GPU; on the CPU-as-GPU path both sides share cores and DRAM.
    pool_contention: fraction by which the CPU pool's expert tasks slow while GPU-side expert work
    runs. The two differ (a memory-bound pool beside compute-bound GPU-side work), so calibrate
    measures each direction; None (every profile calibrated before 2026-12-07, and the presets)
    means gpu_contention for both, the symmetric model those profiles were fitted with.
    """

    name: str
    cores: int
    workers: int
    mem_bandwidth_gbs: float
    gflops: float
    mem_efficiency: float = 0.7
    compute_efficiency: float = 0.5
    task_overhead_us: float = 20.0
    expert_ffn: list[ExpertCurve] = field(default_factory=list)
    gpu_contention: float = 0.0
    pool_contention: float | None = None
    kernel: str = ""   # the runtime's CPU expert kernel the curves were measured with ('' = not recorded)

    def pool_side_contention(self) -> float:
        """The pool's slowdown while GPU-side expert work runs: pool_contention, or gpu_contention
        for a profile without one (the symmetric model)."""
        return self.gpu_contention if self.pool_contention is None else self.pool_contention



def part_digest(part: GPUProfile | PCIeProfile | CPUProfile) -> str:
    """sha256 of one part's content: what a cost lookup over that part may read, so it keys the
    caches of such lookups (a new field is in the key without anyone adding it)."""
    return hashlib.sha256(json.dumps(_as_floats(asdict(part)), sort_keys=True).encode()).hexdigest()


def _as_floats(value: Any) -> Any:
    """Numbers as floats, so 1000 and 1000.0 (a YAML integer, a scaled copy) key alike."""
    if isinstance(value, dict):
        return {k: _as_floats(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_floats(v) for v in value]
    return float(value) if _is_number(value) else value
