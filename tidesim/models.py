"""ModelSpec: the shapes of an MoE diffusion LLM, and the bytes and FLOPs they imply.

Everything the simulator charges for (expert copies, expert FFNs, attention) is derived here from
the architecture, so that a preset and a Hugging Face config.json give the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from tidesim.errors import InputError
from tidesim.hf_config import hf_spec_fields

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1, "int8": 1, "int4": 0.5}


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts of a LLaDA2.0-style MoE model (one shared expert, SwiGLU experts)."""

    name: str
    num_layers: int
    first_dense_layers: int
    hidden_size: int
    dense_intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    num_shared_experts: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    dtype: str = "bfloat16"
    rope_theta: float = 600000.0
    partial_rotary_factor: float = 0.5
    rms_norm_eps: float = 1e-6
    mask_token_id: int = 156895
    eos_token_id: int = 156892

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise InputError(f"model spec {self.name!r}: {problems[0]}")

    def problems(self) -> list[str]:
        """Every inconsistency in the spec, first one first (empty when valid)."""
        out: list[str] = []
        positive = [
            "num_layers", "hidden_size", "dense_intermediate_size", "moe_intermediate_size",
            "num_experts", "top_k", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
            "n_group", "topk_group",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                out.append(f"{name} must be a positive integer, got {value!r}")
        if out:
            return out
        if not 0 <= self.first_dense_layers < self.num_layers:
            out.append("first_dense_layers must lie in [0, num_layers)")
        if self.top_k > self.num_experts:
            out.append("top_k must not exceed num_experts")
        if self.num_experts % self.n_group:
            out.append("num_experts must be divisible by n_group")
        if self.topk_group > self.n_group:
            out.append("topk_group must not exceed n_group")
        if self.num_heads % self.num_kv_heads:
            out.append("num_heads must be a multiple of num_kv_heads")
        if self.dtype not in DTYPE_BYTES:
            out.append(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.num_shared_experts < 0:
            out.append("num_shared_experts must be >= 0")
        return out

    # ----- derived sizes ---------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers

    @property
    def moe_layer_ids(self) -> list[int]:
        """Model layer indices of the MoE layers (layer 0 is dense in LLaDA2.0)."""
        return list(range(self.first_dense_layers, self.num_layers))

    @property
    def bytes_per_param(self) -> float:
        return float(DTYPE_BYTES[self.dtype])

    @property
    def expert_params(self) -> int:
        """gate, up and down projections of one routed expert."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def expert_bytes(self) -> int:
        return int(self.expert_params * self.bytes_per_param)

    @property
    def expert_flops_per_token(self) -> int:
        """Multiply-adds count twice: 2 FLOPs per parameter per token."""
        return 2 * self.expert_params

    @property
    def activation_bytes_per_token(self) -> int:
        """One hidden vector, moved to the CPU and back for CPU-computed experts."""
        return int(self.hidden_size * self.bytes_per_param)

    @property
    def attention_params(self) -> int:
        qkv = self.hidden_size * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        dense = self.num_heads * self.head_dim * self.hidden_size
        return qkv + dense + 2 * self.head_dim

    @property
    def shared_expert_params(self) -> int:
        return self.num_shared_experts * 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def gate_params(self) -> int:
        return self.num_experts * self.hidden_size + self.num_experts

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.dense_intermediate_size

    @property
    def non_expert_params(self) -> int:
        """Everything that stays on the GPU: embeddings, attention, norms, gates, shared
        experts, dense layers and lm_head (not tied)."""
        per_layer_norms = 2 * self.hidden_size
        layers = self.num_layers * (self.attention_params + per_layer_norms)
        layers += self.first_dense_layers * self.dense_mlp_params
        layers += self.num_moe_layers * (self.shared_expert_params + self.gate_params)
        embeddings = 2 * self.vocab_size * self.hidden_size + self.hidden_size
        return layers + embeddings

    @property
    def non_expert_bytes(self) -> int:
        return int(self.non_expert_params * self.bytes_per_param)

    @property
    def routed_expert_bytes_total(self) -> int:
        return self.expert_bytes * self.num_experts * self.num_moe_layers

    @property
    def total_params(self) -> int:
        return self.non_expert_params + self.expert_params * self.num_experts * self.num_moe_layers

    def attention_flops(self, tokens: int, context: int) -> int:
        """FLOPs of one attention layer for `tokens` queries over `context` keys:
        projections (2 per parameter per token) plus scores and weighted sum."""
        proj = 2 * (self.attention_params - 2 * self.head_dim) * tokens
        scores = 4 * self.num_heads * self.head_dim * tokens * context
        return proj + scores

    # ----- (de)serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"model spec has unknown field {unknown[0]!r}")
        missing = sorted(_REQUIRED_FIELDS - set(data))
        if missing:
            raise InputError(f"model spec is missing field {missing[0]!r}")
        return cls(**data)

    @classmethod
    def from_hf_config(cls, path: str | Path, name: str | None = None) -> ModelSpec:
        """Read a Hugging Face MoE config.json (LLaDA2.0, Qwen-MoE, Mixtral, DeepSeek, OLMoE, gpt-oss, LLaDA-MoE)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: no such file; give a config.json or a checkpoint folder") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise InputError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(cfg, name=name or path.parent.name or "custom", source=str(path))

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], name: str, source: str = "config") -> ModelSpec:
        """A spec from a config.json dict of any MoE family tidesim reads (tidesim.hf_config)."""
        return cls(name=name, **hf_spec_fields(cfg, source))

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json fields of the official LLaDA2.0 checkpoints for this spec."""
        return {
            "model_type": "llada2_moe",
            "architectures": ["LLaDA2MoeModelLM"],
            "num_hidden_layers": self.num_layers,
            "first_k_dense_replace": self.first_dense_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.dense_intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.top_k,
            "num_shared_experts": self.num_shared_experts,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "routed_scaling_factor": self.routed_scaling_factor,
            "score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
            "norm_topk_prob": True,
            "torch_dtype": self.dtype,
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "use_qk_norm": True,
            "tie_word_embeddings": False,
            "mask_token_id": self.mask_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.eos_token_id,
        }


_REQUIRED_FIELDS = {
    "name", "num_layers", "first_dense_layers", "hidden_size", "dense_intermediate_size",
    "moe_intermediate_size", "num_experts", "top_k", "num_shared_experts", "num_heads",
    "num_kv_heads", "head_dim", "vocab_size",
}

_COMMON: dict[str, Any] = dict(
    num_experts=256, top_k=8, num_shared_experts=1, first_dense_layers=1, vocab_size=157184,
    n_group=8, topk_group=4, routed_scaling_factor=2.5, dtype="bfloat16", rope_theta=600000.0,
    partial_rotary_factor=0.5, head_dim=128,
)

PRESETS: dict[str, ModelSpec] = {
    "llada2-mini": ModelSpec(
        name="llada2-mini", num_layers=20, hidden_size=2048, dense_intermediate_size=5120,
        moe_intermediate_size=512, num_heads=16, num_kv_heads=4, **_COMMON,
    ),
    "llada2-flash": ModelSpec(
        name="llada2-flash", num_layers=32, hidden_size=4096, dense_intermediate_size=9216,
        moe_intermediate_size=1024, num_heads=32, num_kv_heads=4, **_COMMON,
    ),
    # Small enough to run the reference model on a laptop CPU; used by tests and capture demos.
    "tiny": ModelSpec(
        name="tiny", num_layers=4, first_dense_layers=1, hidden_size=128, dense_intermediate_size=256,
        moe_intermediate_size=64, num_experts=16, top_k=4, num_shared_experts=1, num_heads=4,
        num_kv_heads=2, head_dim=32, vocab_size=512, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, dtype="float32", mask_token_id=511, eos_token_id=510,
    ),
    # Autoregressive MoE models, with the shapes of their published config.json files
    # (Qwen/Qwen3-30B-A3B, deepseek-ai/DeepSeek-V2-Lite on Hugging Face; tidesim.hf_config reads them).
    "qwen3-30b-a3b": ModelSpec(
        name="qwen3-30b-a3b", num_layers=48, first_dense_layers=0, hidden_size=2048, dense_intermediate_size=6144,
        moe_intermediate_size=768, num_experts=128, top_k=8, num_shared_experts=0, num_heads=32, num_kv_heads=4,
        head_dim=128, vocab_size=151936, n_group=1, topk_group=1, routed_scaling_factor=1.0,
        rope_theta=1000000.0, partial_rotary_factor=1.0, eos_token_id=151645,
    ),
    "deepseek-v2-lite": ModelSpec(
        name="deepseek-v2-lite", num_layers=27, first_dense_layers=1, hidden_size=2048,
        dense_intermediate_size=10944, moe_intermediate_size=1408, num_experts=64, top_k=6, num_shared_experts=2,
        num_heads=16, num_kv_heads=16, head_dim=192, vocab_size=102400, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, rope_theta=10000.0, partial_rotary_factor=1.0, eos_token_id=100001,
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_model(name_or_path: str) -> ModelSpec:
    """A preset by name, or a spec from a config.json file or checkpoint folder."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if path.exists():
        return ModelSpec.from_hf_config(path)
    raise InputError(
        f"unknown model {name_or_path!r}; use one of {', '.join(preset_names())} or a config.json path"
    )
