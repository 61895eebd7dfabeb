"""Model shapes from a Hugging Face MoE config.json, for every family tidesim knows by name.

Each family spells the same facts differently (experts per layer, experts per token, the routed
expert's FFN width, shared experts, which layers are dense). The field names below are those of
the families' public config classes (transformers: Qwen2MoeConfig, Qwen3MoeConfig, MixtralConfig,
DeepseekV2Config, DeepseekV3Config, OlmoeConfig, GptOssConfig; inclusionAI's LLaDA2.0 and LLaDA-MoE
configuration files); docs/trace-format.md, "Model specs", lists them. Only what decides bytes
and FLOPs per expert, attention and the layer numbering is read; anything that cannot be mapped
onto tidesim's model (MoE layers after a dense prefix) is refused with one line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tidesim.errors import InputError

FAMILIES = ("llada2_moe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "olmoe",
            "gpt_oss", "llada", "lladamoe")


class _Cfg:
    """Field access with one-line errors naming the config file."""

    def __init__(self, cfg: dict[str, Any], source: str) -> None:
        self.cfg = cfg
        self.source = source

    def need(self, *keys: str) -> Any:
        for key in keys:
            if key in self.cfg and self.cfg[key] is not None:
                return self.cfg[key]
        raise InputError(f"{self.source}: config field {keys[0]!r} is missing")

    def get(self, key: str, default: Any) -> Any:
        value = self.cfg.get(key)
        return default if value is None else value


def moe_prefix(source: str, num_layers: int, is_moe: list[bool]) -> int:
    """Dense layers before the first MoE layer, checked to be a prefix: every layer after it is MoE."""
    dense = next((i for i, m in enumerate(is_moe) if m), num_layers)
    later_dense = [i for i in range(dense, num_layers) if not is_moe[i]]
    if dense >= num_layers:
        raise InputError(f"{source}: the config has no MoE layer")
    if later_dense:
        raise InputError(f"{source}: layer {later_dense[0]} is dense after MoE layer {dense}; tidesim models "
                         "dense layers only before the MoE layers (first_k_dense_replace)")
    return dense


def _shared_count(c: _Cfg, shared_width: int, expert_width: int) -> int:
    """Shared experts as a count of routed-expert-sized FFNs (tidesim charges them that way)."""
    if shared_width <= 0:
        return 0
    if shared_width % expert_width:
        raise InputError(f"{c.source}: shared expert width {shared_width} is not a multiple of the routed expert "
                         f"width {expert_width}; tidesim counts shared experts in routed-expert units")
    return shared_width // expert_width


def _common(c: _Cfg) -> dict[str, Any]:
    """Attention, vocabulary and dtype fields, spelled the same in every family."""
    hidden = c.need("hidden_size")
    heads = c.need("num_attention_heads")
    eos = c.get("eos_token_id", 156892)
    if isinstance(eos, list):
        eos = eos[0] if eos else 156892
    return dict(
        hidden_size=hidden, num_heads=heads, num_kv_heads=c.get("num_key_value_heads", heads),
        head_dim=c.get("head_dim", 0) or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int)
                                           and heads > 0 else 0),
        vocab_size=c.need("vocab_size"), dtype=_dtype(c),
        rope_theta=float(c.get("rope_theta", 10000.0)), rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        eos_token_id=int(eos), partial_rotary_factor=float(c.get("partial_rotary_factor", 1.0)),
    )


QUANTIZED = {"fp8": "float8", "mxfp4": "int4"}
"""quantization_config.quant_method -> the weight dtype charged (DeepSeek-V3 ships fp8 weights,
gpt-oss mxfp4 experts; mxfp4 is charged as 4-bit for every weight, its block scales left out)."""


def _dtype(c: _Cfg) -> str:
    quant = c.get("quantization_config", {})
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method in QUANTIZED:
        return QUANTIZED[str(method)]
    return str(c.get("torch_dtype", c.get("dtype", "bfloat16")))


def _llada2(c: _Cfg) -> dict[str, Any]:
    """LLaDA2.0 (llada2_moe), also the reading for configs of no known family."""
    return dict(
        first_dense_layers=c.get("first_k_dense_replace", 0), dense_intermediate_size=c.need("intermediate_size"),
        moe_intermediate_size=c.need("moe_intermediate_size"), num_experts=c.need("num_experts"),
        top_k=c.need("num_experts_per_tok"), num_shared_experts=c.get("num_shared_experts", 0),
        n_group=c.get("n_group", 1), topk_group=c.get("topk_group", 1),
        routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
        mask_token_id=int(c.get("mask_token_id", 156895)),
    )


def _qwen_moe(c: _Cfg) -> dict[str, Any]:
    """Qwen2-MoE / Qwen3-MoE: layer i is MoE unless listed in mlp_only_layers, when (i + 1) is a
    multiple of decoder_sparse_step; Qwen2-MoE adds one shared expert of its own width."""
    layers = c.need("num_hidden_layers")
    step = c.get("decoder_sparse_step", 1)
    only_mlp = set(c.get("mlp_only_layers", []))
    width = c.need("moe_intermediate_size")
    is_moe = [i not in only_mlp and step > 0 and (i + 1) % step == 0 for i in range(layers)]
    return dict(
        first_dense_layers=moe_prefix(c.source, layers, is_moe), dense_intermediate_size=c.need("intermediate_size"),
        moe_intermediate_size=width, num_experts=c.need("num_experts"), top_k=c.need("num_experts_per_tok"),
        num_shared_experts=_shared_count(c, c.get("shared_expert_intermediate_size", 0), width),
    )


def _every_layer(c: _Cfg, experts: tuple[str, ...], top_k: tuple[str, ...]) -> dict[str, Any]:
    """Mixtral, OLMoE, gpt-oss: every layer is MoE and intermediate_size is the expert's width."""
    width = c.need("intermediate_size")
    return dict(first_dense_layers=0, dense_intermediate_size=width, moe_intermediate_size=width,
                num_experts=c.need(*experts), top_k=c.need(*top_k), num_shared_experts=0)


def _deepseek(c: _Cfg) -> dict[str, Any]:
    """DeepSeek-V2/V3: the first first_k_dense_replace layers are dense, then layer i is MoE when
    i % moe_layer_freq == 0. Multi-head latent attention is costed as the decompressed heads:
    num_key_value_heads heads of qk_nope_head_dim + qk_rope_head_dim (docs/trace-format.md)."""
    layers = c.need("num_hidden_layers")
    first = c.get("first_k_dense_replace", 0)
    freq = c.get("moe_layer_freq", 1)
    is_moe = [i >= first and freq > 0 and i % freq == 0 for i in range(layers)]
    out = dict(
        first_dense_layers=moe_prefix(c.source, layers, is_moe), dense_intermediate_size=c.need("intermediate_size"),
        moe_intermediate_size=c.need("moe_intermediate_size"), num_experts=c.need("n_routed_experts"),
        top_k=c.need("num_experts_per_tok"), num_shared_experts=c.get("n_shared_experts", 0),
        n_group=c.get("n_group", 1), topk_group=c.get("topk_group", 1),
        routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
    )
    if "qk_nope_head_dim" in c.cfg or "qk_rope_head_dim" in c.cfg:
        out["head_dim"] = c.need("qk_nope_head_dim") + c.need("qk_rope_head_dim")
    return out


def _llada_moe(c: _Cfg) -> dict[str, Any]:
    """LLaDA-MoE: expert_intermediate_size, dense_intermediate_size, shared_expert_intermediate_size;
    moe_layer_freq is a per-layer list of 0/1 (or one number for every layer). Configs written in
    the OLMoE layout (intermediate_size only) read as OLMoE."""
    if "expert_intermediate_size" not in c.cfg:
        return _every_layer(c, ("num_experts",), ("num_experts_per_tok",))
    layers = c.need("num_hidden_layers")
    freq = c.get("moe_layer_freq", [])
    flags = [bool(f) for f in freq] if isinstance(freq, list) and freq else [True] * layers
    if len(flags) != layers:
        raise InputError(f"{c.source}: moe_layer_freq has {len(flags)} entries for {layers} layers")
    width = c.need("expert_intermediate_size")
    dense = c.get("dense_intermediate_size", -1)
    return dict(
        first_dense_layers=moe_prefix(c.source, layers, flags), moe_intermediate_size=width,
        dense_intermediate_size=dense if isinstance(dense, int) and dense > 0 else width,
        num_experts=c.need("num_experts"), top_k=c.need("num_experts_per_tok"),
        num_shared_experts=_shared_count(c, c.get("shared_expert_intermediate_size", 0), width),
        routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
        n_group=max(int(c.get("router_num_group", 1)), 1), topk_group=max(int(c.get("router_topk_group", 1)), 1),
    )


_READERS: dict[str, Callable[[_Cfg], dict[str, Any]]] = {
    "llada2_moe": _llada2,
    "qwen2_moe": _qwen_moe,
    "qwen3_moe": _qwen_moe,
    "mixtral": lambda c: _every_layer(c, ("num_local_experts",), ("num_experts_per_tok",)),
    "olmoe": lambda c: _every_layer(c, ("num_experts",), ("num_experts_per_tok",)),
    "gpt_oss": lambda c: _every_layer(c, ("num_local_experts", "num_experts"),
                                      ("num_experts_per_tok", "experts_per_token")),
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
    "llada": _llada_moe,
    "lladamoe": _llada_moe,
}


def hf_spec_fields(cfg: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """ModelSpec fields (all but the name) from a config.json dict of any family in FAMILIES;
    an unknown model_type is read with the LLaDA2.0 field names."""
    c = _Cfg(cfg, source)
    family = str(cfg.get("model_type", "llada2_moe"))
    out = _common(c)
    out.update(num_layers=c.need("num_hidden_layers"), n_group=1, topk_group=1, routed_scaling_factor=1.0)
    out.update(_READERS.get(family, _llada2)(c))
    for key in ("n_group", "topk_group", "num_shared_experts"):   # null / 0 / negative: "not grouped" / none
        value = out[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            out[key] = 0 if key == "num_shared_experts" else 1
    return out
