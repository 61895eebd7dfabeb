"""SGLang's expert distribution recorder dumps (python/sglang/srt/eplb/expert_distribution.py).

per_token mode: one torch.save file per rank, {"records": [...], "last_physical_to_logical_map":
int [layers, physical experts]}; each record holds forward_pass_id, rank, gatherer_key,
input_ids, positions, extend_seq_lens (None for a decode pass), forward_mode and
topk_ids_of_layer int32 [layers, tokens, 8] (every model layer; -1 where a layer or slot routed
nothing), in physical expert ids.
stat mode: {"rank", "logical_count": int [passes, layers, logical experts], ...}: counts only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tidesim.errors import InputError
from tidesim.models import ModelSpec
from tidesim.trace.convert.passes import EnginePass, Provenance, check_ids
from tidesim.trace.convert.torchfile import as_array, load_torch_file


def read(paths: list[Path], model: ModelSpec, prov: Provenance) -> list[EnginePass]:
    dumps = [(path, load_torch_file(path)) for path in paths]
    kinds = set()
    for path, data in dumps:
        if not isinstance(data, dict) or not ({"records", "logical_count"} & set(data)):
            raise InputError(f"{path}: not an SGLang expert distribution dump (no 'records' or 'logical_count')")
        kinds.add("stat" if "logical_count" in data else "per_token")
    if len(kinds) > 1:
        raise InputError("the inputs mix stat and per_token dumps; convert one recorder mode at a time")
    if kinds == {"stat"}:
        return _stat(dumps, model, prov)
    return _per_token(dumps, model, prov)


def _layer_rows(arr: np.ndarray, model: ModelSpec, where: str, empty: int | None) -> np.ndarray:
    """The MoE layers' rows of an array indexed by model layer; dense layers' rows must hold only
    `empty` (-1 for ids, 0 for counts; None: not checked)."""
    if arr.shape[0] != model.num_layers:
        raise InputError(f"{where}: {arr.shape[0]} layers, model {model.name} has {model.num_layers}; "
                         "is it a dump of another model?")
    dense = arr[:model.first_dense_layers]
    if empty is not None and dense.size and (dense != empty).any():
        raise InputError(f"{where}: dense layer rows hold routing; the dump's layer numbering does not match model "
                         f"{model.name} (dense layers 0..{model.first_dense_layers - 1})")
    return arr[model.first_dense_layers:]


def _physical_map(data: dict[str, Any], path: Path, model: ModelSpec, prov: Provenance) -> np.ndarray | None:
    """[MoE layers, physical] physical -> logical ids, or None when they are the same."""
    raw = data.get("last_physical_to_logical_map")
    if raw is None:
        prov.infer("no last_physical_to_logical_map: expert ids taken as logical ids")
        return None
    table = _layer_rows(as_array(raw, f"{path}: last_physical_to_logical_map"), model, str(path), None)
    if table.ndim != 2:
        raise InputError(f"{path}: last_physical_to_logical_map must be [layers, physical experts]")
    if table.shape[1] == model.num_experts and (table == np.arange(model.num_experts)).all():
        return None
    if table.min() < 0 or table.max() >= model.num_experts:
        raise InputError(f"{path}: last_physical_to_logical_map names experts outside the model's "
                         f"{model.num_experts}")
    prov.infer("physical expert ids mapped to logical ids with last_physical_to_logical_map (the map at dump "
               "time; an EPLB rebalance during the recording would misattribute earlier passes)")
    return table


def _record_pass(rec: dict[str, Any], where: str, model: ModelSpec, table: np.ndarray | None) -> EnginePass:
    for key in ("topk_ids_of_layer", "input_ids", "positions"):
        if key not in rec:
            raise InputError(f"{where}: no {key!r}; record with --expert-distribution-recorder-mode per_token")
    topk = as_array(rec["topk_ids_of_layer"], f"{where}: topk_ids_of_layer")
    if topk.ndim != 3:
        raise InputError(f"{where}: topk_ids_of_layer must be [layers, tokens, slots], got {topk.ndim} dimensions")
    k = model.top_k
    if topk.shape[2] < k:
        raise InputError(f"{where}: {topk.shape[2]} routing slots, model {model.name} routes {k}")
    if (topk[:, :, k:] != -1).any():
        raise InputError(f"{where}: slots beyond top_k {k} hold expert ids; is it a dump of another model?")
    moe = _layer_rows(topk[:, :, :k], model, where, -1)
    tokens = moe.shape[1]
    positions = as_array(rec["positions"], f"{where}: positions")
    if len(rec["input_ids"]) != tokens or positions.shape != (tokens,):
        raise InputError(f"{where}: {tokens} routed tokens but {len(rec['input_ids'])} input ids and "
                         f"{positions.size} positions")
    ids = moe.transpose(1, 0, 2)
    if table is not None:
        if ids.size and (ids.min() < 0 or ids.max() >= table.shape[1]):
            raise InputError(f"{where}: physical expert id out of range [0, {table.shape[1]})")
        ids = table[np.arange(table.shape[0])[None, :, None], np.maximum(ids, 0)] if ids.size else ids
    ids = check_ids(ids, model, where)
    lens = rec.get("extend_seq_lens")
    if lens is None:
        return EnginePass(ids, "decode", positions=positions, sequences=tokens)
    seq = [int(x) for x in lens]
    if sum(seq) != tokens:
        raise InputError(f"{where}: extend_seq_lens sum to {sum(seq)}, the pass has {tokens} tokens")
    return EnginePass(ids, "prefill", positions=positions, sequences=len(seq))


def _per_token(dumps: list[tuple[Path, Any]], model: ModelSpec, prov: Provenance) -> list[EnginePass]:
    keyed: list[tuple[int, EnginePass]] = []
    ranks: set[int] = set()
    modes: set[str] = set()
    for path, data in dumps:
        records = data["records"]
        if not isinstance(records, list):
            raise InputError(f"{path}: 'records' must be a list of per-pass records")
        table = _physical_map(data, path, model, prov)
        for n, rec in enumerate(records):
            where = f"{path} record {n}"
            if not isinstance(rec, dict):
                raise InputError(f"{where}: not a record (dict)")
            ranks.add(int(rec.get("rank", 0)))
            if len(ranks) > 1:
                raise InputError(f"{where}: records of ranks {sorted(ranks)}; convert one rank's dump (with tensor "
                                 "parallelism every rank records the same tokens)")
            if rec.get("gatherer_key", "primary") != "primary":
                raise InputError(f"{where}: gatherer {rec.get('gatherer_key')!r}; only the primary gatherer is read")
            modes.add(str(rec.get("forward_mode")))
            keyed.append((int(rec.get("forward_pass_id", n)), _record_pass(rec, where, model, table)))
    ids = [k for k, _ in keyed]
    if len(set(ids)) != len(ids):
        raise InputError("two records share a forward_pass_id; give each dump once")
    keyed.sort(key=lambda kv: kv[0])
    prov.details["forward_pass_ids"] = [ids[0] if ids else None, max(ids) if ids else None]
    prov.details["rank"] = sorted(ranks)[0] if ranks else None
    prov.details["forward_modes"] = sorted(modes)   # SGLang's ForwardMode values (numbering varies by version)
    prov.infer("a pass with extend_seq_lens is a prefill (one output token per sequence in it); one without is a "
               "decode pass of one token per sequence")
    prov.infer("a prompt of the trace runs from one prefill pass to the next (with continuous batching several "
               "requests share it); context is the largest position + 1 in a pass")
    prov.cannot_derive.append("request ids (the recorder does not store them)")
    return [p for _, p in keyed]


def _stat(dumps: list[tuple[Path, Any]], model: ModelSpec, prov: Provenance) -> list[EnginePass]:
    out: list[EnginePass] = []
    k = model.top_k
    for path, data in dumps:
        counts = as_array(data["logical_count"], f"{path}: logical_count")
        if counts.ndim != 3 or counts.shape[2] != model.num_experts:
            raise InputError(f"{path}: logical_count has shape {tuple(counts.shape)}, expected (passes, "
                             f"{model.num_layers} layers, {model.num_experts} experts) for model {model.name}")
        moe = _layer_rows(counts.transpose(1, 0, 2), model, str(path), 0).transpose(1, 0, 2)
        if (moe < 0).any():
            raise InputError(f"{path}: logical_count holds a negative count")
        totals = moe.sum(axis=2)
        if (totals % k).any() or (totals != totals[:, :1]).any():
            raise InputError(f"{path}: a pass's counts differ between layers or are not a multiple of top_k {k}; "
                             "is it a dump of another model?")
        for n in range(moe.shape[0]):
            tokens = int(totals[n, 0]) // k
            if tokens:
                out.append(EnginePass(None, "decode", sequences=tokens, counts=moe[n], count_tokens=tokens))
    prov.infer("stat mode: every pass is taken as a decode pass of one token per sequence; context = tokens")
    prov.cannot_derive.extend([
        "which pass is a prefill and which a decode", "requests and prompt lengths",
        "attention context (costed as tokens)", "token-level routing (counts per pass only)",
        "pass order beyond the recorder's buffer (the last expert_distribution_recorder_buffer_size passes)",
    ])
    return out
