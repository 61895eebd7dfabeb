"""Helpers the offload policies share: expert rankings, top-B selection, static popularity sets,
refresh steps and the Schedule arrays built from a GPU mask.

Every selection breaks ties on the expert id (lower id first), so a policy's schedule depends
on nothing but its inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tidesim.errors import InputError
from tidesim.schedule import CPU, GPU, Schedule
from tidesim.workload import Workload


@dataclass(frozen=True)
class Ranking:
    """Experts of every (forward, layer) ordered by tokens (most first), ties by lower expert id.

    order[f, l, k] is the expert in rank k; rank[f, l, e] is the rank of expert e (a permutation).
    """

    order: np.ndarray  # int64 [F, L, E]
    rank: np.ndarray   # int64 [F, L, E]


def rank_experts(counts: np.ndarray) -> Ranking:
    """Rank experts along the last axis by count (descending), ties by id (ascending)."""
    counts = np.asarray(counts)
    key = -counts if counts.dtype.kind == "i" else -counts.astype(np.int64)
    order = np.argsort(key, axis=-1, kind="stable")
    rank = np.empty_like(order)
    positions = np.broadcast_to(np.arange(counts.shape[-1]), counts.shape)
    np.put_along_axis(rank, order, positions, axis=-1)
    return Ranking(order=order, rank=rank)


def keep_best(candidates: np.ndarray, order: np.ndarray, rank: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """bool [L, E]: at most budget[l] candidates of each layer, the best ones by rank.

    order [L, E] lists each layer's experts from best to worst; rank is its inverse. Leading axes
    of `candidates` and `budget` (several options at once) broadcast over order and rank.
    """
    in_order = np.take_along_axis(candidates, np.broadcast_to(order, candidates.shape), axis=-1)
    # Positions before `limit` hold at most budget candidates (the running count is monotone).
    limit = (np.cumsum(in_order, axis=-1) <= budget[..., None]).sum(axis=-1)
    return candidates & (rank < limit[..., None])


def top_activated(counts: np.ndarray, rank: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """bool [..., L, E]: the top-budget experts by tokens, experts with no tokens excluded
    (the target set of a TIDE refresh)."""
    return (rank < budget[..., None]) & (counts > 0)


def refresh_sets(current: np.ndarray, counts: np.ndarray, budget: np.ndarray, order: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """TIDE's refresh rule, the one place it is written. (target, refreshed), bool [n, E] for n
    layers: the target of a refresh (the top-budget activated experts, top_activated) and the
    resident set after it (current | target, the best by rank while slots remain: keep_best),
    computed in rank order with one sort (tests check it equals those two functions). `order`
    (the experts of each row by rank, rank_experts) skips the sort when the caller has it. One
    layer (the live engine's call) takes 1-D indexing, which numpy does with less overhead."""
    n, e = counts.shape
    if order is None:
        order = (-counts).argsort(axis=-1, kind="stable")
    target = np.empty((n, e), dtype=bool)
    refreshed = np.empty((n, e), dtype=bool)
    if n == 1:
        o, b = order[0], int(budget[0])
        target_o = counts[0][o] > 0
        target_o[b:] = False
        kept_o = first_true(current[0][o] | target_o, b)
        target[0][o] = target_o
        refreshed[0][o] = kept_o
        return target, refreshed
    flat = (order + (np.arange(n) * e)[:, None]).reshape(-1)      # (1-D take and put beat 2-D indexing)
    limit = budget[:, None]
    # in rank order the activated experts come first: the target is the first min(budget, activated)
    target_o = np.arange(e) < np.minimum(limit, (counts > 0).sum(axis=1)[:, None])
    cand_o = np.take(current, flat).reshape(n, e) | target_o
    kept_o = cand_o & (np.cumsum(cand_o, axis=-1) <= limit)
    target.reshape(-1)[flat] = target_o.reshape(-1)
    refreshed.reshape(-1)[flat] = kept_o.reshape(-1)
    return target, refreshed


def first_true(row: np.ndarray, limit: int) -> np.ndarray:
    """1-D bool `row` with only its first `limit` True entries left, cut in place and returned:
    row & (cumsum(row) <= limit), with one count instead of a running sum (one layer's step)."""
    if np.count_nonzero(row) > limit:
        row[row.nonzero()[0][limit]:] = False
    return row


def warmup_forwards(workload: Workload, fraction: float) -> int:
    """Forwards in the profiling prefix: floor(fraction x forwards), at least 1."""
    return max(1, int(fraction * workload.num_forwards))


def popular_set(workload: Workload, size: np.ndarray, fraction: float) -> np.ndarray:
    """bool [L, E]: per layer the size[l] experts with the most tokens over the warm-up prefix
    (ties by lower id; experts with no tokens fill remaining slots in id order)."""
    n = warmup_forwards(workload, fraction)
    totals = workload.expert_tokens[:n].astype(np.int64).sum(axis=0)
    ranking = rank_experts(totals)
    return ranking.rank < np.asarray(size)[:, None]


def static_set(workload: Workload, given: np.ndarray | None, size: np.ndarray, fraction: float) -> np.ndarray:
    """The static resident set: the one given (checked against `size`), else the popular set."""
    if given is None:
        return popular_set(workload, size, fraction)
    return checked_static_set(given, (workload.num_layers, workload.num_experts), size)


def checked_static_set(given: np.ndarray, shape: tuple[int, int], size: np.ndarray) -> np.ndarray:
    """A given static resident set, after checking its shape and that it fits `size` per layer."""
    given = np.asarray(given)
    if given.shape != shape or given.dtype != np.bool_:
        raise InputError(f"the static resident set must be a bool array of shape {shape}")
    too_many = given.sum(axis=1) > size
    if too_many.any():
        layer = int(np.argmax(too_many))
        raise InputError(f"the static resident set holds {int(given[layer].sum())} experts in MoE layer {layer}, "
                         f"more than the {int(size[layer])} slots the policy has there; give a smaller set or a "
                         "larger budget")
    return given.copy()


def commit_forwards(workload: Workload) -> np.ndarray:
    """bool [F]: forwards that only write a finished block into the prefix cache.

    The Workload carries no phase column, so a commit forward is recognised as a forward of a
    generated block (block >= 0) that commits no token: every denoising step commits at least
    one token (LLaDA2.0 commits the most confident position when none passes the threshold),
    and a prefill forward has block -1. A `phase` array on the workload, when present, wins.
    """
    phase = getattr(workload, "phase", None)
    if phase is not None:
        return np.asarray(phase) == "commit"
    return (workload.block >= 0) & (workload.committed == 0)


def refresh_steps(workload: Workload, tau: np.ndarray) -> np.ndarray:
    """bool [F, L]: where TIDE refreshes the resident set.

    A forward refreshes layer l when it is in the first generated block of its prompt (the
    prefill included) or when its denoising step is a multiple of tau[l]; a commit forward
    never refreshes (its routing is not that of a denoising step, and the next block's step 0
    refreshes anyway).
    """
    return refresh_rule(workload.first_block, workload.step, commit_forwards(workload), tau)


def refresh_rule(first_block: np.ndarray | bool, step: np.ndarray | int, commit: np.ndarray | bool,
                 tau: np.ndarray) -> np.ndarray:
    """TIDE's refresh rule, the one place it is written: bool [..., L] for forwards described by
    first_block, step and commit (arrays [...] or scalars: one forward, the online step) and
    intervals tau [L]: refresh in the first block or when step is a multiple of tau, never in a
    commit forward."""
    if np.ndim(step) == 0 and np.ndim(first_block) == 0 and np.ndim(commit) == 0:
        if commit:
            return np.zeros(tau.shape, dtype=bool)
        return np.ones(tau.shape, dtype=bool) if first_block else (int(step) % tau) == 0
    first = np.asarray(first_block, dtype=bool)[..., None]
    periodic = (np.asarray(step)[..., None] % tau) == 0
    return (first | periodic) & ~np.asarray(commit, dtype=bool)[..., None]


def placement_from(activated: np.ndarray, gpu: np.ndarray) -> np.ndarray:
    """int8 placement: activated experts on the GPU where `gpu`, else on the CPU; idle otherwise."""
    act = np.asarray(activated, dtype=bool).view(np.int8)
    on_gpu = np.asarray(gpu, dtype=bool).view(np.int8)
    return act * (np.int8(CPU) - (np.int8(CPU) - np.int8(GPU)) * on_gpu)   # int8 throughout: IDLE = 0


def make_schedule(policy: str, workload: Workload, budget: np.ndarray, initial: np.ndarray,
                  gpu: np.ndarray, copy: np.ndarray, resident: np.ndarray,
                  demote: np.ndarray | None = None, params: dict[str, Any] | None = None,
                  is_bound: bool = False, feasible: bool = True) -> Schedule:
    """A Schedule with the usual dtypes; `gpu` marks activated experts that run on the GPU."""
    shape = workload.expert_tokens.shape
    return Schedule(
        policy=policy,
        budget=np.asarray(budget, dtype=np.int64).copy(),
        initial_resident=np.asarray(initial, dtype=bool).copy(),
        placement=placement_from(workload.activated, gpu),
        copy=np.asarray(copy, dtype=np.int8),
        demote=np.zeros(shape, dtype=bool) if demote is None else np.asarray(demote, dtype=bool),
        resident=np.asarray(resident, dtype=bool),
        params=dict(params or {}),
        is_bound=is_bound,
        feasible=feasible,
    )


def by_count(fn: Callable[[np.ndarray], np.ndarray], counts: np.ndarray) -> np.ndarray:
    """fn applied to every entry of an integer array, evaluated once per distinct count (fn(0) is
    taken as 0): the layer model's per_count."""
    from tidesim.layermodel import per_count

    return per_count(fn, counts)


def int_list(values: np.ndarray) -> list[int]:
    """Plain ints for Schedule.params (JSON-friendly)."""
    return [int(v) for v in np.asarray(values).ravel()]
