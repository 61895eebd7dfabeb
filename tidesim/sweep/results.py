"""A sweep's results table: one flat row per point (its parameters, what it resolved to, every
scalar metric), a fixed schema in grid order, written atomically as Parquet with the grid."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tidesim import __version__
from tidesim.atomic import atomic_path
from tidesim.metrics import Metrics
from tidesim.sweep.grid import PARAMS, Grid, Point

RESULTS_FORMAT = 1
METADATA_KEY = b"tidesim.sweep"

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



_METRIC_SKIP = {"engine", "policy", "busy_s", "breakdown_s", "layer_time_s", "notes"}


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

