"""tidesim.sim.costs: the GPU/CPU contention term (cpu.gpu_contention), by hand.

Profile (tests/simkit.py): 1 ms fixed GPU work per forward and per MoE layer; GPU expert
0.5 + 0.1 t ms (no launch); CPU expert 2 + 1 t ms; 0.125 ms per activation vector each way.
"""

import dataclasses

import numpy as np
import pytest
from simkit import MS, all_cpu, blank, profile, random_schedule, workload

from tidesim.hardware import HardwareProfile, get_profile
from tidesim.hardware_parts import part_digest
from tidesim.policies import PolicyOptions, build_schedule, uniform
from tidesim.run import run
from tidesim.schedule import CPU, GPU, SparseCells, byte_cells
from tidesim.sim.costs import schedule_costs


def with_contention(hw: HardwareProfile, s: float) -> HardwareProfile:
    return dataclasses.replace(hw, cpu=dataclasses.replace(hw.cpu, gpu_contention=s))


def split(counts: list, gpu: list[int]):  # type: ignore[no-untyped-def]
    """One forward; in MoE layer 0 the experts in `gpu` are resident and run on the GPU, the other
    activated ones on the CPU."""
    w = workload(counts)
    s = blank(w)
    for e in np.flatnonzero(w.expert_tokens[0, 0]):
        s.placement[0, 0, e] = GPU if e in gpu else CPU
    s.initial_resident[0, gpu] = True
    s.resident[0, 0, gpu] = True
    return w, s


@pytest.mark.parametrize("engine", ["sim", "analytic"])
def test_zero_contention_changes_nothing(engine: str) -> None:
    w, s = split([[[3, 1, 0, 0], [0, 0, 0, 0]]], gpu=[0])
    hw = profile()
    assert hw.cpu.gpu_contention == 0.0
    plain = run(w, s, hw, engine=engine)
    # dense 1 + layer 0: 1 + max(GPU 0.8, CPU 0.125 + 3 + 0.125) + layer 1: 1
    assert plain.total_time_s == pytest.approx((1 + 1 + 3.25 + 1) * MS)
    costs = schedule_costs(w, s, hw)
    assert costs.rates.contention == 0.0 and not costs.gpu.slow_extra.any()
    assert costs.items.cpu_time.tolist() == pytest.approx([3 * MS])


@pytest.mark.parametrize("engine", ["sim", "analytic"])
def test_cpu_bound_layer_by_hand(engine: str) -> None:
    # GPU 0.8 ms, CPU 3 ms: overlap 0.8, s = 0.5 -> GPU 1.2 ms, CPU makespan 3.4 ms
    w, s = split([[[3, 1, 0, 0], [0, 0, 0, 0]]], gpu=[0])
    m = run(w, s, with_contention(profile(), 0.5), engine=engine)
    assert m.total_time_s == pytest.approx((1 + 1 + 0.125 + 3.4 + 0.125 + 1) * MS)
    assert m.busy_s["gpu"] == pytest.approx((3 + 1.2) * MS)
    assert m.busy_s["cpu"] == pytest.approx(3.4 * MS)


@pytest.mark.parametrize("engine", ["sim", "analytic"])
def test_gpu_bound_layer_by_hand(engine: str) -> None:
    # GPU 4.5 ms (40 tokens), CPU 3 ms: overlap 3, s = 0.5 -> GPU 6 ms, CPU side 0.125 + 4.5 + 0.125
    w, s = split([[[40, 1, 0, 0], [0, 0, 0, 0]]], gpu=[0])
    plain = run(w, s, profile(), engine=engine)
    m = run(w, s, with_contention(profile(), 0.5), engine=engine)
    assert plain.total_time_s == pytest.approx((1 + 1 + 4.5 + 1) * MS)
    assert m.total_time_s == pytest.approx((1 + 1 + 6 + 1) * MS)


@pytest.mark.parametrize("engine", ["sim", "analytic"])
def test_each_side_slows_by_its_own_contention(engine: str) -> None:
    # GPU 0.8 ms, CPU 3 ms: overlap 0.8; GPU side s = 0.5 -> 1.2 ms, pool s = 0.25 -> 3 + 0.2 = 3.2 ms
    w, s = split([[[3, 1, 0, 0], [0, 0, 0, 0]]], gpu=[0])
    hw = with_contention(profile(), 0.5)
    hw = dataclasses.replace(hw, cpu=dataclasses.replace(hw.cpu, pool_contention=0.25))
    m = run(w, s, hw, engine=engine)
    assert m.total_time_s == pytest.approx((1 + 1 + 0.125 + 3.2 + 0.125 + 1) * MS)
    assert m.busy_s["gpu"] == pytest.approx((3 + 1.2) * MS)
    assert m.busy_s["cpu"] == pytest.approx(3.2 * MS)
    # a pool that slows while the GPU side does not: GPU 0.8 ms as without contention, pool 3.4 ms
    hw = dataclasses.replace(profile(), cpu=dataclasses.replace(profile().cpu, pool_contention=0.5))
    m = run(w, s, hw, engine=engine)
    assert m.busy_s["gpu"] == pytest.approx((3 + 0.8) * MS)
    assert m.total_time_s == pytest.approx((1 + 1 + 0.125 + 3.4 + 0.125 + 1) * MS)


def test_absent_pool_contention_is_the_symmetric_model() -> None:
    """Profiles without cpu.pool_contention (presets, every profile calibrated before it) keep their
    fingerprint and charge gpu_contention to both sides, as they were fitted with."""
    hw = with_contention(profile(), 0.5)
    assert hw.cpu.pool_contention is None and "pool_contention" not in hw.to_dict()["cpu"]
    w, s = split([[[3, 1, 0, 0], [0, 0, 0, 0]]], gpu=[0])
    same = dataclasses.replace(hw, cpu=dataclasses.replace(hw.cpu, pool_contention=0.5))
    assert same.fingerprint() != hw.fingerprint()
    assert run(w, s, hw).total_time_s == run(w, s, same).total_time_s


def test_longest_first_makespan_is_stretched_on_two_workers() -> None:
    # GPU expert 0 (10 tokens) 1.5 ms; CPU tasks 5, 3, 4 ms on 2 workers: makespan 7 (5 | 4 + 3).
    # s = 1: overlap 1.5, makespan 8.5, GPU 3; CPU side 0.75 + 8.5 + 0.75 (6 pairs)
    w, s = split([[[10, 3, 1, 2], [0, 0, 0, 0]]], gpu=[0])
    hw = with_contention(profile(workers=2), 1.0)
    m = run(w, s, hw)
    assert m.total_time_s == pytest.approx((1 + 1 + 0.75 + 8.5 + 0.75 + 1) * MS)
    costs = schedule_costs(w, s, hw)
    assert costs.gpu.slow_extra[0] == pytest.approx(1.5 * MS)
    assert costs.items.cpu_time.tolist() == pytest.approx([x * 8.5 / 7 * MS for x in (5, 3, 4)])


def test_no_overlap_no_charge() -> None:
    # all on the CPU: no GPU expert work, nothing to contend with
    w = workload([[[3, 1, 2, 0], [0, 1, 0, 0]]])
    hw = profile(workers=2)
    assert run(w, all_cpu(w), with_contention(hw, 2.0)).total_time_s == pytest.approx(
        run(w, all_cpu(w), hw).total_time_s)


def test_contention_stretches_the_sparse_tasks_like_the_sums() -> None:
    w = workload([[[1, 0, 2, 3], [0, 3, 1, 1]], [[2, 2, 0, 1], [1, 0, 4, 1]]])
    sched = random_schedule(w, budget=2, seed=3)
    plain = schedule_costs(w, sched, profile(workers=2))
    hot = schedule_costs(w, sched, with_contention(profile(workers=2), 0.7))
    np.testing.assert_allclose(np.bincount(hot.items.cpu_g, weights=hot.items.cpu_time, minlength=hot.groups),
                               hot.cpu.total)
    assert (hot.cpu.total >= plain.cpu.total).all() and (hot.gpu.slow_extra >= plain.gpu.slow_extra).all()


@pytest.mark.parametrize("seed", range(4))
def test_simulator_and_analytic_agree_with_one_worker(seed: int) -> None:
    """One worker and synchronous copies only is an exact case of the analytic model; the
    contention term keeps it exact (both read the same adjusted costs)."""
    w = workload([[[1, 0, 2, 3], [0, 3, 1, 1]], [[2, 2, 0, 1], [1, 0, 4, 1]], [[0, 4, 1, 1], [2, 2, 2, 2]]])
    sched = random_schedule(w, budget=2, seed=seed, allow_async=False)
    for engines in (1, 2):
        hw = with_contention(profile(workers=1, engines=engines), 0.8)
        sim, ana = run(w, sched, hw), run(w, sched, hw, engine="analytic")
        assert ana.total_time_s == pytest.approx(sim.total_time_s, rel=1e-9)
        assert sim.total_time_s >= run(w, sched, profile(workers=1, engines=engines)).total_time_s


def test_cached_cell_costs_equal_fresh_ones() -> None:
    """Costs of one workload object come from a per-workload cache of cell times (per GPU and CPU
    curves); they must equal those of a fresh copy, also after other profiles were costed."""
    w = workload([[[1, 0, 2, 3], [0, 3, 1, 1]], [[2, 2, 0, 1], [1, 0, 4, 1]]])
    sched = random_schedule(w, budget=2, seed=5)
    hw, other = profile(workers=2), with_contention(profile(workers=1, gbs=0.001), 0.3)
    first = schedule_costs(w, sched, hw)
    schedule_costs(w, sched, other)
    again = schedule_costs(w, sched, hw)
    fresh = schedule_costs(dataclasses.replace(w), sched, hw)
    for got in (again, fresh):
        for part in ("gpu", "copies", "cpu"):
            for name, value in vars(getattr(first, part)).items():
                if value is not None:
                    np.testing.assert_array_equal(getattr(getattr(got, part), name), value)
        assert got.counts == first.counts and got.flags == first.flags


def test_curve_keys_are_the_content_of_the_part_a_curve_reads() -> None:
    """The cell times are kept per workload content and per content of the one part a curve reads
    (tidesim.curves takes only that part): a what-if's PCIe leaves both keys alone, a CPU change
    leaves the GPU's, anything in the part itself (a new field included) changes its key."""
    base = get_profile("h100-sxm-pcie5")
    same = base.scaled(pcie=0.25)
    for side in ("gpu", "cpu"):
        assert part_digest(getattr(base, side)) == part_digest(getattr(same, side))
    assert part_digest(base.cpu) != part_digest(base.scaled(cpu_cores=2).cpu)
    assert part_digest(base.gpu) == part_digest(base.scaled(cpu_cores=2).gpu)
    assert part_digest(base.gpu) != part_digest(base.scaled(gpu_speed=2).gpu)
    workers = dataclasses.replace(base, cpu=dataclasses.replace(base.cpu, workers=base.cpu.workers + 1))
    assert part_digest(base.cpu) != part_digest(workers.cpu)


def test_cached_costs_follow_the_curves_and_replay_their_flags() -> None:
    """Profiles that differ only where the curves do not read share the cached times; those that
    differ where they read get their own; every costing reports the notes its lookups raise, also
    when the times came from the cache."""
    w = workload([[[1, 0, 2, 3], [0, 3, 1, 1]], [[2, 2, 0, 1], [1, 0, 4, 1]]])
    sched = random_schedule(w, budget=2, seed=5)
    hw = profile(workers=2)
    roofline = dataclasses.replace(hw, cpu=dataclasses.replace(hw.cpu, expert_ffn=[]))   # estimated
    costed = [roofline.scaled(pcie=4.0), roofline.scaled(cpu_cores=2.0), hw]
    schedule_costs(w, sched, roofline)
    for other in costed:
        got, fresh = schedule_costs(w, sched, other), schedule_costs(dataclasses.replace(w), sched, other)
        np.testing.assert_array_equal(got.cpu.total, fresh.cpu.total)
        np.testing.assert_array_equal(got.items.cpu_time, fresh.items.cpu_time)
        assert got.flags == fresh.flags
    assert any(f.startswith("cpu.expert_ffn") for f in schedule_costs(w, sched, costed[0]).flags)
    assert not any(f.startswith("cpu.expert_ffn") for f in schedule_costs(w, sched, hw).flags)


@pytest.mark.parametrize("value", [None, 1, 2, 3])
@pytest.mark.parametrize("size", [0, 5, 64, 1001])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 1.0])
def test_byte_cells_equals_a_plain_scan(value: int | None, size: int, density: float) -> None:
    rng = np.random.default_rng(size)
    a = np.where(rng.random(size) < density, rng.integers(1, 4, size), 0).astype(np.int8)
    want = np.flatnonzero(a) if value is None else np.flatnonzero(a == value)
    np.testing.assert_array_equal(byte_cells(a, value), want)
    np.testing.assert_array_equal(byte_cells(a.reshape(1, -1)[:, ::-1].copy()[:, ::-1], value), want)
    np.testing.assert_array_equal(byte_cells(a != 0), np.flatnonzero(a))


@pytest.mark.parametrize("policy", ["tide", "fiddler", "full-swap"])
def test_builder_record_equals_a_scan_and_guards_its_arrays(policy: str) -> None:
    """The builder's sparse record (Schedule.cells) is what a scan finds; the arrays it indexes are
    read-only, and a schedule given other arrays is scanned again."""
    w = workload([[[1, 0, 2, 3], [0, 3, 1, 1]], [[2, 2, 0, 1], [1, 0, 4, 1]], [[0, 2, 2, 1], [1, 1, 4, 0]]])
    hw = profile(workers=2)
    s = build_schedule(policy, w, PolicyOptions(budget=uniform(2, 2), tau=uniform(1, 2), hw=hw))
    assert s.cells is not None and s.sparse() is s.cells
    scan = SparseCells.scan(s)
    for name in ("copy", "copy_kind", "cpu", "demote"):
        np.testing.assert_array_equal(getattr(s.cells, name), getattr(scan, name))
    with pytest.raises(ValueError):
        s.placement[0, 0, 0] = CPU
    changed = dataclasses.replace(s, placement=s.placement.copy())
    changed.placement[w.expert_tokens > 0] = CPU
    assert changed.sparse() is not s.cells
    np.testing.assert_array_equal(changed.sparse().cpu, np.flatnonzero(w.expert_tokens > 0))
    plain = dataclasses.replace(s, cells=None)
    for other in (hw, profile(workers=1, gbs=0.001), hw):   # what the record keeps is the same for every profile
        for engine in ("sim", "analytic"):
            assert run(w, plain, other, engine=engine) == run(w, s, other, engine=engine)
