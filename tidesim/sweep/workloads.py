"""A sweep point's trace and workload: a fixed trace, or one synthesized once per decode setting
and cached beside the results; the workloads kept per process (points share few traces)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tidesim.errors import InputError
from tidesim.lru import LRU
from tidesim.models import ModelSpec
from tidesim.sweep.grid import Point
from tidesim.workload import Workload

WORKLOADS: LRU[str, Workload] = LRU(4)


def synth_key(point: Point) -> str | None:
    """Name of the cached synthesized trace of a point (None for a fixed trace)."""
    if not point.synthesized:
        return None
    from tidesim.trace.synth import GENERATOR_VERSION, SynthParams

    p = point.params
    ident = {"model": point.model_spec, "generator": GENERATOR_VERSION, "params": SynthParams().__dict__,
             **{k: p[k] for k in ("prompts", "prompt_length", "gen_length", "block_length", "threshold",
                                  "kv_cache", "seed")}}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    return (f"{point.model_spec['name']}-{p['kv_cache']}-g{p['gen_length']}-b{p['block_length']}"
            f"-t{p['threshold']:g}-p{p['prompts']}-s{p['seed']}-{digest}")


def trace_label(point: Point) -> str:
    key = synth_key(point)
    return f"{key}.parquet" if key else str(point.params["trace"])


def ensure_trace(point: Point, cache_dir: Path) -> Path:
    """The trace file of a point; a synthesized one is generated once and cached in cache_dir."""
    from tidesim.trace.io import read_trace, write_trace

    key = synth_key(point)
    if key is None:
        from tidesim.bundled.paths import resolve_trace
        return resolve_trace(point.params["trace"])
    path = cache_dir / f"{key}.parquet"
    if path.exists():
        try:
            read_trace(path, validate=False)
            return path
        except InputError:
            pass                                            # a damaged cache file: make it again
    from tidesim.trace.synth import SynthConfig, synthesize

    p = point.params
    cfg = SynthConfig(model=point.model(), prompts=p["prompts"], gen_length=p["gen_length"],
                      block_length=p["block_length"], threshold=p["threshold"], kv_cache=p["kv_cache"],
                      prompt_length=p["prompt_length"], seed=p["seed"])
    write_trace(synthesize(cfg), path)
    return path


def workload_key(point: Point) -> str:
    """What identifies a point's workload: its trace (synthesis settings, or file and content)
    and its model spec."""
    trace = synth_key(point) or str(point.params["trace"])
    return json.dumps([trace, point.trace_sha256, point.model_spec], sort_keys=True)


def load_workload(point: Point, cache_dir: Path) -> Workload:
    """The point's workload, kept in a small per-process cache (points share few traces)."""
    from tidesim.trace.io import read_trace
    from tidesim.workload import workload_from_trace

    path = ensure_trace(point, cache_dir)
    key = workload_key(point)
    kept = WORKLOADS.get(key)
    if kept is not None:
        return kept
    workload = workload_from_trace(read_trace(path), ModelSpec.from_dict(point.model_spec))
    WORKLOADS.put(key, workload)
    return workload


def prepare_trace(point: Point, cache_dir: Path) -> str:
    """Executor task: make sure a synthesized trace exists before its points run."""
    return ensure_trace(point, cache_dir).name

