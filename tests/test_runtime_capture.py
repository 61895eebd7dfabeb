"""Trace capture: gate hooks -> a valid tidesim Trace with full metadata; cross-mode consistency
of the captured routing; the official LLaDA2MoeGate path through a stand-in; the command."""

import hashlib
import json
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from official_rules import official_config  # noqa: E402
from tidesim_runtime.reference.capture import (  # noqa: E402,I001
    CaptureSettings,
    GateRecorder,
    HFForward,
    capture_trace,
    prompt_fingerprint,
)
from tidesim_runtime.reference.gate import route  # noqa: E402
from tidesim_runtime.reference.generate import DecodeConfig  # noqa: E402
from tidesim_runtime.reference.model import build_model  # noqa: E402

from tidesim.cli import main  # noqa: E402
from tidesim.models import PRESETS  # noqa: E402
from tidesim.trace.io import read_trace, write_trace  # noqa: E402
from tidesim.trace.validate import validate_trace  # noqa: E402

SPEC = PRESETS["tiny"]
PROMPTS = [[3, 1, 4, 1, 5, 9] * 3, [2, 7, 1, 8]]  # 18 tokens: one whole block of 16 and 2 more; 4


@pytest.fixture(scope="module")
def model():
    return build_model(SPEC, torch.float32, seed=21)


def capture(model, kv, token_level=True, forward=None, prompts=PROMPTS):
    cfg = DecodeConfig(gen_length=32, block_length=16, threshold=0.9, kv_cache=kv)
    return capture_trace(model, SPEC, prompts, cfg, CaptureSettings("random (seed 21)", "float32", token_level),
                         seed=21, forward=forward)


@pytest.fixture(scope="module")
def traces(model):
    return {kv: capture(model, kv) for kv in ("none", "prefix")}


def test_captured_traces_are_valid_and_counts_sum_to_tokens_times_top_k(traces, tmp_path):
    for kv, (trace, _) in traces.items():
        validate_trace(trace)
        tokens = trace.forwards["tokens"].to_numpy()
        assert (trace.expert_tokens.sum(axis=2) == tokens[:, None] * SPEC.top_k).all()
        for i, ids in enumerate(trace.topk_ids):
            fw, layer = divmod(i, SPEC.num_moe_layers)
            assert np.array_equal(np.bincount(ids.ravel(), minlength=SPEC.num_experts), trace.expert_tokens[fw, layer])
            assert np.allclose(trace.topk_weights[i].sum(axis=1), SPEC.routed_scaling_factor, atol=1e-4)
        back = read_trace(write_trace(trace, tmp_path / f"{kv}.parquet"))
        assert np.array_equal(back.expert_tokens, trace.expert_tokens)
        assert set(trace.forwards["phase"]) == ({"step"} if kv == "none" else {"prefill", "step", "commit"})
        # prefill only for a prompt holding a whole block: prompt 0 (18 tokens), not prompt 1 (4)
        prefills = trace.forwards[trace.forwards.phase == "prefill"]
        assert prefills["prompt"].tolist() == ([] if kv == "none" else [0]) and set(prefills["tokens"]) <= {16}


def test_metadata_is_complete(traces):
    trace, _ = traces["prefix"]
    m = trace.meta
    assert m.source == "captured" and m.kv_cache == "prefix" and m.seed == 21 and m.model == SPEC
    assert (m.block_length, m.threshold, m.gen_length) == (16, 0.9, 32)
    assert m.prompts[0]["sha256"] == hashlib.sha256(b" ".join([b"3 1 4 1 5 9"] * 3)).hexdigest()
    assert len(m.prompts[0]["steps_per_block"]) <= 3  # blocks 1..3 of ceil((18 + 32) / 16) = 4
    assert m.generator["decode"]["steps"] == 32 and m.generator["decode"]["do_sample"] is False
    assert m.prompts[1]["tokens"] == 4 and m.prompts[1]["generated"] <= 32
    assert m.generator["weights"] == "random (seed 21)" and m.generator["token_level"] is True
    assert "random weights" in m.notes
    assert prompt_fingerprint([10, 2]) == hashlib.sha256(b"10 2").hexdigest()


def test_both_modes_decode_alike_and_route_the_prefix_alike(traces):
    (tn, out_n), (tp, out_p) = traces["none"], traces["prefix"]
    assert out_n == out_p
    sn, sp = (t.forwards[t.forwards.phase == "step"] for t in (tn, tp))
    assert sn["committed"].tolist() == sp["committed"].tolist()
    layers = SPEC.num_moe_layers
    # no cache: the prompt's whole block [0, 16) is routed identically in every forward (it never
    # sees later blocks), and exactly as in the prefix-mode prefill
    first = [i for i in range(tn.num_forwards) if tn.forwards.prompt[i] == 0]
    for layer in range(layers):
        ref = tp.topk_ids[0 * layers + layer]  # prefill of prompt 0
        for fw in first:
            assert np.array_equal(np.sort(tn.topk_ids[fw * layers + layer][:16], 1), np.sort(ref, 1))
    # the first decoded block [16, 32) as committed to the cache routes like those positions in
    # the no-cache forwards of the next block
    commit = int(np.flatnonzero((tp.forwards.phase == "commit") & (tp.forwards.prompt == 0))[0])
    later = int(np.flatnonzero((tn.forwards.block == 1) & (tn.forwards.prompt == 0))[0])
    for layer in range(layers):
        a = tp.topk_ids[commit * layers + layer]
        b = tn.topk_ids[later * layers + layer][16:32]
        assert np.array_equal(np.sort(a, 1), np.sort(b, 1))


class LLaDA2MoeGate(torch.nn.Module):
    """Stand-in with the official class name and output signature (topk_idx, topk_weight, logits)."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())
        self.register_buffer("expert_bias", bias.clone())

    def forward(self, hidden):
        logits = hidden.reshape(-1, hidden.shape[-1]).float() @ self.weight.float().t()
        idx, w = route(logits, self.expert_bias, SPEC.top_k, SPEC.n_group, SPEC.topk_group,
                       SPEC.routed_scaling_factor)
        return idx, w, logits


class StandInHFModel(torch.nn.Module):
    """Takes (input_ids, attention_mask 4D additive, position_ids) and returns an object with
    .logits, like a transformers model; its gates are LLaDA2MoeGate stand-ins."""

    def __init__(self, spec, seed):
        super().__init__()
        self.inner = build_model(spec, torch.float32, seed=seed)
        for _, block in self.inner.moe_blocks():
            block.gate = LLaDA2MoeGate(block.gate.weight.data, block.gate.expert_bias)

    def forward(self, input_ids, attention_mask, position_ids):
        assert attention_mask.ndim == 4 and attention_mask.dtype == torch.float32
        logits, _ = self.inner(input_ids, position_ids[0], attention_mask[0, 0] == 0)
        return types.SimpleNamespace(logits=logits)


def test_capture_through_official_gate_class_matches_reference_capture(model, traces):
    hf = StandInHFModel(SPEC, seed=21)
    rec = GateRecorder(hf, SPEC.num_experts, SPEC.top_k, class_names=("LLaDA2MoeGate",))
    assert rec.layers == SPEC.moe_layer_ids
    rec.remove()
    trace, out = capture(hf, "none", forward=HFForward(hf))
    ref, ref_out = traces["none"]
    assert out == ref_out
    assert np.array_equal(trace.expert_tokens, ref.expert_tokens)
    assert trace.forwards.equals(ref.forwards)


def test_recorder_rejects_a_model_without_gates():
    from tidesim.errors import InputError

    with pytest.raises(InputError, match="no router modules"):
        GateRecorder(torch.nn.Linear(2, 2), 4, 2)


def run_cli(tmp_path, *extra):
    out = tmp_path / "t.parquet"
    args = ["trace", "capture", "--config", "tiny", "--prompt-tokens", "5", "--num-prompts", "2", "--gen-length",
            "32", "--block-length", "16", "--kv-cache", "prefix", "--seed", "4", "-o", str(out), *extra]
    return main(args), out


def test_capture_command_writes_a_valid_deterministic_trace(tmp_path, capsys):
    rc, out = run_cli(tmp_path, "--json")
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["forwards"] == read_trace(out).num_forwards and len(report["prompts"]) == 2
    first = out.read_bytes()
    rc, out = run_cli(tmp_path)
    table = capsys.readouterr().out
    assert rc == 0 and "tokens_per_step" in table and "wrote" in table
    assert out.read_bytes() == first  # same inputs and seed -> same bytes
    t = read_trace(out)
    assert t.meta.source == "captured" and t.topk_ids is None
    rc, out = run_cli(tmp_path, "--token-level")
    assert rc == 0 and read_trace(out).topk_ids is not None


def test_capture_command_prompt_files(tmp_path, capsys):
    for name, text in [("p.json", "[[1, 2, 3], [4, 5]]"), ("p.txt", "1 2 3\n\n4 5\n")]:
        f = tmp_path / name
        f.write_text(text)
        out = tmp_path / f"{name}.parquet"
        assert main(["trace", "capture", "--config", "tiny", "--prompts", str(f), "--gen-length", "16",
                     "--block-length", "8", "-o", str(out)]) == 0
        assert [p["tokens"] for p in read_trace(out).meta.prompts] == [3, 2]
    capsys.readouterr()


@pytest.mark.parametrize("content, extra, word", [
    ("1 2 x\n", [], "is text, but there is no tokenizer.json"), ("[[1, 2], [99999]]", [], "outside [0, 512)"),
    ("[[511]]", [], "mask token"), ("[[1], []]", [], "prompt 1 is empty"),
    ("1 2\n", ["--temperature", "nan"], "--temperature must be a finite number"),
    ("1 2\n", ["--minimal-topk", "17"], "--minimal-topk 17 exceeds --gen-length 16"),
    ("1 2\n", ["--top-p", "inf"], "--top-p"), ("1 2\n", ["--steps", "0"], "--steps"),
    ("1 2\n", ["--top-k", "513"], "--top-k 513 exceeds the vocabulary"),
    ("", [], "holds no prompt"), ("1 2\n", ["--threshold", "2"], "--threshold"),
    ("1 2\n", ["--layers", "1"], "no MoE layer"), ("1 2\n", ["--gen-length", "0"], "--gen-length"),
])
def test_capture_command_bad_input_exit_2(tmp_path, capsys, content, extra, word):
    f = tmp_path / "p.txt"
    f.write_text(content)
    out = tmp_path / "t.parquet"
    rc = main(["trace", "capture", "--config", "tiny", "--prompts", str(f), "--gen-length", "16", "-o", str(out),
               *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and word in err
    assert not out.exists()


def test_capture_command_refuses_a_sequence_beyond_max_position_embeddings(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(official_config(SPEC, max_position_embeddings=40)))
    prompts = tmp_path / "p.txt"
    prompts.write_text("1 2 3\n" + " ".join(["7"] * 30) + "\n")
    out = tmp_path / "t.parquet"
    rc = main(["trace", "capture", "--config", str(cfg), "--prompts", str(prompts), "--gen-length", "16",
               "--block-length", "8", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "prompt 1: 30 prompt tokens + gen length 16, padded to 48 positions" in err
    assert "max_position_embeddings 40" in err and err.count("\n") == 1 and not out.exists()


def test_capture_command_without_torch_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    rc, out = run_cli(tmp_path)
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'tidesim[runtime]'" in err and err.count("\n") == 1
    assert not out.exists()


def test_capture_command_config_path_honours_flags_and_refuses_more_layers(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(official_config(SPEC, use_bias=True)))
    out = tmp_path / "t.parquet"
    rc = main(["trace", "capture", "--config", str(cfg), "--layers", "5", "--prompt-tokens", "4", "--gen-length", "8",
               "--block-length", "8", "-o", str(out)])
    assert rc == 2 and "--layers 5 exceeds the 4 layers" in capsys.readouterr().err and not out.exists()
    rc = main(["trace", "capture", "--config", str(cfg), "--layers", "3", "--prompt-tokens", "4", "--gen-length", "8",
               "--block-length", "8", "-o", str(out), "--json"])
    assert rc == 0
    t = read_trace(out)
    assert t.meta.model.num_layers == 3 and t.expert_tokens.shape[1] == 2
    assert json.loads(capsys.readouterr().out)["model"] == t.meta.model.name
