"""Plain values for JSON and text cells for tables: the one formatting of numbers that the
commands, the demo's summary and the HTML report share."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
    """Numpy scalars and arrays, NaN and nested containers into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating | float):
        f = float(value)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def format_cell(value: Any) -> str:
    if isinstance(value, float | np.floating):
        f = float(value)
        if math.isnan(f):
            return "-"
        if f != 0 and (abs(f) >= 1e6 or abs(f) < 1e-3):
            return f"{f:.3g}"
        return f"{f:,.3f}" if abs(f) < 100 else f"{f:,.1f}"
    return str(value)
