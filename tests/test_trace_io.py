"""Trace format v1 IO: round trips (counts, forwards, metadata, token-level routing), plain pandas."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidesim.errors import InputError
from tidesim.models import PRESETS
from tidesim.trace.io import read_trace, write_trace
from tidesim.trace.schema import METADATA_KEY, Trace, TraceMeta
from tidesim.trace.synth import SynthConfig, synthesize

TINY = PRESETS["tiny"]  # 3 MoE layers, 16 experts, top-4


def tiny_trace(kv_cache: str = "prefix", token_level: bool = True, prompts: int = 2, seed: int = 0) -> Trace:
    return synthesize(SynthConfig(model=TINY, prompts=prompts, gen_length=64, prompt_length=12,
                                  kv_cache=kv_cache, token_level=token_level, seed=seed))


def assert_same(a: Trace, b: Trace) -> None:
    assert a.meta.to_dict() == b.meta.to_dict()
    pd.testing.assert_frame_equal(a.forwards, b.forwards, check_dtype=False)
    assert np.array_equal(a.expert_tokens, b.expert_tokens)
    for x, y in ((a.topk_ids, b.topk_ids), (a.topk_weights, b.topk_weights)):
        assert (x is None) == (y is None)
        if x is not None and y is not None:
            assert len(x) == len(y) and all(np.array_equal(p, q) for p, q in zip(x, y, strict=True))


@pytest.mark.parametrize("kv_cache", ["prefix", "none"])
@pytest.mark.parametrize("token_level", [False, True])
def test_round_trip(tmp_path, kv_cache, token_level) -> None:
    t = tiny_trace(kv_cache, token_level)
    back = read_trace(write_trace(t, tmp_path / "t.parquet"))
    assert_same(t, back)
    if token_level:
        assert back.topk_ids[0].dtype == np.int16 and back.topk_weights[0].dtype == np.float32
        assert back.topk_ids[0].shape == (t.forwards["tokens"][0], TINY.top_k)


@given(st.integers(0, 2**31 - 1), st.sampled_from(["prefix", "none"]))
def test_round_trip_any_seed(seed, kv_cache) -> None:
    import tempfile
    from pathlib import Path
    t = synthesize(SynthConfig(model=TINY, prompts=1, gen_length=32, prompt_length=5, kv_cache=kv_cache,
                               token_level=True, seed=seed))
    with tempfile.TemporaryDirectory() as d:
        assert_same(t, read_trace(write_trace(t, Path(d) / "t.parquet")))


def test_plain_pandas_reads_one_row_per_forward_and_layer(tmp_path) -> None:
    t = tiny_trace(token_level=True)
    path = write_trace(t, tmp_path / "t.parquet")
    df = pd.read_parquet(path)
    layers = TINY.num_moe_layers
    assert len(df) == t.num_forwards * layers
    assert df["layer"].tolist()[:layers] == TINY.moe_layer_ids
    row = df.iloc[layers + 1]                        # forward 1, second MoE layer
    assert np.array_equal(np.asarray(row["expert_tokens"]), t.expert_tokens[1, 1])
    assert row["tokens"] == t.forwards["tokens"][1]
    ids = np.stack(row["topk_ids"]) if row["topk_ids"].dtype == object else np.asarray(row["topk_ids"])
    assert np.array_equal(ids.ravel(), t.topk_ids[layers + 1].ravel())
    meta = json.loads(pq.read_schema(path).metadata[METADATA_KEY])
    assert meta["format_version"] == 1 and meta["source"] == "synthetic" and meta["model"]["name"] == "tiny"


def test_select_prompts_keeps_token_level_rows_aligned(tmp_path) -> None:
    t = tiny_trace(prompts=3, token_level=True)
    sub = t.select_prompts([1])
    assert sub.prompt_ids == [1]
    fw = int(np.flatnonzero(t.forwards["prompt"] == 1)[0])
    layers = TINY.num_moe_layers
    assert np.array_equal(sub.topk_ids[2], t.topk_ids[fw * layers + 2])
    assert_same(sub, read_trace(write_trace(sub, tmp_path / "sub.parquet")))
    assert [p["id"] for p in sub.meta.prompts] == [1]


def test_write_is_atomic_on_invalid_trace(tmp_path) -> None:
    t = tiny_trace(token_level=False)
    t.expert_tokens[0, 0, 0] += 1                    # counts no longer sum to tokens x top_k
    out = tmp_path / "bad.parquet"
    with pytest.raises(InputError, match="sum to"):
        write_trace(t, out)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_whole_file(tmp_path) -> None:
    out = tmp_path / "t.parquet"
    write_trace(tiny_trace(prompts=2, token_level=True), out)
    small = tiny_trace(prompts=1, token_level=False, seed=4)
    write_trace(small, out)
    assert_same(small, read_trace(out))
    assert TraceMeta.from_dict(small.meta.to_dict()).to_dict() == small.meta.to_dict()
