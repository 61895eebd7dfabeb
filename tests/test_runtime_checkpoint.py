"""Hugging Face checkpoint IO: a tiny checkpoint in the official format (every field of the
released config.json) loads and decodes like the model it came from; every config flag is
honoured or refused with one line naming it; missing, extra or mis-shaped tensors fail with one
line naming them, before any weight is read."""

import json

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from official_rules import official_config  # noqa: E402
from tidesim_runtime.reference.checkpoint import expected_shapes, inspect_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from tidesim_runtime.reference.generate import DecodeConfig, generate  # noqa: E402
from tidesim_runtime.reference.model import ModelFlags, build_model  # noqa: E402

from tidesim.cli import main  # noqa: E402
from tidesim.errors import InputError  # noqa: E402
from tidesim.models import PRESETS  # noqa: E402

SPEC = PRESETS["tiny"]


@pytest.fixture(scope="module")
def model():
    return build_model(SPEC, torch.float32, seed=7)


def write_by_hand(folder, model, drop=None, reshape=None, shards=1, config=None, **overrides):
    """Write config.json (official fields) + safetensors with `json` and `safetensors` directly."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config if config is not None else official_config(SPEC, **overrides)
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = {k: v.clone().contiguous() for k, v in model.state_dict().items() if k != drop}
    if reshape:
        tensors[reshape] = torch.zeros(3, 5)
    keys = list(tensors)
    for s in range(shards):
        part = {k: tensors[k] for k in keys[s::shards]}
        name = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        safetensors_torch.save_file(part, str(folder / name))
    return folder


def decode(m, kv="prefix"):
    cfg = DecodeConfig(gen_length=32, block_length=16, threshold=0.9, kv_cache=kv)
    return generate(m, [3, 1, 4, 1, 5], cfg, SPEC.mask_token_id, SPEC.eos_token_id).sequence


def test_official_names_cover_every_parameter():
    names = set(expected_shapes(SPEC))
    for i in range(SPEC.num_layers):
        assert f"model.layers.{i}.attention.query_key_value.weight" in names
    assert "model.layers.0.mlp.down_proj.weight" in names and "model.layers.0.mlp.gate.weight" not in names
    assert {"model.word_embeddings.weight", "model.norm.weight", "lm_head.weight"} <= names


def test_hand_written_checkpoint_loads_and_decodes_identically(model, tmp_path):
    folder = write_by_hand(tmp_path / "ckpt", model)
    loaded = load_checkpoint(folder, torch.float32)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert decode(loaded) == decode(model)
    assert decode(loaded, "none") == decode(model, "none")


def test_save_checkpoint_round_trip_and_shards(model, tmp_path):
    save_checkpoint(model, tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").exists()
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert cfg["model_type"] == "llada2_moe" and cfg["num_experts"] == SPEC.num_experts
    assert decode(load_checkpoint(tmp_path / "saved", torch.float32)) == decode(model)
    sharded = write_by_hand(tmp_path / "sharded", model, shards=3)
    assert decode(load_checkpoint(sharded, torch.float32)) == decode(model)


def test_layers_cut_reads_only_the_first_layers(model, tmp_path):
    folder = write_by_hand(tmp_path / "ckpt", model)
    cut = load_checkpoint(folder, torch.float32, num_layers=2)
    assert cut.spec.num_layers == 2 and len(cut.model.layers) == 2
    assert torch.equal(cut.model.layers[1].mlp.gate.weight, model.model.layers[1].mlp.gate.weight)


def test_extra_tensors_are_refused_by_name(model, tmp_path):
    folder = write_by_hand(tmp_path / "ckpt", model)
    safetensors_torch.save_file({"model.rotary_emb.inv_freq": torch.ones(4)}, str(folder / "extra.safetensors"))
    with pytest.raises(InputError, match="tensor 'model.rotary_emb.inv_freq' is not part of the model"):
        inspect_checkpoint(folder)


def test_missing_config_flags_take_the_official_class_defaults(model, tmp_path):
    # the official class defaults use_bias to true: a config without it needs attention.dense.bias tensors
    cfg = official_config(SPEC)
    del cfg["use_bias"]
    folder = write_by_hand(tmp_path / "ckpt", model, config=cfg)
    with pytest.raises(InputError, match=r"attention.dense.bias' is missing .*\(use_bias is true\)"):
        inspect_checkpoint(folder)


@pytest.mark.parametrize("flags", [dict(use_bias=True), dict(use_qkv_bias=True), dict(use_qk_norm=False),
                                   dict(use_bias=True, use_qkv_bias=True, tie_word_embeddings=True)],
                         ids=["use_bias", "use_qkv_bias", "no-qk-norm", "biases-tied"])
def test_flag_checkpoints_load_every_tensor_and_decode_identically(tmp_path, flags):
    m = build_model(SPEC, torch.float32, seed=5, flags=ModelFlags(**flags))
    sd = m.state_dict()
    if flags.get("tie_word_embeddings"):
        sd.pop("lm_head.weight")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(official_config(SPEC, **flags)))
    safetensors_torch.save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    loaded = load_checkpoint(folder, torch.float32)
    assert loaded.flags == ModelFlags(**flags)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in m.state_dict().items())
    assert decode(loaded) == decode(m)


def test_expert_bias_may_be_absent_when_the_config_disables_it(model, tmp_path):
    drop = [f"model.layers.{i}.mlp.gate.expert_bias" for i in SPEC.moe_layer_ids]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(official_config(SPEC, moe_router_enable_expert_bias=False)))
    safetensors_torch.save_file({k: v.clone().contiguous() for k, v in model.state_dict().items() if k not in drop},
                                str(folder / "model.safetensors"))
    loaded = load_checkpoint(folder, torch.float32)
    assert all(float(b.gate.expert_bias.abs().sum()) == 0 for _, b in loaded.moe_blocks())


@pytest.mark.parametrize("override, words", [
    (dict(model_type="llama"), "model_type \"llama\" is not 'llada2_moe'"),
    (dict(hidden_act="gelu"), "hidden_act \"gelu\" is not supported"),
    (dict(norm_topk_prob=False), "norm_topk_prob false cannot be honoured"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling .* is not supported"),
    (dict(rope_scaling={"type": "linear"}), "rope_scaling factor None"),
    (dict(score_function="softmax"), "score_function \"softmax\" is not supported"),
    (dict(use_sliding_window=True), "use_sliding_window true is not supported"),
    (dict(rotary_dim=32), "rotary_dim 32 contradicts"),
    (dict(use_bias="yes"), "use_bias \"yes\" must be true or false"),
])
def test_flags_that_cannot_be_honoured_are_refused_by_name(model, tmp_path, override, words):
    folder = write_by_hand(tmp_path / "ckpt", model, **override)
    with pytest.raises(InputError, match=words):
        load_checkpoint(folder)


def test_bf16_checkpoint_loads_in_bf16(tmp_path):
    m = build_model(SPEC, torch.bfloat16, seed=6)
    save_checkpoint(m, tmp_path / "bf16")
    loaded = load_checkpoint(tmp_path / "bf16", torch.bfloat16)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in m.state_dict().items())
    assert loaded.model.layers[1].mlp.gate.expert_bias.dtype == torch.bfloat16


def test_missing_tensor_is_named(model, tmp_path):
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    folder = write_by_hand(tmp_path / "ckpt", model, drop=name)
    with pytest.raises(InputError, match=f"tensor '{name}' is missing"):
        load_checkpoint(folder)


def test_misshaped_tensor_is_named(model, tmp_path):
    name = "model.layers.1.mlp.gate.expert_bias"
    folder = write_by_hand(tmp_path / "ckpt", model, reshape=name)
    with pytest.raises(InputError, match=rf"tensor '{name}' has shape \[3, 5\], expected \[16\]"):
        load_checkpoint(folder)


@pytest.mark.parametrize("problem", ["missing", "misshaped", "nodir", "noconfig", "noweights", "extra",
                                     "model_type", "flag", "layers"])
def test_capture_command_exit_2_one_line_no_output(model, tmp_path, capsys, problem):
    folder = tmp_path / "ckpt"
    if problem == "missing":
        write_by_hand(folder, model, drop="lm_head.weight")
    elif problem == "misshaped":
        write_by_hand(folder, model, reshape="model.norm.weight")
    elif problem == "noconfig":
        write_by_hand(folder, model)
        (folder / "config.json").unlink()
    elif problem == "noweights":
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(official_config(SPEC)))
    elif problem == "extra":
        write_by_hand(folder, model)
        safetensors_torch.save_file({"model.layers.1.attention.dense.bias": torch.zeros(SPEC.hidden_size)},
                                    str(folder / "more.safetensors"))
    elif problem == "model_type":
        write_by_hand(folder, model, model_type="qwen2_moe")
    elif problem == "flag":
        write_by_hand(folder, model, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    elif problem == "layers":
        write_by_hand(folder, model)
    out = tmp_path / "t.parquet"
    extra = ["--layers", "9"] if problem == "layers" else []
    rc = main(["trace", "capture", "--model-dir", str(folder), "--prompt-tokens", "4", "--gen-length", "8",
               "--block-length", "4", "-o", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("tidesim: error:")
    expected = {"missing": "'lm_head.weight' is missing", "misshaped": "'model.norm.weight' has shape",
                "nodir": "no such folder", "noconfig": "no config.json", "noweights": "no *.safetensors",
                "extra": "'model.layers.1.attention.dense.bias' is not part of the model config.json describes "
                         "(use_bias is false)",
                "model_type": "model_type \"qwen2_moe\"", "flag": "rope_scaling",
                "layers": "--layers 9 exceeds the 4 layers"}[problem]
    assert expected in err
    assert not out.exists() and not list(tmp_path.glob(".t.parquet*"))


def test_capture_command_from_checkpoint_decodes_like_the_model(model, tmp_path, capsys):
    folder = write_by_hand(tmp_path / "ckpt", model)
    prompts = tmp_path / "p.txt"
    prompts.write_text("3 1 4 1 5\n")
    rc = main(["trace", "capture", "--model-dir", str(folder), "--prompts", str(prompts), "--gen-length", "32",
               "--block-length", "16", "--threshold", "0.9", "--kv-cache", "prefix", "-o",
               str(tmp_path / "t.parquet"), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    expected = decode(model)
    if SPEC.eos_token_id in expected:
        expected = expected[: expected.index(SPEC.eos_token_id) + 1]
    assert report["tokens"] == [expected]
    assert report["weights"] == "checkpoint ckpt"
