"""Autoregressive decoding as a decode shape every command handles: synthesis, validation, stats,
compare, plan and sweep, on synthesized and on converted traces."""

from __future__ import annotations

import json

import convert_cases as cc
import numpy as np
import pandas as pd
import pytest
import yaml

from tidesim.cli import main
from tidesim.errors import InputError
from tidesim.models import PRESETS
from tidesim.policies.residency import refresh_steps
from tidesim.trace.convert import convert
from tidesim.trace.io import write_trace
from tidesim.trace.stats import gini
from tidesim.trace.synth_ar import ArConfig, ArParams, synthesize_ar
from tidesim.trace.validate import trace_problems
from tidesim.workload import workload_from_trace

DSV2 = PRESETS["deepseek-v2-lite"]


def test_structure_of_an_autoregressive_trace():
    t = synthesize_ar(ArConfig(model=PRESETS["tiny"], prompts=2, prompt_length=6, gen_length=4))
    f = t.forwards
    assert f["phase"].tolist() == ["prefill", "step", "step", "step"] * 2
    assert f["block"].tolist() == [-1, 0, 1, 2] * 2 and f["step"].tolist() == [0, 0, 1, 2] * 2
    assert f["tokens"].tolist() == [6, 1, 1, 1] * 2 and f["context"].tolist() == [6, 7, 8, 9] * 2
    assert t.generated_tokens == 8 and t.meta.block_length == 1 and t.meta.decode == "autoregressive"
    assert (t.expert_tokens.sum(axis=2) == f["tokens"].to_numpy()[:, None] * 4).all()


def test_same_seed_same_bytes(tmp_path):
    cfg = ArConfig(model=PRESETS["tiny"], prompts=2, prompt_length=8, gen_length=6, seed=3, token_level=True)
    write_trace(synthesize_ar(cfg), tmp_path / "a.parquet")
    write_trace(synthesize_ar(cfg), tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_layer_skew_is_the_one_asked_for():
    """pop_scale 0 on the first MoE layer (routing by token terms only) to 3 on the last: the Gini of
    expert load rises from the first layer to the last."""
    t = synthesize_ar(ArConfig(model=DSV2, prompts=2, prompt_length=32, gen_length=32,
                               params=ArParams(pop_scale_first=0.0, pop_scale_last=3.0)))
    g = gini(t.expert_tokens.sum(axis=0))
    assert g[-1] > g[0] + 0.3
    assert np.corrcoef(np.arange(g.size), g)[0, 1] > 0.9


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.__setitem__("phase", ["prefill", "step", "commit", "step"]), "no commit forwards"),
    (lambda f: f.__setitem__("step", [0, 0, 0, 0]), "decode forward of prompt 0 must have block 1 and step 1"),
    (lambda f: f.update(pd.DataFrame({"phase": ["prefill", "step", "prefill", "step"], "block": [-1, 0, -1, 1]})),
     "a prefill after decode forwards"),
    (lambda f: f.__setitem__("committed", [1, 1, 2, 1]), "committed tokens outside [0, tokens]"),
])
def test_validation_of_the_autoregressive_shape(mutate, message):
    t = synthesize_ar(ArConfig(model=PRESETS["tiny"], prompts=1, prompt_length=6, gen_length=4))
    mutate(t.forwards)
    assert any(message in p for p in trace_problems(t))


def test_meta_checks_block_length_and_cache():
    t = synthesize_ar(ArConfig(model=PRESETS["tiny"], prompts=1, prompt_length=6, gen_length=4))
    t.meta.block_length = 32
    assert "block_length 1 and kv_cache prefix" in trace_problems(t)[0]
    with pytest.raises(InputError, match="prompt-length must be a positive integer"):
        synthesize_ar(ArConfig(model=PRESETS["tiny"], prompt_length=0))


def test_tide_refreshes_every_tau_tokens():
    """The refresh clock of an autoregressive trace counts tokens: tau 4 refreshes the prefill, the
    first decode forward (the first generated block) and every 4th token after."""
    t = synthesize_ar(ArConfig(model=PRESETS["tiny"], prompts=1, prompt_length=6, gen_length=11))
    refresh = refresh_steps(workload_from_trace(t), np.full(3, 4))[:, 0]
    assert np.flatnonzero(refresh).tolist() == [0, 1, 5, 9]


def test_synth_cli_and_stats(tmp_path, capsys):
    out = tmp_path / "ar.parquet"
    assert main(["trace", "synth", "--decode", "autoregressive", "--model", "tiny", "--prompts", "2",
                 "--prompt-length", "10", "--gen-length", "12", "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["forwards"] == 24
    assert main(["trace", "stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["decode_shape"] == "autoregressive" and stats["decode"]["step_forwards"] == 22
    sim = stats["similarity"]["forward"]
    assert sim["distance"][0] == 1 and sim["pairs"][0] == 2 * 10   # 11 decode forwards per prompt: 10 pairs
    assert main(["trace", "stats", str(out)]) == 0
    assert "d tokens apart (same prompt)" in capsys.readouterr().out


def _compare(trace, capsys, hw="rtx4090-pcie4-desktop", budget="8"):
    assert main(["compare", "--trace", str(trace), "--hw", hw, "--budget", budget, "--engine", "analytic",
                 "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _plan(trace, tmp_path, capsys, gib):
    out = tmp_path / "plan.json"
    assert main(["plan", "--trace", str(trace), "--hw", "rtx4090-pcie4-desktop", "--gpu-mem-gib", str(gib),
                 "--calibrate-prompts", "0,1", "-o", str(out), "--json"]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())


def test_plan_budgets_follow_routing_skew_by_layer(tmp_path, capsys):
    """DeepSeek-V2-Lite-shaped AR trace (converted from a vLLM record) whose first 13 MoE layers send
    every token to the same 6 experts and whose last 13 route uniformly at random: keeping more than
    6 experts gains nothing in the first half, so the plan's budgets there stay at the smallest
    candidate while the uniform layers take the slots (uniform routing is where extra experts pay)."""
    rng = np.random.default_rng(0)
    half = DSV2.num_moe_layers // 2

    def routed(tokens):
        ids = cc.routing(rng, tokens, DSV2)
        ids[:, :half] = np.arange(DSV2.top_k)
        return ids

    rec = cc.Recording([routed(24) for _ in range(3)], [routed(40) for _ in range(3)], model=DSV2)
    trace = convert("vllm", [cc.write_vllm_npz(tmp_path / "r.npz", rec)], DSV2)
    path = write_trace(trace, tmp_path / "skew.parquet")
    plan = _plan(path, tmp_path, capsys, 10)
    budget = np.array(plan["budget"])
    assert len(set(budget.tolist())) > 1                       # not uniform
    assert budget[:half].max() < budget[half:].min()
    assert budget[:half].sum() < budget[half:].sum()


def test_converted_traces_run_stats_compare_plan_and_sweep(tmp_path, capsys):
    rec = cc.recording(seed=11, prompts=(12, 9, 10, 8), decodes=(14, 10, 12, 9))
    inputs = {"sglang": cc.write_sglang(tmp_path / "d.pt", cc.sglang_records(rec)),
              "sglang-request": cc.write_sglang_requests(tmp_path / "r.json", rec),
              "vllm": cc.write_vllm_npz(tmp_path / "v.npz", rec),
              "llamacpp": cc.write_llamacpp(tmp_path / "t.csv", rec)}
    traces = {}
    for engine, src in inputs.items():
        out = tmp_path / f"{engine}.parquet"
        assert main(["trace", "convert", "--from", engine, str(src), "--model", "tiny", "-o", str(out)]) == 0
        traces[engine] = out
        assert main(["trace", "stats", str(out), "--json"]) == 0
        capsys.readouterr()
        result = _compare(out, capsys, budget="6")
        tide = next(r for r in result["policies"] if r["policy"] == "tide")
        assert tide["tokens_per_s"] > 0
    m = cc.MODEL   # memory for about 8 of the 16 experts per layer beside the 1.5 GB reserve
    gib = (1.5e9 + m.non_expert_bytes + 8 * m.num_moe_layers * m.expert_bytes) / 2**30
    plan = _plan(traces["sglang"], tmp_path, capsys, f"{gib:.6f}")
    assert len(plan["budget"]) == cc.MODEL.num_moe_layers
    grid = {"name": "converted", "parameters": {"trace": [str(traces["vllm"]), str(traces["llamacpp"])],
                                                "hw": "rtx4090-pcie4-desktop", "budget": 6,
                                                "policy": ["tide", "cpu-routing"]}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    table = tmp_path / "sweep.parquet"
    assert main(["sweep", str(tmp_path / "grid.yaml"), "-o", str(table), "--workers", "1", "--no-figures"]) == 0
    df = pd.read_parquet(table)
    assert len(df) == 4 and (df["tokens_per_s"] > 0).all()


def test_headers_name_the_autoregressive_decode(tmp_path, capsys):
    """compare and simulate say "autoregressive decode" for an AR trace, not its cache mode alone, and
    --json carries decode; a diffusion trace's header is unchanged (no decode key)."""
    out = tmp_path / "ar.parquet"
    assert main(["trace", "synth", "--decode", "autoregressive", "--model", "tiny", "--prompts", "2",
                 "--prompt-length", "10", "--gen-length", "12", "-o", str(out), "--json"]) == 0
    capsys.readouterr()
    common = ["--trace", str(out), "--hw", "rtx4090-pcie4-desktop", "--budget", "8", "--engine", "analytic"]
    assert main(["compare", *common]) == 0
    assert "tiny, autoregressive decode, KV cache, " in capsys.readouterr().out
    assert main(["simulate", *common, "--policy", "cpu-routing"]) == 0
    assert "(autoregressive decode, KV cache, " in capsys.readouterr().out
    assert _compare(out, capsys)["inputs"]["decode"] == "autoregressive"
    diffusion = tmp_path / "dllm.parquet"
    assert main(["trace", "synth", "--model", "tiny", "--prompts", "1", "--gen-length", "16", "-o",
                 str(diffusion), "--json"]) == 0
    capsys.readouterr()
    inputs = _compare(diffusion, capsys)["inputs"]
    assert "decode" not in inputs and inputs["kv_cache"] in ("none", "prefix")
