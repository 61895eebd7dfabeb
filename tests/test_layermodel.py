"""tidesim.layermodel: the one layer-time model, by hand, and its five consumers agreeing on it.

Profile (tests/simkit.py): 1 ms fixed GPU work per forward and per MoE layer, GPU expert
0.5 + 0.1 t ms (no launch), CPU expert 2 + t ms, expert copy 3 ms, 0.125 ms per activation
vector each way.
"""

import dataclasses

import numpy as np
import pytest
from simkit import MS, blank, profile, random_schedule, workload

from tidesim.layermodel import (
    AFTER_GROUPED,
    FREE_NOW,
    ONDEMAND_LAUNCHES_PER_EXPERT,
    OnDemand,
    copy_releases,
    ondemand_pipeline,
)
from tidesim.policies import PolicyOptions, build_schedule, uniform
from tidesim.policies.residency import rank_experts
from tidesim.run import run
from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_ON_DEMAND, COPY_SYNC_REFRESH, GPU, Schedule

# 2 forwards of block 1 (step 0 refreshes with tau 2, step 1 does not), 2 MoE layers, 4 experts
W = workload([[[3, 0, 1, 0], [0, 2, 0, 2]], [[2, 1, 1, 0], [0, 3, 0, 1]]], block=1)
HW = profile(workers=1, engines=2)
# tide, sync, budget 1, tau 2 (experts: GPU 0.5 + 0.1 t, CPU 2 + t, activations 0.125 per token):
# f0 L0: fixed 1 + sync copy of expert 0 3 + max(GPU 0.8, CPU 0.125 + 3 + 0.125)      = 7.25
# f0 L1: fixed 1 + sync copy of expert 1 3 + max(GPU 0.7, CPU 0.25 + 4 + 0.25)        = 8.5
# f1 L0: fixed 1 + max(GPU 0.7, CPU 0.25 + 3 + 3 + 0.25)                              = 7.5
# f1 L1: fixed 1 + max(GPU 0.8, CPU 0.125 + 3 + 0.125)                                = 4.25
LAYER_FORWARD_MS = np.array([[7.25, 8.5], [7.5, 4.25]])


def tide() -> Schedule:
    opts = PolicyOptions(budget=uniform(1, 2), tau=uniform(2, 2), hw=HW, refresh="sync")
    s = build_schedule("tide", W, opts)
    assert s.copy[0, 0, 0] == s.copy[0, 1, 1] == COPY_SYNC_REFRESH and (s.copy[1] == 0).all()
    return s


def test_five_consumers_agree_on_hand_computed_layer_forwards() -> None:
    from tidesim.planner import cost_table, oracle_bound, oracle_costs
    from tidesim.policies.split import layer_times

    want = LAYER_FORWARD_MS.sum(axis=0) * MS
    s = tide()
    # 1, 2: the simulator and the analytic model
    for engine in ("sim", "analytic"):
        m = run(W, s, HW, engine=engine)
        np.testing.assert_allclose(m.layer_time_s, want, rtol=0, atol=1e-9)
        assert m.total_time_s == pytest.approx(2 * MS + want.sum(), abs=1e-9)
    # 3: the planner's cost table (tide with the same tau and budget)
    table = cost_table(W, HW, taus=[2], budgets=[1])
    np.testing.assert_allclose(table.layer_cost_s[:, 0, 0], want, rtol=0, atol=1e-9)
    # 4: the oracle's layer model on the forward without copies (expert phase, fixed work apart)
    f1 = W.expert_tokens[1]
    r = rank_experts(f1)
    counts = np.take_along_axis(f1, r.order, axis=1)
    active = (f1 > 0).sum(axis=1)
    free = (s.resident_before()[1] & (f1 > 0)).sum(axis=1)
    split = (s.placement[1] == GPU).sum(axis=1)
    mine = layer_times(counts, r.order, active, free, split, W.model, HW)
    np.testing.assert_allclose(mine + 1 * MS, LAYER_FORWARD_MS[1] * MS, rtol=0, atol=1e-9)
    # 5: the planner's bound charges the same terms, and stays below
    oc = oracle_costs(W, HW)
    assert oc.gpu_s[1, 0, 0] == pytest.approx(0.7 * MS, abs=1e-12)
    assert oc.cpu_s[1, 0, 1] == pytest.approx(3 * MS, abs=1e-12)
    assert oc.copy_s == pytest.approx(3 * MS, abs=1e-12)
    np.testing.assert_allclose(oc.layer_fixed_s, [MS, MS], atol=1e-12)
    assert oracle_bound(oc, np.array([1, 1])).bound_s <= 2 * MS + want.sum() + 1e-9


def one_forward(counts: list, resident: list[int], gpu: list[int], copy: dict[int, int], after: list[int],
                budget: int) -> tuple:  # type: ignore[type-arg]
    """One forward, MoE layer 0 as given (layer 1 idle)."""
    w = workload([[counts, [0, 0, 0, 0]]])
    s = blank(w, budget=budget)
    s.initial_resident[0, resident] = True
    for e in np.flatnonzero(w.expert_tokens[0, 0]):
        s.placement[0, 0, e] = GPU if e in gpu else 2
    for e, kind in copy.items():
        s.copy[0, 0, e] = kind
    s.resident[0, 0, after] = True
    return w, s


@pytest.mark.parametrize("engine", ["sim", "analytic"])
def test_on_demand_copy_waits_for_the_slot_the_grouped_kernel_frees(engine: str) -> None:
    # budget 1, expert 0 resident and leaving after its grouped run (0.8 ms); expert 1 copied on
    # demand into its slot: the copy waits for the grouped kernel, [0.8, 3.8], then runs 0.6.
    w, s = one_forward([3, 1, 0, 0], resident=[0], gpu=[0, 1], copy={1: COPY_ON_DEMAND}, after=[1], budget=1)
    od, _ = copy_releases(s)
    assert od.tolist() == [AFTER_GROUPED]
    m = run(w, s, HW, engine=engine)
    assert m.total_time_s == pytest.approx((1 + 1 + 0.8 + 3 + 0.6 + 1) * MS)


@pytest.mark.parametrize("engine", ["sim", "analytic"])
def test_pass_through_slots_serialise_copies(engine: str) -> None:
    # budget 1, nothing resident: expert 0's copy takes the free slot; expert 1's copy must wait
    # until expert 0 (which passes through) has run: copy 0 [0, 3], run [3, 3.8]; copy 1 [3.8,
    # 6.8], run [6.8, 7.4]. Expert 1 stays resident.
    w, s = one_forward([3, 1, 0, 0], resident=[], gpu=[0, 1], copy={0: COPY_ON_DEMAND, 1: COPY_ON_DEMAND},
                       after=[1], budget=1)
    od, _ = copy_releases(s)
    assert od.tolist() == [FREE_NOW, 0]
    assert run(w, s, HW, engine=engine).total_time_s == pytest.approx((1 + 1 + 7.4 + 1) * MS)


def test_async_copy_waits_for_the_grouped_kernel_in_the_simulator() -> None:
    # The layer starts at 2 (dense 1, fixed 1). Expert 0 leaves but runs in this forward's grouped
    # kernel [2, 2.8]; expert 1's async copy takes its slot after that, [2.8, 5.8]. Expert 1 runs
    # on the CPU: activations [2, 2.125], CPU [2.125, 5.125]; its results wait for the background
    # copy in progress (no preemption), [5.8, 5.925]; then layer 1's fixed work: 6.925.
    w, s = one_forward([3, 1, 0, 0], resident=[0], gpu=[0], copy={1: COPY_ASYNC_REFRESH}, after=[1], budget=1)
    _, asy = copy_releases(s)
    assert asy.tolist() == [AFTER_GROUPED]
    from tidesim.sim.timeline import Timeline

    tl = Timeline()
    m = run(w, s, HW, timeline=tl)
    start = [e[1] for e in tl.events if "async refresh" in e[3]]
    assert start == [pytest.approx((2 + 0.8) * MS)]
    assert m.total_time_s == pytest.approx(6.925 * MS)


@pytest.mark.parametrize("engine", ["sim", "analytic"])
def test_on_demand_expert_pays_its_launches(engine: str) -> None:
    # launch overhead 0.1 ms: the grouped kernel pays one launch, an on-demand expert
    # ONDEMAND_LAUNCHES_PER_EXPERT: its curve time 0.5 + 0.1 t includes one, so it costs
    # 0.5 + 0.1 t - 0.1 + 0.1 x launches.
    hw = profile(workers=1, engines=2)
    hw = dataclasses.replace(hw, gpu=dataclasses.replace(hw.gpu, launch_overhead_us=100.0))
    w, s = one_forward([3, 0, 0, 0], resident=[], gpu=[0], copy={0: COPY_ON_DEMAND}, after=[0], budget=1)
    expert = 0.8 - 0.1 + 0.1 * ONDEMAND_LAUNCHES_PER_EXPERT
    m = run(w, s, hw, engine=engine)
    fixed = m.breakdown_s["gpu_fixed"] / MS
    assert m.total_time_s == pytest.approx((fixed + 3 + expert) * MS)
    assert ONDEMAND_LAUNCHES_PER_EXPERT == 4


def test_pipeline_by_hand() -> None:
    # copies of 3 from t = 1 (engine), grouped kernel ends at 5; experts compute 2, 1, 4
    od = OnDemand.single(0, np.array([2.0, 1.0, 4.0]), np.array([FREE_NOW, AFTER_GROUPED, 0]))
    engine, gpu, starts, ends = ondemand_pipeline(3.0, np.array([1.0]), np.array([5.0]), od)
    # copy 0 [1, 4] -> run [5, 7]; copy 1 waits for the grouped end [5, 8] -> run [8, 9];
    # copy 2 waits for expert 0's run [8, 11] -> run [11, 15]
    assert starts[:, 0].tolist() == [1.0, 5.0, 8.0] and ends[:, 0].tolist() == [7.0, 9.0, 15.0]
    assert engine.tolist() == [11.0] and gpu.tolist() == [15.0]


class _Pool:
    """One layer's slot pool while one layer-forward's copies are planned."""

    def __init__(self, size: int) -> None:
        self.size, self.free, self.queue = size, 0, []  # type: ignore[var-annotated]

    def take(self, may_wait: bool = True) -> int:
        """A copy's slot: free now, else (if the copy may wait) the queue's head, a slot freed
        later in this forward, else a spare."""
        if self.free:
            self.free -= 1
            return FREE_NOW
        if may_wait and self.queue:
            return int(self.queue.pop(0))
        self.size += 1
        return FREE_NOW


def reference_releases(s: Schedule) -> tuple[list[int], list[int]]:
    """The slot rule written out one copy at a time (what the runtime's slot plan does)."""
    F, L, E = s.placement.shape
    before_all = s.resident_before()
    od_tags: dict[tuple[int, int, int], int] = {}
    as_tags: dict[tuple[int, int, int], int] = {}
    for layer in range(L):
        pool = _Pool(max(int(s.budget[layer]), int(s.initial_resident[layer].sum())))
        for f in range(F):
            before, after = before_all[f, layer], s.resident[f, layer]
            runs = s.placement[f, layer] == GPU
            copy = s.copy[f, layer]
            pool.free, pool.queue = pool.size - int(before.sum()), []
            for e in np.flatnonzero(before & ~after):
                if runs[e] and copy[e] == 0:
                    pool.queue.append(AFTER_GROUPED)
                else:
                    pool.free += 1
            for _ in np.flatnonzero(copy == COPY_SYNC_REFRESH):
                pool.take(may_wait=False)            # a sync copy runs before any kernel: never waits
            for k, e in enumerate(np.flatnonzero(copy == COPY_ON_DEMAND)):
                od_tags[(f, layer, int(e))] = pool.take()
                if not after[e]:
                    pool.queue.append(k)
            for e in np.flatnonzero(copy == COPY_ASYNC_REFRESH):
                as_tags[(f, layer, int(e))] = pool.take()
    return [od_tags[k] for k in sorted(od_tags)], [as_tags[k] for k in sorted(as_tags)]


@pytest.mark.parametrize("seed", range(12))
def test_slot_releases_follow_the_slot_rule(seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 3, size=(4, 2, 6)).tolist()
    from simkit import SPEC

    spec = dataclasses.replace(SPEC, num_experts=6)
    w = workload(counts, spec=spec, block=1)
    budget = int(rng.integers(1, 5))
    schedules = [random_schedule(w, budget=budget, seed=seed)]
    for name, refresh in (("full-swap", "sync"), ("tide", "async"), ("fiddler", "sync")):
        opts = PolicyOptions(budget=uniform(budget, 2), tau=uniform(2, 2), hw=HW, refresh=refresh,
                             warmup_fraction=0.5)
        schedules.append(build_schedule(name, w, opts))
    for s in schedules:
        od, asy = copy_releases(s)
        want_od, want_as = reference_releases(s)
        assert od.tolist() == want_od and asy.tolist() == want_as, s.policy
