"""Routing statistics of a trace: the numbers that say whether interval refresh pays off.

What is computed (docs/traces.md gives the reasoning):

- unique experts per step: experts with at least one routed token in a denoising-step forward
  (phase "step"), per MoE layer; mean over steps. Over the whole forward, so in no-cache mode it
  includes the prefix; over the current block's tokens too when token-level routing is present.
- similarity d steps apart: cosine of tokens-per-expert vectors and Jaccard of activated sets,
  for pairs of step forwards of the same (prompt, block) whose steps differ by d. "forward":
  the whole forward's counts (in no-cache mode the prefix is frozen within a block, so this is
  near 1 by construction); "block": only the current block's last `block_length` tokens
  (needs token-level routing in no-cache mode; in prefix mode a step forward is the block).
- popularity skew: share of routed tokens taken by the top 10% of experts and the Gini
  coefficient, per layer, over tokens as computed (summed over forwards), for the whole trace
  and per prompt (mean over prompts).
- TIDE hit ratio: the public TIDE code's interval refresh (tide_gpu_tokens); overall (tokens
  pooled), per layer, per prompt, and per step index averaged over prompts (the TIDE notebook's
  way of comparing runs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tidesim.budget import check_budget
from tidesim.errors import InputError
from tidesim.limits import check_tau
from tidesim.trace.schema import Trace
from tidesim.workload import Workload

MAX_DISTANCE = 8
DEFAULT_TAUS = (1, 2, 4, 8)
TOP_SHARE = 0.10


@dataclass(frozen=True)
class _Arrays:
    """The columns statistics need, from a Trace or a Workload."""

    counts: np.ndarray    # int [F, L, E]
    prompt: np.ndarray
    block: np.ndarray
    step: np.ndarray
    is_step: np.ndarray   # bool [F]: a denoising step (not prefill or commit)


def _arrays(source: Trace | Workload) -> _Arrays:
    if isinstance(source, Trace):
        f = source.forwards
        col = lambda name: f[name].to_numpy().astype(np.int64)  # noqa: E731
        is_step = (f["phase"] == "step").to_numpy()
        return _Arrays(source.expert_tokens, col("prompt"), col("block"), col("step"), is_step)
    if isinstance(source, Workload):
        # A Workload has no phase: prefill is block -1; in prefix mode the commit forward is the
        # one that commits nothing (every denoising step commits at least one token).
        is_step = source.block >= 0
        if source.kv_cache == "prefix":
            is_step &= source.committed > 0
        return _Arrays(source.expert_tokens, source.prompt, source.block, source.step, is_step)
    raise TypeError(f"expected a Trace or a Workload, got {type(source).__name__}")


# ----- TIDE interval refresh -----------------------------------------------------------------
def _budget_array(budget: int | Sequence[int] | np.ndarray, layers: int, experts: int) -> np.ndarray:
    b = np.asarray(budget, dtype=np.int64)
    if b.ndim == 0:
        b = np.full(layers, int(b), dtype=np.int64)
    if b.shape != (layers,):
        raise InputError(f"budget must be one number or one per MoE layer ({layers}), got {b.shape[0]} values")
    for value in (int(b.min()), int(b.max())):
        check_budget(value, experts, "budget")
    return b


def refresh_targets(counts: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """bool [F, L, E]: the top-`budget` experts by tokens with a count > 0 (ties: lower id first),
    the set the TIDE code moves to the GPU on a refresh step."""
    f, layers, e = counts.shape
    out = np.zeros(counts.shape, dtype=bool)
    for b in np.unique(budget):
        sel = np.flatnonzero(budget == b)
        if b == 0:
            continue
        c = counts[:, sel]
        if b >= e:
            out[:, sel] = c > 0
            continue
        kth = np.partition(c, e - b, axis=-1)[..., e - b]          # the b-th largest value
        greater = c > kth[..., None]
        tie = c == kth[..., None]
        need = b - greater.sum(-1)
        take = tie.copy()
        split = np.nonzero(tie.sum(-1) > need)               # rows whose ties cross the budget
        take[split] &= np.cumsum(tie[split], axis=-1) <= need[split][:, None]
        out[:, sel] = (greater | take) & (c > 0)
    return out


def refresh_mask(block: np.ndarray, step: np.ndarray, tau: int, is_step: np.ndarray | None = None) -> np.ndarray:
    """Forwards that refresh: every forward of the first generated block (and the prefill,
    block -1), and steps whose within-block step counter is a multiple of tau (the public TIDE
    code); a commit forward (is_step False, block >= 0) never refreshes, as in the tide policies."""
    check_tau(tau, "tau")
    refresh = (block <= 0) | (step % tau == 0)
    if is_step is not None:
        refresh &= is_step | (block < 0)
    return refresh


def tide_gpu_tokens(counts: np.ndarray, refresh: np.ndarray, budget: np.ndarray,
                    targets: np.ndarray | None = None) -> np.ndarray:
    """Tokens computed by GPU-resident experts, int64 [F, L], under TIDE's interval refresh.

    Semantics of the public code: the resident set starts as experts 0..B-1; on a refresh
    forward the target set (refresh_targets) is moved in before the experts run; demotions are
    capped at the number of promotions, so residents beyond that stay (the lowest ids are demoted
    first); between refreshes the resident set is fixed and other experts' tokens go to the CPU.
    """
    f, layers, e = counts.shape
    if targets is None:
        targets = refresh_targets(counts, budget)
    resident = np.arange(e)[None, :] < budget[:, None]
    gpu = np.zeros((f, layers), dtype=np.int64)
    starts = np.flatnonzero(refresh)
    if f and (not starts.size or starts[0] != 0):
        first = starts[0] if starts.size else f
        gpu[:first] = np.einsum("fle,le->fl", counts[:first], resident, dtype=np.int64)
    bounds = np.append(starts, f)
    # A full target (budget experts, all with tokens) replaces the resident set outright.
    full = (targets[starts].sum(-1) == budget[None, :]).all(-1)
    for i, start in enumerate(starts):
        target = targets[start]
        if full[i]:
            resident = target
        else:
            promote = (target & ~resident).sum(-1)
            can_demote = resident & ~target
            kept = can_demote & (np.cumsum(can_demote, axis=-1) > promote[:, None])
            resident = target | kept
        seg = slice(start, bounds[i + 1])
        gpu[seg] = np.einsum("fle,le->fl", counts[seg], resident, dtype=np.int64)
    return gpu


@dataclass(frozen=True)
class HitRatios:
    """TIDE hit ratio per tau: overall, per MoE layer and per prompt."""

    budget: np.ndarray
    taus: list[int]
    overall: dict[int, float]
    per_layer: dict[int, np.ndarray]
    per_prompt: dict[int, dict[int, float]]
    by_step: dict[int, np.ndarray]       # mean over prompts of the i-th denoising step's hit ratio
    step_mean: dict[int, float]          # mean over denoising steps of their hit ratios (unweighted)


def tide_hit_ratios(source: Trace | Workload, budget: int | Sequence[int] | np.ndarray,
                    taus: Iterable[int] = DEFAULT_TAUS) -> HitRatios:
    """Hit ratio = tokens routed to GPU-resident experts / all routed tokens, for each tau."""
    a = _arrays(source)
    f, layers, e = a.counts.shape
    b = _budget_array(budget, layers, e)
    taus = sorted({int(t) for t in taus})
    if not taus:
        raise InputError("give at least one tau")
    targets = refresh_targets(a.counts, b)
    total = a.counts.sum(-1, dtype=np.int64)
    prompts = np.unique(a.prompt)
    overall: dict[int, float] = {}
    per_layer: dict[int, np.ndarray] = {}
    per_prompt: dict[int, dict[int, float]] = {}
    by_step: dict[int, np.ndarray] = {}
    step_mean: dict[int, float] = {}
    index = step_index(a.prompt, a.is_step)
    for tau in taus:
        gpu = tide_gpu_tokens(a.counts, refresh_mask(a.block, a.step, tau, a.is_step), b, targets)
        overall[tau] = _ratio(gpu.sum(), total.sum())
        per_layer[tau] = gpu.sum(0) / np.maximum(total.sum(0), 1)
        per_prompt[tau] = {int(p): _ratio(gpu[a.prompt == p].sum(), total[a.prompt == p].sum()) for p in prompts}
        by_step[tau], step_mean[tau] = _by_step_index(gpu.sum(-1), total.sum(-1), index)
    return HitRatios(b, taus, overall, per_layer, per_prompt, by_step, step_mean)


def step_index(prompt: np.ndarray, is_step: np.ndarray) -> np.ndarray:
    """Index of each denoising-step forward among its prompt's denoising steps (0, 1, ...);
    -1 for prefill and commit forwards."""
    out = np.full(prompt.shape, -1, dtype=np.int64)
    rows = np.flatnonzero(is_step)
    if rows.size:
        p = prompt[rows]
        starts = np.r_[0, np.flatnonzero(np.diff(p)) + 1]
        run = np.repeat(starts, np.diff(np.r_[starts, rows.size]))
        out[rows] = np.arange(rows.size) - run
    return out


def _by_step_index(gpu: np.ndarray, total: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-step hit ratios (all layers pooled) averaged at each step index over the prompts that
    reach it, and their plain mean over all denoising steps: how the TIDE notebook compares runs
    (a curve per step, each step weighing the same whatever its token count)."""
    rows = np.flatnonzero(index >= 0)
    if not rows.size:
        return np.zeros(0), math.nan
    ratio = gpu[rows] / np.maximum(total[rows], 1)
    idx = index[rows]
    curve = np.bincount(idx, weights=ratio) / np.bincount(idx)
    return curve, float(ratio.mean())


def hit_ratio_vs_tau(trace_or_workload: Trace | Workload, budget: int | Sequence[int] | np.ndarray,
                     taus: Iterable[int]) -> dict[int, float]:
    """Overall TIDE hit ratio for each refresh interval tau (budget: per layer, one or L values)."""
    return tide_hit_ratios(trace_or_workload, budget, taus).overall


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


# ----- similarity, unique experts, skew ------------------------------------------------------
def step_pairs(prompt: np.ndarray, block: np.ndarray, step: np.ndarray, is_step: np.ndarray,
               d: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) of step forwards of one (prompt, block) whose steps differ by d."""
    n = prompt.shape[0]
    if d >= n:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    i = np.arange(n - d)
    j = i + d
    ok = is_step[i] & is_step[j] & (prompt[i] == prompt[j]) & (block[i] == block[j]) & (step[j] - step[i] == d)
    return i[ok], j[ok]


def similarity_by_distance(counts: np.ndarray, prompt: np.ndarray, block: np.ndarray, step: np.ndarray,
                           is_step: np.ndarray, max_distance: int = MAX_DISTANCE) -> dict[str, Any]:
    """Mean cosine and Jaccard per distance d = 1..max_distance, per layer and over all layers.

    Averages are over (pair, layer) cells; a layer whose two vectors are both empty is skipped.
    """
    x = counts.astype(np.float32)
    norm = np.sqrt(np.einsum("fle,fle->fl", x, x))
    active = counts > 0
    n_active = active.sum(-1)
    out: dict[str, Any] = {"distance": [], "pairs": [], "cosine": [], "jaccard": [],
                           "cosine_per_layer": [], "jaccard_per_layer": []}
    for d in range(1, max_distance + 1):
        i, j = step_pairs(prompt, block, step, is_step, d)
        if not i.size:
            break
        dot = np.einsum("fle,fle->fl", x[i], x[j])
        den = norm[i] * norm[j]
        cos = np.where(den > 0, dot / np.where(den > 0, den, 1), np.nan)
        inter = (active[i] & active[j]).sum(-1)
        union = n_active[i] + n_active[j] - inter
        jac = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
        out["distance"].append(d)
        out["pairs"].append(int(i.size))
        out["cosine"].append(float(np.nanmean(cos)))
        out["jaccard"].append(float(np.nanmean(jac)))
        out["cosine_per_layer"].append(np.nanmean(cos, axis=0))
        out["jaccard_per_layer"].append(np.nanmean(jac, axis=0))
    return out


def block_token_counts(trace: Trace) -> np.ndarray | None:
    """Tokens per expert over the current block's tokens (the last block_length of each step
    forward), int64 [F, L, E]; None without token-level routing. Non-step forwards are zero."""
    if trace.topk_ids is None:
        return None
    f, layers, e = trace.expert_tokens.shape
    bl = trace.meta.block_length
    out = np.zeros((f, layers, e), dtype=np.int64)
    is_step = (trace.forwards["phase"] == "step").to_numpy()
    for fw in np.flatnonzero(is_step):
        ids = np.stack([trace.topk_ids[fw * layers + layer][-bl:] for layer in range(layers)], axis=1)
        flat = (np.arange(layers)[None, :, None] * e + ids.astype(np.int64)).ravel()
        out[fw] = np.bincount(flat, minlength=layers * e).reshape(layers, e)
    return out


def unique_experts(counts: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Mean number of experts with a routed token, per layer, over the selected forwards."""
    if not rows.any():
        return np.full(counts.shape[1], np.nan)
    return (counts[rows] > 0).sum(-1).mean(0)


def gini(x: np.ndarray) -> np.ndarray:
    """Gini coefficient along the last axis (0: all equal; near 1: one takes all)."""
    s = np.sort(x.astype(np.float64), axis=-1)
    n = s.shape[-1]
    total = s.sum(-1)
    weighted = (np.arange(1, n + 1) * s).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2 * weighted / (n * total) - (n + 1) / n, np.nan)


def top_share(x: np.ndarray, fraction: float = TOP_SHARE) -> np.ndarray:
    """Share of the total taken by the top `fraction` of entries (at least one), last axis."""
    n = x.shape[-1]
    k = max(1, int(math.ceil(fraction * n)))
    s = np.sort(x.astype(np.float64), axis=-1)[..., n - k:].sum(-1)
    total = x.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, s / total, np.nan)


def popularity_skew(counts: np.ndarray, prompt: np.ndarray) -> dict[str, Any]:
    """Top-10% share and Gini per layer: over the whole trace, and within each prompt (mean)."""
    whole = counts.sum(0, dtype=np.int64)
    per_prompt = np.stack([counts[prompt == p].sum(0, dtype=np.int64) for p in np.unique(prompt)])
    return {
        "top10_share_per_layer": top_share(whole), "gini_per_layer": gini(whole),
        "top10_share": float(np.nanmean(top_share(whole))), "gini": float(np.nanmean(gini(whole))),
        "prompt_top10_share_per_layer": np.nanmean(top_share(per_prompt), axis=0),
        "prompt_gini_per_layer": np.nanmean(gini(per_prompt), axis=0),
        "prompt_top10_share": float(np.nanmean(top_share(per_prompt))),
        "prompt_gini": float(np.nanmean(gini(per_prompt))),
    }


# ----- everything ----------------------------------------------------------------------------
def decode_summary(trace: Trace) -> dict[str, Any]:
    """Steps per block and tokens committed per denoising step."""
    f = trace.forwards
    steps = f[f["phase"] == "step"]
    per_block = steps.groupby(["prompt", "block"]).size().to_numpy()
    committed = int(steps["committed"].sum())
    prompts = trace.prompt_ids
    per_prompt = steps.groupby("prompt").size().reindex(prompts, fill_value=0)
    # generated tokens as the decode outputs them (through the first EOS) where the metadata says,
    # else the tokens committed
    recorded = {int(m["id"]): int(m["generated"]) for m in trace.meta.prompts if "generated" in m and "id" in m}
    committed_per_prompt = f.groupby("prompt")["committed"].sum()
    generated = [recorded.get(p, int(committed_per_prompt.get(p, 0))) for p in prompts]
    return {
        "steps_per_prompt": [int(n) for n in per_prompt.to_numpy()],
        "steps_per_prompt_mean": float(per_prompt.mean()) if prompts else math.nan,
        "generated_per_prompt": generated,
        "generated_per_prompt_mean": float(np.mean(generated)) if prompts else math.nan,
        "forwards": int(len(f)), "step_forwards": int(len(steps)), "blocks": int(per_block.size),
        "steps_per_block_mean": float(per_block.mean()) if per_block.size else math.nan,
        "steps_per_block_min": int(per_block.min()) if per_block.size else 0,
        "steps_per_block_max": int(per_block.max()) if per_block.size else 0,
        "tokens_per_step": committed / len(steps) if len(steps) else math.nan,
        "generated_tokens": trace.generated_tokens,
        "mean_tokens_per_step_forward": float(steps["tokens"].mean()) if len(steps) else math.nan,
    }


def trace_stats(trace: Trace, budget: int | Sequence[int] | np.ndarray = 128,
                taus: Iterable[int] = DEFAULT_TAUS, max_distance: int = MAX_DISTANCE) -> dict[str, Any]:
    """All statistics of a trace, as a JSON-ready dict (numpy arrays inside; see to_jsonable)."""
    a = _arrays(trace)
    meta = trace.meta
    hits = tide_hit_ratios(trace, budget, taus)
    # autoregressive: every decode forward is its own block of one token, so similarity pairs are
    # decode forwards of the same prompt d tokens apart (its step counter counts tokens)
    sim_block = np.where(a.is_step, 0, a.block) if trace.autoregressive else a.block
    forward_sim = similarity_by_distance(a.counts, a.prompt, sim_block, a.step, a.is_step, max_distance)
    out: dict[str, Any] = {
        "model": meta.model.name, "kv_cache": meta.kv_cache, "source": meta.source, "decode_shape": meta.decode,
        "block_length": meta.block_length, "threshold": meta.threshold, "gen_length": meta.gen_length,
        "prompts": trace.prompt_ids, "layers": meta.model.moe_layer_ids,
        "decode": decode_summary(trace),
        "unique_experts_per_step_per_layer": unique_experts(a.counts, a.is_step),
        "similarity": {"forward": forward_sim},
        "skew": popularity_skew(a.counts, a.prompt),
        "hit_ratio": {
            "budget_per_layer": hits.budget, "taus": hits.taus,
            "overall": {str(t): v for t, v in hits.overall.items()},
            "per_layer": {str(t): v for t, v in hits.per_layer.items()},
            "per_prompt": {str(t): {str(p): v for p, v in d.items()} for t, d in hits.per_prompt.items()},
            "step_mean": {str(t): v for t, v in hits.step_mean.items()},
            "by_step": {str(t): v for t, v in hits.by_step.items()},
        },
    }
    out["unique_experts_per_step"] = float(np.nanmean(out["unique_experts_per_step_per_layer"]))
    if meta.kv_cache == "prefix":
        block_counts: np.ndarray | None = a.counts
        out["block_scope"] = "step forwards process the current block only, so block = forward"
    else:
        block_counts = block_token_counts(trace)
        out["block_scope"] = ("last block_length tokens of each step forward (token-level routing)"
                              if block_counts is not None else
                              "unavailable: no-cache trace without token-level routing")
    if block_counts is not None:
        out["similarity"]["block"] = similarity_by_distance(block_counts, a.prompt, sim_block, a.step, a.is_step,
                                                            max_distance)
        out["unique_experts_per_step_block_per_layer"] = unique_experts(block_counts, a.is_step)
        out["unique_experts_per_step_block"] = float(np.nanmean(out["unique_experts_per_step_block_per_layer"]))
    else:
        out["similarity"]["block"] = None
        out["unique_experts_per_step_block"] = None
    return out
