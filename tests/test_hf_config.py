"""Model specs from the config.json of each MoE family, with the families' real field names."""

from __future__ import annotations

import json

import pytest

from tidesim.errors import InputError
from tidesim.hf_config import hf_spec_fields
from tidesim.models import ModelSpec, get_model

QWEN3_30B = {  # Qwen3-30B-A3B
    "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "torch_dtype": "bfloat16", "rope_theta": 1000000.0, "eos_token_id": 151645,
}
QWEN2_A27 = {  # Qwen1.5-MoE-A2.7B: one shared expert 4x the routed width
    "model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4,
    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 151936,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "torch_dtype": "bfloat16",
}
MIXTRAL = {  # Mixtral-8x7B
    "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "torch_dtype": "bfloat16", "eos_token_id": 2,
}
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "n_group": 8, "topk_group": 4,
    "routed_scaling_factor": 2.5, "num_attention_heads": 128, "num_key_value_heads": 128,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "vocab_size": 129280, "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3"},
}
DEEPSEEK_V2_LITE = {
    "model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 1, "topk_group": 1,
    "num_attention_heads": 16, "num_key_value_heads": 16, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "kv_lora_rank": 512, "q_lora_rank": None, "vocab_size": 102400, "torch_dtype": "bfloat16",
}
OLMOE = {  # OLMoE-1B-7B
    "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024, "num_experts": 64,
    "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
    "vocab_size": 50304, "torch_dtype": "bfloat16",
}
GPT_OSS_20B = {
    "model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880, "num_local_experts": 32,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8,
    "head_dim": 64, "vocab_size": 201088, "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "mxfp4"},
}
LLADA_MOE = {  # LLaDA-MoE-7B-A1B
    "model_type": "llada", "hidden_size": 2048, "expert_intermediate_size": 1024,
    "dense_intermediate_size": 8192, "shared_expert_intermediate_size": -1, "num_experts": 64,
    "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
    "vocab_size": 157184, "moe_layer_freq": [1] * 16, "router_num_group": -2, "router_topk_group": -2,
    "torch_dtype": "bfloat16",
}

# (config, experts, top_k, MoE layers, first dense, shared, expert bytes, head_dim): hand computed,
# expert bytes = 3 x hidden x expert width x bytes per weight.
CASES = {
    "qwen3": (QWEN3_30B, 128, 8, 48, 0, 0, 3 * 2048 * 768 * 2, 128),
    "qwen2": (QWEN2_A27, 60, 4, 24, 0, 4, 3 * 2048 * 1408 * 2, 128),
    "mixtral": (MIXTRAL, 8, 2, 32, 0, 0, 3 * 4096 * 14336 * 2, 128),
    "deepseek_v3": (DEEPSEEK_V3, 256, 8, 58, 3, 1, 3 * 7168 * 2048 * 1, 192),
    "deepseek_v2_lite": (DEEPSEEK_V2_LITE, 64, 6, 26, 1, 2, 3 * 2048 * 1408 * 2, 192),
    "olmoe": (OLMOE, 64, 8, 16, 0, 0, 3 * 2048 * 1024 * 2, 128),
    "gpt_oss": (GPT_OSS_20B, 32, 4, 24, 0, 0, 3 * 2880 * 2880 // 2, 64),
    "llada_moe": (LLADA_MOE, 64, 8, 16, 0, 0, 3 * 2048 * 1024 * 2, 128),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_family_shapes(case, tmp_path):
    cfg, experts, top_k, moe_layers, dense, shared, expert_bytes, head_dim = CASES[case]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    spec = get_model(str(path))
    assert (spec.num_experts, spec.top_k, spec.num_moe_layers, spec.first_dense_layers) == (
        experts, top_k, moe_layers, dense)
    assert spec.num_shared_experts == shared
    assert spec.expert_bytes == expert_bytes
    assert spec.head_dim == head_dim
    assert spec.moe_layer_ids[0] == dense and spec.moe_layer_ids[-1] == cfg["num_hidden_layers"] - 1


def test_deepseek_grouped_routing_and_scaling():
    spec = ModelSpec.from_hf_dict(DEEPSEEK_V3, name="dsv3")
    assert (spec.n_group, spec.topk_group, spec.routed_scaling_factor) == (8, 4, 2.5)
    assert spec.dtype == "float8"


def test_ungrouped_families_are_not_grouped():
    assert hf_spec_fields(MIXTRAL)["n_group"] == 1 and hf_spec_fields(OLMOE)["topk_group"] == 1
    assert hf_spec_fields(LLADA_MOE)["n_group"] == 1   # router_num_group -2: not grouped


def test_llada2_reading_unchanged():
    from tidesim.models import PRESETS
    spec = PRESETS["llada2-mini"]
    assert ModelSpec.from_hf_dict(spec.to_hf_dict(), name="llada2-mini") == spec


@pytest.mark.parametrize("cfg, message", [
    ({**QWEN3_30B, "mlp_only_layers": [5]}, "layer 5 is dense after MoE layer 0"),
    ({**QWEN3_30B, "decoder_sparse_step": 2}, "layer 2 is dense after MoE layer 1"),
    ({**DEEPSEEK_V3, "moe_layer_freq": 2}, "dense after MoE layer 4"),
    ({**QWEN2_A27, "shared_expert_intermediate_size": 5000}, "not a multiple of the routed expert width"),
    ({**LLADA_MOE, "moe_layer_freq": [1] * 3}, "moe_layer_freq has 3 entries"),
    ({k: v for k, v in MIXTRAL.items() if k != "num_local_experts"}, "'num_local_experts' is missing"),
    ({k: v for k, v in DEEPSEEK_V3.items() if k != "n_routed_experts"}, "'n_routed_experts' is missing"),
])
def test_unmappable_configs_refused_in_one_line(cfg, message):
    with pytest.raises(InputError, match=message) as err:
        ModelSpec.from_hf_dict(cfg, name="x", source="cfg.json")
    assert "\n" not in str(err.value) and str(err.value).startswith("cfg.json")


@pytest.mark.parametrize("case", ["qwen3", "mixtral", "deepseek_v3", "olmoe", "gpt_oss"])
def test_same_fields_as_transformers_config_classes(case):
    """Where transformers is installed, its config class round-trips our test configs unchanged in
    every field we read (so the names are the real ones)."""
    transformers = pytest.importorskip("transformers")
    cfg = CASES[case][0]
    klass = transformers.AutoConfig.for_model(cfg["model_type"]).__class__
    loaded = klass(**cfg).to_dict()
    assert hf_spec_fields(loaded) == hf_spec_fields(cfg)
