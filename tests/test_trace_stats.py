"""Trace statistics against hand-computed values on tiny traces, and against the tide-reference policy."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from policy_cases import options, workloads

from tidesim.cli import main
from tidesim.errors import InputError
from tidesim.models import PRESETS, ModelSpec
from tidesim.policies import build_schedule
from tidesim.trace.io import write_trace
from tidesim.trace.schema import Trace, TraceMeta
from tidesim.trace.stats import (
    gini,
    hit_ratio_vs_tau,
    popularity_skew,
    refresh_targets,
    step_index,
    tide_hit_ratios,
    top_share,
    trace_stats,
)
from tidesim.trace.synth import SynthConfig, synthesize
from tidesim.workload import workload_from_trace

TINY = PRESETS["tiny"]  # 3 MoE layers, 16 experts, top-4
SMALL = ModelSpec(  # 1 MoE layer, 4 experts, top-2: small enough to follow a refresh by hand
    name="small", num_layers=2, first_dense_layers=1, hidden_size=64, dense_intermediate_size=128,
    moe_intermediate_size=32, num_experts=4, top_k=2, num_shared_experts=1, num_heads=2, num_kv_heads=1,
    head_dim=32, vocab_size=64, n_group=1, topk_group=1, dtype="float32", mask_token_id=63, eos_token_id=62,
)


def make_trace(model: ModelSpec, rows: list[tuple[int, int, int, str, int, int]], counts: list,
               kv_cache: str = "prefix") -> Trace:
    """rows: (prompt, block, step, phase, tokens, committed); counts [F, L, E] (a per-forward
    vector is broadcast to every layer)."""
    arr = np.asarray(counts, dtype=np.int32)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, None, :], model.num_moe_layers, axis=1)
    f = pd.DataFrame(rows, columns=["prompt", "block", "step", "phase", "tokens", "committed"])
    f["context"] = f["tokens"] * 2
    f = f[["prompt", "block", "step", "phase", "tokens", "context", "committed"]]
    meta = TraceMeta(model=model, block_length=32, threshold=0.95, kv_cache=kv_cache, gen_length=64,
                     source="synthetic")
    return Trace(meta=meta, forwards=f, expert_tokens=arr)


def onehot(experts: list[int], value: int = 2, n: int = 16) -> list[int]:
    v = [0] * n
    for e in experts:
        v[e] = value
    return v


A, B, C = onehot([0, 1, 2, 3]), onehot([0, 1, 4, 5]), onehot([4, 5, 6, 7])


def similarity_trace() -> Trace:
    rows = [(0, 0, 0, "step", 2, 1), (0, 0, 1, "step", 2, 1), (0, 0, 2, "step", 2, 1),
            (0, 0, 3, "commit", 2, 0), (0, 1, 0, "step", 2, 1), (0, 1, 1, "step", 2, 1)]
    return make_trace(TINY, rows, [A, B, C, onehot([8, 9, 10, 11]), A, A])


def test_similarity_hand_computed() -> None:
    s = trace_stats(similarity_trace(), budget=8, taus=[1])
    sim = s["similarity"]["forward"]
    # d=1 pairs: (A,B) cos 8/16 = 0.5, jaccard 2/6; (B,C) the same; block 1 (A,A) 1 and 1.
    # The commit forward and pairs across blocks are excluded.
    assert sim["distance"][:2] == [1, 2]
    assert sim["pairs"][:2] == [3, 1]
    assert sim["cosine"][0] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert sim["jaccard"][0] == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
    # d=2: only (A,C) in block 0: disjoint.
    assert sim["cosine"][1] == pytest.approx(0.0)
    assert sim["jaccard"][1] == pytest.approx(0.0)
    assert len(sim["distance"]) == 2          # no pair 3 steps apart
    assert np.allclose(sim["cosine_per_layer"][0], (0.5 + 0.5 + 1) / 3)
    # prefix mode: a step forward is the block, so the block scope equals the forward scope
    assert s["similarity"]["block"]["cosine"] == sim["cosine"]


def test_unique_experts_counts_only_denoising_steps() -> None:
    rows = [(0, -1, 0, "prefill", 4, 0), (0, 0, 0, "step", 2, 1), (0, 0, 1, "step", 2, 1),
            (0, 0, 2, "commit", 2, 0)]
    counts = [onehot(list(range(16)), 1), A, onehot([0, 1, 2, 3, 4, 5, 6, 7], 1), onehot([9, 10, 11, 12])]
    s = trace_stats(make_trace(TINY, rows, counts), budget=4, taus=[1])
    assert s["unique_experts_per_step"] == pytest.approx((4 + 8) / 2)
    assert np.allclose(s["unique_experts_per_step_per_layer"], 6.0)
    assert s["decode"]["tokens_per_step"] == pytest.approx(1.0)
    assert s["decode"]["steps_per_block_mean"] == pytest.approx(2.0)


def test_gini_and_top_share_hand_computed() -> None:
    assert gini(np.array([0, 0, 0, 4])) == pytest.approx(0.75)   # 2*16/(4*4) - 5/4
    assert gini(np.array([3, 3, 3, 3])) == pytest.approx(0.0)
    assert gini(np.array([1, 2, 3, 4])) == pytest.approx(2 * 30 / (4 * 10) - 5 / 4)
    x = np.arange(1, 21)                                        # top 10% of 20 = the top 2
    assert top_share(x) == pytest.approx((20 + 19) / x.sum())
    skew = popularity_skew(np.array([[[4, 0, 0, 0]], [[0, 0, 0, 4]]]), np.array([0, 1]))
    assert skew["gini"] == pytest.approx(gini(np.array([4, 0, 0, 4])))
    assert skew["prompt_gini"] == pytest.approx(0.75)            # each prompt puts all on one expert


HIT_ROWS = [(0, 0, 0, "step", 2, 1), (0, 0, 1, "step", 2, 1), (0, 1, 0, "step", 2, 1),
            (0, 1, 1, "step", 2, 1), (0, 1, 2, "step", 2, 1), (0, 1, 3, "step", 2, 1)]
HIT_COUNTS = [[2, 2, 0, 0], [0, 2, 2, 0], [0, 0, 2, 2], [2, 0, 2, 0], [2, 2, 0, 0], [0, 2, 0, 2]]


def test_hit_ratio_hand_computed() -> None:
    # Budget 2, start {0,1}. Block 0 refreshes on every step; block 1 at steps % tau == 0.
    # tau=2: step0 -> {2,3} (4 hits), step1 [2,0,2,0] 2 hits, step2 -> {0,1} 4, step3 [0,2,0,2] 2.
    # tau=4: {2,3} from step0 for steps 1..3: 2 + 0 + 2.
    trace = make_trace(SMALL, HIT_ROWS, HIT_COUNTS, kv_cache="none")
    got = hit_ratio_vs_tau(trace, 2, [1, 2, 4])
    assert got == pytest.approx({1: 1.0, 2: 20 / 24, 4: 16 / 24})
    assert hit_ratio_vs_tau(workload_from_trace(trace), 2, [1, 2, 4]) == pytest.approx(got)


def test_hit_ratio_by_step_index_and_per_prompt_decode_counts() -> None:
    # HIT_ROWS as prompt 0 (per-step hit ratios at tau 2: 1, 1, 1, 0.5, 1, 0.5), then prompt 1 with
    # two steps of 4 tokens in its first generated block (refreshed every step: 1, 1)
    rows = HIT_ROWS + [(1, 0, 0, "step", 4, 3), (1, 0, 1, "step", 4, 1)]
    counts = HIT_COUNTS + [[4, 4, 0, 0], [0, 0, 4, 4]]
    trace = make_trace(SMALL, rows, counts, kv_cache="none")
    hr = tide_hit_ratios(trace, 2, [2])
    assert hr.by_step[2].tolist() == pytest.approx([1.0, 1.0, 1.0, 0.5, 1.0, 0.5])
    assert hr.step_mean[2] == pytest.approx(7 / 8)                 # each step weighs the same
    assert hr.overall[2] == pytest.approx((20 + 16) / (24 + 16))   # tokens pooled
    assert step_index(np.array([0, 0, 0, 1, 1]), np.array([False, True, True, True, False])).tolist() == \
        [-1, 0, 1, 0, -1]
    d = trace_stats(trace, budget=2, taus=[2])["decode"]
    assert d["steps_per_prompt"] == [6, 2] and d["steps_per_prompt_mean"] == pytest.approx(4.0)
    assert d["generated_per_prompt"] == [6, 4]                      # committed tokens (no metadata)
    trace.meta.prompts = [{"id": 0, "generated": 5}, {"id": 1, "generated": 3}]
    assert trace_stats(trace, budget=2, taus=[2])["decode"]["generated_per_prompt"] == [5, 3]


def test_demotions_capped_at_promotions() -> None:
    # Budget 3, start {0,1,2}; the refresh target {1} is resident, so nothing is demoted and the
    # next (non-refresh) step still finds 0 and 2 on the GPU.
    rows = [(0, 1, 0, "step", 2, 1), (0, 1, 1, "step", 2, 1)]
    trace = make_trace(SMALL, rows, [[0, 4, 0, 0], [2, 0, 2, 0]], kv_cache="none")
    assert hit_ratio_vs_tau(trace, 3, [2]) == {2: 1.0}


def test_commit_forward_never_refreshes() -> None:
    rows = [(0, 1, 0, "step", 2, 1), (0, 1, 1, "commit", 2, 0)]
    trace = make_trace(SMALL, rows, [[2, 2, 0, 0], [0, 0, 2, 2]])
    assert hit_ratio_vs_tau(trace, 2, [1]) == {1: 0.5}


def test_refresh_targets_ties_lower_id_and_zero_counts() -> None:
    counts = np.array([[[1, 3, 1, 0, 1]]])
    assert refresh_targets(counts, np.array([2]))[0, 0].tolist() == [True, True, False, False, False]
    assert refresh_targets(counts, np.array([5]))[0, 0].tolist() == [True, True, True, False, True]
    assert not refresh_targets(counts, np.array([0])).any()


@given(workloads())
def test_hit_ratio_matches_tide_reference_policy(w) -> None:
    budget = max(1, w.num_experts // 2)
    for tau in (1, 2, 3):
        sched = build_schedule("tide-reference", w, options(w, budget, tau=tau))
        total = w.expert_tokens.sum()
        expect = (w.expert_tokens * sched.on_gpu()).sum() / total if total else None
        got = hit_ratio_vs_tau(w, budget, [tau])[tau]
        if expect is None:
            assert np.isnan(got)
        else:
            assert got == pytest.approx(expect)


def test_per_layer_budget_and_bad_budget() -> None:
    trace = similarity_trace()
    hr = tide_hit_ratios(trace, [16, 0, 4], [1])
    assert hr.per_layer[1][0] == pytest.approx(1.0)
    assert hr.per_layer[1][1] == pytest.approx(0.0)
    with pytest.raises(InputError):
        tide_hit_ratios(trace, [1, 2], [1])
    with pytest.raises(InputError):
        tide_hit_ratios(trace, 17, [1])


def test_block_scope_from_token_level_in_no_cache_mode() -> None:
    trace = synthesize(SynthConfig(model=TINY, prompts=1, gen_length=64, prompt_length=20, kv_cache="none",
                                   token_level=True, seed=3))
    s = trace_stats(trace, budget=8, taus=[2])
    # The block scope must equal statistics of a prefix-mode view built from the same tokens.
    f, layers = trace.num_forwards, TINY.num_moe_layers
    blk = np.zeros_like(trace.expert_tokens)
    for fw in range(f):
        for layer in range(layers):
            ids = trace.topk_ids[fw * layers + layer][-32:]
            blk[fw, layer] = np.bincount(ids.ravel(), minlength=16)
    view = Trace(meta=TraceMeta(**{**trace.meta.__dict__, "kv_cache": "prefix"}),
                 forwards=trace.forwards.assign(tokens=32), expert_tokens=blk)
    assert s["similarity"]["block"]["cosine"] == pytest.approx(trace_stats(view, 8, [2])["similarity"]["forward"]
                                                               ["cosine"])
    # prefix tokens are frozen within a block, so the whole forward looks more similar than the block
    assert s["similarity"]["forward"]["cosine"][0] > s["similarity"]["block"]["cosine"][0]


def test_cli_json_and_table(tmp_path, capsys) -> None:
    path = tmp_path / "t.parquet"
    write_trace(make_trace(SMALL, HIT_ROWS, HIT_COUNTS, kv_cache="none"), path)
    assert main(["trace", "stats", str(path), "--budget", "2", "--taus", "1,2,4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hit_ratio"]["overall"] == pytest.approx({"1": 1.0, "2": 20 / 24, "4": 16 / 24})
    assert main(["trace", "stats", str(path), "--budget", "2"]) == 0
    text = capsys.readouterr().out
    assert "TIDE hit ratio, budget 2" in text and "per MoE layer" in text
    assert "steps per prompt" in text and "generated tokens per prompt" in text and "by step index" in text
    assert out["decode"]["steps_per_prompt"] == [6]
    assert out["hit_ratio"]["by_step"]["2"] == pytest.approx([1.0, 1.0, 1.0, 0.5, 1.0, 0.5])


@pytest.mark.parametrize("args", [["--taus", "1,x"], ["--taus", "0"], ["--budget", "99"]])
def test_cli_bad_options_exit_2(tmp_path, capsys, args) -> None:
    path = tmp_path / "t.parquet"
    write_trace(make_trace(SMALL, HIT_ROWS, HIT_COUNTS, kv_cache="none"), path)
    assert main(["trace", "stats", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tidesim: error:") and len(err.strip().splitlines()) == 1


def test_cli_missing_trace_exit_2(capsys) -> None:
    assert main(["trace", "stats", "no-such-trace.parquet"]) == 2
    assert "no such trace file" in capsys.readouterr().err
