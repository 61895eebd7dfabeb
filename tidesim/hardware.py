"""HardwareProfile: one GPU + PCIe link + host CPU, from measurements or a datasheet, as data with
its loading, checks and what-if variants. The parts are tidesim.hardware_parts; what they cost is
tidesim.curves (the methods below are its shorthand for a whole profile); a lookup that had to
estimate says so as a note (tidesim.notes), never by changing the profile.
docs/hardware-profiles.md documents the YAML schema.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tidesim import curves
from tidesim.atomic import write_text
from tidesim.errors import InputError, parse_yaml, read_input_text
from tidesim.hardware_parts import (
    US,
    CPUProfile,
    Curve,
    ExpertCurve,
    GPUProfile,
    PCIeProfile,
    Provenance,
    _is_number,
)
from tidesim.models import ModelSpec

__all__ = ["US", "CPUProfile", "Curve", "ExpertCurve", "GPUProfile", "HardwareProfile", "PCIeProfile",
           "Provenance"]

SCHEMA_VERSION = 1
LAYER_SHAPE_KEYS = curves.LAYER_SHAPE_KEYS
PROVENANCE_KINDS = ("measured", "datasheet")


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

    # ----- costs (seconds): tidesim.curves on this profile's parts -----------------------
    def gpu_expert_time(self, tokens: np.ndarray, spec: ModelSpec) -> np.ndarray:
        return curves.gpu_expert_time(self.gpu, tokens, spec)

    def cpu_expert_time(self, tokens: np.ndarray, spec: ModelSpec) -> np.ndarray:
        return curves.cpu_expert_time(self.cpu, tokens, spec)

    def cpu_expert_latency(self, tokens: np.ndarray, spec: ModelSpec) -> np.ndarray:
        return curves.cpu_expert_latency(self.cpu, tokens, spec)

    def h2d_time(self, nbytes: np.ndarray | float) -> np.ndarray:
        return curves.h2d_time(self.pcie, nbytes)

    def d2h_time(self, nbytes: np.ndarray | float) -> np.ndarray:
        return curves.d2h_time(self.pcie, nbytes)

    def attention_time(self, tokens: np.ndarray, context: np.ndarray, spec: ModelSpec) -> np.ndarray:
        return curves.attention_time(self.gpu, tokens, context, spec)

    def gpu_dense_time(self, tokens: np.ndarray, params: int, spec: ModelSpec, launches: int = 1) -> np.ndarray:
        return curves.gpu_dense_time(self.gpu, tokens, params, spec, launches)

    def gpu_layer_fixed_time(self, tokens: np.ndarray, context: np.ndarray, spec: ModelSpec) -> np.ndarray:
        return curves.gpu_layer_fixed_time(self.gpu, tokens, context, spec)

    def gpu_forward_fixed_time(self, tokens: np.ndarray, context: np.ndarray, spec: ModelSpec) -> np.ndarray:
        return curves.gpu_forward_fixed_time(self.gpu, tokens, context, spec)

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
        for grid in (*g["attention"], *g.get("layer_fixed", [])):
            grid["time_us"] = [[t / gpu_speed for t in row] for row in grid["time_us"]]
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
        if not out["cpu"]["kernel"]:   # profiles without a recorded kernel keep their form and fingerprint
            out["cpu"].pop("kernel")
        if out["cpu"]["pool_contention"] is None:   # likewise profiles with one (symmetric) contention
            out["cpu"].pop("pool_contention")
        if not out["pcie"]["copy_slows_cpu"]:       # and profiles whose copies do not slow the pool
            out["pcie"].pop("copy_slows_cpu")
        if not out["gpu"]["layer_fixed"]:   # likewise profiles without a measured fixed path
            out["gpu"].pop("layer_fixed")
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
    names = {f.name: f for f in fields(cls)}
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
    return _grids(data, where, ("hidden", "heads", "kv_heads", "head_dim"))


def _layer_fixed_grids(data: Any, where: str) -> list[dict[str, Any]]:
    """Measured grids of a MoE layer's fixed path: as attention grids, with every shape key of
    tidesim.curves.layer_shape (a grid without one would apply to any model)."""
    grids = _grids(data, where, LAYER_SHAPE_KEYS)
    for i, grid in enumerate(grids):
        missing = [k for k in LAYER_SHAPE_KEYS if k not in grid]
        unknown = sorted(set(grid) - {"tokens", "context", "time_us", *LAYER_SHAPE_KEYS})
        if missing or unknown:
            raise InputError(f"{where}[{i}].{(missing or unknown)[0]}: "
                             + ("required field is missing" if missing else "unknown field"))
    return grids


def _grids(data: Any, where: str, shape_keys: tuple[str, ...]) -> list[dict[str, Any]]:
    if not isinstance(data, list):
        raise InputError(f"{where}: expected a list")
    for i, grid in enumerate(data):
        at = f"{where}[{i}]"
        if not isinstance(grid, dict) or not {"tokens", "context", "time_us"} <= set(grid):
            raise InputError(f"{at}: needs tokens, context and time_us")
        for key in shape_keys:
            if key in grid:
                _in_range(grid[key], (0 if key == "shared_intermediate" else 1, 1 << 20, True), f"{at}.{key}")
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
        "copy_slows_cpu": (0.0, 10.0, False),
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
        "pool_contention": (0.0, 10.0, False),
    },
}


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
            if getattr(obj, name) is not None:      # optional fields (pool_contention) may be absent
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
                                                 "attention": _attention_grids, "layer_fixed": _layer_fixed_grids})
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
