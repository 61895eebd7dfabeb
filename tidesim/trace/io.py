"""Read and write trace files (Parquet, one row per forward pass and MoE layer).

Plain pandas reads them too: `pd.read_parquet(path)`; the file-level metadata is JSON under the
schema metadata key `tidesim.trace`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tidesim.atomic import atomic_path
from tidesim.errors import InputError
from tidesim.trace.schema import FORWARD_COLUMNS, METADATA_KEY, Trace, TraceMeta
from tidesim.trace.validate import validate_trace

_FORWARD_TYPES = {
    "forward": pa.int32(),
    "prompt": pa.int32(),
    "block": pa.int32(),
    "step": pa.int32(),
    "phase": pa.string(),
    "tokens": pa.int32(),
    "context": pa.int32(),
    "committed": pa.int32(),
    "layer": pa.int16(),
}


def trace_to_table(trace: Trace) -> pa.Table:
    """The Arrow table of a trace: per-forward columns repeated for each MoE layer."""
    f = trace.forwards
    n_fwd, n_layers, n_exp = trace.expert_tokens.shape
    columns: dict[str, pa.Array] = {
        "forward": pa.array(np.repeat(np.arange(n_fwd), n_layers), _FORWARD_TYPES["forward"]),
    }
    for name in FORWARD_COLUMNS:
        values = np.repeat(f[name].to_numpy(), n_layers)
        columns[name] = pa.array(values, _FORWARD_TYPES[name])
    layer_ids = np.array(trace.moe_layer_ids, dtype=np.int16)
    columns["layer"] = pa.array(np.tile(layer_ids, n_fwd), pa.int16())
    flat = pa.array(trace.expert_tokens.astype(np.int32).ravel(), pa.int32())
    columns["expert_tokens"] = pa.FixedSizeListArray.from_arrays(flat, n_exp)
    if trace.topk_ids is not None:
        columns["topk_ids"] = _ragged(trace.topk_ids, pa.int16(), np.int16)
        if trace.topk_weights is not None:
            columns["topk_weights"] = _ragged(trace.topk_weights, pa.float32(), np.float32)
    table = pa.table(columns)
    meta = json.dumps(trace.meta.to_dict(), sort_keys=True).encode()
    return table.replace_schema_metadata({METADATA_KEY: meta})


def _ragged(items: list[np.ndarray], typ: pa.DataType, dtype: Any) -> pa.Array:
    lengths = np.array([a.size for a in items], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate([a.astype(dtype).ravel() for a in items]) if items else np.array([], dtype)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, typ))


def write_trace(trace: Trace, path: str | Path) -> Path:
    """Validate, then write atomically (no half-written file on error)."""
    validate_trace(trace, source=str(path))
    table = trace_to_table(trace)
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def read_trace(path: str | Path, validate: bool = True) -> Trace:
    """Load and validate a trace; any problem raises InputError naming the file."""
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise InputError(f"{name}: no such trace file; check the path or list traces with `tidesim trace list`")
    if path.is_dir():
        raise InputError(f"{name}: is a folder, expected a trace .parquet file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise InputError(f"{name}: not a readable Parquet trace ({_short(exc)})") from None
    try:
        trace = table_to_trace(table)
    except InputError as exc:
        raise InputError(f"{name}: {exc}") from None
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise InputError(f"{name}: malformed trace columns ({_short(exc)})") from None
    return validate_trace(trace, source=name) if validate else trace


def _short(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:160] if str(exc).strip() else "unreadable"


def table_to_trace(table: pa.Table) -> Trace:
    raw_meta = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw_meta is None:
        raise InputError("no tidesim trace metadata (was it written by tidesim or `tidesim trace convert`?)")
    try:
        meta_dict = json.loads(raw_meta)
    except json.JSONDecodeError:
        raise InputError("trace metadata is not valid JSON") from None
    if not isinstance(meta_dict, dict):
        raise InputError("trace metadata is not a JSON object")
    if meta_dict.get("format_version") not in (None, 1):
        raise InputError(
            f"trace format version {meta_dict.get('format_version')} is not supported "
            "(this tidesim reads version 1)"
        )
    if not isinstance(meta_dict.get("model", {}), dict):
        raise InputError("metadata field 'model' must be an object (a model spec), "
                         f"got {meta_dict['model']!r:.40}")
    meta = TraceMeta.from_dict(meta_dict)
    needed = ["forward", *FORWARD_COLUMNS, "layer", "expert_tokens"]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise InputError(f"column {missing[0]!r} is missing (trace format v1 needs {', '.join(needed)})")
    _check_column_types(table, needed)
    layers = meta.model.num_moe_layers
    n_exp = meta.num_experts
    rows = table.num_rows
    if rows % layers:
        raise InputError(f"{rows} rows is not a multiple of the {layers} MoE layers")
    n_fwd = rows // layers
    layer_col = table.column("layer").to_numpy()
    expected_layers = np.tile(np.array(meta.model.moe_layer_ids), n_fwd)
    if not np.array_equal(layer_col, expected_layers):
        bad = int(np.argmax(layer_col != expected_layers))
        raise InputError(f"row {bad}: layer {layer_col[bad]} out of order (expected one row per MoE layer "
                         "per forward, layers ascending)")
    fwd_col = table.column("forward").to_numpy()
    if not np.array_equal(fwd_col, np.repeat(np.arange(n_fwd), layers)):
        raise InputError("forward column must number forwards 0, 1, 2, ... in order")
    et_col = table.column("expert_tokens").combine_chunks()
    if not (pa.types.is_list(et_col.type) or pa.types.is_fixed_size_list(et_col.type)
            or pa.types.is_large_list(et_col.type)):
        raise InputError(f"column 'expert_tokens' must hold a list of {n_exp} counts per row, got {et_col.type}")
    if et_col.null_count or pa.compute.list_flatten(et_col).null_count:
        raise InputError("expert_tokens has missing values")
    if not pa.types.is_integer(et_col.type.value_type):
        got = _type_words(et_col.type.value_type)
        raise InputError(f"column 'expert_tokens' must hold whole-number counts, got {got}")
    values = pa.compute.list_flatten(et_col).to_numpy(zero_copy_only=False)
    lengths = pa.compute.list_value_length(et_col).to_numpy(zero_copy_only=False)
    if (lengths != n_exp).any():
        bad = int(np.argmax(lengths != n_exp))
        raise InputError(f"row {bad}: expert_tokens has {lengths[bad]} entries, expected {n_exp}")
    if values.size and (values.max() > np.iinfo(np.int32).max or values.min() < np.iinfo(np.int32).min):
        raise InputError("expert_tokens holds a count beyond the 32-bit range")
    expert_tokens = values.astype(np.int32).reshape(n_fwd, layers, n_exp)
    forwards = pd.DataFrame({c: _per_forward(table, c, n_fwd, layers) for c in FORWARD_COLUMNS})
    topk_ids = _read_ragged(table, "topk_ids", meta.top_k, np.int16)
    topk_weights = _read_ragged(table, "topk_weights", meta.top_k, np.float32)
    return Trace(meta=meta, forwards=forwards, expert_tokens=expert_tokens,
                 topk_ids=topk_ids, topk_weights=topk_weights)


def _type_words(typ: pa.DataType) -> str:
    if pa.types.is_floating(typ):
        return "fractional numbers"
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "text"
    if pa.types.is_boolean(typ):
        return "true/false values"
    return f"values of type {typ}"


def _check_column_types(table: pa.Table, needed: list[str]) -> None:
    """Every row of every column: integer columns hold integers, phase holds text, nothing missing."""
    for name in needed:
        if name == "expert_tokens":
            continue
        col = table.column(name)
        if name == "phase":
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                raise InputError(f"column 'phase' must hold text, got {_type_words(col.type)}")
        elif not pa.types.is_integer(col.type):
            raise InputError(f"column {name!r} must hold whole numbers, got {_type_words(col.type)}")
        if col.null_count:
            row = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
            raise InputError(f"row {row}: column {name!r} has a missing value")


def _per_forward(table: pa.Table, name: str, n_fwd: int, layers: int) -> np.ndarray:
    """A per-forward column, checked to be the same on every layer row of each forward."""
    values = table.column(name).to_numpy(zero_copy_only=False).reshape(n_fwd, layers)
    differs = (values != values[:, :1]).any(axis=1)
    if differs.any():
        fw = int(np.argmax(differs))
        layer = int(np.argmax(values[fw] != values[fw, 0]))
        raise InputError(f"forward {fw}: column {name!r} differs between its layer rows "
                         f"({values[fw, 0]!r} on the first, {values[fw, layer]!r} on row {fw * layers + layer}); "
                         "per-forward columns repeat the same value on every layer row")
    return values[:, 0]


def _read_ragged(table: pa.Table, name: str, k: int, dtype: Any) -> list[np.ndarray] | None:
    if name not in table.column_names:
        return None
    col = table.column(name).combine_chunks()
    if col.null_count == len(col):
        return None
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False).astype(dtype)
    return [values[offsets[i]:offsets[i + 1]].reshape(-1, k) for i in range(len(col))]
