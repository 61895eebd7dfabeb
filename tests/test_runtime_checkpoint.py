"""Hugging Face checkpoint IO: a tiny checkpoint in the official naming scheme loads and decodes
like the model it came from; missing or mis-shaped tensors fail with one line naming them."""

import json

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from tidesim_runtime.checkpoint import expected_shapes, inspect_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from tidesim_runtime.generate import DecodeConfig, generate  # noqa: E402
from tidesim_runtime.model import build_model  # noqa: E402

from tidesim.cli import main  # noqa: E402
from tidesim.errors import InputError  # noqa: E402
from tidesim.models import PRESETS  # noqa: E402

SPEC = PRESETS["tiny"]


@pytest.fixture(scope="module")
def model():
    return build_model(SPEC, torch.float32, seed=7)


def write_by_hand(folder, model, drop=None, reshape=None, shards=1):
    """Write config.json + safetensors with the `safetensors` package directly (not save_checkpoint)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(SPEC.to_hf_dict()))
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


def test_extra_tensors_are_ignored_and_reported(model, tmp_path):
    folder = write_by_hand(tmp_path / "ckpt", model)
    safetensors_torch.save_file({"model.rotary_emb.inv_freq": torch.ones(4)}, str(folder / "extra.safetensors"))
    _, _, extra = inspect_checkpoint(folder)
    assert extra == ["model.rotary_emb.inv_freq"]


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


@pytest.mark.parametrize("problem", ["missing", "misshaped", "nodir", "noconfig", "noweights"])
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
        (folder / "config.json").write_text(json.dumps(SPEC.to_hf_dict()))
    out = tmp_path / "t.parquet"
    rc = main(["trace", "capture", "--model-dir", str(folder), "--prompt-tokens", "4", "--gen-length", "8",
               "--block-length", "4", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("tidesim: error:")
    expected = {"missing": "'lm_head.weight' is missing", "misshaped": "'model.norm.weight' has shape",
                "nodir": "no such folder", "noconfig": "no config.json", "noweights": "no *.safetensors"}[problem]
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
        expected = expected[: expected.index(SPEC.eos_token_id)]
    assert report["tokens"] == [expected]
    assert report["weights"] == "checkpoint ckpt"
