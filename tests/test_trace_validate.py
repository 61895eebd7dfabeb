"""The validator rejects every kind of corrupt trace with one line naming the file and the problem."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tidesim.cli import main
from tidesim.errors import InputError
from tidesim.models import PRESETS
from tidesim.trace.io import read_trace, trace_to_table, write_trace
from tidesim.trace.schema import METADATA_KEY, Trace
from tidesim.trace.synth import SynthConfig, synthesize
from tidesim.trace.validate import trace_problems, validate_trace

TINY = PRESETS["tiny"]


def good(token_level: bool = True) -> Trace:
    return synthesize(SynthConfig(model=TINY, prompts=2, gen_length=64, prompt_length=10,
                                  token_level=token_level, seed=2))


def with_meta(table: pa.Table, change: Callable[[dict], None]) -> pa.Table:
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    change(meta)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})


def replace_column(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, array)


def write_raw(tmp_path: Path, table: pa.Table) -> Path:
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    return path


def _bump_first_id(table: pa.Table) -> pa.Table:
    col = table.column("topk_ids").combine_chunks()
    values = col.values.to_numpy().copy()
    values[0] = TINY.num_experts                   # one past the last expert
    fixed = pa.ListArray.from_arrays(col.offsets, pa.array(values, pa.int16()))
    return replace_column(table, "topk_ids", fixed)


def _unsum_counts(table: pa.Table) -> pa.Table:
    col = table.column("expert_tokens").combine_chunks()
    values = col.values.to_numpy().copy()
    values[3] += 1
    return replace_column(table, "expert_tokens",
                          pa.FixedSizeListArray.from_arrays(pa.array(values, pa.int32()), TINY.num_experts))


def _swap_steps(table: pa.Table) -> pa.Table:
    step = table.column("step").to_numpy().copy()
    layers = TINY.num_moe_layers
    # forwards 1 and 2 are steps 0 and 1 of block 0: make them 1, 0
    step[layers:2 * layers], step[2 * layers:3 * layers] = 1, 0
    return replace_column(table, "step", pa.array(step, pa.int32()))


CORRUPTIONS: dict[str, tuple[Callable[[pa.Table], pa.Table], str]] = {
    "wrong schema version": (lambda t: with_meta(t, lambda m: m.update(format_version=2)),
                             "format version 2 is not supported"),
    "missing metadata": (lambda t: t.replace_schema_metadata(None), "no tidesim trace metadata"),
    "metadata field missing": (lambda t: with_meta(t, lambda m: m.pop("kv_cache")), "'kv_cache' is missing"),
    "metadata not JSON": (lambda t: t.replace_schema_metadata({METADATA_KEY: b"{oops"}), "not valid JSON"),
    "unknown kv-cache mode": (lambda t: with_meta(t, lambda m: m.update(kv_cache="full")), "kv_cache must be"),
    "threshold not a number": (lambda t: with_meta(t, lambda m: m.update(threshold="high")), "threshold"),
    "model not an object": (lambda t: with_meta(t, lambda m: m.update(model="llada2-mini")), "model"),
    "top_k disagrees": (lambda t: with_meta(t, lambda m: m.update(top_k=8)), "top_k"),
    "expert id out of range": (_bump_first_id, "expert id 16 out of range"),
    "counts do not sum": (_unsum_counts, "expected tokens x top_k"),
    "non-monotone steps": (_swap_steps, "does not follow"),
    "column missing": (lambda t: t.drop_columns(["committed"]), "'committed' is missing"),
    "expert_tokens not a list": (lambda t: replace_column(t, "expert_tokens", pa.array(np.zeros(t.num_rows),
                                                                                        pa.float64())),
                                 "expert_tokens"),
    "rows not a multiple of layers": (lambda t: t.slice(0, t.num_rows - 1), "not a multiple"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_file_rejected_with_one_line(tmp_path, capsys, kind) -> None:
    corrupt, words = CORRUPTIONS[kind]
    path = write_raw(tmp_path, corrupt(trace_to_table(good())))
    with pytest.raises(InputError) as err:
        read_trace(path)
    message = str(err.value)
    assert message.startswith(str(path)) and words in message and "\n" not in message
    assert main(["trace", "stats", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0]


def test_missing_file(tmp_path) -> None:
    with pytest.raises(InputError, match="no such trace file"):
        read_trace(tmp_path / "nope.parquet")
    with pytest.raises(InputError, match="is a folder"):
        read_trace(tmp_path)


def test_not_parquet_and_truncated(tmp_path) -> None:
    text = tmp_path / "notes.parquet"
    text.write_text("prompt,block\n0,0\n")
    with pytest.raises(InputError, match="not a readable Parquet trace"):
        read_trace(text)
    path = write_trace(good(), tmp_path / "t.parquet")
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 5, 10):
        (tmp_path / "cut.parquet").write_bytes(data[:cut])
        with pytest.raises(InputError, match="not a readable Parquet trace"):
            read_trace(tmp_path / "cut.parquet")


def test_in_memory_problems_each_kind() -> None:
    t = good()
    assert trace_problems(t) == []
    layers = TINY.num_moe_layers

    neg = good(token_level=False)
    neg.expert_tokens[2, 1, 0] = -1
    neg.expert_tokens[2, 1, 1] += 1
    assert "negative count" in trace_problems(neg)[0]

    wrong_ids = good()
    wrong_ids.topk_ids[5] = wrong_ids.topk_ids[5].copy()
    wrong_ids.topk_ids[5][0, 0] = -3
    assert "expert id -3 out of range" in trace_problems(wrong_ids)[0]

    disagree = good()
    ids = disagree.topk_ids[layers].copy()
    ids[0, 0] = (ids[0, 0] + 1) % TINY.num_experts
    disagree.topk_ids[layers] = ids
    assert "disagrees with the expert counts" in trace_problems(disagree)[0]

    back = good(token_level=False)
    back.forwards.loc[1, "prompt"] = 1
    assert "prompt ids go backwards" in trace_problems(back)[0]

    phase = good(token_level=False)
    phase.forwards.loc[0, "phase"] = "decode"
    assert "unknown phase" in trace_problems(phase)[0]

    ctx = good(token_level=False)
    ctx.forwards.loc[3, "context"] = 1
    assert "context is below tokens" in trace_problems(ctx)[0]

    committed = good(token_level=False)
    committed.forwards.loc[3, "committed"] = 99
    assert "committed tokens outside" in trace_problems(committed)[0]

    with pytest.raises(InputError, match="^where: "):
        validate_trace(neg, source="where")
