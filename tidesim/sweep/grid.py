"""Sweep grid files: parse, validate up front, expand into points with stable ids.

A grid file (YAML) names parameter values; a list is an axis, a scalar is fixed for every point,
and the points are the cartesian product of the axes (last axis fastest). `parameters` may also
be a list of such mappings: the points are then the union of their products, duplicates dropped.
Custom model shapes are declared under `models` (a preset plus changed fields) and used by name.
docs/sweeps.md documents every parameter.

Everything that can be checked without running a point is checked here, so a bad grid fails with
one line before any work starts. A point's id is a hash of everything that determines its result
(resolved parameters, the full model spec, the fixed trace's bytes), so ids stay the same when a
grid is reordered or extended, and a resumed sweep reuses exactly the points that still apply.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tidesim.budget import TIDE_MAX_EXPERTS_PER_LAYER
from tidesim.errors import InputError, parse_yaml, read_input_text
from tidesim.limits import (
    MAX_BLOCK_LENGTH,
    MAX_GEN_LENGTH,
    MAX_PROMPT_LENGTH,
    MAX_PROMPTS,
    MAX_SWEEP_POINTS,
    available_memory_bytes,
    check_synth,
)
from tidesim.models import PRESETS, ModelSpec
from tidesim.plan import file_fingerprint

# Typical pinned host-to-device bandwidth of an x16 link per PCIe generation (docs/sources.md).
PCIE_GEN_GBS = {3: 12.0, 4: 25.0, 5: 50.0}
KV_CACHE_MODES = ("none", "prefix")
REFRESH_MODES = ("sync", "async")
ENGINES = ("analytic", "sim")
TOP_KEYS = ("name", "description", "models", "parameters")
MAX_POINTS = MAX_SWEEP_POINTS


@dataclass(frozen=True)
class Param:
    """One sweepable parameter: its type, default, group and the check of one value."""

    name: str
    kind: str                       # int | float | str
    default: Any
    group: str                      # trace | decode | hardware | policy | engine
    help: str
    choices: tuple[Any, ...] = ()
    low: float | None = None        # smallest allowed value
    low_open: bool = False          # value must be strictly above `low`
    high: float | None = None       # largest allowed value (inclusive)
    words: tuple[str, ...] = ()     # string values allowed for a numeric parameter


PARAMS: dict[str, Param] = {p.name: p for p in [
    Param("trace", "str", None, "trace",
          "a fixed trace (bundled name or .parquet path); unset: synthesize one per decode setting"),
    Param("model", "str", "llada2-mini", "decode", "model preset or a name declared under `models`"),
    Param("prompts", "int", 4, "decode", "prompts per synthesized trace", low=1, high=MAX_PROMPTS),
    Param("prompt_length", "int", 300, "decode", "prompt tokens per synthesized prompt", low=1,
          high=MAX_PROMPT_LENGTH),
    Param("gen_length", "int", 256, "decode", "generated tokens per prompt", low=1, high=MAX_GEN_LENGTH),
    Param("block_length", "int", 32, "decode", "tokens per diffusion block", low=1, high=MAX_BLOCK_LENGTH),
    Param("threshold", "float", 0.95, "decode", "confidence threshold that commits a token",
          low=0.0, low_open=True, high=0.999999),
    Param("kv_cache", "str", "prefix", "decode", "KV-cache mode", choices=KV_CACHE_MODES),
    Param("seed", "int", 0, "decode", "seed of the trace generator", low=0),
    Param("hw", "str", "h100-sxm-pcie5", "hardware", "base hardware profile (bundled name or YAML path)"),
    Param("pcie_gbs", "float", None, "hardware", "host-to-device bandwidth in GB/s (D2H scaled alike)",
          low=0.0, low_open=True, high=10_000),
    Param("pcie_gen", "int", None, "hardware", "PCIe generation, typical pinned x16 bandwidth",
          choices=tuple(PCIE_GEN_GBS)),
    Param("pcie_scale", "float", None, "hardware", "factor on the profile's PCIe bandwidth",
          low=0.0, low_open=True),
    Param("gpu_memory_gib", "float", None, "hardware", "GPU memory (default: the profile's)",
          low=0.0, low_open=True, high=4096),
    Param("gpu_speed", "float", 1.0, "hardware", "factor on GPU memory bandwidth and FLOP/s",
          low=0.0, low_open=True),
    Param("cpu_cores_scale", "float", 1.0, "hardware", "factor on CPU cores, workers and FLOP/s",
          low=0.0, low_open=True),
    Param("cpu_mem_bw_scale", "float", 1.0, "hardware", "factor on CPU memory bandwidth",
          low=0.0, low_open=True),
    Param("policy", "str", "tide", "policy", "offload policy (see `tidesim compare`), or `planned`"),
    Param("tau", "int", "best", "policy",
          "refresh interval in denoising steps, or `best`: the best single tau for the point by the analytic "
          "model (the default of every command)", low=1, words=("best",)),
    Param("refresh", "str", "sync", "policy", "refresh copies block the step or overlap",
          choices=REFRESH_MODES),
    Param("budget", "int", "memory", "policy",
          "GPU expert slots per MoE layer, or `memory`: what the GPU memory holds", low=0, words=("memory",)),
    Param("budget_cap", "int", "tide", "policy",
          "cap on a memory-derived budget: `tide` (the public code's per-model cap), `none`, or a number",
          low=1, words=("tide", "none")),
    Param("warmup_fraction", "float", 0.1, "policy", "share of forwards that pick a static resident set",
          low=0.0, low_open=True, high=1.0),
    Param("engine", "str", "analytic", "engine", "analytic cost model or discrete-event simulator",
          choices=ENGINES),
]}
DECODE_PARAMS = [p.name for p in PARAMS.values() if p.group == "decode"]
PCIE_PARAMS = ("pcie_gbs", "pcie_gen", "pcie_scale")


@dataclass(frozen=True)
class TraceInfo:
    """What a fixed trace fixes: its model and decode settings, and its content hash."""

    path: str
    sha256: str
    model: ModelSpec
    prompts: int
    gen_length: int
    block_length: int
    threshold: float
    kv_cache: str


@dataclass(frozen=True)
class Point:
    """One grid point: every parameter resolved (None where it does not apply)."""

    id: str
    index: int
    params: dict[str, Any]
    model_spec: dict[str, Any]
    trace_sha256: str | None = None

    @property
    def synthesized(self) -> bool:
        return self.params["trace"] is None

    def model(self) -> ModelSpec:
        return ModelSpec.from_dict(self.model_spec)


@dataclass
class Grid:
    """A validated grid: its points in expansion order, and what varies."""

    name: str
    description: str
    source: str
    points: list[Point]
    axes: list[str]                                   # parameters with more than one value
    custom_models: dict[str, dict[str, Any]] = field(default_factory=dict)
    canonical: str = ""                               # the grid as canonical JSON (provenance)

    def __len__(self) -> int:
        return len(self.points)

    def input_files(self) -> list[Path]:
        """The files the grid reads: itself, and its fixed traces and profile files (not bundled names)."""
        names = {self.source} | {str(p.params[k]) for p in self.points for k in ("trace", "hw") if p.params[k]}
        return sorted(Path(n) for n in names if Path(n).is_file())


# ----- loading ----------------------------------------------------------------------------------------
def load_grid(path: str | Path, check_policies: bool = True) -> Grid:
    """Read, validate and expand a grid file; any problem raises InputError naming the file."""
    path = Path(path)
    text = read_input_text(path, "grid file", "see docs/examples/ for grid files")
    data = parse_yaml(text, str(path))
    return parse_grid(data, source=str(path), base_dir=path.parent, check_policies=check_policies)


def parse_grid(data: Any, source: str = "grid", base_dir: Path | None = None,
               check_policies: bool = True) -> Grid:
    """Validate a grid mapping and expand it (see module docstring)."""
    try:
        return _parse(data, source, base_dir or Path("."), check_policies)
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None


def _parse(data: Any, source: str, base_dir: Path, check_policies: bool) -> Grid:
    if not isinstance(data, dict):
        raise InputError("expected a YAML mapping with a `parameters` section")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise InputError(f"unknown top-level key {unknown[0]!r}{_suggest(str(unknown[0]), TOP_KEYS)}; "
                         f"allowed: {', '.join(TOP_KEYS)}")
    if "parameters" not in data:
        raise InputError("the `parameters` section is missing")
    name = data.get("name", Path(source).stem)
    description = data.get("description", "")
    for key, value in (("name", name), ("description", description)):
        if not isinstance(value, str):
            raise InputError(f"{key} must be a string")
    custom = _parse_models(data.get("models") or {})
    sections = data["parameters"]
    if isinstance(sections, dict):
        sections = [sections]
    if not isinstance(sections, list) or not sections:
        raise InputError("parameters must be a mapping (or a non-empty list of mappings)")
    resolver = _Resolver(custom, base_dir, check_policies)
    points: list[Point] = []
    seen: set[str] = set()
    varying: dict[str, set[str]] = {}
    for i, section in enumerate(sections):
        where = "parameters" if len(sections) == 1 else f"parameters[{i}]"
        axes = _parse_section(section, where)
        combos = math.prod(len(v) for v in axes.values())
        if len(points) + combos > MAX_POINTS:
            raise InputError(f"the grid has {len(points) + combos:,} points, more than the limit of "
                             f"{MAX_POINTS:,} (docs/limits.md); split it")
        names = list(axes)
        for values in itertools.product(*(axes[n] for n in names)):
            point = resolver.point(dict(zip(names, values, strict=True)), len(points))
            if point.id in seen:
                continue
            seen.add(point.id)
            points.append(point)
            for key, value in point.params.items():
                varying.setdefault(key, set()).add(json.dumps(value, sort_keys=True))
    varied = [p for p in PARAMS if len(varying.get(p, ())) > 1]
    canonical = json.dumps({"name": name, "description": description, "models": custom,
                            "parameters": sections}, sort_keys=True, default=str)
    return Grid(name=name, description=description, source=source, points=points, axes=varied,
                custom_models=custom, canonical=canonical)


def _suggest(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_models(models: Any) -> dict[str, dict[str, Any]]:
    """Custom model shapes: name -> full ModelSpec dict (a preset with changed fields)."""
    if not isinstance(models, dict):
        raise InputError("models must map a name to {base: PRESET, FIELD: VALUE, ...}")
    out: dict[str, dict[str, Any]] = {}
    for name, spec in models.items():
        if not isinstance(name, str) or name in PRESETS:
            raise InputError(f"models: {name!r} must be a new name (not a preset)")
        if not isinstance(spec, dict) or "base" not in spec:
            raise InputError(f"models.{name}: give `base: PRESET` and the fields to change")
        base = spec["base"]
        if base not in PRESETS:
            raise InputError(f"models.{name}.base: unknown preset {base!r}; use one of {', '.join(sorted(PRESETS))}")
        fields = PRESETS[base].to_dict()
        for key, value in spec.items():
            if key == "base":
                continue
            if key not in fields or key == "name":
                raise InputError(f"models.{name}: unknown model field {key!r}{_suggest(str(key), fields)}")
            if type(value) is not type(fields[key]) and not (isinstance(fields[key], float)
                                                             and type(value) is int):
                raise InputError(f"models.{name}.{key}: expected {_kind_words(fields[key])}, got {value!r}")
            fields[key] = float(value) if isinstance(fields[key], float) else value
        fields["name"] = name
        ModelSpec.from_dict(fields)          # raises InputError on an inconsistent shape
        out[name] = {"base": base, "spec": fields}
    return out


# ----- values -----------------------------------------------------------------------------------------
def _parse_section(section: Any, where: str) -> dict[str, list[Any]]:
    if not isinstance(section, dict) or not section:
        raise InputError(f"{where} must be a non-empty mapping of parameter: value or [values]")
    axes: dict[str, list[Any]] = {}
    for name, raw in section.items():
        if name not in PARAMS:
            raise InputError(f"{where}: unknown parameter {name!r}{_suggest(str(name), PARAMS)}; "
                             "see docs/sweeps.md for the list")
        param = PARAMS[name]
        values = _values(param, raw, f"{where}.{name}")
        checked = [_check_value(param, v, f"{where}.{name}") for v in values]
        unique = list(dict.fromkeys(json.dumps(v) for v in checked))
        if len(unique) != len(checked):
            raise InputError(f"{where}.{name}: a value appears twice")
        axes[name] = checked
    if sum(p in axes for p in PCIE_PARAMS) > 1:
        raise InputError(f"{where}: give only one of {', '.join(PCIE_PARAMS)}")
    if "trace" in axes and axes["trace"] != [None]:
        fixed_decode = [p for p in DECODE_PARAMS if p in axes]
        if fixed_decode:
            raise InputError(f"{where}: {fixed_decode[0]} is set by the fixed trace; leave `trace` out to "
                             "synthesize traces per decode setting")
    return axes


RANGE_KEYS = ("from", "to", "step", "linspace", "geomspace")


def _values(param: Param, raw: Any, where: str) -> list[Any]:
    """A scalar, a list, or a range mapping -> the list of values of one axis."""
    if isinstance(raw, list):
        if not raw:
            raise InputError(f"{where}: empty list; give at least one value")
        return raw
    if isinstance(raw, dict):
        if param.kind == "str":
            raise InputError(f"{where}: give a value or a list of values")
        return _range(param, raw, where)
    return [raw]


def _range(param: Param, raw: dict[str, Any], where: str) -> list[Any]:
    unknown = [k for k in raw if k not in RANGE_KEYS]
    if unknown:
        raise InputError(f"{where}: unknown range key {unknown[0]!r}; use from/to/step, linspace: [a, b, n] "
                         "or geomspace: [a, b, n]")
    if "linspace" in raw or "geomspace" in raw:
        kind = "linspace" if "linspace" in raw else "geomspace"
        if len(raw) != 1:
            raise InputError(f"{where}: {kind} stands alone in a range")
        spec = raw[kind]
        if (not isinstance(spec, list) or len(spec) != 3 or not all(_is_number(v) for v in spec)
                or not _is_int(spec[2])):
            raise InputError(f"{where}: {kind} needs [start, stop, count] numbers")
        start, stop, count = float(spec[0]), float(spec[1]), int(spec[2])
        if count < 1:
            raise InputError(f"{where}: {kind} count must be at least 1 (empty range)")
        if kind == "geomspace" and (start <= 0 or stop <= 0):
            raise InputError(f"{where}: geomspace needs positive start and stop")
        fn: Callable[..., np.ndarray] = np.linspace if kind == "linspace" else np.geomspace
        values = [float(f"{v:.12g}") for v in fn(start, stop, count)]
    else:
        if not {"from", "to"} <= set(raw):
            raise InputError(f"{where}: a range needs from and to (and optionally step)")
        start, stop, step = raw["from"], raw["to"], raw.get("step", 1)
        if not all(_is_number(v) for v in (start, stop, step)):
            raise InputError(f"{where}: from, to and step must be numbers")
        if step <= 0:
            raise InputError(f"{where}: step must be positive")
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        if count < 1:
            raise InputError(f"{where}: empty range (from {start} is above to {stop})")
        values = [start + i * step for i in range(count)]
        if not all(_is_int(v) for v in (start, stop, step)):
            values = [float(f"{v:.12g}") for v in values]
    if param.kind == "int":
        if not all(float(v).is_integer() for v in values):
            raise InputError(f"{where}: {param.name} takes whole numbers, the range gives fractions")
        values = [int(v) for v in values]
    return values


def _kind_words(example: Any) -> str:
    """What kind of value `example` is, in words (not a Python type name)."""
    if isinstance(example, bool):
        return "true or false"
    if isinstance(example, int):
        return "a whole number"
    if isinstance(example, float):
        return "a number"
    return "text" if isinstance(example, str) else "a value like the preset's"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_value(param: Param, value: Any, where: str) -> Any:
    """One value of one parameter, type-checked and normalised (ints for int, floats for float)."""
    if value is None:
        if param.default is None:
            return None
        raise InputError(f"{where}: null is not allowed; leave the parameter out for its default")
    if isinstance(value, str) and value in param.words:
        return value
    if param.kind == "str":
        if not isinstance(value, str) or not value:
            raise InputError(f"{where}: expected a name, got {value!r}")
    elif param.kind == "int":
        if not _is_int(value) and not (isinstance(value, float) and value.is_integer()):
            extra = f" or {', '.join(param.words)}" if param.words else ""
            raise InputError(f"{where}: expected a whole number{extra}, got {value!r}")
        value = int(value)
    else:
        if not _is_number(value):
            raise InputError(f"{where}: expected a number, got {value!r}")
        value = float(value)
    if param.choices and value not in param.choices:
        raise InputError(f"{where}: {value!r} is not one of {', '.join(map(str, param.choices))}")
    if param.low is not None and (value < param.low or (param.low_open and value == param.low)):
        relation = ">" if param.low_open else ">="
        raise InputError(f"{where}: must be {relation} {param.low:g}, got {value!r}")
    if param.high is not None and value > param.high:
        raise InputError(f"{where}: must be <= {param.high:g}, got {value!r}")
    return value


# ----- resolution of one point ------------------------------------------------------------------------
class _Resolver:
    """Resolves names (models, profiles, traces, policies) once each, and builds points."""

    def __init__(self, custom: dict[str, dict[str, Any]], base_dir: Path, check_policies: bool) -> None:
        self.custom = custom
        self.base_dir = base_dir
        self.check_policies = check_policies
        self._traces: dict[str, TraceInfo] = {}
        self._profiles: dict[str, tuple[str, str]] = {}
        self._policies: list[str] | None = None
        self._sizes_checked: set[str] = set()
        self._available = available_memory_bytes()

    def synth_fits(self, spec: dict[str, Any], params: dict[str, Any]) -> None:
        """A synthesized trace of this point within the limits and this machine's memory (once per setting)."""
        names = ("prompts", "gen_length", "block_length", "prompt_length", "kv_cache")
        key = json.dumps([spec["name"], *(params[n] for n in names)])
        if key not in self._sizes_checked:
            check_synth(ModelSpec.from_dict(spec), params["prompts"], params["gen_length"], params["block_length"],
                        params["prompt_length"], params["kv_cache"], available=self._available)
            self._sizes_checked.add(key)

    def point(self, given: dict[str, Any], index: int) -> Point:
        params = {name: given.get(name, p.default) for name, p in PARAMS.items()}
        trace_sha = None
        if params["trace"] is not None:
            info = self.trace(params["trace"])
            params["trace"] = info.path
            spec = info.model.to_dict()
            params.update(model=info.model.name, prompts=info.prompts, prompt_length=None,
                          gen_length=info.gen_length, block_length=info.block_length, threshold=info.threshold,
                          kv_cache=info.kv_cache, seed=None)
            trace_sha = info.sha256
        else:
            spec = self.model(params["model"])
            if params["gen_length"] % params["block_length"]:
                raise InputError(f"gen_length {params['gen_length']} is not a multiple of block_length "
                                 f"{params['block_length']}")
            self.synth_fits(spec, params)
        params["hw"], hw_sha = self.profile(params["hw"])
        self.policy(params["policy"])
        if isinstance(params["budget"], int) and params["budget"] > spec["num_experts"]:
            raise InputError(f"budget {params['budget']} exceeds the {spec['num_experts']} experts per layer "
                             f"of {spec['name']}")
        if params["budget_cap"] == "tide":
            base = self.custom.get(spec["name"], {}).get("base", spec["name"])
            params["budget_cap"] = TIDE_MAX_EXPERTS_PER_LAYER.get(base, "none")
        ident = json.dumps({"params": params, "model_spec": spec, "trace_sha256": trace_sha, "hw_sha256": hw_sha},
                           sort_keys=True)
        pid = hashlib.sha256(ident.encode()).hexdigest()[:12]
        return Point(id=pid, index=index, params=params, model_spec=spec, trace_sha256=trace_sha)

    def model(self, name: str) -> dict[str, Any]:
        if name in self.custom:
            return dict(self.custom[name]["spec"])
        if name in PRESETS:
            return PRESETS[name].to_dict()
        options = sorted(PRESETS) + sorted(self.custom)
        raise InputError(f"model: unknown model {name!r}{_suggest(name, options)}; use one of "
                         f"{', '.join(options)} or declare it under `models`")

    def profile(self, name: str) -> tuple[str, str]:
        """Check a profile loads. Returns (bundled name or absolute path, hash of its content)."""
        if name not in self._profiles:
            from tidesim.hardware import bundled_profiles, get_profile
            bundled = bundled_profiles()
            if name in bundled:
                path, shown = bundled[name], name
            else:
                path = Path(name) if Path(name).is_absolute() else self.base_dir / name
                if not path.exists() and Path(name).exists():
                    path = Path(name)
                if not path.exists():
                    raise InputError(f"hw: unknown hardware profile {name!r}{_suggest(name, bundled)}; "
                                     f"use one of {', '.join(bundled)} or a YAML file path")
                shown = str(path.resolve())
            prof = get_profile(str(path))
            digest = prof.fingerprint()
            self._profiles[name] = (shown, digest)
        return self._profiles[name]

    def policy(self, name: str) -> None:
        if not self.check_policies:
            return
        if self._policies is None:
            from tidesim.policies import policy_names
            self._policies = policy_names()
        if name not in self._policies:
            raise InputError(f"policy: unknown policy {name!r}{_suggest(name, self._policies)}; use one of "
                             f"{', '.join(self._policies) or '(none registered)'}")

    def trace(self, name: str) -> TraceInfo:
        if name not in self._traces:
            from tidesim.bundled.paths import bundled_traces
            bundled = bundled_traces()
            if name in bundled:
                path = bundled[name]
                shown = name
            else:
                path = Path(name) if Path(name).is_absolute() else self.base_dir / name
                if not path.exists() and Path(name).exists():
                    path = Path(name)
                if not path.exists():
                    raise InputError(f"trace: no bundled trace or file {name!r}{_suggest(name, bundled)}; "
                                     f"bundled: {', '.join(bundled) or 'none'}")
                shown = str(path.resolve())
            self._traces[name] = replace(trace_info(path), path=shown)
        return self._traces[name]


def trace_info(path: Path) -> TraceInfo:
    """A trace file's metadata and content hash, without reading its arrays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tidesim.trace.schema import METADATA_KEY, TraceMeta

    try:
        schema = pq.read_schema(path)
        meta = TraceMeta.from_dict(json.loads((schema.metadata or {})[METADATA_KEY]))
    except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
        why = "no tidesim metadata" if isinstance(exc, KeyError) else "not a readable Parquet file"
        raise InputError(f"trace {path}: not a tidesim trace ({why})") from None
    digest = file_fingerprint(path)
    prompts = len(meta.prompts) if meta.prompts else 0
    return TraceInfo(path=str(path), sha256=digest, model=meta.model, prompts=prompts, gen_length=meta.gen_length,
                     block_length=meta.block_length, threshold=float(meta.threshold), kv_cache=meta.kv_cache)
