"""Load and save LLaDA2.0 checkpoints in the Hugging Face layout (config.json + *.safetensors).

Honest loading (docs/capture.md, "Checkpoint loading"): config.json is read with the defaults of
the official configuration class (LLaDA2MoeConfig: a missing `use_bias` means True, a missing
`rms_norm_eps` 1e-5, ...); every field of the official config that changes the computation is
honoured (ModelSpec shapes + ModelFlags) or refused with one line naming it; the tensor names in
the files must equal the names the config implies, exactly: a missing, extra or mis-shaped tensor
stops the load before any weight is read. Sharded checkpoints (every *.safetensors in the folder)
load the same way; weights are copied in one tensor at a time (peak memory: model + one tensor).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tidesim.atomic import atomic_path, write_text
from tidesim.errors import InputError
from tidesim.models import ModelSpec
from tidesim_runtime.reference.model import LLaDA2Model, ModelFlags, build_model

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "llada2_moe"

# Defaults of the official configuration class (configuration_llada2_moe.py, LLaDA2MoeConfig),
# applied to fields a config.json leaves out, for the fields that change the computation.
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "use_qkv_bias": False, "use_qk_norm": True, "use_bias": True, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "max_position_embeddings": 16384, "rope_theta": 10000.0,
    "rope_scaling": None, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 0, "partial_rotary_factor": 0.5, "hidden_act": "silu",
    "num_shared_experts": 0,
}
# Fields whose value does not change inference in the official code (read, then left alone).
NO_EFFECT = ("attention_dropout", "embedding_dropout", "output_dropout", "initializer_range", "use_cache",
             "output_router_logits", "pad_token_id", "max_window_layers", "sliding_window", "norm_head",
             "norm_softmax", "use_rmsnorm", "using_split_qkv_in_self_attention", "transformers_version")


@dataclass(frozen=True)
class CheckpointConfig:
    """What config.json says: the spec (cut to the layers asked for), the full spec, the flags."""

    spec: ModelSpec
    full_spec: ModelSpec
    flags: ModelFlags


def read_config(folder: str | Path, num_layers: int | None = None) -> CheckpointConfig:
    """Read and check config.json of a checkpoint folder (InputError, one line, on any problem)."""
    folder = _check_folder(folder)
    return read_config_file(folder / CONFIG_NAME, num_layers, name=folder.name or "checkpoint")


def read_config_file(path: str | Path, num_layers: int | None = None, name: str | None = None) -> CheckpointConfig:
    """Read and check a config.json file (official defaults for missing fields; see module doc)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object")
    cfg = {**OFFICIAL_DEFAULTS, **{k: v for k, v in raw.items() if v is not None or k == "rope_scaling"}}
    _check_flags(cfg, path)
    full = ModelSpec.from_hf_dict(cfg, name=name or path.parent.name or "checkpoint", source=str(path))
    flags = ModelFlags(
        use_bias=bool(cfg["use_bias"]), use_qkv_bias=bool(cfg["use_qkv_bias"]), use_qk_norm=bool(cfg["use_qk_norm"]),
        rope_scaling=_rope_type(cfg["rope_scaling"]), rope_factor=_rope_factor(cfg["rope_scaling"], path),
        max_position_embeddings=int(cfg["max_position_embeddings"]),
        tie_word_embeddings=bool(cfg["tie_word_embeddings"]),
    )
    return CheckpointConfig(with_layers(full, num_layers), full, flags)


def _check_flags(cfg: dict[str, Any], path: Path) -> None:
    """Refuse a config field whose value this model cannot compute the way the official code does."""
    def refuse(field: str, why: str) -> None:
        raise InputError(f"{path}: {field} {json.dumps(cfg.get(field))} {why}")

    if cfg.get("model_type") != MODEL_TYPE:
        refuse("model_type", f"is not {MODEL_TYPE!r}; this loader reads LLaDA2.0 (llada2_moe) checkpoints only")
    if cfg["hidden_act"] != "silu":
        refuse("hidden_act", "is not supported; LLaDA2.0 experts are SwiGLU with silu")
    if cfg.get("score_function", "sigmoid") != "sigmoid":
        refuse("score_function", "is not supported; the LLaDA2.0 router scores with a sigmoid")
    if str(cfg.get("router_dtype", "fp32")) not in ("fp32", "float32"):
        refuse("router_dtype", "is not supported; the LLaDA2.0 router runs in float32")
    if cfg.get("norm_topk_prob", True) is False and int(cfg.get("num_experts_per_tok", 2)) > 1:
        refuse("norm_topk_prob", "cannot be honoured: the official LLaDA2.0 code normalises the top-k weights "
                                 "whenever num_experts_per_tok > 1")
    if cfg.get("use_sliding_window", False):
        refuse("use_sliding_window", "is not supported; LLaDA2.0 attention is block-causal over the whole sequence")
    if not cfg.get("num_experts"):
        refuse("num_experts", "leaves no MoE layer; this loader reads LLaDA2.0 MoE checkpoints only")
    for flag in ("use_bias", "use_qkv_bias", "use_qk_norm", "tie_word_embeddings"):
        if not isinstance(cfg[flag], bool):
            refuse(flag, "must be true or false")
    mpe = cfg["max_position_embeddings"]
    if not isinstance(mpe, int) or isinstance(mpe, bool) or mpe <= 0:
        refuse("max_position_embeddings", "must be a positive integer")
    rs = cfg["rope_scaling"]
    if rs is not None and (not isinstance(rs, dict) or _rope_type(rs) not in (None, "linear", "dynamic")):
        refuse("rope_scaling", "is not supported; the reference model implements null, linear and dynamic")
    head_dim = cfg.get("head_dim") or int(cfg.get("hidden_size", 0)) // max(int(cfg.get("num_attention_heads", 1)), 1)
    prf = cfg["partial_rotary_factor"]
    if not isinstance(prf, int | float) or isinstance(prf, bool) or not 0 <= float(prf) <= 1:
        refuse("partial_rotary_factor", "must lie in [0, 1]")
    if "rotary_dim" in cfg and cfg["rotary_dim"] != int(head_dim * float(prf)):
        refuse("rotary_dim", f"contradicts head_dim x partial_rotary_factor = {int(head_dim * float(prf))} "
                             "(the official code rotates head_dim x partial_rotary_factor channels)")


def _rope_type(rs: Any) -> str | None:
    if not isinstance(rs, dict):
        return None
    kind = rs.get("rope_type", rs.get("type"))
    return None if kind in (None, "default") else str(kind)


def _rope_factor(rs: Any, path: Path) -> float:
    if _rope_type(rs) is None:
        return 1.0
    factor = rs.get("factor")
    if not isinstance(factor, int | float) or isinstance(factor, bool) or not math.isfinite(factor) or factor < 1:
        raise InputError(f"{path}: rope_scaling factor {factor!r} must be a finite number >= 1")
    return float(factor)


def spec_from_checkpoint(folder: str | Path, num_layers: int | None = None) -> ModelSpec:
    """The ModelSpec of a checkpoint folder, optionally cut to its first `num_layers` layers."""
    return read_config(folder, num_layers).spec


def with_layers(spec: ModelSpec, num_layers: int | None, at_most_spec: bool = True) -> ModelSpec:
    """The same architecture with `num_layers` layers (None: unchanged). A checkpoint can only be
    cut (at_most_spec); random weights may also have more layers than the preset."""
    if num_layers is None or num_layers == spec.num_layers:
        return spec
    if num_layers <= spec.first_dense_layers:
        raise InputError(f"--layers {num_layers} leaves no MoE layer in {spec.name}; give more than "
                         f"{spec.first_dense_layers}")
    if at_most_spec and num_layers > spec.num_layers:
        raise InputError(f"--layers {num_layers} exceeds the {spec.num_layers} layers of {spec.name}")
    return dataclasses.replace(spec, num_layers=num_layers, name=f"{spec.name}-{num_layers}layer")


def expected_shapes(spec: ModelSpec, flags: ModelFlags | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor name a checkpoint for (spec, flags) holds, with its shape, in module order
    (a tied lm_head is not stored)."""
    with torch.device("meta"):
        model = LLaDA2Model(spec, flags=flags)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.flags.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def _check_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder}: no such checkpoint folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; give the folder holding config.json and *.safetensors")
    if not (folder / CONFIG_NAME).exists():
        raise InputError(f"{folder}: no {CONFIG_NAME}; is this a Hugging Face LLaDA2.0 checkpoint folder?")
    return folder


def _tensor_index(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Which file holds each tensor name, and its shape (headers only; no weight is read)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder}: no *.safetensors weight files")
    where: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key in where:
                        raise InputError(f"{folder}: tensor {key!r} is stored twice ({where[key][0].name}, {f.name})")
                    where[key] = (f, tuple(handle.get_slice(key).get_shape()))
        except InputError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise InputError(f"{f}: not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    return where


def inspect_checkpoint(
    folder: str | Path, num_layers: int | None = None
) -> tuple[ModelSpec, dict[str, Path], list[str]]:
    """Check names and shapes without reading weights: (spec, tensor -> file for the layers to
    load, []). The names in the files must be exactly those the config implies for all its
    layers; InputError names the first missing, extra or mis-shaped tensor."""
    conf = read_config(folder, num_layers)
    folder = Path(folder)
    where = _tensor_index(folder)
    full = expected_shapes(conf.full_spec, conf.flags)
    optional = _optional_tensors(folder, conf)
    for key, shape in full.items():
        if key not in where:
            if key in optional:
                continue
            raise InputError(f"{folder}: tensor {key!r} is missing from the checkpoint"
                             + _flag_hint(key, conf.flags))
        if where[key][1] != shape:
            raise InputError(f"{folder}: tensor {key!r} has shape {list(where[key][1])}, expected {list(shape)} "
                             f"from {CONFIG_NAME}")
    extra = sorted(k for k in where if k not in full)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise InputError(f"{folder}: tensor {extra[0]!r} is not part of the model {CONFIG_NAME} describes"
                         + more + _flag_hint(extra[0], conf.flags))
    wanted = expected_shapes(conf.spec, conf.flags)
    return conf.spec, {k: where[k][0] for k in wanted if k in where}, []


def _optional_tensors(folder: Path, conf: CheckpointConfig) -> set[str]:
    """expert_bias may be absent when moe_router_enable_expert_bias is false (the official gate
    then keeps zeros)."""
    raw = json.loads((folder / CONFIG_NAME).read_text())
    if raw.get("moe_router_enable_expert_bias", True):
        return set()
    return {f"model.layers.{i}.mlp.gate.expert_bias" for i in conf.full_spec.moe_layer_ids}


def _flag_hint(key: str, flags: ModelFlags) -> str:
    """Which config flag decides whether `key` exists."""
    if key.endswith("attention.dense.bias"):
        return f" (use_bias is {str(flags.use_bias).lower()})"
    if key.endswith("query_key_value.bias"):
        return f" (use_qkv_bias is {str(flags.use_qkv_bias).lower()})"
    if "query_layernorm" in key or "key_layernorm" in key:
        return f" (use_qk_norm is {str(flags.use_qk_norm).lower()})"
    if key == "lm_head.weight":
        return f" (tie_word_embeddings is {str(flags.tie_word_embeddings).lower()})"
    return ""


def load_checkpoint(
    folder: str | Path, dtype: torch.dtype = torch.bfloat16, num_layers: int | None = None
) -> LLaDA2Model:
    """A reference model holding the checkpoint's weights (cast to `dtype`); layers beyond
    `num_layers` are checked but not read."""
    spec, where, _ = inspect_checkpoint(folder, num_layers)
    flags = read_config(folder, num_layers).flags
    model = build_model(spec, dtype, seed=None, flags=flags)
    targets = model.state_dict(keep_vars=True)
    by_file: dict[Path, list[str]] = {}
    for key, path in where.items():
        by_file.setdefault(path, []).append(key)
    with torch.no_grad():
        for _, block in model.moe_blocks():
            block.gate.expert_bias.zero_()
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for key in keys:
                    target = targets[key]
                    target.copy_(handle.get_tensor(key).to(target.dtype))
    return model


def save_checkpoint(model: LLaDA2Model, folder: str | Path) -> Path:
    """Write config.json (spec + flags, every flag explicit) and model.safetensors (official
    names, in the model's dtype) into `folder`, each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.flags.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = {**model.spec.to_hf_dict(), **model.flags.to_hf_dict(),
              "torch_dtype": str(model.dtype).replace("torch.", "")}
    write_text(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
