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
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidesim.atomic import check_output_path, write_text
from tidesim.sweep.executors import Executor, check_executor, make_executor
from tidesim.sweep.grid import Grid, Point
from tidesim.sweep.point import Evaluator, evaluate_point, evaluate_rows
from tidesim.sweep.results import write_results
from tidesim.sweep.workloads import prepare_trace, synth_key

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


def _prepare_traces(ex: Executor, todo: list[Point], cache_dir: Path,
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
