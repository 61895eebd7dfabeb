"""vLLM per-request routing (--enable-return-routed-experts): prompt_routed_experts
[prompt_len, moe_layers, top_k] and routed_experts [gen_len, moe_layers, top_k], int16.

vLLM returns them on each request's output; tidesim reads them saved as (docs/capture.md):
- .npz: `prompt_routed_experts` and `routed_experts` for one request, or `prompt_routed_experts_<i>`
  and `routed_experts_<i>` for requests i = 0, 1, ... (in decode order);
- .json / .jsonl: an object with the two keys as nested lists, or a list of such objects; an
  OpenAI-compatible response of `vllm serve` (prompt_routed_experts on the response,
  routed_experts on each of its choices) reads as one request per choice.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tidesim.errors import InputError
from tidesim.models import ModelSpec
from tidesim.trace.convert.passes import EnginePass, Provenance
from tidesim.trace.convert.requests import note_requests, request_passes
from tidesim.trace.convert.sglang_request import load_json_objects
from tidesim.trace.convert.torchfile import as_array

KEYS = ("prompt_routed_experts", "routed_experts")


def _requests_npz(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            files = {name: z[name] for name in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0][:100]})") from None
    if set(KEYS) <= set(files):
        return [(files[KEYS[0]], files[KEYS[1]])]
    out = []
    i = 0
    while f"{KEYS[0]}_{i}" in files:
        if f"{KEYS[1]}_{i}" not in files:
            raise InputError(f"{path}: {KEYS[0]}_{i} has no {KEYS[1]}_{i}")
        out.append((files[f"{KEYS[0]}_{i}"], files[f"{KEYS[1]}_{i}"]))
        i += 1
    if not out:
        raise InputError(f"{path}: no {KEYS[0]} / {KEYS[1]} arrays (see docs/capture.md for the layout)")
    if len(files) != 2 * len(out):
        raise InputError(f"{path}: arrays beyond {KEYS[0]}_0..{len(out) - 1}: request numbering has a gap")
    return out


def _requests(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    if path.suffix == ".npz":
        return _requests_npz(path)
    out = []
    for n, obj in enumerate(_flat_choices(load_json_objects(path))):
        missing = [k for k in KEYS if obj.get(k) is None]
        if missing:
            raise InputError(f"{path} request {n}: no {missing[0]!r} (see docs/capture.md for the layout)")
        out.append((as_array(obj[KEYS[0]], f"{path} request {n}: {KEYS[0]}"),
                    as_array(obj[KEYS[1]], f"{path} request {n}: {KEYS[1]}")))
    return out


def _flat_choices(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Server responses (routed_experts on each choice) as one object per choice."""
    out: list[dict[str, Any]] = []
    for obj in objects:
        choices = obj.get("choices")
        if KEYS[1] not in obj and isinstance(choices, list) and choices:
            out.extend({KEYS[0]: obj.get(KEYS[0]), KEYS[1]: c.get(KEYS[1]) if isinstance(c, dict) else None}
                       for c in choices)
        else:
            out.append(obj)
    return out


def _moe_layers(arr: np.ndarray, model: ModelSpec, where: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[1] != model.num_moe_layers:
        raise InputError(f"{where}: {arr.shape[1]} layers, model {model.name} has {model.num_moe_layers} MoE "
                         "layers; is it a record of another model?")
    return arr


def read(paths: list[Path], model: ModelSpec, prov: Provenance) -> list[EnginePass]:
    out: list[EnginePass] = []
    for path in paths:
        for n, (prompt, generated) in enumerate(_requests(path)):
            where = f"{path} request {n}"
            prompt = _moe_layers(as_array(prompt, where), model, f"{where} prompt")
            generated = _moe_layers(as_array(generated, where), model, f"{where} generated")
            out.extend(request_passes(prompt, generated, int(generated.shape[0]) if generated.ndim else 0,
                                      model, where))
    note_requests(prov)
    prov.infer("vLLM: routed_experts has one row per output token; each row is one decode pass")
    return out
