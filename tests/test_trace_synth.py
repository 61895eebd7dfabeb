"""Synthetic traces: structure of block-diffusion decoding, routing rules, calibration, determinism."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pandas as pd
import pytest

from tidesim.bundled.paths import bundled_traces
from tidesim.cli import main
from tidesim.errors import InputError
from tidesim.models import PRESETS
from tidesim.trace.io import read_trace, write_trace
from tidesim.trace.stats import hit_ratio_vs_tau, trace_stats
from tidesim.trace.synth import GENERATOR_NAME, SynthConfig, SynthParams, route, synthesize

TINY = PRESETS["tiny"]
MINI = PRESETS["llada2-mini"]


def tiny(**kw: object) -> SynthConfig:
    base: dict[str, object] = dict(model=TINY, prompts=2, gen_length=64, prompt_length=40, seed=5)
    base.update(kw)
    return SynthConfig(**base)  # type: ignore[arg-type]


def test_prefix_mode_forward_layout() -> None:
    t = synthesize(tiny(kv_cache="prefix"))
    f = t.forwards
    for p in (0, 1):
        fp = f[f["prompt"] == p]
        first = fp.iloc[0]
        assert (first["phase"], first["block"], first["tokens"], first["context"]) == ("prefill", -1, 40, 40)
        for b in (0, 1):
            fb = fp[fp["block"] == b]
            steps, last = fb.iloc[:-1], fb.iloc[-1]
            assert (steps["phase"] == "step").all() and last["phase"] == "commit"
            assert steps["step"].tolist() == list(range(len(steps))) and last["step"] == len(steps)
            assert (fb["tokens"] == 32).all() and (fb["context"] == 40 + 32 * (b + 1)).all()
            assert steps["committed"].sum() == 32 and (steps["committed"] >= 1).all() and last["committed"] == 0
    assert t.generated_tokens == 2 * 64
    assert (t.expert_tokens.sum(-1) == f["tokens"].to_numpy()[:, None] * TINY.top_k).all()


def test_none_mode_runs_the_whole_prefix_every_step() -> None:
    t = synthesize(tiny(kv_cache="none"))
    f = t.forwards
    assert (f["phase"] == "step").all()
    assert (f["tokens"] == f["context"]).all()
    assert (f["tokens"] == 40 + 32 * (f["block"] + 1)).all()
    assert t.generated_tokens == 2 * 64


def test_prefix_routing_frozen_and_block_final_routing_reused() -> None:
    t = synthesize(tiny(kv_cache="none", prompts=1, gen_length=96, token_level=True))
    layers = TINY.num_moe_layers
    f = t.forwards
    ids = lambda fw, layer: t.topk_ids[fw * layers + layer]  # noqa: E731
    first_of = {b: int(f.index[f["block"] == b][0]) for b in (0, 1, 2)}
    for layer in range(layers):
        prompt_rows = ids(0, layer)[:40]
        for fw in range(len(f)):
            assert np.array_equal(ids(fw, layer)[:40], prompt_rows)            # the prompt never changes
        block0 = ids(first_of[1], layer)[40:72]                               # block 0 as block 1 sees it
        for fw in np.flatnonzero(f["block"] >= 1):
            assert np.array_equal(ids(fw, layer)[40:72], block0)               # frozen after commit


def test_counts_match_token_level_routing_and_round_trip(tmp_path) -> None:
    t = synthesize(tiny(kv_cache="prefix", token_level=True))
    path = write_trace(t, tmp_path / "t.parquet")
    back = read_trace(path)                           # validation checks counts == bincount(ids)
    assert np.array_equal(back.expert_tokens, t.expert_tokens)
    assert all(np.array_equal(a, b) for a, b in zip(back.topk_ids, t.topk_ids, strict=True))
    for w in back.topk_weights:
        assert np.allclose(w.sum(-1), TINY.routed_scaling_factor, atol=1e-5)


def test_route_obeys_group_limit_and_top_k() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 2, 256)).astype(np.float32)
    ids, w = route(logits, MINI)
    assert ids.shape == (50, 2, 8)
    for tok in range(50):
        for layer in range(2):
            row = ids[tok, layer]
            assert len(set(row.tolist())) == 8
            assert len(set((row // 32).tolist())) <= 4                         # best 4 of 8 groups
            # the chosen experts are the best 8 among the eligible groups, in score order
            score = logits[tok, layer]
            group_score = np.sort(score.reshape(8, 32), axis=1)[:, -2:]
            group_score = (1 / (1 + np.exp(-group_score))).sum(1)
            eligible = np.isin(np.arange(256) // 32, np.argsort(-group_score)[:4])
            best = np.argsort(-np.where(eligible, score, -np.inf))[:8]
            assert row.tolist() == best.tolist()
    assert np.allclose(w.sum(-1), 2.5, atol=1e-5)


def _mean_pairwise_jaccard(sets: list[set[int]]) -> float:
    return float(np.mean([len(a & b) / len(a | b) for a, b in combinations(sets, 2)]))


def test_masked_positions_route_alike_and_committed_tokens_drift_little() -> None:
    cfg = SynthConfig(model=MINI, prompts=1, gen_length=64, prompt_length=32, kv_cache="prefix",
                      token_level=True, seed=11)
    t = synthesize(cfg)
    layers, f = MINI.num_moe_layers, t.forwards
    first_step = int(f.index[(f["block"] == 0) & (f["step"] == 0)][0])
    commit = int(f.index[(f["block"] == 0) & (f["phase"] == "commit")][0])
    layer = 0                      # the first MoE layer: masked positions look most like the mask there
    masked = [set(r.tolist()) for r in t.topk_ids[first_step * layers + layer]]
    final = [set(r.tolist()) for r in t.topk_ids[commit * layers + layer]]
    assert _mean_pairwise_jaccard(masked) > _mean_pairwise_jaccard(final) + 0.1
    # committed tokens: the last step vs the commit forward, same positions, keep most experts
    last_step = commit - 1
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 8 for a, b in
               zip(t.topk_ids[last_step * layers + layer], t.topk_ids[commit * layers + layer], strict=True)]
    assert np.mean(overlap) > 0.7


def test_tokens_per_step_follow_threshold() -> None:
    def tps(threshold: float) -> float:
        t = synthesize(SynthConfig(model=TINY, prompts=2, gen_length=512, prompt_length=16, threshold=threshold,
                                   seed=1))
        return trace_stats(t, budget=8, taus=[1])["decode"]["tokens_per_step"]
    at95, at85 = tps(0.95), tps(0.85)
    assert 2.2 < at95 < 2.9          # LLaDA2.0-mini: 2.55 tokens per forward at 0.95
    assert at85 > at95 + 0.4          # 3.31 at 0.85


def test_same_seed_same_bytes_other_seed_differs(tmp_path) -> None:
    for i in (1, 2):
        assert main(["trace", "synth", "--model", "tiny", "--prompts", "2", "--gen-length", "64",
                     "--prompt-length", "20", "--seed", "7", "--token-level", "-o", str(tmp_path / f"{i}.parquet"),
                     "--json"]) == 0
    main(["trace", "synth", "--model", "tiny", "--prompts", "2", "--gen-length", "64", "--prompt-length", "20",
          "--seed", "8", "--token-level", "-o", str(tmp_path / "3.parquet"), "--json"])
    one, two, three = ((tmp_path / f"{i}.parquet").read_bytes() for i in (1, 2, 3))
    assert one == two and one != three


def test_metadata_records_generator_and_seed(tmp_path, capsys) -> None:
    out = tmp_path / "t.parquet"
    assert main(["trace", "synth", "--model", "tiny", "--gen-length", "32", "--prompt-length", "8", "--seed", "3",
                 "--kv-cache", "none", "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["forwards"] == summary["step_forwards"] > 0
    meta = read_trace(out).meta
    assert meta.source == "synthetic" and meta.seed == 3 and meta.kv_cache == "none"
    assert meta.generator["name"] == GENERATOR_NAME and meta.generator["seed"] == 3
    assert SynthParams(**meta.generator["params"]) == SynthParams()


@pytest.mark.parametrize("kw", [
    dict(gen_length=50), dict(threshold=1.0), dict(threshold=0.0), dict(kv_cache="full"), dict(prompts=0),
    dict(seed=-1), dict(prompt_length=0), dict(params=SynthParams(pop_shared=2.0)),
    dict(params=SynthParams(conf_rate=0.0)),
])
def test_bad_config_raises_input_error(kw) -> None:
    with pytest.raises(InputError):
        synthesize(tiny(**kw))


def test_token_level_no_cache_too_large_is_refused() -> None:
    with pytest.raises(InputError, match="token-level"):
        SynthConfig(model=MINI, prompts=8, gen_length=4096, kv_cache="none", token_level=True).check()


@pytest.mark.parametrize("args, words", [
    (["--model", "nope"], "unknown model"), (["--gen-length", "33"], "multiple"),
    (["--kv-cache", "full"], "invalid choice"), (["--threshold", "2"], "threshold"),
])
def test_cli_bad_input_exit_2_and_no_file(tmp_path, capsys, args, words) -> None:
    out = tmp_path / "t.parquet"
    assert main(["trace", "synth", *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_calibration_mini_prefix_small() -> None:
    # Published: ~69.5 unique experts per layer per step, adjacent-step cosine 0.985 (> 0.95 at 5).
    t = synthesize(SynthConfig(model=MINI, prompts=2, gen_length=128, kv_cache="prefix", seed=0))
    s = trace_stats(t, budget=128, taus=[2])
    assert s["unique_experts_per_step"] == pytest.approx(69.5, rel=0.2)
    assert s["similarity"]["forward"]["cosine"][0] >= 0.97
    # 5 apart the generator lands near 0.92 (docs/traces.md: the trade-off with masked positions
    # routing alike); guard against a regression well below that
    assert s["similarity"]["forward"]["cosine"][4] >= 0.90


def test_bundled_traces_meet_published_statistics() -> None:
    traces = bundled_traces()
    assert {"llada2-mini_none_g1024", "llada2-mini_prefix_g256", "llada2-flash_prefix_g256",
            "llada2-flash_none_g256"} <= set(traces)
    none = read_trace(traces["llada2-mini_none_g1024"])
    assert none.meta.kv_cache == "none" and none.meta.gen_length == 1024 and len(none.prompt_ids) == 4
    assert 0.92 <= hit_ratio_vs_tau(none, 128, [2])[2] <= 0.95          # TIDE repo: 0.928 .. 0.947
    prefix = read_trace(traces["llada2-mini_prefix_g256"])
    s = trace_stats(prefix, budget=128, taus=[2])
    assert s["unique_experts_per_step"] == pytest.approx(69.5, rel=0.2)
    assert s["similarity"]["forward"]["cosine"][0] >= 0.97
    for name in ("llada2-flash_prefix_g256", "llada2-flash_none_g256"):
        meta = read_trace(traces[name]).meta
        assert meta.model.name == "llada2-flash" and meta.source == "synthetic" and meta.gen_length == 256


def test_bundled_trace_regenerates_from_its_metadata(tmp_path) -> None:
    path = bundled_traces()["llada2-mini_prefix_g256"]
    t = read_trace(path)
    g = t.meta.generator
    cfg = SynthConfig(model=t.model, prompts=g["prompts"], gen_length=g["gen_length"],
                      block_length=g["block_length"], threshold=g["threshold"], kv_cache=g["kv_cache"],
                      prompt_length=g["prompt_length"], seed=g["seed"], token_level=g["token_level"],
                      params=SynthParams(**g["params"]))
    again = synthesize(cfg)
    assert np.array_equal(again.expert_tokens, t.expert_tokens)
    pd.testing.assert_frame_equal(again.forwards, t.forwards, check_dtype=False)
    write_trace(again, tmp_path / "again.parquet")
    assert (tmp_path / "again.parquet").read_bytes() == path.read_bytes()
