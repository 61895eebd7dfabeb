"""SGLang per-request routing: a /generate response with return_routed_experts, whose
meta_info["routed_experts"] is base64 of the flattened int32 array [tokens, layers, top_k].

Input files: JSON holding one response object, a list of them, or one per line (JSON Lines), as
saved from the HTTP API or `Engine.generate`.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

import numpy as np

from tidesim.errors import InputError
from tidesim.models import ModelSpec
from tidesim.trace.convert.passes import EnginePass, Provenance
from tidesim.trace.convert.requests import note_requests, request_passes


def load_json_objects(path: Path) -> list[dict[str, Any]]:
    """A JSON object, a list of objects, or JSON Lines."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text (JSON) file") from None
    try:
        data = json.loads(text)
        items = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        try:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not JSON or JSON Lines ({exc.msg} at line {exc.lineno})") from None
    if not items or not all(isinstance(i, dict) for i in items):
        raise InputError(f"{path}: expected JSON objects (one response each)")
    return items


def _shape(n: int, prompt: int, completion: int, model: ModelSpec, where: str) -> tuple[int, int]:
    """(tokens, layers) of a flattened array of n ids: the one combination of tokens (prompt +
    completion, or one fewer: the last output token never runs) and layers (MoE layers, or every
    layer) that fits; anything else is refused as ambiguous."""
    k = model.top_k
    fits = sorted({(t, layer) for t in (prompt + completion - 1, prompt + completion)
                   for layer in (model.num_moe_layers, model.num_layers) if t > 0 and t * layer * k == n})
    if len(fits) != 1:
        why = "none" if not fits else f"{len(fits)} ({fits})"
        raise InputError(f"{where}: {n} routed ids fit {why} of tokens {prompt}+{completion}(-1) x layers "
                         f"{model.num_moe_layers} or {model.num_layers} x top_k {k} of model {model.name}; "
                         "is it a response of another model?")
    return fits[0]


def _decode(obj: dict[str, Any], model: ModelSpec, where: str) -> tuple[np.ndarray, int, int]:
    info = obj.get("meta_info", obj)
    raw = info.get("routed_experts") if isinstance(info, dict) else None
    if not isinstance(raw, str):
        raise InputError(f"{where}: no meta_info.routed_experts string; send the request with "
                         "return_routed_experts and a server started with --enable-return-routed-experts")
    try:
        prompt, completion = int(info["prompt_tokens"]), int(info["completion_tokens"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{where}: meta_info needs prompt_tokens and completion_tokens") from None
    try:
        buf = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{where}: routed_experts is not valid base64") from None
    if len(buf) % 4:
        raise InputError(f"{where}: routed_experts holds {len(buf)} bytes, not whole int32 values")
    flat = np.frombuffer(buf, dtype="<i4")
    tokens, layers = _shape(flat.size, prompt, completion, model, where)
    arr = flat.reshape(tokens, layers, model.top_k).astype(np.int64)
    if layers != model.num_moe_layers:
        dense = arr[:, :model.first_dense_layers]
        if (dense != -1).any():
            raise InputError(f"{where}: dense layers hold expert ids; the layer numbering does not match model "
                             f"{model.name}")
        arr = arr[:, model.first_dense_layers:]
    return arr, prompt, completion


def read(paths: list[Path], model: ModelSpec, prov: Provenance) -> list[EnginePass]:
    out: list[EnginePass] = []
    for path in paths:
        for n, obj in enumerate(load_json_objects(path)):
            where = f"{path} response {n}"
            arr, prompt, completion = _decode(obj, model, where)
            out.extend(request_passes(arr[:prompt], arr[prompt:], completion, model, where))
    note_requests(prov)
    return out
