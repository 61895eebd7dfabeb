"""tidesim calibrate's library: statistics, the measured profile's structure and round trip."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tidesim_runtime.engine.device import select_device  # noqa: E402
from tidesim_runtime.measure.calibrate import Grid, calibrate, model_bytes_factor, stat  # noqa: E402
from tidesim_runtime.measure.timer import monotone as _monotone  # noqa: E402

from tidesim.hardware import load_profile  # noqa: E402
from tidesim.models import PRESETS  # noqa: E402

TINY = PRESETS["tiny"]


def test_stat_is_median_and_half_interquartile_range() -> None:
    s = stat([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s.median_s == 3.0
    # quartiles (exclusive method) of 1,2,3,4,100: 1.5 and 52 -> half range 25.25
    assert s.spread_s == pytest.approx(25.25)
    assert stat([2.0, 4.0]).spread_s == 1.0


def test_monotone_keeps_the_running_maximum() -> None:
    assert _monotone([3.0, 2.0, 5.0, 4.0]) == [3.0, 3.0, 5.0, 5.0]


def test_model_bytes_factor() -> None:
    assert model_bytes_factor(PRESETS["llada2-mini"], torch.float32) == 0.5
    assert model_bytes_factor(PRESETS["llada2-mini"], torch.bfloat16) == 1.0
    assert model_bytes_factor(TINY, torch.float32) == 1.0


def test_quick_grid_is_smaller_than_the_full_one() -> None:
    dev = select_device("cpu")
    quick, full = Grid.for_device(dev, True), Grid.for_device(dev, False)
    assert len(quick.gpu_tokens) < len(full.gpu_tokens) and quick.repeats <= full.repeats
    assert len(quick.copy_bytes) < len(full.copy_bytes)


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    dev = select_device("cpu")
    grid = Grid(repeats=3, gpu_tokens=[1, 4, 16], cpu_tokens=[1, 4, 16], att_tokens=[4, 16], att_context=[16, 64],
                copy_bytes=[1024, 65536, 1 << 20])
    before = torch.get_num_threads()
    prof = calibrate([TINY], dev, quick=True, name="tiny-test", grid=grid)
    assert torch.get_num_threads() == before  # restored
    path = tmp_path_factory.mktemp("cal") / "tiny-test.yaml"
    prof.save(path)
    return prof, path


def test_profile_round_trips_and_says_it_was_measured_without_a_gpu(tiny_profile) -> None:
    prof, path = tiny_profile
    loaded = load_profile(path)
    assert loaded.to_dict() == prof.to_dict()
    assert loaded.provenance.kind == "measured"
    assert "NO GPU" in loaded.description and "cpu-as-gpu" in loaded.provenance.notes
    assert loaded.provenance.date and loaded.provenance.repeats == 3
    assert loaded.pcie.copy_engines == 1 and loaded.cpu.workers == 1


def test_profile_has_curves_for_the_measured_shape(tiny_profile) -> None:
    prof, _ = tiny_profile
    (gpu,) = prof.gpu.expert_ffn
    (cpu,) = prof.cpu.expert_ffn
    assert gpu.matches(TINY) and cpu.matches(TINY)
    assert gpu.curve.x == [1.0, 4.0, 16.0] and cpu.curve.x == [1.0, 4.0, 16.0]
    for curve in (gpu.curve, cpu.curve, prof.pcie.h2d, prof.pcie.d2h):
        assert curve is not None
        assert all(b >= a for a, b in zip(curve.time_us, curve.time_us[1:], strict=False))
        assert all(t > 0 for t in curve.time_us) and len(curve.spread_us) == len(curve.x)
    # the cost functions use the measured curve (no roofline flag) inside the measured range
    from tidesim.notes import noting

    t, notes = noting(lambda: prof.gpu_expert_time(np.array([4]), TINY)[0])
    assert t == pytest.approx(gpu.curve.time_us[1] * 1e-6)
    assert not notes
    (att,) = prof.gpu.attention
    assert att["tokens"] == [4, 16] and att["context"] == [16, 64]
    arr = np.asarray(att["time_us"])
    assert arr.shape == (2, 2) and (np.diff(arr, axis=0) >= 0).all() and (np.diff(arr, axis=1) >= 0).all()
    # the executor's whole fixed path, on the attention grid's points, is what a layer is charged
    from tidesim.curves import layer_shape

    (fixed,) = prof.gpu.layer_fixed
    assert {k: fixed[k] for k in layer_shape(TINY)} == layer_shape(TINY)
    assert fixed["tokens"] == [4, 16] and fixed["context"] == [16, 64]
    arr = np.asarray(fixed["time_us"])
    assert arr.shape == (2, 2) and (arr > 0).all() and (np.diff(arr, axis=0) >= 0).all()
    t, notes = noting(lambda: prof.gpu_layer_fixed_time(np.array([16]), np.array([64]), TINY)[0])
    assert t == pytest.approx(arr[1, 1] * 1e-6) and not notes
    # copies: x in model bytes; tiny is a float32 model, so bytes are as measured
    assert prof.pcie.h2d is not None and prof.pcie.h2d.x == [1024.0, 65536.0, float(1 << 20)]
    assert prof.pcie.h2d_gbs > 0 and prof.pcie.copy_slows_compute >= 0
    assert prof.gpu.launch_overhead_us > 0 and prof.gpu.layer_overhead_us >= 0
    assert prof.cpu.task_overhead_us > 0 and prof.cpu.mem_bandwidth_gbs > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibrate_on_cuda_measures_the_gpu() -> None:
    dev = select_device("cuda")
    grid = Grid(repeats=3, gpu_tokens=[1, 8], cpu_tokens=[1, 8], att_tokens=[8], att_context=[64],
                copy_bytes=[1 << 16, 1 << 22])
    prof = calibrate([PRESETS["llada2-mini"]], dev, quick=True, name="cuda-test", grid=grid)
    assert prof.pcie.copy_engines == 2 and "NO GPU" not in prof.description
    assert prof.gpu.expert_ffn[0].curve.time_us[0] > 0


def test_measured_contention_goes_into_the_profile_field() -> None:
    """calibrate's GPU-side/CPU-pool contention is cpu.gpu_contention (what the cost model reads),
    rounded like the other ratios, and survives a save and load."""
    from tidesim_runtime.measure.calibrate import Calibration, build_profile

    from tidesim.hardware import Curve, ExpertCurve, profile_from_dict

    dev = select_device("cpu")
    curve = ExpertCurve(TINY.hidden_size, TINY.moe_intermediate_size, Curve([1.0, 8.0], [100.0, 200.0]))
    cal = Calibration(dev, Grid.for_device(dev, quick=True), gpu_curves=[curve], cpu_curves=[curve],
                      h2d=Curve([1024.0, 65536.0], [10.0, 20.0]), d2h=Curve([1024.0, 65536.0], [10.0, 20.0]),
                      mem_gbs=1.0, tflops=1.0, contention=0.123456, pool_contention=0.0456789)
    prof = build_profile(cal, "t", [TINY])
    assert prof.cpu.gpu_contention == 0.1235 and prof.cpu.pool_contention == 0.0457
    assert "contention" not in prof.provenance.notes
    back = profile_from_dict(prof.to_dict())
    assert back.cpu.gpu_contention == 0.1235 and back.cpu.pool_contention == 0.0457


def test_pool_slowdown_is_measured_with_the_gpu_side_running_beside_it() -> None:
    """The pool's direction of the contention: a pool job alone, then while a thread keeps the GPU
    side busy. Here both take turns on one lock (5 ms each), so the job under load waits about one
    GPU-side turn per step: a slowdown near 1 (0.5 to 2 allowed for the host's scheduling), where
    a GPU side that did not run beside the job would give 0."""
    import threading
    import time

    from tidesim_runtime.engine.streams import make_backend
    from tidesim_runtime.measure.resources import Calibration, _pool_slowdown
    dev = select_device("cpu")
    backend = make_backend(dev.torch_device)
    lock = threading.Lock()

    def hold() -> None:
        with lock:
            time.sleep(0.005)

    def pool_job() -> float:
        t0 = time.perf_counter()
        for _ in range(4):
            hold()
        return time.perf_counter() - t0

    cal = Calibration(dev, Grid(repeats=1, gpu_tokens=[1], cpu_tokens=[1], att_tokens=[1], att_context=[1],
                                copy_bytes=[1]))
    try:
        slowdown = _pool_slowdown(cal, hold, pool_job)
    finally:
        backend.close()
    assert 0.5 <= slowdown <= 2.0


def test_rotating_pairs_walk_the_regions_chunk_by_chunk_and_wrap() -> None:
    from tidesim_runtime.measure.resources import rotating_pairs

    src, dst = torch.arange(10.0), torch.zeros(10)
    # 3-element chunks of a 10-element region: chunks 0, 1, 2 (the 10th element is never used);
    # 4 copies from chunk 2 take chunks 2, 0, 1, 2 and the next queue starts at chunk 0
    pairs, nxt = rotating_pairs(dst, src, 3, 4, 2)
    assert nxt == 0
    assert [p[1].tolist() for p in pairs] == [[6.0, 7.0, 8.0], [0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]
    assert all(d.data_ptr() - dst.data_ptr() == s.data_ptr() - src.data_ptr() for d, s in pairs)


def test_copy_timing_never_reuses_a_buffer_a_cache_could_still_hold() -> None:
    """The copy curves are timed on buffers that rotate over copy_region_bytes: within the whole
    measurement of one size no source is read again before every other chunk of the region has
    been (the executor copies experts that no cache holds; one buffer over and over times the
    cache: issue 24's fidelity run found expert copies 2.0x the calibrated time)."""
    from tidesim_runtime.engine.device import last_level_cache_bytes
    from tidesim_runtime.engine.streams import HostBackend
    from tidesim_runtime.measure.resources import Calibration, copy_region_bytes, measure_copies
    from tidesim_runtime.measure.timer import Timer

    dev = select_device("cpu")
    assert copy_region_bytes(dev, 1 << 30) == 2 << 30
    assert copy_region_bytes(dev, 1) >= 2 * last_level_cache_bytes()
    grid = Grid(repeats=3, gpu_tokens=[1], cpu_tokens=[1], att_tokens=[1], att_context=[1],
                copy_bytes=[1 << 20, 1 << 22])
    seen: dict[int, list[int]] = {}

    class Recording(HostBackend):
        def copy_queue_s(self, pairs, direction):      # type: ignore[no-untyped-def]
            for _d, s in pairs:
                seen.setdefault(s.numel(), []).append(s.data_ptr())
            return super().copy_queue_s(pairs, direction)

    be = Recording()
    try:
        cal = Calibration(dev, grid)
        measure_copies(cal, be, Timer(dev, be), 0.5)
    finally:
        be.close()
    region = copy_region_bytes(dev, 1 << 22)
    for numel, ptrs in seen.items():
        chunks = region // (4 * numel)
        # both directions, (repeats + 1) queues each; every `chunks` consecutive reads are distinct
        for start in range(0, len(ptrs), chunks):
            window = ptrs[start:start + chunks]
            assert len(set(window)) == len(window)
        assert len(ptrs) >= 2 * (grid.repeats + 1) * 2
    assert cal.h2d is not None and cal.h2d.x == [float(1 << 19), float(1 << 21)]   # model bytes (factor 0.5)
    assert "rotate" in cal.h2d.provenance.source


def test_contention_tasks_cycle_through_few_token_counts_over_adjacent_rows() -> None:
    """The pool's tasks while contention is measured: one per expert, 1, 2, 4, 8, 1, ... tokens,
    each over the rows right after the previous one (every row computed once)."""
    from tidesim_runtime.measure.resources import contention_tasks

    tasks = contention_tasks(6)
    assert [(t.expert, t.start, t.stop) for t in tasks] == [(0, 0, 1), (1, 1, 3), (2, 3, 7), (3, 7, 15),
                                                          (4, 15, 16), (5, 16, 18)]
