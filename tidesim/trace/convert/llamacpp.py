"""llama.cpp moe-trace CSV (MOE_TRACE_OUT): rows `layer,expert` from the ffn_moe_topk tensors,
one row per (token, k slot), in the tensor's memory order (the k slots of a token together).

Forward boundaries are not written: a pass is the run of rows from the first MoE layer to the
last, each layer's rows in one run; a pass of one token is a decode pass, a longer one a prefill
(batched decoding of several sequences would read as a prefill; docs/capture.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tidesim.errors import InputError
from tidesim.models import ModelSpec
from tidesim.trace.convert.passes import EnginePass, Provenance, check_ids


def _rows(path: Path) -> np.ndarray:
    """int64 [rows, 2] (layer, expert); an optional header line `layer,expert`."""
    try:
        with open(path) as fh:
            first = fh.readline()
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text CSV file") from None
    header = 0 if first.strip().replace(" ", "").lower().startswith("layer") else None
    try:
        df = pd.read_csv(path, header=header, dtype="int64", engine="c")
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"{path}: rows must be two whole numbers `layer,expert` "
                         f"({str(exc).splitlines()[0][:100]})") from None
    if df.shape[1] != 2:
        raise InputError(f"{path}: {df.shape[1]} columns; llama.cpp moe-trace rows are `layer,expert`")
    return df.to_numpy()


def _passes(rows: np.ndarray, model: ModelSpec, where: str) -> list[EnginePass]:
    layer, expert = rows[:, 0], rows[:, 1]
    ids_expected = np.array(model.moe_layer_ids)
    seen = np.unique(layer)
    if not np.isin(seen, ids_expected).all():
        bad = int(seen[~np.isin(seen, ids_expected)][0])
        raise InputError(f"{where}: layer {bad} is not an MoE layer of model {model.name} (MoE layers "
                         f"{ids_expected[0]}..{ids_expected[-1]}); is it a trace of another model?")
    run_start = np.flatnonzero(np.r_[True, layer[1:] != layer[:-1]])
    run_layer = layer[run_start]
    run_len = np.diff(np.r_[run_start, len(layer)])
    first = np.flatnonzero(run_layer == ids_expected[0])
    L, k = model.num_moe_layers, model.top_k
    if len(run_layer) != len(first) * L or first.size == 0 or (first != np.arange(len(first)) * L).any():
        raise InputError(f"{where}: layers do not repeat {ids_expected[0]}..{ids_expected[-1]} in order, one run "
                         "each per pass; cannot find the forward passes")
    out = []
    for n, start in enumerate(first):
        lens = run_len[start:start + L]
        if (run_layer[start:start + L] != ids_expected).any() or (lens != lens[0]).any() or lens[0] % k:
            raise InputError(f"{where}: pass {n} does not route the same tokens x top_k {k} in every MoE layer")
        lo = run_start[start]
        tokens = int(lens[0]) // k
        ids = expert[lo:lo + L * tokens * k].reshape(L, tokens, k).transpose(1, 0, 2)
        ids = check_ids(ids, model, f"{where} pass {n}")
        out.append(EnginePass(ids, "unknown", sequences=1))
    return out


def read(paths: list[Path], model: ModelSpec, prov: Provenance) -> list[EnginePass]:
    out: list[EnginePass] = []
    for path in paths:
        out.extend(_passes(_rows(path), model, str(path)))
    prov.infer("forward passes found from the layer order (first MoE layer to last); each layer's rows hold the "
               "pass's tokens in order with their k slots together")
    prov.infer("a pass of more than one token is a prefill and starts a prompt; a one-token pass is a decode "
               "pass committing one token; context is the prompt's tokens so far")
    prov.cannot_derive.extend(["token positions", "request boundaries beyond prefills"])
    return out
