import json

import pytest

from tidesim.errors import InputError
from tidesim.models import PRESETS, ModelSpec, get_model


def test_expert_sizes_match_published_figures():
    # docs/sources.md: 3 x hidden x moe_inter parameters; 6.3 MB (mini) and 25.2 MB (flash) in bf16
    mini, flash = PRESETS["llada2-mini"], PRESETS["llada2-flash"]
    assert mini.expert_params == 3 * 2048 * 512
    assert mini.expert_bytes == 3 * 2048 * 512 * 2 == 6_291_456
    assert flash.expert_bytes == 3 * 4096 * 1024 * 2 == 25_165_824
    assert mini.num_moe_layers == 19 and flash.num_moe_layers == 31
    assert mini.moe_layer_ids[0] == 1 and mini.moe_layer_ids[-1] == 19


def test_total_parameters_close_to_published():
    # 16B and 100B total parameters (published, rounded); all routed experts ~30.6 GB and ~200 GB
    assert PRESETS["llada2-mini"].total_params == pytest.approx(16e9, rel=0.05)
    assert PRESETS["llada2-flash"].total_params == pytest.approx(100e9, rel=0.05)
    assert PRESETS["llada2-mini"].routed_expert_bytes_total == pytest.approx(30.6e9, rel=0.01)
    assert PRESETS["llada2-flash"].routed_expert_bytes_total == pytest.approx(200e9, rel=0.01)


def test_expert_flops_and_attention_flops_hand_computed():
    tiny = PRESETS["tiny"]
    assert tiny.expert_flops_per_token == 2 * 3 * 128 * 64
    # qkv rows (4 + 2*2) * 32 = 256 -> 128*256 params; dense 4*32*128; projections 2 FLOPs/param/token
    proj = 2 * (128 * 256 + 128 * 128)
    assert tiny.attention_flops(tokens=3, context=10) == proj * 3 + 4 * 4 * 32 * 3 * 10


def test_hf_config_round_trip(tmp_path):
    spec = PRESETS["llada2-flash"]
    (tmp_path / "config.json").write_text(json.dumps(spec.to_hf_dict()))
    loaded = ModelSpec.from_hf_config(tmp_path, name="llada2-flash")
    assert loaded == spec


def test_hf_config_list_eos_and_defaults(tmp_path):
    cfg = PRESETS["llada2-mini"].to_hf_dict()
    cfg["eos_token_id"] = [156892, 156893]
    del cfg["head_dim"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    spec = ModelSpec.from_hf_config(path)
    assert spec.eos_token_id == 156892 and spec.head_dim == 2048 // 16


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.pop("moe_intermediate_size"), "moe_intermediate_size"),
        (lambda c: c.update(num_experts_per_tok=300), "top_k"),
        (lambda c: c.update(hidden_size=-4), "hidden_size"),
    ],
)
def test_bad_hf_config_fails_with_one_line(tmp_path, mutate, message):
    cfg = PRESETS["llada2-mini"].to_hf_dict()
    mutate(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=message) as err:
        ModelSpec.from_hf_config(tmp_path)
    assert "\n" not in str(err.value)


def test_not_json_and_missing(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        ModelSpec.from_hf_config(tmp_path)
    with pytest.raises(InputError, match="no such file"):
        ModelSpec.from_hf_config(tmp_path / "missing.json")


def test_get_model_unknown_name():
    with pytest.raises(InputError, match="unknown model"):
        get_model("llada3-giant")
    assert get_model("llada2-mini") is PRESETS["llada2-mini"]


def test_dict_round_trip_and_unknown_field():
    spec = PRESETS["tiny"]
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(InputError, match="unknown field"):
        ModelSpec.from_dict({**spec.to_dict(), "colour": "red"})
    data = spec.to_dict()
    del data["hidden_size"]
    with pytest.raises(InputError, match="hidden_size"):
        ModelSpec.from_dict(data)
