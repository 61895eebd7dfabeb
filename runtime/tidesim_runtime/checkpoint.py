"""Load and save LLaDA2.0 checkpoints in the Hugging Face layout (config.json + *.safetensors).

The reference model's state_dict keys are the official parameter names, so saving is
`state_dict -> safetensors` and loading checks every expected name and shape *before* reading any
weight, then copies tensors in one at a time (peak memory: the model plus one tensor). Sharded
checkpoints (model-00001-of-000NN.safetensors + index) load the same way: every *.safetensors file
in the folder is scanned. Extra tensors in the files are ignored (reported by `inspect_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tidesim.atomic import atomic_path, write_text
from tidesim.errors import InputError
from tidesim.models import ModelSpec
from tidesim_runtime.model import LLaDA2Model, build_model

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def spec_from_checkpoint(folder: str | Path, num_layers: int | None = None) -> ModelSpec:
    """The ModelSpec of a checkpoint folder, optionally cut to its first `num_layers` layers."""
    folder = _check_folder(folder)
    spec = ModelSpec.from_hf_config(folder / CONFIG_NAME, name=folder.name or "checkpoint")
    return with_layers(spec, num_layers)


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


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every parameter name of the model for `spec`, with its shape, in module order."""
    with torch.device("meta"):
        model = LLaDA2Model(spec)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder}: no such checkpoint folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; give the folder holding config.json and *.safetensors")
    if not (folder / CONFIG_NAME).exists():
        raise InputError(f"{folder}: no {CONFIG_NAME}; is this a Hugging Face LLaDA2.0 checkpoint folder?")
    return folder


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Which file holds each tensor name."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder}: no *.safetensors weight files")
    where: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    where.setdefault(key, f)
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise InputError(f"{f}: not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    return where


def _shape_of(path: Path, key: str) -> tuple[int, ...]:
    with safe_open(str(path), framework="pt") as handle:
        return tuple(handle.get_slice(key).get_shape())


def inspect_checkpoint(
    folder: str | Path, num_layers: int | None = None
) -> tuple[ModelSpec, dict[str, Path], list[str]]:
    """Check names and shapes without reading weights: (spec, tensor -> file, ignored extra names).

    Raises InputError naming the first missing or mis-shaped tensor.
    """
    spec = spec_from_checkpoint(folder, num_layers)
    folder = Path(folder)
    where = _tensor_files(folder)
    expected = expected_shapes(spec)
    for key, shape in expected.items():
        if key not in where:
            raise InputError(f"{folder}: tensor {key!r} is missing from the checkpoint")
        got = _shape_of(where[key], key)
        if got != shape:
            raise InputError(f"{folder}: tensor {key!r} has shape {list(got)}, expected {list(shape)} "
                             f"from {CONFIG_NAME}")
    extra = sorted(k for k in where if k not in expected)
    return spec, {k: where[k] for k in expected}, extra


def load_checkpoint(
    folder: str | Path, dtype: torch.dtype = torch.bfloat16, num_layers: int | None = None
) -> LLaDA2Model:
    """A reference model holding the checkpoint's weights (cast to `dtype`); layers beyond
    `num_layers` are not read."""
    spec, where, _ = inspect_checkpoint(folder, num_layers)
    model = build_model(spec, dtype, seed=None)
    targets = model.state_dict(keep_vars=True)
    by_file: dict[Path, list[str]] = {}
    for key, path in where.items():
        by_file.setdefault(path, []).append(key)
    with torch.no_grad():
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for key in keys:
                    target = targets[key]
                    target.copy_(handle.get_tensor(key).to(target.dtype))
    return model


def save_checkpoint(model: LLaDA2Model, folder: str | Path) -> Path:
    """Write config.json and model.safetensors (official names) into `folder`, each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = model.spec.to_hf_dict()
    write_text(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
