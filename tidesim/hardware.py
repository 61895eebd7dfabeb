"""HardwareProfile: what one GPU + PCIe link + host CPU costs, from measurements or a datasheet.

Every cost the simulator and the cost model charge comes from here. Measured curves are
interpolated piecewise-linearly between measured points; outside them, or for shapes never
measured, a roofline with efficiency factors is used and the fallback is recorded in `flags`, so
extrapolation is never silent. docs/hardware-profiles.md documents the YAML schema.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml

from tidesim.atomic import write_text
from tidesim.errors import InputError, parse_yaml, read_input_text
from tidesim.models import ModelSpec

SCHEMA_VERSION = 1
PROVENANCE_KINDS = ("measured", "datasheet")
US = 1e-6
T = TypeVar("T")


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


@dataclass
class PCIeProfile:
    generation: int
    h2d_gbs: float
    d2h_gbs: float
    copy_overhead_us: float = 10.0
    copy_engines: int = 2
    copy_slows_compute: float = 0.0
    h2d: Curve | None = None
    d2h: Curve | None = None


@dataclass
class CPUProfile:
    """The host CPU's expert pool.

    gpu_contention: fraction by which GPU-side expert work and the CPU pool's expert tasks slow
    each other while both run in one layer-forward (first order, charged in tidesim.sim.costs).
    About 0 with a discrete GPU; large on the CPU-as-GPU path, where both sides share cores and
    DRAM (tidesim calibrate measures it).
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
    kernel: str = ""   # the runtime's CPU expert kernel the curves were measured with ('' = not recorded)


@dataclass
class HardwareProfile:
    """One machine: GPU, PCIe link and CPU, with provenance; see module docstring."""

    name: str
    description: str
    provenance: Provenance
    gpu: GPUProfile
    pcie: PCIeProfile
    cpu: CPUProfile
    schema_version: int = SCHEMA_VERSION
    flags: set[str] = field(default_factory=set, compare=False, repr=False)

    # ----- costs (seconds), vectorised over numpy arrays ---------------------------------
    def gpu_expert_time(self, tokens: np.ndarray, spec: ModelSpec) -> np.ndarray:
        """One expert's FFN on the GPU for the given token counts, one kernel launch included."""
        roof = self._roofline(tokens, spec, *self._gpu_expert_roof())
        return self._from_curves(self.gpu.expert_ffn, tokens, spec, roof, "gpu.expert_ffn")

    def _gpu_expert_roof(self) -> tuple[float, float, float]:
        """The GPU expert roofline's bandwidth (GB/s), GFLOP/s and overhead (us)."""
        return (self.gpu.mem_bandwidth_gbs * self.gpu.mem_efficiency,
                self.gpu.bf16_tflops * 1e3 * self.gpu.compute_efficiency, self.gpu.launch_overhead_us)

    def cpu_expert_time(self, tokens: np.ndarray, spec: ModelSpec) -> np.ndarray:
        """One expert's FFN on one CPU worker (cores / workers threads, bandwidth shared)."""
        roof = self._roofline(tokens, spec, *self._cpu_expert_roof())
        return self._from_curves(self.cpu.expert_ffn, tokens, spec, roof, "cpu.expert_ffn")

    def _cpu_expert_roof(self) -> tuple[float, float, float]:
        """The CPU expert roofline's bandwidth (GB/s), GFLOP/s and overhead (us), per worker."""
        w = max(self.cpu.workers, 1)
        return (self.cpu.mem_bandwidth_gbs * self.cpu.mem_efficiency / w,
                self.cpu.gflops * self.cpu.compute_efficiency / w, self.cpu.task_overhead_us)

    def expert_time_key(self, side: str, spec: ModelSpec) -> str:
        """Everything gpu_expert_time ("gpu") or cpu_expert_time ("cpu") reads for this expert
        shape: the measured curve when one matches, else the roofline's constants. Profiles with
        equal keys give equal times and flags (a what-if's PCIe, memory or core count often leaves
        them unchanged), so per-count time tables can be shared between them."""
        curves, roof = ((self.gpu.expert_ffn, self._gpu_expert_roof()) if side == "gpu"
                        else (self.cpu.expert_ffn, self._cpu_expert_roof()))
        match = [c for c in curves if c.matches(spec)]
        shape = f"{spec.hidden_size}x{spec.moe_intermediate_size}/{spec.expert_bytes}/{spec.expert_flops_per_token}"
        return f"{side} {shape} " + (f"curve {match[0].curve!r}" if match else f"roofline {roof!r}")

    def noting(self, fn: Callable[[], T]) -> tuple[T, frozenset[str]]:
        """fn() and the flags it raised on this profile, whether or not the profile carried them
        already (caches replay them on the profiles that reuse the result)."""
        before = set(self.flags)
        self.flags.clear()
        try:
            value = fn()
        finally:
            raised = frozenset(self.flags)
            self.flags.update(before)
        return value, raised

    def cpu_expert_latency(self, tokens: np.ndarray, spec: ModelSpec) -> np.ndarray:
        """One expert computed with the whole CPU (every worker's cores and DRAM bandwidth), the
        latency Fiddler profiles when it decides between the CPU and a copy."""
        return self.cpu_expert_time(tokens, spec) / max(self.cpu.workers, 1)

    def h2d_time(self, nbytes: np.ndarray | float) -> np.ndarray:
        return self._copy_time(nbytes, self.pcie.h2d, self.pcie.h2d_gbs, "pcie.h2d")

    def d2h_time(self, nbytes: np.ndarray | float) -> np.ndarray:
        return self._copy_time(nbytes, self.pcie.d2h, self.pcie.d2h_gbs, "pcie.d2h")

    def attention_time(self, tokens: np.ndarray, context: np.ndarray, spec: ModelSpec) -> np.ndarray:
        """One layer's attention (fused QKV, scores, output projection) on the GPU."""
        tokens = np.asarray(tokens, dtype=float)
        context = np.asarray(context, dtype=float)
        measured = [a for a in self.gpu.attention if a.get("hidden") == spec.hidden_size
                    and a.get("heads") == spec.num_heads and a.get("kv_heads") == spec.num_kv_heads]
        if measured:
            return self._attention_from_grid(measured[0], tokens, context)
        self.flags.add(f"gpu.attention[{spec.name}]: roofline estimate (not measured)")
        h, kv, d, nh = spec.hidden_size, spec.num_kv_heads, spec.head_dim, spec.num_heads
        bpp = spec.bytes_per_param
        proj_params = h * (nh + 2 * kv) * d + nh * d * h
        flops = 2 * proj_params * tokens + 4 * nh * d * tokens * context
        nbytes = proj_params * bpp + 2 * kv * d * context * bpp + 2 * h * tokens * bpp
        return self._gpu_roofline(flops, nbytes, launches=4)

    def gpu_dense_time(self, tokens: np.ndarray, params: int, spec: ModelSpec, launches: int = 1) -> np.ndarray:
        """A dense weight matrix set (shared expert, gate, dense MLP, lm_head) over `tokens`."""
        tokens = np.asarray(tokens, dtype=float)
        flops = 2.0 * params * tokens
        nbytes = params * spec.bytes_per_param + 2 * spec.hidden_size * tokens * spec.bytes_per_param
        return self._gpu_roofline(flops, nbytes, launches=launches)

    def gpu_layer_fixed_time(self, tokens: np.ndarray, context: np.ndarray, spec: ModelSpec) -> np.ndarray:
        """Per MoE layer, work that always runs on the GPU: norms and overhead, attention,
        shared expert and the gate."""
        shared = self.gpu_dense_time(tokens, spec.shared_expert_params, spec, launches=3)
        gate = self.gpu_dense_time(tokens, spec.gate_params, spec, launches=2)
        return self.attention_time(tokens, context, spec) + shared + gate + self.gpu.layer_overhead_us * US

    def gpu_forward_fixed_time(self, tokens: np.ndarray, context: np.ndarray, spec: ModelSpec) -> np.ndarray:
        """Per forward, GPU work outside the MoE layers: dense layers (with their attention),
        embedding lookup and lm_head."""
        dense = spec.first_dense_layers * (
            self.attention_time(tokens, context, spec)
            + self.gpu_dense_time(tokens, spec.dense_mlp_params, spec, launches=3)
            + self.gpu.layer_overhead_us * US
        )
        head = self.gpu_dense_time(tokens, spec.vocab_size * spec.hidden_size, spec, launches=2)
        return dense + head

    # ----- helpers ------------------------------------------------------------------------
    def _gpu_roofline(self, flops: np.ndarray, nbytes: np.ndarray, launches: int) -> np.ndarray:
        compute = flops / (self.gpu.bf16_tflops * 1e12 * self.gpu.compute_efficiency)
        memory = nbytes / (self.gpu.mem_bandwidth_gbs * 1e9 * self.gpu.mem_efficiency)
        return np.maximum(compute, memory) + launches * self.gpu.launch_overhead_us * US

    @staticmethod
    def _roofline(tokens: np.ndarray, spec: ModelSpec, gbs: float, gflops: float, overhead_us: float
                  ) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=float)
        memory = spec.expert_bytes / (gbs * 1e9)
        compute = tokens * spec.expert_flops_per_token / (gflops * 1e9)
        return np.maximum(memory, compute) + overhead_us * US

    def _from_curves(self, curves: list[ExpertCurve], tokens: np.ndarray, spec: ModelSpec,
                     roofline: np.ndarray, where: str) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=float)
        match = [c for c in curves if c.matches(spec)]
        if not match:
            self.flags.add(f"{where}[{spec.hidden_size}x{spec.moe_intermediate_size}]: "
                           "roofline estimate (shape not measured)")
            return roofline
        curve = match[0].curve
        measured, outside = curve.interpolate(tokens)
        if not outside.any():
            return measured
        self.flags.add(f"{where}[{spec.hidden_size}x{spec.moe_intermediate_size}]: tokens outside the "
                       f"measured {curve.x[0]:g}..{curve.x[-1]:g}, roofline scaled to the nearest point")
        xs = np.asarray(curve.x, dtype=float)
        edge = np.where(tokens > xs[-1], xs[-1], xs[0])
        edge_roof = self._roofline(edge, spec, 1.0, 1.0, 0.0)
        here_roof = self._roofline(tokens, spec, 1.0, 1.0, 0.0)
        edge_measured, _ = curve.interpolate(edge)
        scaled = edge_measured * here_roof / np.maximum(edge_roof, 1e-30)
        return np.where(outside, scaled, measured)

    def _copy_time(self, nbytes: np.ndarray | float, curve: Curve | None, gbs: float, where: str
                   ) -> np.ndarray:
        nbytes = np.asarray(nbytes, dtype=float)
        linear = self.pcie.copy_overhead_us * US + nbytes / (gbs * 1e9)
        linear = np.where(nbytes > 0, linear, 0.0)
        if curve is None:
            return linear
        measured, outside = curve.interpolate(nbytes)
        outside &= nbytes > 0          # an empty copy costs nothing: never an extrapolation
        if outside.any():
            self.flags.add(f"{where}: sizes outside the measured {curve.x[0]:g}..{curve.x[-1]:g} bytes, "
                           "bandwidth model used")
        return np.where(nbytes > 0, np.where(outside, linear, measured), 0.0)

    def _attention_from_grid(self, grid: dict[str, Any], tokens: np.ndarray, context: np.ndarray
                             ) -> np.ndarray:
        tk = np.asarray(grid["tokens"], dtype=float)
        cx = np.asarray(grid["context"], dtype=float)
        table = np.asarray(grid["time_us"], dtype=float) * US  # [len(tk), len(cx)]
        if ((tokens < tk[0]) | (tokens > tk[-1]) | (context < cx[0]) | (context > cx[-1])).any():
            self.flags.add("gpu.attention: tokens or context outside the measured grid, clamped linear")
        per_ctx = np.stack([np.interp(tokens, tk, table[:, j]) for j in range(len(cx))], axis=-1)
        idx = np.clip(np.searchsorted(cx, context) - 1, 0, max(len(cx) - 2, 0))
        if len(cx) == 1:
            return per_ctx[..., 0]
        lo, hi = cx[idx], cx[idx + 1]
        frac = np.clip((context - lo) / (hi - lo), 0.0, None)
        a = np.take_along_axis(per_ctx, idx[..., None], axis=-1)[..., 0]
        b = np.take_along_axis(per_ctx, (idx + 1)[..., None], axis=-1)[..., 0]
        return a + (b - a) * frac

    # ----- variants for what-if studies ---------------------------------------------------
    def scaled(self, pcie: float = 1.0, gpu_speed: float = 1.0, cpu_cores: float = 1.0,
               cpu_mem_bw: float = 1.0, gpu_memory_gib: float | None = None) -> HardwareProfile:
        """A what-if copy: bandwidths and speeds multiplied; measured curves scaled alike. The copy is
        not range-checked (tests scale made-up profiles); check_ranges tells whether it is plausible."""
        data = self.to_dict()
        data["name"] = f"{self.name}*"
        g, p, c = data["gpu"], data["pcie"], data["cpu"]
        g["mem_bandwidth_gbs"] *= gpu_speed
        g["bf16_tflops"] *= gpu_speed
        if gpu_memory_gib is not None:
            g["memory_gib"] = gpu_memory_gib
        for ec in g["expert_ffn"]:
            ec["curve"]["time_us"] = [t / gpu_speed for t in ec["curve"]["time_us"]]
        for att in g["attention"]:
            att["time_us"] = [[t / gpu_speed for t in row] for row in att["time_us"]]
        p["h2d_gbs"] *= pcie
        p["d2h_gbs"] *= pcie
        for key in ("h2d", "d2h"):
            if p[key]:
                p[key]["time_us"] = [t / pcie for t in p[key]["time_us"]]
        # More cores give each worker more threads (more FLOP/s); the pool size is a runtime setting and
        # DRAM bandwidth is its own axis, so more cores never make a bandwidth-bound expert slower.
        c["cores"] = max(1, round(c["cores"] * cpu_cores))
        c["gflops"] *= cpu_cores
        c["mem_bandwidth_gbs"] *= cpu_mem_bw
        cpu_factor = min(cpu_cores, cpu_mem_bw)
        for ec in c["expert_ffn"]:
            ec["curve"]["time_us"] = [t / cpu_factor for t in ec["curve"]["time_us"]]
        return profile_from_dict(data, source=self.name, plausible=False)

    # ----- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("flags")
        if not out["cpu"]["kernel"]:   # profiles without a recorded kernel keep their form and fingerprint
            out["cpu"].pop("kernel")
        return out

    def fingerprint(self) -> str:
        """sha256 of the profile as canonical JSON: equal profiles agree whether named or loaded from a file."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        write_text(path, self.to_yaml())


# ----- loading with validation --------------------------------------------------------------
def _build(cls: type, data: Any, where: str, nested: dict[str, Any] | None = None) -> Any:
    """A dataclass from a mapping, with one-line errors for missing, unknown or negative fields."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping")
    names = {f.name: f for f in fields(cls) if f.name != "flags"}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise InputError(f"{where}.{unknown[0]}: unknown field")
    values: dict[str, Any] = {}
    for name, f in names.items():
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise InputError(f"{where}.{name}: required field is missing")
            continue
        value = data[name]
        if nested and name in nested and value is not None:
            value = nested[name](value, f"{where}.{name}")
        elif isinstance(value, bool):
            pass
        elif isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{where}.{name}: must be a finite number, got {value}")
        elif isinstance(value, int | float) and value < 0:
            raise InputError(f"{where}.{name}: must not be negative, got {value}")
        values[name] = value
    return cls(**values)


def _curve(data: Any, where: str) -> Curve:
    curve = _build(Curve, data, where, {"provenance": _provenance})
    curve.check(where)
    return curve


def _provenance(data: Any, where: str) -> Provenance:
    prov = _build(Provenance, data, where)
    if prov.kind not in PROVENANCE_KINDS:
        raise InputError(f"{where}.kind: must be one of {', '.join(PROVENANCE_KINDS)}")
    return prov


def _expert_curves(data: Any, where: str) -> list[ExpertCurve]:
    if not isinstance(data, list):
        raise InputError(f"{where}: expected a list")
    curves = [_build(ExpertCurve, d, f"{where}[{i}]", {"curve": _curve}) for i, d in enumerate(data)]
    for i, c in enumerate(curves):
        for name in ("hidden", "intermediate", "workers"):
            _in_range(getattr(c, name), (1, 1 << 20, True), f"{where}[{i}].{name}")
    return curves


def _attention_grids(data: Any, where: str) -> list[dict[str, Any]]:
    """Measured attention grids: increasing finite tokens and context, a finite non-negative time
    for every (tokens, context) pair."""
    if not isinstance(data, list):
        raise InputError(f"{where}: expected a list")
    for i, grid in enumerate(data):
        at = f"{where}[{i}]"
        if not isinstance(grid, dict) or not {"tokens", "context", "time_us"} <= set(grid):
            raise InputError(f"{at}: needs tokens, context and time_us")
        for key in ("hidden", "heads", "kv_heads", "head_dim"):
            if key in grid:
                _in_range(grid[key], (1, 1 << 20, True), f"{at}.{key}")
        for key in ("tokens", "context"):
            xs = grid[key]
            if (not isinstance(xs, list) or not xs or not all(_is_number(v) and math.isfinite(v) and v >= 0
                                                              for v in xs)
                    or any(b <= a for a, b in zip(xs, xs[1:], strict=False))):
                raise InputError(f"{at}.{key}: must be a non-empty increasing list of finite numbers >= 0")
        table = grid["time_us"]
        rows_ok = isinstance(table, list) and len(table) == len(grid["tokens"]) and all(
            isinstance(r, list) and len(r) == len(grid["context"]) for r in table)
        if not rows_ok:
            raise InputError(f"{at}.time_us: must be a {len(grid['tokens'])} x {len(grid['context'])} table")
        if not all(_is_number(v) and math.isfinite(v) and v >= 0 for r in table for v in r):
            raise InputError(f"{at}.time_us: every time must be a finite number >= 0")
    return data


# Physically plausible range of every numeric field: (low, high, whole number). Wide enough for a
# CPU playing the GPU (tens of GFLOP/s) and for hardware years ahead; docs/hardware-profiles.md lists them.
RANGES: dict[str, dict[str, tuple[float, float, bool]]] = {
    "gpu": {
        "memory_gib": (0.25, 4096, False),
        "mem_bandwidth_gbs": (1e-3, 100_000, False),
        "bf16_tflops": (1e-3, 100_000, False),
        "mem_efficiency": (1e-3, 1.0, False),
        "compute_efficiency": (1e-3, 1.0, False),
        "launch_overhead_us": (0.0, 100_000, False),
        "layer_overhead_us": (0.0, 1_000_000, False),
    },
    "pcie": {
        "generation": (1, 7, True),
        "h2d_gbs": (0.01, 10_000, False),
        "d2h_gbs": (0.01, 10_000, False),
        "copy_overhead_us": (0.0, 1_000_000, False),
        "copy_engines": (1, 16, True),
        "copy_slows_compute": (0.0, 10.0, False),
    },
    "cpu": {
        "cores": (1, 4096, True),
        "workers": (1, 4096, True),
        "mem_bandwidth_gbs": (1e-3, 100_000, False),
        "gflops": (1e-3, 10_000_000, False),
        "mem_efficiency": (1e-3, 1.0, False),
        "compute_efficiency": (1e-3, 1.0, False),
        "task_overhead_us": (0.0, 1_000_000, False),
        "gpu_contention": (0.0, 10.0, False),
    },
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _in_range(value: Any, bounds: tuple[float, float, bool], where: str) -> None:
    low, high, whole = bounds
    if whole and not (isinstance(value, int) and not isinstance(value, bool)):
        raise InputError(f"{where}: must be a whole number in {low:g}..{high:g}, got {value!r}")
    if not _is_number(value) or not math.isfinite(value):
        raise InputError(f"{where}: must be a finite number in {low:g}..{high:g}, got {value!r}")
    if not low <= value <= high:
        raise InputError(f"{where}: {value:g} is outside the plausible range {low:g}..{high:g} "
                         "(see docs/hardware-profiles.md)")


def check_ranges(prof: HardwareProfile, source: str) -> None:
    """Every numeric field of the profile finite and inside its plausible range (RANGES), and no more
    CPU workers than cores: the pool model runs its workers in parallel, each on cores / workers
    cores, which an oversubscribed pool does not have."""
    for part, names in RANGES.items():
        obj = getattr(prof, part)
        for name, bounds in names.items():
            _in_range(getattr(obj, name), bounds, f"{source}.{part}.{name}")
    if prof.cpu.workers > prof.cpu.cores:
        raise InputError(f"{source}.cpu.workers: {prof.cpu.workers} workers on {prof.cpu.cores} cores; the CPU pool "
                         "model needs at least one core per worker, so give workers <= cores")


def profile_from_dict(data: Any, source: str = "profile", plausible: bool = True) -> HardwareProfile:
    """A profile from its mapping, every field checked; `plausible` also checks RANGES (off only for
    what-if variants made by `scaled`, whose callers check the result themselves)."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a YAML mapping at the top level")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise InputError(f"{source}: schema_version {version} is not supported (this tidesim reads "
                         f"{SCHEMA_VERSION})")
    gpu = lambda d, w: _build(GPUProfile, d, w, {"expert_ffn": _expert_curves,  # noqa: E731
                                                 "attention": _attention_grids})
    pcie = lambda d, w: _build(PCIeProfile, d, w, {"h2d": _curve, "d2h": _curve})  # noqa: E731
    cpu = lambda d, w: _build(CPUProfile, d, w, {"expert_ffn": _expert_curves})  # noqa: E731
    prof = _build(HardwareProfile, data, source,
                  {"provenance": _provenance, "gpu": gpu, "pcie": pcie, "cpu": cpu})
    if plausible:
        check_ranges(prof, source)
    return prof


def not_this_machine(prof: HardwareProfile) -> str | None:
    """Why the profile does not describe the machine this runs on (None when it may): a datasheet
    estimate, or more CPU cores than this machine has. `validate` compares a measurement on this
    machine with the profile's prediction, so a profile of another machine makes the error meaningless."""
    from tidesim.limits import usable_cores

    if prof.provenance.kind != "measured":
        return (f"profile {prof.name!r} is a datasheet estimate, not a measurement of this machine: the "
                "errors below compare this machine with another; measure it with `tidesim calibrate`")
    cores = usable_cores()
    if prof.cpu.cores > cores:
        return (f"profile {prof.name!r} describes a CPU with {prof.cpu.cores} cores, this machine has {cores}: "
                "it was measured elsewhere; measure this machine with `tidesim calibrate`")
    return None


def load_profile(path: str | Path) -> HardwareProfile:
    text = read_input_text(path, "hardware profile", "see `tidesim hw list`")
    return profile_from_dict(parse_yaml(text, str(path)), source=str(path))


def bundled_profiles() -> dict[str, Path]:
    from tidesim.bundled.paths import hwprofiles_dir

    return {p.stem: p for p in sorted(hwprofiles_dir().glob("*.yaml"))}


def get_profile(name_or_path: str) -> HardwareProfile:
    """A bundled profile by name, or a YAML file by path."""
    bundled = bundled_profiles()
    if name_or_path in bundled:
        return load_profile(bundled[name_or_path])
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return load_profile(path)
    raise InputError(f"unknown hardware profile {name_or_path!r}; use one of "
                     f"{', '.join(bundled) or '(none bundled)'} or a YAML file path")
