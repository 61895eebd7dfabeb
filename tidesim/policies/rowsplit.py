"""tide-split's one-layer decision, compiled: the scalar twin of the batched split search.

The live engine decides one MoE layer per call; on mini shapes (19 layers x 256 experts) the
decision must take well under 1 ms per forward, which numpy's fixed cost per call (a few
microseconds, tens of calls per layer) and a Python loop over the on-demand positions did not
allow. These functions are compiled with numba (machine code, cached on disk after the first
call) and make, for one layer-forward, the same decisions as the batched path from the same
floating-point operations:

- row_split: split.best_split(keep_resident=True, try_all=False) for one row (split._estimates'
  terms in a loop over the on-demand positions that stops once the GPU side alone reaches the best
  so far; then, where the estimate names another split than "resident only", both timed with
  split.layer_times' terms without copy slowdown, bounds on the longest-first makespans first).
- decide_layer: the rest of TideSplit's one-layer step once the refresh is decided (which
  experts may be copied in on demand, the decision order, the slot pool's spares, the backlog's
  side bound: TideSplit.decide's terms for one row).
- slot_rule, slot_spares_one: the executors' slot rule for one layer-forward (layermodel.slot_tags).
- pairwise_sum: numpy's summation order (np.sum of a float64 row), where the batched path sums
  with numpy.

Rules live in tidesim.policies.split and tide_split (batched, numpy); a change there is made here
too, and tests/test_policies_tide_split.py checks both paths decide alike (random rows, the bundled
traces, layer by layer against the offline builder).

numba's disk cache (__pycache__/rowsplit.*.nbi, .nbc) is keyed on this file alone: the code it
compiles from elsewhere (tidesim.sim.lpt.lpt_makespan) and the constants it reads (layermodel's
slot tags, the schedule's placement and copy codes) are frozen into it. After changing one of
those, touch this file (or delete those cache files) so that it compiles again. A first compile
takes tens of seconds; later processes load the cache in well under a second.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from tidesim.layermodel import AFTER_GROUPED, FREE_NOW
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_ON_DEMAND, COPY_SYNC_REFRESH, CPU, GPU, NO_COPY
from tidesim.sim.lpt import lpt_makespan

# return codes below zero: the caller fills a table and calls again (nothing was changed)
GROW_TIMES = -1      # a token count past ExpertTimes' tables
NEED_ACT = -2        # activation copy times not yet evaluated for the pair counts written to `need`

# fconst: launch_s, expert_copy_s, on-demand launches (s), gpu_contention, margin, pool_contention;
# iconst: workers, engines
F_LAUNCH, F_COPY, F_OD_LAUNCH, F_CONTENTION, F_MARGIN, F_POOL_CONTENTION = range(6)
I_WORKERS, I_ENGINES = range(2)
LAST_USE = np.int64(1 << 62)      # TideSplit.history's bit for the layer's previous forward

_lpt = njit(cache=True, nogil=True)(lpt_makespan)


@njit(cache=True, nogil=True)
def _block_sum(a: np.ndarray, lo: int, n: int) -> float:
    """numpy's sum of at most 128 entries: in order below 8, else 8 running sums then the rest."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    end = n - n % 8
    while i < end:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(cache=True, nogil=True)
def pairwise_sum(a: np.ndarray, lo: int, n: int) -> float:
    """a[lo:lo + n].sum() in numpy's order (pairwise: blocks of at most 128 entries, _block_sum,
    above that the two halves, the first cut at a multiple of 8, added), with an explicit stack
    (numba's cache does not load recursive functions safely)."""
    if n <= 128:
        return _block_sum(a, lo, n)
    depth = 8
    m = n
    while m > 128:
        m //= 2
        depth += 2
    seg_lo = np.empty(2 * depth, np.int64)    # tasks: n >= 0 sums a segment, n = -1 adds the last two values
    seg_n = np.empty(2 * depth, np.int64)
    values = np.empty(depth)
    seg_lo[0], seg_n[0] = lo, n
    tasks, held = 1, 0
    while tasks > 0:
        tasks -= 1
        at, size = seg_lo[tasks], seg_n[tasks]
        if size < 0:
            held -= 1
            values[held - 1] = values[held - 1] + values[held]
        elif size <= 128:
            values[held] = _block_sum(a, at, size)
            held += 1
        else:
            half = size // 2
            half -= half % 8
            seg_lo[tasks], seg_n[tasks] = 0, -1
            seg_lo[tasks + 1], seg_n[tasks + 1] = at + half, size - half
            seg_lo[tasks + 2], seg_n[tasks + 2] = at, half
            tasks += 3
    return values[0]


@njit(cache=True, nogil=True)
def np_sum(a: np.ndarray) -> float:
    return 0.0 + pairwise_sum(a, 0, a.size) if a.size > 0 else 0.0


@njit(cache=True, nogil=True)
def _by_value(values: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The stable ascending argsort of values[lo:hi], a few entries (insertion sort: numba's
    argsort costs microseconds there, and compiles slowly)."""
    n = hi - lo
    perm = np.empty(n, np.int64)
    for i in range(n):
        v = values[lo + i]
        j = i
        while j > 0 and values[lo + perm[j - 1]] > v:
            perm[j] = perm[j - 1]
            j -= 1
        perm[j] = i
    return perm


@njit(cache=True, nogil=True)
def slot_rule(passes: np.ndarray, n_async: int, free: int, deferred: int, tags: np.ndarray) -> int:
    """The slot rule for one layer-forward: the release tag of each on-demand copy (in expert-id
    order; `passes`: whether it only passes through its slot) written to `tags`, and the spare
    slots its copies take, the asynchronous ones after them. A copy takes a free slot, else the
    head of the queue of slots that free later (the grouped kernel's, then each earlier
    pass-through on-demand expert's), else a spare."""
    n = passes.size
    queue = np.empty(deferred + n, np.int64)
    for i in range(deferred):
        queue[i] = AFTER_GROUPED
    tail = deferred
    head = spare = 0
    for k in range(n):
        if free > 0:
            free -= 1
            tags[k] = FREE_NOW
        elif head < tail:
            tags[k] = queue[head]
            head += 1
        else:
            spare += 1
            tags[k] = FREE_NOW
        if passes[k]:
            queue[tail] = k
            tail += 1
    return spare + max(n_async - free - (tail - head), 0)


@njit(cache=True, nogil=True)
def slot_spares_one(n_od: int, n_async: int, free: int, deferred: int) -> int:
    """split.slot_spares for one layer-forward (every on-demand copy passes through)."""
    od_spare = 1 if n_od > 0 and free + deferred == 0 else 0
    popped = max(n_od - free, 0) - od_spare
    return od_spare + max(n_async - max(free - n_od, 0) - (deferred + n_od - popped), 0)


@njit(cache=True, nogil=True)
def _side_at(fc: np.ndarray, ic: np.ndarray, grouped: float, od_sum: float, act: float, res: float,
             compute: np.ndarray, tags: np.ndarray, n_cpu: int, span: float) -> float:
    """The layer-forward's expert phase (layer_phases' "side") for a CPU pool span: contention,
    then the on-demand pipeline (each copy once its slot is free: `tags`, slot_rule) and the CPU
    side."""
    c, s, s_pool = fc[F_COPY], fc[F_CONTENTION], fc[F_POOL_CONTENTION]
    slow = 0.0
    if s > 0 or s_pool > 0:
        overlap = min(grouped + od_sum, span)
        slow = 0.0 + s * overlap
        factor = (span + s_pool * overlap) / max(span, 1e-300) if span > 0 else 1.0
        span = span * factor
    grouped_end = grouped + slow
    gpu_end = grouped_end
    cpu_end = act + span
    n = compute.size
    if n > 0:
        engine = act if ic[I_ENGINES] == 1 else 0.0
        gpu = grouped_end
        ends = np.empty(n)
        for i in range(n):
            tag = tags[i]
            slot = 0.0 if tag == FREE_NOW else grouped_end if tag == AFTER_GROUPED else ends[tag]
            landed = max(engine, slot) + c
            gpu = max(gpu, landed) + compute[i]
            ends[i] = gpu
            engine = landed
        gpu_end = gpu
        cpu_end = max(cpu_end, engine)
    res_end = cpu_end + res if n_cpu > 0 else 0.0
    return max(gpu_end, res_end)


@njit(cache=True, nogil=True)
def _pool(total: float, longest: float, shortest: float, n: int, w: int) -> float:
    """split.pool_estimate (layermodel.cpu_pool_bound) for one entry: with one worker the total,
    else the mean load, the longest task or ceil(n / w) rounds of the shortest, whichever is
    longest (the same floating-point operations: the rounds an exact integer times shortest)."""
    if w == 1:
        return total
    return max(total / w, longest, (-(-n // w)) * shortest)


@njit(cache=True, nogil=True)
def _bounds(cpu_rest: np.ndarray, longest: np.ndarray, shortest: np.ndarray, at: int, n: int, w: int
            ) -> tuple[float, float]:
    """(lower, upper) bound on the longest-first makespan of the n CPU tasks from position `at`."""
    total, big = cpu_rest[at], longest[at]
    if n == 0 or w == 1:
        return total, total
    if big == shortest[at]:                  # equal tasks: ceil(n / workers) rounds
        rounds = -(-n // w)
        return rounds * big, rounds * big
    return max(total / w, big), total / w + (1 - 1 / w) * big


@njit(cache=True, nogil=True)
def row_split(counts: np.ndarray, experts: np.ndarray, nf: int, most: int, fr: int, d0: int, stay: np.ndarray,
              backlog: float, gpu_t: np.ndarray, cpu_t: np.ndarray, act_t: np.ndarray, fc: np.ndarray,
              ic: np.ndarray, need: np.ndarray) -> int:
    """The split of one layer-forward (split.RowSplit.one): counts and expert ids [k] of its
    activated experts in decision order (the first nf at the gate, positions nf .. most - 1
    movable), `fr` free and `d0` deferred slots; `stay` [k] (or empty): positions whose on-demand
    copy stays resident, and `backlog` (split.Slots: a split with j on-demand copies is charged
    min(backlog, j x copy), split.stay_charge). gpu_t/cpu_t: ExpertTimes' tables, act_t [2, P]:
    activation copy times by pair count (NaN: not evaluated). Returns the split, or GROW_TIMES, or
    NEED_ACT with the pair counts to evaluate in need[1:need[0] + 1]."""
    if most <= nf:
        return nf
    k = counts.size
    for i in range(k):
        if counts[i] >= gpu_t.size:
            return GROW_TIMES
    launch, c, od_launch = fc[F_LAUNCH], fc[F_COPY], fc[F_OD_LAUNCH]
    w = ic[I_WORKERS]
    share = np.empty(k)
    cpu = np.empty(k)
    for i in range(k):
        share[i] = max(gpu_t[counts[i]] - launch, 0.0)
        cpu[i] = cpu_t[counts[i]]
    # the estimate (split._estimates' terms): the CPU side of splits nf .. most, index j - nf
    grouped_end = 0.0
    for i in range(nf):
        grouped_end += share[i]
    grouped_end += launch if nf > 0 else 0.0
    m = most - nf
    stop = min(most + 1, k)
    cpu_rest = np.zeros(m + 1)
    longest = np.zeros(m + 1)
    shortest = np.zeros(m + 1)
    pairs = np.zeros(m + 1, np.int64)
    rest, big, small, prs = 0.0, -np.inf, np.inf, 0
    for i in range(k - 1, nf - 1, -1):
        rest = cpu[i] if i == k - 1 else rest + cpu[i]
        big = max(big, cpu[i])
        small = min(small, cpu[i])
        prs += counts[i]
        if i < stop:
            cpu_rest[i - nf], longest[i - nf], shortest[i - nf], pairs[i - nf] = rest, big, small, prs
    act = np.empty(m + 1)
    res = np.empty(m + 1)
    missing = 0
    for i in range(m + 1):
        p = pairs[i]
        if p >= act_t.shape[1] or math.isnan(act_t[0, p]):
            missing += 1
            need[missing] = p
        else:
            act[i], res[i] = act_t[0, p], act_t[1, p]
    if missing > 0:
        need[0] = missing
        return NEED_ACT

    def cpu_side(i: int, engine_end: float) -> float:
        if pairs[i] <= 0:
            return 0.0
        pool = _pool(cpu_rest[i], longest[i], shortest[i], k - nf - i, w)
        return max(act[i] + pool, engine_end) + res[i]

    best, best_j = max(grouped_end, cpu_side(0, 0.0)), nf
    streamed = max(fr + d0, 1)
    late = max(fr * c, grouped_end)
    total, lead, done = 0.0, -np.inf, 0.0
    done_s = total_s = 0.0
    for i in range(m):
        t = share[nf + i] + od_launch
        total = total + t
        if i < streamed:
            landed = (i + 1) * c if i < fr else late + (i - fr + 1) * c
            lead = max(lead, landed - (total - t))
            done = total + max(grouped_end, lead)
            done_s, total_s = done, total
        else:
            landed = done + c
            done = done_s + (i - streamed + 1) * c + (total - total_s)
        e = max(done, cpu_side(i + 1, landed))
        if e < best:
            best, best_j = e, nf + i + 1
        if done >= best:
            break
    split = best_j
    if split == nf:
        return nf
    # the exact comparison with "resident only" (split.layer_times' terms, no copy slowdown)
    j = split - nf
    o = _by_value(experts, nf, split)
    compute = np.empty(j)
    passes = np.ones(j, np.bool_)
    od_sum = 0.0
    for x in range(j):
        compute[x] = share[nf + o[x]] + od_launch
        od_sum += compute[x]
        if stay.size > 0 and stay[nf + o[x]]:
            passes[x] = False
    tags = np.empty(j, np.int64)
    slot_rule(passes, 0, fr, d0, tags)
    # every on-demand copy overtakes the background queue: split.stay_charge, min(backlog, j x copy)
    charge = min(backlog, j * c) if backlog > 0 else 0.0
    n_theirs, n_mine = k - nf, k - split
    lo_t, hi_t = _bounds(cpu_rest, longest, shortest, 0, n_theirs, w)
    lo_m, hi_m = _bounds(cpu_rest, longest, shortest, j, n_mine, w)
    a_t, r_t, a_m, r_m = act[0], res[0], act[j], res[j]
    none_f, none_i = np.empty(0), np.empty(0, np.int64)
    margin = fc[F_MARGIN]
    mine = _side_at(fc, ic, grouped_end, od_sum, a_m, r_m, compute, tags, n_mine, hi_m) + charge
    if mine < _side_at(fc, ic, grouped_end, 0.0, a_t, r_t, none_f, none_i, n_theirs, lo_t) * (1 - margin):
        return split
    mine = _side_at(fc, ic, grouped_end, od_sum, a_m, r_m, compute, tags, n_mine, lo_m) + charge
    if mine > _side_at(fc, ic, grouped_end, 0.0, a_t, r_t, none_f, none_i, n_theirs, hi_t) * (1 + margin):
        return nf
    in_group = np.zeros(k)
    for i in range(nf):
        in_group[i] = share[i]
    grouped = np_sum(in_group) + (launch if nf > 0 else 0.0)
    mine = _side_at(fc, ic, grouped, od_sum, a_m, r_m, compute, tags, n_mine, _lpt(cpu[split:], w)) + charge
    theirs = _side_at(fc, ic, grouped, 0.0, a_t, r_t, none_f, none_i, n_theirs, _lpt(cpu[nf:], w))
    return split if mine < theirs else nf


@njit(cache=True, nogil=True)
def decide_layer(c: np.ndarray, p: np.ndarray, cp: np.ndarray, before: np.ndarray, resident: np.ndarray,
                 refreshing: bool, stays: bool, side: bool, size: int, backlog: float,
                 gpu_t: np.ndarray, cpu_t: np.ndarray, act_t: np.ndarray, fc: np.ndarray, ic: np.ndarray,
                 need: np.ndarray, out: np.ndarray) -> float:
    """TideSplit's one-layer step after the refresh (TideSplit.decide for one row): c, p, cp,
    before, resident [E] are the layer's tokens per expert, the refresh's placement and copies,
    the resident set before and after it. On-demand experts are written into p and cp; out[:]
    = (status, on-demand copies, spare slots taken, copies for the backlog). Returns the side bound
    (TideSplit._side_bound) when `side`, else 0.0. status < 0 (GROW_TIMES, NEED_ACT): a table to
    fill, nothing changed."""
    n = c.size
    for e in range(n):
        if c[e] >= gpu_t.size:
            out[0] = GROW_TIMES
            return 0.0
    n_before = 0
    for e in range(n):
        n_before += before[e]
    n_grouped, free_base, n_sync, n_async = 0, -n_before, 0, 0
    if refreshing:
        n_leaving = 0
        for e in range(n):
            if before[e] and not resident[e]:
                n_leaving += 1
                if p[e] == GPU and cp[e] == NO_COPY:
                    n_grouped += 1
            if cp[e] == COPY_SYNC_REFRESH:
                n_sync += 1
            elif cp[e] == COPY_ASYNC_REFRESH:
                n_async += 1
        free_base = n_leaving - n_grouped - n_before
    size = max(size, n_before)
    free, sync_spare = max(size + free_base - n_sync, 0), max(n_sync - size - free_base, 0)
    n_od = 0
    passes = np.empty(0, np.bool_)
    # the activated experts in decision order: at the gate, movable, the others; by tokens, by id
    band = np.empty(n, np.int64)
    top = 0
    n_movable = n_stay = nf = n_act = 0
    for e in range(n):
        if c[e] > 0:
            n_act += 1
            top = max(top, c[e])
            at_gate = p[e] == GPU
            # without a refresh the placement is the resident set, so the movable ones are the rest
            movable = (p[e] == CPU and not before[e] and cp[e] == NO_COPY) if refreshing else not at_gate
            if stays and cp[e] == COPY_ASYNC_REFRESH and not at_gate:
                movable = True
                n_stay += 1
            band[e] = 0 if at_gate else 1 if movable else 2
            nf += at_gate
            n_movable += movable
    if n_movable > 0:
        # a counting sort on band x (top + 1) + (top - tokens), stable in id (TideSplit's decision_order)
        top += 1
        first = np.zeros(3 * top + 1, np.int64)
        for e in range(n):
            if c[e] > 0:
                first[band[e] * top + (top - 1 - c[e]) + 1] += 1
        for v in range(1, first.size):
            first[v] += first[v - 1]
        k = n_act
        order = np.empty(k, np.int64)
        for e in range(n):
            if c[e] > 0:
                v = band[e] * top + (top - 1 - c[e])
                order[first[v]] = e
                first[v] += 1
        counts = np.empty(k, np.int64)
        for i in range(k):
            counts[i] = c[order[i]]
        stay = np.empty(0, np.bool_)
        if n_stay > 0:
            stay = np.zeros(k, np.bool_)
            for i in range(nf, nf + n_movable):
                stay[i] = cp[order[i]] == COPY_ASYNC_REFRESH
        split = row_split(counts, order, nf, nf + n_movable, free, n_grouped, stay, backlog, gpu_t, cpu_t,
                          act_t, fc, ic, need)
        if split < 0:
            out[0] = split
            return 0.0
        if split > nf:
            n_od = split - nf
            for i in range(nf, split):
                p[order[i]] = GPU
                cp[order[i]] = COPY_ON_DEMAND
            if n_stay > 0:
                taken = 0
                for i in range(nf, split):
                    taken += stay[i]
                if taken > 0:
                    by_id = _by_value(order, nf, split)
                    passes = np.empty(n_od, np.bool_)
                    for x in range(n_od):
                        passes[x] = not stay[nf + by_id[x]]
                    n_async -= taken
    if passes.size == 0:
        spare = sync_spare + slot_spares_one(n_od, n_async, free, n_grouped)
    else:
        spare = sync_spare + slot_rule(passes, n_async, free, n_grouped, np.empty(n_od, np.int64))
    out[0], out[1], out[2], out[3] = 0, n_od, spare, n_async + n_od
    if not side:
        return 0.0
    on_cpu = np.zeros(n)
    on_gpu = np.zeros(n)
    longest, shortest, n_cpu = 0.0, np.inf, 0
    for e in range(n):
        if p[e] == CPU:
            on_cpu[e] = cpu_t[c[e]]
            longest = max(longest, on_cpu[e])
            shortest = min(shortest, on_cpu[e])
            n_cpu += 1
        elif p[e] == GPU:
            on_gpu[e] = gpu_t[c[e]]
    pool = _pool(np_sum(on_cpu), longest, shortest if n_cpu > 0 else 0.0, n_cpu, ic[I_WORKERS])
    return max(pool, np_sum(on_gpu))


@njit(cache=True, nogil=True)
def _by_history(ids: np.ndarray, history: np.ndarray) -> np.ndarray:
    """ids (ascending) reordered by history, most recent use first, ties kept in id order."""
    n = ids.size
    out = ids.copy()
    for i in range(1, n):
        e = out[i]
        j = i
        while j > 0 and history[out[j - 1]] < history[e]:
            out[j] = out[j - 1]
            j -= 1
        out[j] = e
    return out


@njit(cache=True, nogil=True)
def refresh_row(c: np.ndarray, current: np.ndarray, history: np.ndarray, budget: int) -> np.ndarray:
    """bool [E]: the resident set after a refresh of one layer (residency.refresh_sets: the
    top-budget activated experts, then the current residents in rank order while slots remain)
    with tide-split's ranking (tokens, then the activation history, then id: TideSplit._refresh).
    In rank order the activated experts come first, so: with at least `budget` of them, the best
    `budget` by that ranking; else all of them and the best idle residents by history, then id."""
    n = c.size
    kept = np.zeros(n, np.bool_)
    if budget <= 0:
        return kept
    n_act = top = 0
    for e in range(n):
        if c[e] > 0:
            n_act += 1
            top = max(top, c[e])
    if n_act >= budget:
        per = np.zeros(top + 1, np.int64)             # experts per token count
        for e in range(n):
            per[c[e]] += 1
        above, cut = 0, top                           # `above` experts have more tokens than `cut`
        while above + per[cut] < budget:
            above += per[cut]
            cut -= 1
        tied = np.empty(per[cut], np.int64)
        t = 0
        for e in range(n):
            if c[e] > cut:
                kept[e] = True
            elif c[e] == cut:
                tied[t] = e
                t += 1
        ranked = _by_history(tied, history)
        for i in range(budget - above):
            kept[ranked[i]] = True
        return kept
    idle = np.empty(n, np.int64)
    t = 0
    for e in range(n):
        if c[e] > 0:
            kept[e] = True
        elif current[e]:
            idle[t] = e
            t += 1
    left = budget - n_act
    if t <= left:
        for i in range(t):
            kept[idle[i]] = True
    else:
        ranked = _by_history(idle[:t], history)
        for i in range(left):
            kept[ranked[i]] = True
    return kept


@njit(cache=True, nogil=True)
def tide_split_layer(c: np.ndarray, current: np.ndarray, history: np.ndarray, budget: int, refreshing: bool,
                     sync: bool, copy_code: int, size: int, backlog: float, gpu_t: np.ndarray,
                     cpu_t: np.ndarray, act_t: np.ndarray, fc: np.ndarray, ic: np.ndarray, need: np.ndarray,
                     out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """TideSplit's whole one-layer step: its refresh (TideSplit._refresh for one row: refresh_row,
    the copies, the placement, then the activation history updated in place), then decide_layer.
    Returns placement, copy, resident [1, E] and decide_layer's side bound; out as decide_layer's
    (status < 0: a table to fill, nothing changed, the history included)."""
    n = c.size
    placement = np.zeros((1, n), np.int8)
    copy = np.zeros((1, n), np.int8)
    resident = np.empty((1, n), np.bool_)
    p, cp, after = placement[0], copy[0], resident[0]
    kept = refresh_row(c, current, history, budget) if refreshing else current
    for e in range(n):
        after[e] = kept[e]
    for e in range(n):
        if after[e] and not current[e]:
            cp[e] = copy_code
        if c[e] > 0:
            p[e] = GPU if (after[e] if sync else current[e]) else CPU
    bound = decide_layer(c, p, cp, current, after, refreshing, refreshing and not sync, not sync, size, backlog,
                         gpu_t, cpu_t, act_t, fc, ic, need, out)
    if out[0] >= 0:
        for e in range(n):
            history[e] = (history[e] >> 1) | (LAST_USE if c[e] > 0 else 0)
    return placement, copy, resident, bound
