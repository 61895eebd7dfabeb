"""`tidesim trace convert`: every engine layout, written tiny by the tests, converts to the trace the
routing implies; bad inputs exit 2 with one line and write nothing."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import convert_cases as cc
import numpy as np
import pytest

from tidesim.cli import main
from tidesim.errors import InputError
from tidesim.trace.convert import convert
from tidesim.trace.io import read_trace

torch = pytest.importorskip("torch")


def _writers(tmp_path, rec):
    return {
        "sglang": lambda: [cc.write_sglang(tmp_path / "dump_0.pt", cc.sglang_records(rec))],
        "sglang-request": lambda: [cc.write_sglang_requests(tmp_path / "responses.json", rec)],
        "vllm": lambda: [cc.write_vllm_npz(tmp_path / "routing.npz", rec)],
        "llamacpp": lambda: [cc.write_llamacpp(tmp_path / "moe-trace.csv", rec)],
    }


# committed tokens per prompt: the engines differ in whether the last output token's routing is recorded
GENERATED = {"sglang": 1, "sglang-request": 1, "vllm": 0, "llamacpp": 1}


@pytest.mark.parametrize("engine", ["sglang", "sglang-request", "vllm", "llamacpp"])
def test_each_layout_converts_to_the_recorded_routing(engine, tmp_path):
    rec = cc.recording()
    inputs = _writers(tmp_path, rec)[engine]()
    out = tmp_path / "trace.parquet"
    assert main(["trace", "convert", "--from", engine, *map(str, inputs), "--model", "tiny", "-o", str(out)]) == 0
    trace = read_trace(out)
    assert trace.meta.decode == "autoregressive" and trace.meta.source == "converted"
    np.testing.assert_array_equal(trace.expert_tokens, rec.expected_counts())
    f = trace.forwards
    # prompt 0: prefill of 5 tokens, then 4 decode forwards; prompt 1: 3 tokens, then 2
    assert f["phase"].tolist() == ["prefill"] + ["step"] * 4 + ["prefill"] + ["step"] * 2
    assert f["tokens"].tolist() == [5, 1, 1, 1, 1, 3, 1, 1]
    assert f["block"].tolist() == [-1, 0, 1, 2, 3, -1, 0, 1] and f["step"].tolist() == [0, 0, 1, 2, 3, 0, 0, 1]
    assert f["context"].tolist() == [5, 6, 7, 8, 9, 3, 4, 5]
    assert [p["generated"] for p in trace.meta.prompts] == [4 + GENERATED[engine], 2 + GENERATED[engine]]
    # token-level routing kept, token by token
    assert trace.topk_ids is not None
    np.testing.assert_array_equal(trace.topk_ids[0], rec.prompts[0][:, 0, :])
    gen = trace.meta.generator
    assert gen["engine"] == engine and gen["inferred"]
    assert [i["path"] for i in gen["inputs"]] == [p.name for p in inputs]
    import hashlib
    assert gen["inputs"][0]["sha256"] == hashlib.sha256(inputs[0].read_bytes()).hexdigest()


def test_same_inputs_same_bytes(tmp_path):
    rec = cc.recording(seed=3)
    dump = cc.write_sglang(tmp_path / "d.pt", cc.sglang_records(rec))
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    for out in (a, b):
        assert main(["trace", "convert", "--from", "sglang", str(dump), "--model", "tiny", "-o", str(out)]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_vllm_json_equals_npz_and_sglang_all_layers_equals_moe_layers(tmp_path):
    rec = cc.recording(seed=1)
    t_npz = convert("vllm", [cc.write_vllm_npz(tmp_path / "r.npz", rec)], cc.MODEL)
    t_json = convert("vllm", [cc.write_vllm_json(tmp_path / "r.json", rec)], cc.MODEL)
    np.testing.assert_array_equal(t_npz.expert_tokens, t_json.expert_tokens)
    moe = convert("sglang-request", [cc.write_sglang_requests(tmp_path / "a.json", rec)], cc.MODEL)
    every = convert("sglang-request", [cc.write_sglang_requests(tmp_path / "b.json", rec, all_layers=True)],
                    cc.MODEL)
    np.testing.assert_array_equal(moe.expert_tokens, every.expert_tokens)


def test_vllm_server_response_reads_one_request_per_choice(tmp_path):
    rec = cc.recording(seed=8, prompts=(5,), decodes=(4,))
    response = {"id": "chatcmpl-1", "prompt_routed_experts": rec.prompts[0].tolist(),
                "choices": [{"index": 0, "message": {"content": "..."}, "routed_experts": rec.decodes[0].tolist()}]}
    (tmp_path / "resp.json").write_text(json.dumps(response))
    trace = convert("vllm", [tmp_path / "resp.json"], cc.MODEL)
    np.testing.assert_array_equal(trace.expert_tokens, rec.expected_counts())
    response["prompt_routed_experts"] = None
    (tmp_path / "resp.json").write_text(json.dumps(response))
    assert "no 'prompt_routed_experts'" in _bad(tmp_path, "vllm", [tmp_path / "resp.json"])


def test_sglang_physical_ids_mapped_to_logical(tmp_path):
    """20 physical slots, 16..19 redundant copies of experts 0..3: ids recorded as 16..19 count for 0..3."""
    rec = cc.recording(seed=2)
    records = cc.sglang_records(rec)
    for r in records:
        t = r["topk_ids_of_layer"]
        t[t == 2] = 18                          # physical slot 18 holds logical expert 2
    dump = cc.write_sglang(tmp_path / "d.pt", records, cc.physical_map(physical=20))
    trace = convert("sglang", [dump], cc.MODEL)
    np.testing.assert_array_equal(trace.expert_tokens, rec.expected_counts())
    assert any("last_physical_to_logical_map" in n for n in trace.meta.generator["inferred"])


def test_sglang_batched_decode_commits_one_token_per_sequence(tmp_path):
    rng = np.random.default_rng(4)
    prefill = cc.sglang_record(cc.routing(rng, 7), np.r_[np.arange(4), np.arange(3)], [4, 3], 0)
    decode = cc.sglang_record(cc.routing(rng, 2), np.array([4, 3]), None, 1)
    trace = convert("sglang", [cc.write_sglang(tmp_path / "d.pt", [prefill, decode])], cc.MODEL)
    f = trace.forwards
    # context: the largest position + 1, but never below the tokens (the trace format's rule)
    assert f["committed"].tolist() == [2, 2] and f["tokens"].tolist() == [7, 2] and f["context"].tolist() == [7, 5]


def test_sglang_stat_mode_counts_only(tmp_path):
    rec = cc.recording(seed=5)
    trace = convert("sglang", [cc.write_sglang_stat(tmp_path / "stat.pt", rec)], cc.MODEL)
    np.testing.assert_array_equal(trace.expert_tokens, rec.expected_counts())
    assert trace.topk_ids is None
    assert trace.forwards["tokens"].tolist() == [5, 1, 1, 1, 1, 3, 1, 1]
    assert any("prefill" in c for c in trace.meta.generator["cannot_derive"])


def test_repeated_positions_become_denoising_steps(tmp_path):
    """A diffusion model served by SGLang: a prompt prefill, then each block's positions run
    several times (denoising steps) before the next block."""
    rng = np.random.default_rng(6)
    records = [cc.sglang_record(cc.routing(rng, 6), np.arange(6), [6], 0)]
    for block, steps in ((0, 3), (1, 2)):
        pos = np.arange(6 + 4 * block, 10 + 4 * block)
        for _ in range(steps):
            records.append(cc.sglang_record(cc.routing(rng, 4), pos, [4], len(records)))
    trace = convert("sglang", [cc.write_sglang(tmp_path / "d.pt", records)], cc.MODEL)
    f = trace.forwards
    assert trace.meta.decode == "diffusion" and trace.meta.block_length == 4
    assert f["phase"].tolist() == ["prefill", "step", "step", "step", "step", "step"]
    assert f["block"].tolist() == [-1, 0, 0, 0, 1, 1] and f["step"].tolist() == [0, 0, 1, 2, 0, 1]
    assert f["committed"].tolist() == [0, 0, 0, 4, 0, 4]


def test_llamacpp_without_header_and_batched_prefill_detection(tmp_path):
    rec = cc.recording(seed=7)
    trace = convert("llamacpp", [cc.write_llamacpp(tmp_path / "t.csv", rec, header=False)], cc.MODEL)
    np.testing.assert_array_equal(trace.expert_tokens, rec.expected_counts())
    assert trace.forwards["prompt"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]


def _two_layer_config(tmp_path):
    """The tiny model's shapes with MoE layers 1 and 2 only."""
    cfg = {**cc.MODEL.to_hf_dict(), "num_hidden_layers": 3}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path / "config.json")


def test_llamacpp_prefill_in_ubatches_is_one_chunked_prefill(tmp_path):
    """An 8-token prompt run as two ubatches of 4 tokens, then 3 one-token passes: the passes of
    several tokens are chunks of one prefill (steps 0, 1), each one-token pass a decode forward;
    the prefill's output token is committed by its last chunk."""
    rng = np.random.default_rng(9)
    passes = [cc.routing(rng, n) for n in (4, 4, 1, 1, 1)]
    (tmp_path / "t.csv").write_text("\n".join(r for ids in passes for r in cc.llamacpp_rows(ids)) + "\n")
    f = convert("llamacpp", [tmp_path / "t.csv"], cc.MODEL).forwards
    assert f["phase"].tolist() == ["prefill", "prefill", "step", "step", "step"]
    assert f["block"].tolist() == [-1, -1, 0, 1, 2] and f["step"].tolist() == [0, 1, 0, 1, 2]
    assert f["committed"].tolist() == [0, 1, 1, 1, 1] and f["context"].tolist() == [4, 8, 9, 10, 11]


def _bad(tmp_path, engine, inputs, model="tiny"):
    """Exit 2, one line on stderr, no output (nor temporary) file."""
    out = tmp_path / "out.parquet"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["trace", "convert", "--from", engine, *map(str, inputs), "--model", model, "-o", str(out)])
    assert code == 2, err.getvalue()
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err.getvalue()
    assert not out.exists() and not list(tmp_path.glob(".out.parquet*"))
    return lines[0]


def _sglang_with(tmp_path, mutate):
    records = cc.sglang_records(cc.recording())
    mutate(records)
    return [cc.write_sglang(tmp_path / "d.pt", records)]


def _set(records, i, key, value):
    records[i][key] = value


def _pad_routed_slot(records):
    records[1]["topk_ids_of_layer"][2, 0, 1] = -1


def _out_of_range(records):
    records[2]["topk_ids_of_layer"][1, 0, 0] = 16


def _dense_layer_routed(records):
    records[0]["topk_ids_of_layer"][0, 0, 0] = 3


def _extra_slot(records):
    records[0]["topk_ids_of_layer"][1, 0, 5] = 3


@pytest.mark.parametrize("mutate, message", [
    (_pad_routed_slot, "expert id -1 in a routed slot"),
    (_out_of_range, "expert id 16 out of range"),
    (_dense_layer_routed, "dense layer rows hold routing"),
    (_extra_slot, "slots beyond top_k 4"),
    (lambda r: _set(r, 3, "rank", 1), "records of ranks [0, 1]"),
    (lambda r: _set(r, 0, "topk_ids_of_layer", torch.zeros((4, 5), dtype=torch.int32)), "must be [layers, tokens"),
    (lambda r: _set(r, 0, "positions", [0, 1]), "5 routed tokens but 5 input ids and 2 positions"),
    (lambda r: _set(r, 0, "extend_seq_lens", [3]), "extend_seq_lens sum to 3"),
    (lambda r: _set(r, 4, "forward_pass_id", 3), "share a forward_pass_id"),
])
def test_bad_sglang_dumps_refused(tmp_path, mutate, message):
    assert message in _bad(tmp_path, "sglang", _sglang_with(tmp_path, mutate))


def test_dump_of_another_model_refused(tmp_path):
    dump = cc.write_sglang(tmp_path / "d.pt", cc.sglang_records(cc.recording()))
    assert "is it a dump of another model" in _bad(tmp_path, "sglang", [dump], model="llada2-mini")
    csv = cc.write_llamacpp(tmp_path / "t.csv", cc.recording())
    assert "layers do not repeat 0..47" in _bad(tmp_path, "llamacpp", [csv], model="qwen3-30b-a3b")
    two_layers = _two_layer_config(tmp_path)
    assert "layer 3 is not an MoE layer of model" in _bad(tmp_path, "llamacpp", [csv], model=two_layers)


def test_mixed_rank_files_refused(tmp_path):
    rec = cc.recording()
    a = cc.write_sglang(tmp_path / "r0.pt", cc.sglang_records(rec))
    records = cc.sglang_records(rec)
    for r in records:
        r["rank"] = 1
        r["forward_pass_id"] += 100
    b = cc.write_sglang(tmp_path / "r1.pt", records)
    assert "ranks [0, 1]" in _bad(tmp_path, "sglang", [a, b])


def test_bad_request_and_csv_inputs_refused(tmp_path):
    rec = cc.recording()
    resp = cc.sglang_response(rec.prompts[0], rec.decodes[0])
    resp["meta_info"]["routed_experts"] = "not base64!"
    (tmp_path / "r.json").write_text(json.dumps(resp))
    assert "not valid base64" in _bad(tmp_path, "sglang-request", [tmp_path / "r.json"])
    resp = cc.sglang_response(rec.prompts[0], rec.decodes[0])
    resp["meta_info"]["completion_tokens"] = 40
    (tmp_path / "r.json").write_text(json.dumps(resp))
    assert "is it a response of another model" in _bad(tmp_path, "sglang-request", [tmp_path / "r.json"])
    # 3 tokens x 4 layers = 4 tokens x 3 MoE layers: the layer numbering cannot be told apart
    resp = cc.sglang_response(rec.prompts[1][:2], rec.decodes[1][:1], all_layers=True)
    (tmp_path / "r.json").write_text(json.dumps(resp))
    assert "fit 2" in _bad(tmp_path, "sglang-request", [tmp_path / "r.json"])
    np.savez(tmp_path / "v.npz", prompt_routed_experts=rec.prompts[0][:, :2], routed_experts=rec.decodes[0][:, :2])
    assert "2 layers, model tiny has 3 MoE layers" in _bad(tmp_path, "vllm", [tmp_path / "v.npz"])
    (tmp_path / "t.csv").write_text("layer,expert\n1,2\n1,x\n")
    assert "two whole numbers" in _bad(tmp_path, "llamacpp", [tmp_path / "t.csv"])
    (tmp_path / "t.csv").write_text("layer,expert\n1,2\n1,3\n1,4\n1,5\n2,1\n2,2\n2,3\n2,4\n3,1\n3,1\n3,2\n3,3\n")
    assert "routed twice to the same expert" in _bad(tmp_path, "llamacpp", [tmp_path / "t.csv"])
    (tmp_path / "t.csv").write_text("layer,expert\n1,2\n1,3\n1,4\n")
    assert "do not repeat" in _bad(tmp_path, "llamacpp", [tmp_path / "t.csv"])


def test_not_a_dump_and_missing_file(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a torch file")
    assert "not a readable torch.save dump" in _bad(tmp_path, "sglang", [tmp_path / "x.pt"])
    torch.save({"something": 1}, tmp_path / "y.pt")
    assert "not an SGLang expert distribution dump" in _bad(tmp_path, "sglang", [tmp_path / "y.pt"])
    assert "no such input file" in _bad(tmp_path, "sglang", [tmp_path / "missing.pt"])


def test_output_may_not_overwrite_an_input(tmp_path):
    dump = cc.write_sglang(tmp_path / "d.parquet", cc.sglang_records(cc.recording()))
    before = dump.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "tidesim", "trace", "convert", "--from", "sglang", str(dump),
                           "--model", "tiny", "-o", str(dump)], capture_output=True, text=True)
    assert proc.returncode == 2 and dump.read_bytes() == before


def test_missing_torch_is_one_line(tmp_path, monkeypatch):
    dump = cc.write_sglang(tmp_path / "d.pt", cc.sglang_records(cc.recording()))
    monkeypatch.setitem(sys.modules, "torch", None)   # import torch raises ImportError
    with pytest.raises(InputError, match=r"needs torch; install it with pip install 'tidesim\[runtime\]'"):
        convert("sglang", [dump], cc.MODEL)
