"""Check a trace for every kind of corruption; the first problem is reported as one line."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tidesim.errors import InputError
from tidesim.trace.schema import DECODES, FORMAT_VERSION, KV_CACHE_MODES, PHASES, SOURCES, Trace, TraceMeta


def meta_problems(meta: TraceMeta) -> list[str]:
    out: list[str] = []
    if meta.format_version != FORMAT_VERSION:
        out.append(
            f"trace format version {meta.format_version} is not supported (this tidesim reads "
            f"version {FORMAT_VERSION}); convert it with the tidesim that wrote it"
        )
    if meta.top_k != meta.model.top_k:
        out.append(f"metadata top_k {meta.top_k} differs from the model's top_k {meta.model.top_k}")
    if meta.num_experts != meta.model.num_experts:
        out.append(
            f"metadata num_experts {meta.num_experts} differs from the model's {meta.model.num_experts}"
        )
    if meta.kv_cache not in KV_CACHE_MODES:
        out.append(f"kv_cache must be one of {', '.join(KV_CACHE_MODES)}, got {meta.kv_cache!r}")
    if meta.source not in SOURCES:
        out.append(f"source must be one of {', '.join(SOURCES)}, got {meta.source!r}")
    if not isinstance(meta.block_length, int) or meta.block_length <= 0:
        out.append(f"block_length must be a positive integer, got {meta.block_length!r}")
    if not isinstance(meta.threshold, int | float) or isinstance(meta.threshold, bool):
        out.append(f"threshold must be a number in (0, 1], got {meta.threshold!r}")
    elif not 0 < float(meta.threshold) <= 1:
        out.append(f"threshold must lie in (0, 1], got {meta.threshold!r}")
    if not isinstance(meta.gen_length, int) or meta.gen_length <= 0:
        out.append(f"gen_length must be a positive integer, got {meta.gen_length!r}")
    if meta.decode not in DECODES:
        out.append(f"decode must be one of {', '.join(DECODES)}, got {meta.decode!r}")
    elif meta.decode == "autoregressive" and (meta.block_length != 1 or meta.kv_cache != "prefix"):
        out.append("an autoregressive trace has block_length 1 and kv_cache prefix, got "
                   f"{meta.block_length} and {meta.kv_cache!r}")
    return out


def trace_problems(trace: Trace) -> list[str]:
    """All problems found, in a fixed order (metadata, shapes, counts, ordering, token routing)."""
    meta = trace.meta
    out = meta_problems(meta)
    if out:
        return out
    f = trace.forwards
    et = trace.expert_tokens
    layers = meta.model.num_moe_layers
    if et.ndim != 3 or et.shape[1:] != (layers, meta.num_experts):
        return [f"expert_tokens has shape {et.shape}, expected (forwards, {layers}, {meta.num_experts})"]
    if len(f) != et.shape[0]:
        return [f"{len(f)} forwards but {et.shape[0]} rows of expert counts"]
    if len(f) == 0:
        return ["the trace holds no forward passes"]
    types = _type_problems(trace)
    if types:
        return types
    if (et < 0).any():
        fw, layer, e = np.argwhere(et < 0)[0]
        return [f"forward {fw} layer {meta.model.moe_layer_ids[layer]}: negative count for expert {e}"]
    bad_phase = ~f["phase"].isin(PHASES)
    if bad_phase.any():
        return [f"forward {int(np.flatnonzero(bad_phase)[0])}: unknown phase {f['phase'][bad_phase].iloc[0]!r}"]
    tokens = f["tokens"].to_numpy()
    if (tokens <= 0).any():
        return [f"forward {int(np.argmax(tokens <= 0))}: tokens must be positive"]
    if (f["context"].to_numpy() < tokens).any():
        return [f"forward {int(np.argmax(f['context'].to_numpy() < tokens))}: context is below tokens"]
    sums = et.sum(axis=2)
    expected = tokens[:, None] * meta.top_k
    wrong = sums != expected
    if wrong.any():
        fw, layer = np.argwhere(wrong)[0]
        return [
            f"forward {fw} layer {meta.model.moe_layer_ids[layer]}: expert counts sum to {sums[fw, layer]}, "
            f"expected tokens x top_k = {expected[fw, 0]}"
        ]
    out.extend(_ordering_problems(trace))
    if out:
        return out
    out.extend(_token_routing_problems(trace))
    return out


INTEGER_COLUMNS = ("prompt", "block", "step", "tokens", "context", "committed")


def _type_problems(trace: Trace) -> list[str]:
    """Every per-forward column and the counts hold integers (no NaN, no fractions, no text), and
    the ids are not negative."""
    f = trace.forwards
    missing = [c for c in (*INTEGER_COLUMNS, "phase") if c not in f.columns]
    if missing:
        return [f"forward column {missing[0]!r} is missing"]
    for name in INTEGER_COLUMNS:
        if not pd.api.types.is_integer_dtype(f[name].dtype):
            return [f"column {name!r} must hold whole numbers, got {f[name].dtype} values"]
    if not np.issubdtype(trace.expert_tokens.dtype, np.integer):
        return [f"expert_tokens must hold whole-number counts, got {trace.expert_tokens.dtype}"]
    for name, low in (("prompt", 0), ("block", -1), ("step", 0)):   # block -1: a prefill
        values = f[name].to_numpy()
        if (values < low).any():
            return [f"forward {int(np.argmax(values < low))}: {name} must be at least {low}"]
    return []


def _ordering_problems(trace: Trace) -> list[str]:
    f = trace.forwards
    prompt = f["prompt"].to_numpy()
    block = f["block"].to_numpy()
    step = f["step"].to_numpy()
    committed = f["committed"].to_numpy()
    if trace.autoregressive:   # a batched decode forward commits one token per sequence in it
        ar = _autoregressive_problems(f)
        if ar:
            return ar
    elif (committed < 0).any() or (committed > trace.meta.block_length).any():
        return [f"forward {int(np.argmax((committed < 0) | (committed > trace.meta.block_length)))}: "
                "committed tokens outside [0, block_length]"]
    for i in range(1, len(f)):
        if prompt[i] < prompt[i - 1]:
            return [f"forward {i}: prompt ids go backwards ({prompt[i - 1]} then {prompt[i]})"]
        if prompt[i] != prompt[i - 1]:
            continue
        if block[i] < block[i - 1]:
            return [f"forward {i}: block index goes backwards in prompt {prompt[i]}"]
        if block[i] == block[i - 1] and step[i] != step[i - 1] + 1:
            return [f"forward {i}: step {step[i]} does not follow step {step[i - 1]} in prompt "
                    f"{prompt[i]} block {block[i]} (steps must be monotone, one apart)"]
    return []


def _autoregressive_problems(f: pd.DataFrame) -> list[str]:
    """An autoregressive trace: per prompt, an optional prefill first (block -1; in chunks, steps 0,
    1, ...), then decode forwards numbered 0, 1, 2, ... in both `block` and `step`; no commit
    forwards; each forward commits between 0 and its tokens."""
    committed, tokens = f["committed"].to_numpy(), f["tokens"].to_numpy()
    bad = (committed < 0) | (committed > tokens)
    if bad.any():
        return [f"forward {int(np.argmax(bad))}: committed tokens outside [0, tokens]"]
    phase, block, step, prompt = (f[c].to_numpy() for c in ("phase", "block", "step", "prompt"))
    if (phase == "commit").any():
        return [f"forward {int(np.argmax(phase == 'commit'))}: an autoregressive trace has no commit forwards"]
    prefill = phase == "prefill"
    if (prefill != (block < 0)).any():
        return [f"forward {int(np.argmax(prefill != (block < 0)))}: block -1 is the prefill and only it"]
    start = np.r_[True, prompt[1:] != prompt[:-1]]
    want_block = np.zeros(len(f), dtype=np.int64)
    want_step = np.zeros(len(f), dtype=np.int64)
    decoded = chunks = 0
    for i in range(len(f)):
        if start[i]:
            decoded = chunks = 0
        if prefill[i]:      # a prefill, possibly in chunks (steps 0, 1, ...), before any decode forward
            if decoded:
                return [f"forward {i}: a prefill after decode forwards of prompt {prompt[i]}"]
            want_block[i], want_step[i] = -1, chunks
            chunks += 1
        else:
            want_block[i] = want_step[i] = decoded
            decoded += 1
    wrong = (block != want_block) | (step != want_step)
    if wrong.any():
        i = int(np.argmax(wrong))
        what = "prefill chunk" if prefill[i] else "decode forward"
        return [f"forward {i}: {what} of prompt {prompt[i]} must have block {want_block[i]} and step "
                f"{want_step[i]}, got block {block[i]} step {step[i]}"]
    return []


def _token_routing_problems(trace: Trace) -> list[str]:
    """The first (forward, layer) whose token-level routing is wrong, in order. The checks run on all
    entries at once (one concatenation, one bincount); the entry found is then described by
    _routing_entry_problem, which states the checks one entry at a time."""
    if trace.topk_ids is None:
        return [] if trace.topk_weights is None else ["topk_weights given without topk_ids"]
    meta = trace.meta
    layers = meta.model.num_moe_layers
    n = trace.num_forwards * layers
    if len(trace.topk_ids) != n:
        return ["topk_ids must have one entry per (forward, layer)"]
    for i in _suspect_entries(trace):
        problem = _routing_entry_problem(trace, i)
        if problem:
            return [problem]
    return []


def _suspect_entries(trace: Trace) -> list[int]:
    """Indices of entries that may fail a check (every failing one among them), ascending."""
    meta, ids_list, w_list = trace.meta, trace.topk_ids, trace.topk_weights
    assert ids_list is not None
    k, n_exp, n = meta.top_k, meta.num_experts, len(ids_list)
    rows = np.repeat(trace.forwards["tokens"].to_numpy(), meta.model.num_moe_layers).tolist()
    shape_ok = [a.ndim == 2 and a.shape == (r, k) and (w_list is None or w_list[i].shape == a.shape)
                for i, (a, r) in enumerate(zip(ids_list, rows, strict=True))]
    stop = shape_ok.index(False) if False in shape_ok else n
    if stop == 0:
        return [0]
    sizes = np.array([a.size for a in ids_list[:stop]], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    values = np.concatenate([a.ravel() for a in ids_list[:stop]]).astype(np.int64)
    out_of_range = (values < 0) | (values >= n_exp)
    suspect = np.logical_or.reduceat(out_of_range, offsets) if values.size else np.zeros(stop, dtype=bool)
    seg = np.repeat(np.arange(stop, dtype=np.int64), sizes)
    counts = np.bincount(seg * n_exp + np.clip(values, 0, n_exp - 1), minlength=stop * n_exp).reshape(stop, n_exp)
    suspect |= (counts != trace.expert_tokens.reshape(n, n_exp)[:stop]).any(axis=1)
    if w_list is not None and values.size:
        w = np.concatenate([a.ravel() for a in w_list[:stop]])
        suspect |= np.logical_or.reduceat(~np.isfinite(w) | (w < 0), offsets)
    return [*np.flatnonzero(suspect).tolist(), *([stop] if stop < n else [])]


def _routing_entry_problem(trace: Trace, i: int) -> str:
    """What is wrong with token-level entry i (forward i // layers, MoE layer i % layers), or ""."""
    meta = trace.meta
    fw, layer = divmod(i, meta.model.num_moe_layers)
    ids = trace.topk_ids[i]  # type: ignore[index]
    tokens = int(trace.forwards["tokens"].iloc[fw])
    where = f"forward {fw} layer {meta.model.moe_layer_ids[layer]}"
    if ids.shape != (tokens, meta.top_k):
        return f"{where}: topk_ids has shape {ids.shape}, expected ({tokens}, {meta.top_k})"
    if ids.size and (ids.min() < 0 or ids.max() >= meta.num_experts):
        return (f"{where}: expert id {int(ids.max() if ids.max() >= meta.num_experts else ids.min())} "
                f"out of range [0, {meta.num_experts})")
    counts = np.bincount(ids.ravel(), minlength=meta.num_experts)
    if not np.array_equal(counts, trace.expert_tokens[fw, layer]):
        return f"{where}: token-level routing disagrees with the expert counts"
    if trace.topk_weights is not None:
        weights = trace.topk_weights[i]
        if weights.shape != ids.shape:
            return f"{where}: topk_weights shape differs from topk_ids"
        if weights.size and (not np.isfinite(weights).all() or (weights < 0).any()):
            return f"{where}: topk_weights must be finite and not negative"
    return ""


def validate_trace(trace: Trace, source: str = "trace") -> Trace:
    """Return the trace if it is valid, else raise InputError naming `source` and the first problem."""
    problems = trace_problems(trace)
    if problems:
        raise InputError(f"{source}: {problems[0]}")
    return trace
