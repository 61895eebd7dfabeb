"""Tiny routing records in each engine's documented layout, written by the tests.

One routing (the `Recording`) is written in every layout, so each converter can be checked
against the same hand-made expectation: prompts decoded one after another, each a prefill of
`prompt` tokens then one decode pass per further output token.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tidesim.models import PRESETS, ModelSpec

MODEL: ModelSpec = PRESETS["tiny"]     # 4 layers, layer 0 dense, 3 MoE layers, 16 experts, top 4


@dataclass
class Recording:
    """Per request: prompt ids [P, L, k] and decode ids [D, L, k] (logical, MoE layers only)."""

    prompts: list[np.ndarray]
    decodes: list[np.ndarray]
    model: ModelSpec = MODEL

    def expected_counts(self) -> np.ndarray:
        """[forwards, L, E] in forward order, counted with a plain loop (independent of bincount)."""
        out = []
        for p, d in zip(self.prompts, self.decodes, strict=True):
            for ids in [p, *[d[j:j + 1] for j in range(d.shape[0])]]:
                c = np.zeros((self.model.num_moe_layers, self.model.num_experts), dtype=np.int64)
                for t in range(ids.shape[0]):
                    for layer in range(ids.shape[1]):
                        for e in ids[t, layer]:
                            c[layer, e] += 1
                out.append(c)
        return np.stack(out)


def routing(rng: np.random.Generator, tokens: int, model: ModelSpec = MODEL) -> np.ndarray:
    """[tokens, MoE layers, top_k] distinct expert ids per token and layer."""
    keys = rng.random((tokens, model.num_moe_layers, model.num_experts))
    return np.argsort(keys, axis=-1)[..., :model.top_k].astype(np.int64)


def recording(seed: int = 0, prompts: tuple[int, ...] = (5, 3), decodes: tuple[int, ...] = (4, 2)) -> Recording:
    rng = np.random.default_rng(seed)
    return Recording([routing(rng, n) for n in prompts], [routing(rng, n) for n in decodes])


# ----- SGLang expert distribution recorder (per_token, stat) -----------------------------------
SLOTS = 8   # the recorder's fixed top-k width, padded with -1


def sglang_record(ids: np.ndarray, positions: np.ndarray, extend: list[int] | None, pass_id: int,
                  model: ModelSpec = MODEL, rank: int = 0) -> dict[str, object]:
    """One per_token record: topk_ids_of_layer int32 [layers, tokens, 8], -1 in dense layers and
    slots beyond top_k."""
    import torch

    tokens = ids.shape[0]
    full = np.full((model.num_layers, tokens, SLOTS), -1, dtype=np.int32)
    full[model.first_dense_layers:, :, :model.top_k] = ids.transpose(1, 0, 2)
    return {"forward_pass_id": pass_id, "rank": rank, "gatherer_key": "primary",
            "input_ids": list(range(tokens)), "positions": torch.tensor(positions, dtype=torch.int64).tolist(),
            "extend_seq_lens": extend, "forward_mode": 1 if extend is not None else 2,
            "topk_ids_of_layer": torch.tensor(full), "misc_objects": [],
            "global_physical_count": torch.zeros((model.num_layers, model.num_experts), dtype=torch.int32)}


def sglang_records(rec: Recording) -> list[dict[str, object]]:
    out = []
    for p, d in zip(rec.prompts, rec.decodes, strict=True):
        P = p.shape[0]
        out.append(sglang_record(p, np.arange(P), [P], len(out), rec.model))
        for j in range(d.shape[0]):
            out.append(sglang_record(d[j:j + 1], np.array([P + j]), None, len(out), rec.model))
    return out


def physical_map(model: ModelSpec = MODEL, physical: int | None = None) -> object:
    """last_physical_to_logical_map [layers, physical]: identity, then redundant copies of expert 0.."""
    import torch

    physical = physical or model.num_experts
    row = np.r_[np.arange(model.num_experts), np.arange(physical - model.num_experts)]
    return torch.tensor(np.tile(row, (model.num_layers, 1)))


def write_sglang(path: Path, records: list[dict[str, object]], mapping: object = None) -> Path:
    import torch

    torch.save({"records": records, "last_physical_to_logical_map": physical_map() if mapping is None else mapping},
               path)
    return path


def write_sglang_stat(path: Path, rec: Recording) -> Path:
    import torch

    counts = rec.expected_counts()
    full = np.zeros((counts.shape[0], MODEL.num_layers, MODEL.num_experts), dtype=np.int32)
    full[:, MODEL.first_dense_layers:] = counts
    torch.save({"rank": 0, "logical_count": torch.tensor(full), "average_utilization_rate_over_window": None}, path)
    return path


# ----- SGLang per request ----------------------------------------------------------------------
def sglang_response(prompt: np.ndarray, decode: np.ndarray, all_layers: bool = False,
                    model: ModelSpec = MODEL) -> dict[str, object]:
    """A /generate response: routed_experts = base64 of int32 [prompt + decode rows, layers, k];
    completion_tokens = decode rows + 1 (the last output token never runs)."""
    ids = np.concatenate([prompt, decode])
    if all_layers:
        dense = np.full((ids.shape[0], model.first_dense_layers, model.top_k), -1)
        ids = np.concatenate([dense, ids], axis=1)
    raw = base64.b64encode(ids.astype("<i4").tobytes()).decode()
    return {"text": "...", "meta_info": {"prompt_tokens": prompt.shape[0], "completion_tokens": decode.shape[0] + 1,
                                         "routed_experts": raw}}


def write_sglang_requests(path: Path, rec: Recording, all_layers: bool = False) -> Path:
    path.write_text(json.dumps([sglang_response(p, d, all_layers) for p, d in zip(rec.prompts, rec.decodes,
                                                                                 strict=True)]))
    return path


# ----- vLLM ------------------------------------------------------------------------------------
def write_vllm_npz(path: Path, rec: Recording) -> Path:
    arrays = {}
    for i, (p, d) in enumerate(zip(rec.prompts, rec.decodes, strict=True)):
        arrays[f"prompt_routed_experts_{i}"] = p.astype(np.int16)
        arrays[f"routed_experts_{i}"] = d.astype(np.int16)
    np.savez(path, **arrays)   # type: ignore[arg-type]
    return path


def write_vllm_json(path: Path, rec: Recording) -> Path:
    path.write_text(json.dumps([{"prompt_routed_experts": p.tolist(), "routed_experts": d.tolist()}
                                for p, d in zip(rec.prompts, rec.decodes, strict=True)]))
    return path


# ----- llama.cpp moe-trace ---------------------------------------------------------------------
def llamacpp_rows(ids: np.ndarray, model: ModelSpec = MODEL) -> list[str]:
    """One pass: for each MoE layer, every token's k slots, as `layer,expert` rows."""
    rows = []
    for layer_index, layer in enumerate(model.moe_layer_ids):
        for t in range(ids.shape[0]):
            rows.extend(f"{layer},{e}" for e in ids[t, layer_index])
    return rows


def write_llamacpp(path: Path, rec: Recording, header: bool = True) -> Path:
    rows = ["layer,expert"] if header else []
    for p, d in zip(rec.prompts, rec.decodes, strict=True):
        rows += llamacpp_rows(p)
        for j in range(d.shape[0]):
            rows += llamacpp_rows(d[j:j + 1])
    path.write_text("\n".join(rows) + "\n")
    return path
