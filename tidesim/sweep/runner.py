"""Run a sweep: evaluate every grid point, in parallel, resumably, into one Parquet table.

Evaluation of one point: trace (fixed, or synthesized once per decode setting and cached beside
the results) -> workload -> what-if hardware -> GPU expert budget -> policy (or the planner's plan)
-> Schedule -> `tidesim.run.run` (analytic cost model or simulator) -> one flat row.

Resume: every finished point is written at once as its own small file in RESULTS.parts/; a restarted
sweep skips the point ids found there. At the end the rows are merged, in grid order, into the
results file atomically and the parts folder is removed. A point whose inputs are invalid for it
(e.g. GPU memory too small for the model) becomes a row with an `error` text; any other failure
stops the sweep, keeping the finished points for a resume.

Executors: inline (one worker), a local process pool (default: os.cpu_count() workers), or a Dask
distributed cluster. All run the same function on the same points, so results are identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tidesim import __version__
from tidesim.atomic import atomic_path, check_output_path, write_text
from tidesim.errors import InputError
from tidesim.hardware import HardwareProfile, check_ranges, get_profile
from tidesim.metrics import Metrics
from tidesim.models import ModelSpec
from tidesim.policies.options import PolicyOptions
from tidesim.policies.registry import traits
from tidesim.procs import die_with_parent
from tidesim.schedule import Schedule
from tidesim.sweep.grid import PARAMS, PCIE_GEN_GBS, Grid, Point
from tidesim.workload import Workload

RESULTS_FORMAT = 1
METADATA_KEY = b"tidesim.sweep"
EXECUTORS = ("local", "dask")


# ----- what one evaluation returns ---------------------------------------------------------------------
@dataclass
class Evaluation:
    """The metrics of one point plus what the point resolved to (effective hardware, budget, tau)."""

    metrics: Metrics
    derived: dict[str, Any] = field(default_factory=dict)


Evaluator = Callable[[Point, Path], Evaluation]
"""(point, trace cache folder) -> Evaluation; raises InputError when the point's inputs do not fit."""

DERIVED_COLUMNS: dict[str, pa.DataType] = {
    "trace_file": pa.string(),        # the trace evaluated: bundled name, path, or cache file name
    "hw_name": pa.string(),
    "hw_h2d_gbs": pa.float64(),
    "hw_d2h_gbs": pa.float64(),
    "hw_gpu_memory_gib": pa.float64(),
    "hw_cpu_cores": pa.int64(),
    "hw_cpu_workers": pa.int64(),
    "budget_used": pa.float64(),      # mean GPU expert slots per MoE layer (planned: per-layer)
    "tau_used": pa.float64(),         # mean refresh interval over MoE layers
    "per_layer": pa.string(),         # planned: JSON {"tau": [...], "budget": [...], ...}
}


# ----- the real evaluation -----------------------------------------------------------------------------
def evaluate_point(point: Point, cache_dir: Path) -> Evaluation:
    """Evaluate one point with the real simulator / cost model (the default evaluator)."""
    from tidesim.budget import budget_for_memory
    from tidesim.policies import PolicyOptions, uniform
    from tidesim.run import run

    p = point.params
    workload = load_workload(point, cache_dir)
    hw = build_hardware(p)
    model = workload.model
    layers = model.num_moe_layers
    derived = hardware_columns(hw)
    derived["trace_file"] = trace_label(point)
    policy = p["policy"]
    if traits(policy).needs_plan:
        tau, budget, info = plan_point(workload, hw)
        derived["per_layer"] = json.dumps(info, sort_keys=True)
    else:
        if p["budget"] == "memory":
            cap = None if p["budget_cap"] == "none" else int(p["budget_cap"])
            slots = budget_for_memory(model, hw.gpu.memory_gib, cap)
        else:
            slots = int(p["budget"])
        tau, budget = uniform(point_tau(p, workload, hw, slots, workload_key(point)), layers), uniform(slots, layers)
    derived["budget_used"] = float(np.mean(budget))
    derived["tau_used"] = float(np.mean(tau))
    options = PolicyOptions(budget=budget, tau=tau, hw=hw, refresh=p["refresh"],
                            warmup_fraction=p["warmup_fraction"])
    schedule, fresh = cached_schedule(policy, workload_key(point), workload, options)
    metrics = run(workload, schedule, hw, engine=p["engine"], check=fresh)
    metrics.policy = policy
    return Evaluation(metrics=metrics, derived=derived)


def point_tau(p: dict[str, Any], workload: Workload, hw: HardwareProfile, slots: int, wkey: str | None = None) -> int:
    """The point's tau; `best` follows the default-tau rule of every command (tidesim.default_tau):
    the analytic best single tau for this workload, profile, budget and refresh mode. Policies that
    do not refresh on an interval ignore tau, so they skip the search. With `wkey` (the point's
    workload_key) the choice is kept per process for points with the same inputs (tide and
    tide-reference on one profile search once)."""
    if p["tau"] != "best":
        return int(p["tau"])
    if not traits(p["policy"]).uses_tau:
        return 1
    from tidesim.default_tau import best_tau

    if wkey is None:
        return best_tau(workload, hw, slots, p["refresh"]).tau
    key = json.dumps([wkey, hw.fingerprint(), slots, p["refresh"]])
    known = _kept(_TAUS, key)
    if known is None:
        choice, raised = hw.noting(lambda: best_tau(workload, hw, slots, p["refresh"]))
        known = (choice.tau, raised)
        _keep(_TAUS, key, known, _MAX_TAUS)
    hw.flags.update(known[1])             # the search's notes on the profile, as if it ran here
    return known[0]


_TAUS: OrderedDict[str, tuple[int, frozenset[str]]] = OrderedDict()   # best tau and the notes it added
_MAX_TAUS = 256


PLAN_TAUS = list(range(1, 33))      # the candidate intervals the planner chooses from (TIDE swept 1..31)


def plan_point(workload: Workload, hw: HardwareProfile) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Solve the per-layer plan (tau and budget per MoE layer) for this point's hardware and GPU
    memory, over the candidate intervals PLAN_TAUS and the planner's default budget grid."""
    from tidesim import planner

    layers, experts = workload.num_layers, workload.num_experts
    slots = planner.expert_slots(workload.model, hw.gpu.memory_gib)
    budgets = planner.default_budgets(slots, layers, experts)
    table = planner.cost_table(workload, hw, PLAN_TAUS, budgets)
    result = planner.solve_plan(table, slots)
    if result.status not in ("optimal", "feasible"):
        raise InputError(f"the planner found no plan for {hw.gpu.memory_gib:g} GiB ({result.status})")
    info = {"tau": [int(t) for t in result.tau], "budget": [int(b) for b in result.budget],
            "predicted_s": float(result.objective_s), "status": result.status, "slots": int(slots)}
    return np.asarray(result.tau, np.int64), np.asarray(result.budget, np.int64), info


# ----- hardware ----------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _base_profile(name: str) -> HardwareProfile:
    return get_profile(name)


def pcie_factor(params: dict[str, Any], base: HardwareProfile) -> float:
    """Factor on the base profile's PCIe bandwidth from pcie_gbs, pcie_gen or pcie_scale."""
    if params.get("pcie_gbs") is not None:
        return float(params["pcie_gbs"]) / base.pcie.h2d_gbs
    if params.get("pcie_gen") is not None:
        return PCIE_GEN_GBS[int(params["pcie_gen"])] / base.pcie.h2d_gbs
    if params.get("pcie_scale") is not None:
        return float(params["pcie_scale"])
    return 1.0


def build_hardware(params: dict[str, Any]) -> HardwareProfile:
    """The what-if variant of the point's base profile."""
    base = _base_profile(params["hw"])
    hw = base.scaled(pcie=pcie_factor(params, base), gpu_speed=params["gpu_speed"],
                     cpu_cores=params["cpu_cores_scale"], cpu_mem_bw=params["cpu_mem_bw_scale"],
                     gpu_memory_gib=params["gpu_memory_gib"])
    check_ranges(hw, "the what-if hardware")            # out of the plausible ranges: an error row
    return hw


def hardware_columns(hw: HardwareProfile) -> dict[str, Any]:
    return {"hw_name": hw.name, "hw_h2d_gbs": hw.pcie.h2d_gbs, "hw_d2h_gbs": hw.pcie.d2h_gbs,
            "hw_gpu_memory_gib": hw.gpu.memory_gib, "hw_cpu_cores": hw.cpu.cores,
            "hw_cpu_workers": hw.cpu.workers}


# ----- traces and workloads ----------------------------------------------------------------------------
_WORKLOADS: OrderedDict[str, Workload] = OrderedDict()
_LOCK = threading.Lock()
_MAX_WORKLOADS = 4


def _kept(cache: OrderedDict[str, Any], key: str) -> Any | None:
    """The value a per-process cache keeps for `key` (now its most recent), or None."""
    with _LOCK:
        if key not in cache:
            return None
        cache.move_to_end(key)
        return cache[key]


def _keep(cache: OrderedDict[str, Any], key: str, value: Any, size: int) -> None:
    """Keep `value` under `key`, dropping the least recently used beyond `size` entries."""
    with _LOCK:
        cache[key] = value
        while len(cache) > size:
            cache.popitem(last=False)


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
    kept: Workload | None = _kept(_WORKLOADS, key)
    if kept is not None:
        return kept
    workload = workload_from_trace(read_trace(path), ModelSpec.from_dict(point.model_spec))
    _keep(_WORKLOADS, key, workload, _MAX_WORKLOADS)
    return workload


def prepare_trace(point: Point, cache_dir: Path) -> str:
    """Executor task: make sure a synthesized trace exists before its points run."""
    return ensure_trace(point, cache_dir).name


# ----- schedules ---------------------------------------------------------------------------------------
class _WatchedOptions(PolicyOptions):
    """PolicyOptions that notes whether the policy read the hardware profile."""

    def __getattribute__(self, name: str) -> Any:
        if name == "hw":
            object.__setattr__(self, "hw_read", True)
        return super().__getattribute__(name)


_SCHEDULES: OrderedDict[str, Schedule] = OrderedDict()     # schedules that did not read the profile
_HW_SCHEDULES: OrderedDict[str, Schedule] = OrderedDict()  # those that did (rarely reused: a grid's
_MAX_SCHEDULES = 16                                        # profiles differ point to point)
_MAX_HW_SCHEDULES = 2


def cached_schedule(policy: str, wkey: str, workload: Workload, options: PolicyOptions) -> tuple[Schedule, bool]:
    """The policy's Schedule, reused across points that differ only in hardware when the policy
    never read the hardware profile (most placements depend on routing, budget and tau alone).
    Whether it read it is observed, not assumed: a policy that reads `options.hw` is cached per
    profile. Returns (schedule, built now)."""
    from tidesim.policies import build_schedule

    base = json.dumps([wkey, policy, options.budget.tolist(), options.tau.tolist(), options.refresh,
                       options.warmup_fraction])
    per_hw = base + options.hw.fingerprint()
    for key, cache in ((base, _SCHEDULES), (per_hw, _HW_SCHEDULES)):
        kept: Schedule | None = _kept(cache, key)
        if kept is not None:
            return kept, False
    watched = _WatchedOptions(budget=options.budget, tau=options.tau, hw=options.hw, refresh=options.refresh,
                              warmup_fraction=options.warmup_fraction)
    schedule = build_schedule(policy, workload, watched)
    if getattr(watched, "hw_read", False):
        _keep(_HW_SCHEDULES, per_hw, schedule, _MAX_HW_SCHEDULES)
    else:
        _keep(_SCHEDULES, base, schedule, _MAX_SCHEDULES)
    return schedule, True


# ----- rows --------------------------------------------------------------------------------------------
_METRIC_SKIP = {"engine", "policy", "busy_s", "breakdown_s", "layer_time_s", "notes"}


def evaluate_row(point: Point, cache_dir: Path, evaluator: Evaluator) -> dict[str, Any]:
    """Executor task: one point -> one flat row (an InputError becomes the row's `error`)."""
    row: dict[str, Any] = {"point_id": point.id, "index": point.index}
    row.update(param_columns(point))
    try:
        result = evaluator(point, cache_dir)
    except InputError as exc:
        row["error"] = str(exc)
        return row
    row.update(result.derived)
    row.update(metric_columns(result.metrics))
    row["error"] = None
    return row


def evaluate_rows(points: list[Point], cache_dir: Path, evaluator: Evaluator) -> list[dict[str, Any]]:
    """Executor task: a few points, one after another in one worker (see point_batches)."""
    return [evaluate_row(p, cache_dir, evaluator) for p in points]


BATCH_POINTS = 8


def point_batches(points: list[Point], workers: int) -> list[list[Point]]:
    """The points as executor tasks: points that differ only in their policy go to one worker
    together (at most BATCH_POINTS at a time), since they share the workload, the profile, the
    budget and the best-tau search, which a worker keeps; one point per task when that would leave
    fewer than two tasks per worker."""
    groups: dict[str, list[Point]] = {}
    for p in points:
        rest = {k: v for k, v in p.params.items() if k != "policy"}
        key = json.dumps([p.model_spec, p.trace_sha256, rest], sort_keys=True, default=str)
        groups.setdefault(key, []).append(p)
    batches = [g[i:i + BATCH_POINTS] for g in groups.values() for i in range(0, len(g), BATCH_POINTS)]
    return batches if len(batches) >= 2 * workers else [[p] for p in points]


def param_columns(point: Point) -> dict[str, Any]:
    out = {}
    for name, param in PARAMS.items():
        value = point.params[name]
        out[name] = str(value) if param.words and value is not None else value
    return out


def metric_columns(metrics: Metrics) -> dict[str, Any]:
    """Every scalar of Metrics as a column; busy_s / breakdown_s as one column per key."""
    out: dict[str, Any] = {}
    for f in fields(Metrics):
        if f.name not in _METRIC_SKIP:
            value = getattr(metrics, f.name)
            out[f.name] = value.item() if isinstance(value, np.generic) else value
    for key, value in metrics.busy_s.items():
        out[f"busy_{key}_s"] = float(value)
    for key, value in metrics.breakdown_s.items():
        out[f"breakdown_{key}_s"] = float(value)
    out["notes"] = "; ".join(metrics.notes) if metrics.notes else None
    return out


def _metric_types() -> dict[str, pa.DataType]:
    types: dict[str, pa.DataType] = {}
    for f in fields(Metrics):
        if f.name in _METRIC_SKIP:
            continue
        annotation = str(f.type)
        if annotation.startswith("bool"):
            types[f.name] = pa.bool_()
        elif annotation.startswith("int"):
            types[f.name] = pa.int64()
        elif annotation.startswith("str"):
            types[f.name] = pa.string()
        else:
            types[f.name] = pa.float64()
    return types


def results_schema(rows: list[dict[str, Any]]) -> pa.Schema:
    """Fixed columns first (ids, inputs, derived, metrics), then the per-resource and per-category
    columns found in the rows (sorted), then notes and error."""
    cols: list[tuple[str, pa.DataType]] = [("point_id", pa.string()), ("index", pa.int64())]
    kinds = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}
    cols += [(n, pa.string() if p.words else kinds[p.kind]) for n, p in PARAMS.items()]
    cols += list(DERIVED_COLUMNS.items())
    cols += list(_metric_types().items())
    extra = sorted({k for row in rows for k in row if k.startswith(("busy_", "breakdown_"))},
                   key=lambda k: (not k.startswith("busy_"), k))
    cols += [(k, pa.float64()) for k in extra]
    cols += [("notes", pa.string()), ("error", pa.string())]
    return pa.schema(cols)


def rows_to_table(rows: list[dict[str, Any]], grid: Grid) -> pa.Table:
    rows = sorted(rows, key=lambda r: r["index"])
    schema = results_schema(rows)
    arrays = [pa.array([r.get(f.name) for r in rows], type=f.type) for f in schema]
    meta = {"format": RESULTS_FORMAT, "tidesim_version": __version__, "grid": json.loads(grid.canonical)}
    schema = schema.with_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
    return pa.Table.from_arrays(arrays, schema=schema)


def write_results(rows: list[dict[str, Any]], grid: Grid, path: Path) -> None:
    table = rows_to_table(rows, grid)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


# ----- executors ---------------------------------------------------------------------------------------
class InlineExecutor:
    """Runs tasks one after another in this process (one worker; tests; debugging)."""

    def __enter__(self) -> InlineExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def unordered(self, fn: Callable[..., Any], items: Iterable[Any], *args: Any) -> Iterator[Any]:
        for item in items:
            yield fn(item, *args)


class LocalExecutor:
    """A process pool on this machine; results come back as they finish. Its workers end with this
    process, even when it is killed with SIGKILL (tidesim.procs)."""

    def __init__(self, workers: int) -> None:
        self.pool = ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent,
                                        initargs=(os.getpid(),))
        self.workers = workers

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def unordered(self, fn: Callable[..., Any], items: Iterable[Any], *args: Any) -> Iterator[Any]:
        pending: set[Future[Any]] = set()
        queue = iter(items)
        window = 4 * self.workers                            # bounded: a kill loses little work
        for item in queue:
            pending.add(self.pool.submit(fn, item, *args))
            if len(pending) >= window:
                break
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=id):
                yield fut.result()
                nxt = next(queue, None)
                if nxt is not None:
                    pending.add(self.pool.submit(fn, nxt, *args))


DASK_CONNECT_TIMEOUT_S = 10.0


def check_scheduler(address: str, timeout_s: float) -> None:
    """InputError unless a Dask scheduler at `address` answers an identity request within timeout_s
    (the Client itself can wait forever on an address that accepts and says nothing)."""
    import asyncio

    from distributed.core import rpc

    async def identity() -> Any:
        async with rpc(address) as remote:
            return await remote.identity()

    try:
        info = asyncio.run(asyncio.wait_for(identity(), timeout_s))
    except Exception:          # refused, timed out, garbage from something that is not a scheduler
        info = None
    if not isinstance(info, dict):
        raise InputError(f"the Dask scheduler {address!r} did not answer within {timeout_s:g} s; check the address "
                         "and that the scheduler runs")


class DaskExecutor:
    """A Dask distributed cluster: an existing scheduler, or a local cluster started here."""

    def __init__(self, scheduler: str | None, workers: int) -> None:
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise InputError("the dask executor needs dask[distributed]: pip install 'tidesim[dask]'") from None
        self.cluster = None
        if scheduler:
            check_scheduler(scheduler, DASK_CONNECT_TIMEOUT_S)
        try:
            if scheduler:
                self.client = Client(scheduler, timeout=DASK_CONNECT_TIMEOUT_S)
            else:
                self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                            dashboard_address=None)
                self.client = Client(self.cluster)
        except (OSError, TimeoutError) as exc:
            raise InputError(f"cannot reach the Dask scheduler {scheduler!r} ({exc}); check the address") from None

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def unordered(self, fn: Callable[..., Any], items: Iterable[Any], *args: Any) -> Iterator[Any]:
        from dask.distributed import as_completed

        futures = [self.client.submit(fn, item, *args, pure=False) for item in items]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            for fut in futures:
                fut.cancel()


def check_executor(kind: str, workers: int, scheduler: str | None) -> None:
    if kind not in EXECUTORS:
        raise InputError(f"executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    if scheduler and kind != "dask":
        raise InputError("--scheduler only applies to --executor dask")


def make_executor(kind: str, workers: int, scheduler: str | None = None
                  ) -> InlineExecutor | LocalExecutor | DaskExecutor:
    check_executor(kind, workers, scheduler)
    if kind == "dask":
        return DaskExecutor(scheduler, workers)
    return InlineExecutor() if workers == 1 else LocalExecutor(workers)


# ----- the sweep ---------------------------------------------------------------------------------------
@dataclass
class SweepPaths:
    """Where a sweep writes: results, finished-point parts, cached traces (beside the results)."""

    results: Path

    @property
    def parts(self) -> Path:
        return self.results.with_name(self.results.stem + ".parts")

    @property
    def traces(self) -> Path:
        return self.results.with_name(self.results.stem + ".traces")

    @property
    def figures(self) -> Path:
        return self.results.with_name(self.results.stem + ".figures")


@dataclass
class SweepReport:
    """What a sweep did: points in the grid, evaluated now, reused from parts, failed with an error."""

    results: Path
    points: int
    evaluated: int
    reused: int
    errors: int
    traces_made: int
    rows: list[dict[str, Any]]


def read_parts(parts: Path, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """Finished rows from a previous, interrupted run (unreadable part files are redone)."""
    done: dict[str, dict[str, Any]] = {}
    if not parts.is_dir():
        return done
    for path in sorted(parts.glob("*.json")):
        if path.stem not in wanted:
            continue
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(row, dict) and row.get("point_id") == path.stem:
            done[path.stem] = row
    return done


def run_sweep(grid: Grid, results: str | Path, *, executor: str = "local", workers: int | None = None,
              scheduler: str | None = None, evaluator: Evaluator = evaluate_point, fresh: bool = False,
              progress: Callable[[Iterable[Any], str, int], Iterable[Any]] | None = None) -> SweepReport:
    """Evaluate every point not already finished, then merge all rows into `results`."""
    paths = SweepPaths(Path(results))
    check_output_path(paths.results, flag="--output", inputs=grid.input_files())
    if fresh and paths.parts.exists():
        shutil.rmtree(paths.parts)
    workers = (os.cpu_count() or 1) if workers is None else workers
    check_executor(executor, workers, scheduler)
    by_id = {p.id: p for p in grid.points}
    done = read_parts(paths.parts, set(by_id))
    todo = [p for p in grid.points if p.id not in done]
    show = progress or (lambda items, desc, total: items)
    made = 0
    if todo:
        try:
            with make_executor(executor, workers, scheduler) as ex:
                paths.parts.mkdir(parents=True, exist_ok=True)   # RESULTS.traces/ appears when a trace is made
                made = _prepare_traces(ex, todo, paths.traces, evaluator, show)
                batches = ex.unordered(evaluate_rows, point_batches(todo, workers), paths.traces, evaluator)
                rows = (row for batch in batches for row in batch)
                for row in show(rows, "sweep", len(todo)):
                    write_text(paths.parts / f"{row['point_id']}.json", json.dumps(row, sort_keys=True))
                    done[row["point_id"]] = row
        except BaseException:
            _remove_if_empty(paths.parts)      # finished points stay for a resume; an empty folder goes
            _remove_if_empty(paths.traces)
            raise
    all_rows = [done[p.id] for p in grid.points]
    write_results(all_rows, grid, paths.results)
    shutil.rmtree(paths.parts, ignore_errors=True)
    return SweepReport(results=paths.results, points=len(grid.points), evaluated=len(todo),
                       reused=len(grid.points) - len(todo), errors=sum(1 for r in all_rows if r.get("error")),
                       traces_made=made, rows=all_rows)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()                          # only succeeds when empty


def _prepare_traces(ex: InlineExecutor | LocalExecutor | DaskExecutor, todo: list[Point], cache_dir: Path,
                    evaluator: Evaluator, show: Callable[[Iterable[Any], str, int], Iterable[Any]]) -> int:
    """Synthesize each missing trace once, in parallel, before the points that need it run."""
    if evaluator is not evaluate_point:
        return 0
    firsts: dict[str, Point] = {}
    for point in todo:
        key = synth_key(point)
        if key and key not in firsts and not (cache_dir / f"{key}.parquet").exists():
            firsts[key] = point
    if not firsts:
        return 0
    for _ in show(ex.unordered(prepare_trace, list(firsts.values()), cache_dir), "traces", len(firsts)):
        pass
    return len(firsts)
