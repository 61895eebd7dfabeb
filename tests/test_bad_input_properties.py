"""Property: no nonsense value in a trace file or a hardware profile gets through to a result.

Hypothesis mutates one cell of a valid trace file (or one field of a valid profile) to a value of a
nonsense kind. Kinds that are always nonsense (missing, NaN, infinity, a fraction or text where an
integer is meant, a negative count, a per-forward value that differs between the layer rows of its
forward, a value outside the plausible range) must be refused with InputError; whatever is
accepted must give finite, positive results."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidesim.errors import InputError
from tidesim.hardware import RANGES, HardwareProfile, get_profile, profile_from_dict
from tidesim.models import PRESETS
from tidesim.policies import PolicyOptions, build_schedule, uniform
from tidesim.run import run
from tidesim.trace.io import read_trace, trace_to_table
from tidesim.trace.schema import Trace
from tidesim.trace.synth import SynthConfig, synthesize
from tidesim.workload import workload_from_trace

TRACE = synthesize(SynthConfig(model=PRESETS["tiny"], prompts=1, gen_length=16, block_length=8, prompt_length=6,
                               seed=4))
TABLE = trace_to_table(TRACE)
LAYERS = PRESETS["tiny"].num_moe_layers
PER_FORWARD = ["prompt", "block", "step", "tokens", "context", "committed"]
ALWAYS_NONSENSE = ["null", "nan", "inf", "fraction", "text", "uneven"]


def result_is_finite(trace: Trace, hw: HardwareProfile) -> None:
    """tide on the trace with the analytic engine: every time finite and positive."""
    w = workload_from_trace(trace)
    options = PolicyOptions(budget=uniform(4, w.num_layers), tau=uniform(2, w.num_layers), hw=hw)
    m = run(w, build_schedule("tide", w, options), hw, engine="analytic")
    assert math.isfinite(m.total_time_s) and m.total_time_s > 0
    assert math.isfinite(m.tokens_per_s) and m.tokens_per_s > 0
    assert all(math.isfinite(v) and v >= 0 for v in m.breakdown_s.values())


def mutate(column: str, row: int, kind: str) -> pa.Table:
    values = TABLE.column(column).to_pylist()
    old = values[row]
    if kind == "uneven":                 # another value on a layer row that is not its forward's first
        row = row - row % LAYERS + 1 + row % (LAYERS - 1)
        values[row] = old + 1
        return TABLE.set_column(TABLE.column_names.index(column), column, pa.array(values, pa.int32()))
    new: object = {"null": None, "nan": float("nan"), "inf": float("inf"), "fraction": old + 0.5, "text": str(old),
                   "negative": -1 - abs(old), "huge": 2**31 - 1, "zero": 0}[kind]
    values[row] = new
    if kind in ("nan", "inf", "fraction"):
        values = [float(v) for v in values]
    elif kind == "text":
        values = [str(v) for v in values]
    typ = None if kind in ("nan", "inf", "fraction", "text") else pa.int32()
    return TABLE.set_column(TABLE.column_names.index(column), column, pa.array(values, typ))


@given(column=st.sampled_from(PER_FORWARD), row=st.integers(0, TABLE.num_rows - 1),
       kind=st.sampled_from([*ALWAYS_NONSENSE, "negative", "huge", "zero"]))
@settings(max_examples=60)
def test_mutated_trace_refused_or_sound(column: str, row: int, kind: str) -> None:
    table = mutate(column, row, kind)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.parquet"
        pq.write_table(table, path)
        try:
            trace = read_trace(path)
        except InputError as exc:
            assert "\n" not in str(exc)
            return
    assert kind not in ALWAYS_NONSENSE, f"{kind} in {column} row {row} got through"
    assert not (kind == "negative" and column != "block"), f"negative {column} got through"
    assert not (kind == "zero" and column == "tokens"), "zero tokens got through"
    result_is_finite(trace, get_profile("a40-pcie4"))


NUMERIC_FIELDS = [(part, name) for part, names in RANGES.items() for name in names]


@given(field=st.sampled_from(NUMERIC_FIELDS),
       value=st.sampled_from([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e300, 1e-300, 2.5, True, "7"])
       | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10, 10**6))
@settings(max_examples=80)
def test_mutated_profile_refused_or_plausible(field: tuple[str, str], value: object) -> None:
    part, name = field
    data = get_profile("a40-pcie4").to_dict()
    data[part][name] = value
    try:
        hw = profile_from_dict(data, source="p")
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    low, high, whole = RANGES[part][name]
    got = getattr(getattr(hw, part), name)
    assert not isinstance(got, bool) and isinstance(got, int | float)
    assert math.isfinite(got) and low <= got <= high
    assert not whole or isinstance(got, int)
    result_is_finite(TRACE, hw)


@pytest.mark.parametrize("kind", ["nan", "inf", "negative", "text"])
def test_curve_values_refused(kind: str) -> None:
    data = get_profile("a40-pcie4").to_dict()
    bad = {"nan": float("nan"), "inf": float("inf"), "negative": -5.0, "text": "5"}[kind]
    data["gpu"]["expert_ffn"] = [{"hidden": 2048, "intermediate": 512,
                                  "curve": {"x": [1.0, 8.0], "time_us": [10.0, bad]}}]
    with pytest.raises(InputError, match="gpu.expert_ffn"):
        profile_from_dict(data, source="p")


def test_the_unmutated_inputs_are_sound() -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.parquet"
        pq.write_table(TABLE, path)
        trace = read_trace(path)
    assert np.array_equal(trace.expert_tokens, TRACE.expert_tokens)
    result_is_finite(trace, get_profile("a40-pcie4"))
