import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tidesim.errors import InputError
from tidesim.hardware import (
    Curve,
    ExpertCurve,
    Provenance,
    bundled_profiles,
    get_profile,
    load_profile,
    profile_from_dict,
)
from tidesim.models import PRESETS
from tidesim.notes import noting

MINI = PRESETS["llada2-mini"]


def test_presets_exist_and_are_marked_as_estimates():
    names = set(bundled_profiles())
    assert {"h100-sxm-pcie5", "a100-80gb-pcie4", "rtx4090-pcie4-desktop", "a40-pcie4"} <= names
    for name in names:
        prof = get_profile(name)
        if name.startswith(("h100", "h200", "a100", "a40", "rtx")):
            assert prof.provenance.kind == "datasheet"


def test_yaml_round_trip(tmp_path):
    prof = get_profile("h100-sxm-pcie5")
    prof.gpu.expert_ffn.append(ExpertCurve(2048, 512, Curve([1, 8, 64], [10.0, 12.0, 30.0], [0.1, 0.1, 0.2],
                                                              Provenance(kind="measured", repeats=5))))
    path = tmp_path / "p.yaml"
    prof.save(path)
    assert load_profile(path) == prof


def test_copy_time_is_overhead_plus_bandwidth():
    prof = get_profile("h100-sxm-pcie5")
    # 10 us overhead + 6291456 B / 50 GB/s
    assert float(prof.h2d_time(MINI.expert_bytes)) == pytest.approx(10e-6 + 6291456 / 50e9)
    assert float(prof.h2d_time(0)) == 0.0


def test_roofline_fallback_is_flagged_and_hand_computed():
    prof = get_profile("a100-80gb-pcie4")
    before = prof.to_dict()
    t, notes = noting(lambda: prof.gpu_expert_time(np.array([1.0]), MINI))
    # memory bound: 6291456 B / (2039 GB/s * 0.85) + 5 us launch
    assert t[0] == pytest.approx(6291456 / (2039e9 * 0.85) + 5e-6)
    assert any("gpu.expert_ffn[2048x512]" in f for f in notes)
    assert prof.to_dict() == before                  # said, not stored on the profile


def _with_curve(xs, ts):
    prof = get_profile("h100-sxm-pcie5")
    prof.gpu.expert_ffn = [ExpertCurve(2048, 512, Curve(list(xs), list(ts)))]
    return prof


def test_interpolation_exact_at_points_and_flagged_outside():
    prof = _with_curve([1, 16, 256], [10.0, 20.0, 100.0])
    t, notes = noting(lambda: prof.gpu_expert_time(np.array([1, 16, 256, 8.5]), MINI) * 1e6)
    assert t == pytest.approx([10.0, 20.0, 100.0, 15.0])
    assert not notes
    _, notes = noting(lambda: prof.gpu_expert_time(np.array([1024]), MINI))
    assert any("outside the measured" in f for f in notes)


@given(st.lists(st.floats(1, 1000), min_size=2, max_size=6, unique=True),
       st.lists(st.floats(0, 1e4), min_size=6, max_size=6),
       st.lists(st.floats(0.5, 5000), min_size=2, max_size=20))
def test_interpolation_monotone_where_data_is(xs, raw_ts, queries):
    xs = sorted(xs)
    ts = sorted(raw_ts[: len(xs)])
    prof = _with_curve(xs, ts)
    q = np.sort(np.asarray(queries))
    t = prof.gpu_expert_time(q, MINI)
    assert np.all(np.diff(t) >= -1e-12)


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("gpu", "memory_gib"), None, "gpu.memory_gib: required field is missing"),
        (("pcie", "h2d_gbs"), -3.0, "pcie.h2d_gbs: must not be negative"),
        (("cpu", "workers"), 0, "cpu.workers: 0 is outside the plausible range 1..4096"),
        (("cpu", "workers"), 2.5, "cpu.workers: must be a whole number in 1..4096, got 2.5"),
        (("cpu", "workers"), 33, "cpu.workers: 33 workers on 32 cores; the CPU pool model needs at least one core"),
        (("pcie", "h2d_gbs"), float("nan"), "pcie.h2d_gbs: must be a finite number, got nan"),
        (("pcie", "d2h_gbs"), float("inf"), "pcie.d2h_gbs: must be a finite number, got inf"),
        (("pcie", "h2d_gbs"), 1e300, "pcie.h2d_gbs: 1e+300 is outside the plausible range 0.01..10000"),
        (("pcie", "h2d_gbs"), 1e-300, "pcie.h2d_gbs: 1e-300 is outside the plausible range"),
        (("gpu", "memory_gib"), 1e9, "gpu.memory_gib: 1e+09 is outside the plausible range 0.25..4096"),
        (("gpu", "mem_efficiency"), 1.5, "gpu.mem_efficiency: 1.5 is outside the plausible range"),
        (("pcie", "copy_engines"), True, "pcie.copy_engines: must be a whole number"),
        (("gpu", "attention"), [{"tokens": [1, 2], "context": [8], "time_us": [[1.0], [float("nan")]]}],
         "gpu.attention[0].time_us: every time must be a finite number >= 0"),
        (("gpu", "colour"), "red", "gpu.colour: unknown field"),
        (("schema_version",), 7, "schema_version 7 is not supported"),
    ],
)
def test_bad_yaml_fields_fail_with_one_line(tmp_path, path, value, message):
    data = get_profile("a40-pcie4").to_dict()
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError) as err:
        load_profile(file)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unreadable_profiles(tmp_path):
    with pytest.raises(InputError, match="no such hardware profile"):
        load_profile(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("gpu: [unclosed")
    with pytest.raises(InputError, match="not valid YAML"):
        load_profile(tmp_path / "bad.yaml")
    with pytest.raises(InputError, match="unknown hardware profile"):
        get_profile("tpu-v9")
    with pytest.raises(InputError, match="top level"):
        profile_from_dict([1, 2])


def test_scaled_profile_for_what_if():
    base = get_profile("h100-sxm-pcie5")
    fast = base.scaled(pcie=2.0, cpu_cores=0.5)
    assert fast.pcie.h2d_gbs == 2 * base.pcie.h2d_gbs
    assert fast.cpu.cores == base.cpu.cores // 2 and fast.cpu.workers == base.cpu.workers
    assert float(fast.h2d_time(MINI.expert_bytes)) < float(base.h2d_time(MINI.expert_bytes))


def test_attention_grid_interpolation():
    prof = get_profile("h100-sxm-pcie5")
    prof.gpu.attention = [{"hidden": 2048, "heads": 16, "kv_heads": 4, "head_dim": 128,
                           "tokens": [32, 64], "context": [64, 128], "time_us": [[10, 20], [30, 40]]}]
    t = prof.attention_time(np.array([32, 48, 64]), np.array([64, 96, 128]), MINI) * 1e6
    assert t == pytest.approx([10, 25, 40])


def test_more_cpu_cores_never_slow_an_expert():
    base = get_profile("h100-sxm-pcie5")
    more = base.scaled(cpu_cores=2.0)
    tokens = np.array([1, 8, 64, 512])
    assert more.cpu.workers == base.cpu.workers and more.cpu.cores == 2 * base.cpu.cores
    assert np.all(more.cpu_expert_time(tokens, MINI) <= base.cpu_expert_time(tokens, MINI))
    # bandwidth-bound at one token: unchanged; compute-bound at 512 tokens: faster
    assert more.cpu_expert_time(tokens, MINI)[0] == pytest.approx(base.cpu_expert_time(tokens, MINI)[0])
    assert more.cpu_expert_time(tokens, MINI)[3] < base.cpu_expert_time(tokens, MINI)[3]


def test_empty_copies_are_free_and_never_flagged():
    prof = get_profile("h100-sxm-pcie5")
    prof.pcie.h2d = Curve([1024, 1 << 20], [12.0, 40.0])
    free, notes = noting(lambda: float(prof.h2d_time(0)))
    assert free == 0.0 and not notes
    _, notes = noting(lambda: prof.h2d_time(1 << 24))
    assert any("pcie.h2d" in f for f in notes)


def test_cpu_kernel_is_recorded_only_when_known_and_round_trips(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """cpu.kernel (the runtime's CPU expert kernel a calibration measured) is written when set and
    left out when empty, so profiles without one keep their form and fingerprint."""
    from tidesim.hardware import get_profile

    prof = get_profile("dev-2core-cpu")
    assert "kernel" not in prof.to_dict()["cpu"]
    before = prof.fingerprint()
    prof.cpu.kernel = "weights-left"
    assert prof.to_dict()["cpu"]["kernel"] == "weights-left" and prof.fingerprint() != before
    prof.save(tmp_path / "p.yaml")
    assert get_profile(str(tmp_path / "p.yaml")).cpu.kernel == "weights-left"


def test_pool_contention_round_trips_and_is_range_checked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """cpu.pool_contention is written when measured, read back, and refused when absurd (exit-2
    InputError naming the field); a profile without it has no such key."""
    from tidesim.errors import InputError
    from tidesim.hardware import get_profile, profile_from_dict

    prof = get_profile("dev-2core-cpu")
    assert "pool_contention" not in prof.to_dict()["cpu"]
    prof.cpu.pool_contention = 0.17
    prof.save(tmp_path / "p.yaml")
    assert get_profile(str(tmp_path / "p.yaml")).cpu.pool_contention == 0.17
    data = prof.to_dict()
    data["cpu"]["pool_contention"] = 50.0
    with pytest.raises(InputError, match="cpu.pool_contention"):
        profile_from_dict(data)
    data["cpu"]["pool_contention"] = float("nan")
    with pytest.raises(InputError, match="pool_contention"):
        profile_from_dict(data)


def _layer_grid(**shape: int) -> dict:
    from tidesim.curves import layer_shape

    return {**layer_shape(MINI), **shape, "tokens": [1, 32], "context": [32, 128],
            "time_us": [[1000.0, 2000.0], [3000.0, 5000.0]]}


def test_layer_fixed_grid_is_what_a_moe_layer_is_charged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """gpu.layer_fixed (the executor's whole fixed path, measured) replaces the composed charge
    for a model of its shape, interpolated like an attention grid; other shapes keep the
    composition (attention + shared and gate rooflines + layer_overhead_us)."""
    prof = get_profile("dev-2core-cpu")
    composed = prof.gpu_layer_fixed_time(np.array([32.0]), np.array([96.0]), MINI)
    assert "layer_fixed" not in prof.to_dict()["gpu"]          # presets keep their form and fingerprint
    before = prof.fingerprint()
    prof.gpu.layer_fixed = [_layer_grid()]
    assert prof.fingerprint() != before
    # t=32, ctx=96: 3000 + (96-32)/(128-32) x (5000-3000) = 4333.3 us; t=16.5, ctx=80: rows at
    # ctx 32 and 128 give 2000 and 3500, halfway between them 2750 us
    t = prof.gpu_layer_fixed_time(np.array([32.0, 16.5]), np.array([96.0, 80.0]), MINI) * 1e6
    assert t == pytest.approx([4333.333, 2750.0])
    assert float(prof.gpu_layer_fixed_time(np.array([32.0]), np.array([96.0]), MINI)[0]) != pytest.approx(
        float(composed[0]))
    # a grid of another layer shape (more experts) is not this model's: the composition again
    prof.gpu.layer_fixed = [_layer_grid(experts=MINI.num_experts * 2)]
    assert prof.gpu_layer_fixed_time(np.array([32.0]), np.array([96.0]), MINI) == pytest.approx(composed)
    # round trip, and a what-if GPU twice as fast halves the measured path
    prof.gpu.layer_fixed = [_layer_grid()]
    prof.save(tmp_path / "p.yaml")
    loaded = load_profile(tmp_path / "p.yaml")
    assert loaded.to_dict() == prof.to_dict()
    assert loaded.scaled(gpu_speed=2.0).gpu_layer_fixed_time(np.array([32.0]), np.array([96.0]), MINI)[0] \
        == pytest.approx(4333.333e-6 / 2)


@pytest.mark.parametrize("change, message", [
    (lambda g: g.pop("top_k"), "layer_fixed[0].top_k: required field is missing"),
    (lambda g: g.update(colour=1), "layer_fixed[0].colour: unknown field"),
    (lambda g: g.update(time_us=[[1.0, 2.0]]), "layer_fixed[0].time_us: must be a 2 x 2 table"),
    (lambda g: g.update(context=[128, 32]), "layer_fixed[0].context: must be a non-empty increasing list"),
])
def test_bad_layer_fixed_grids_fail_with_one_line(change, message) -> None:  # type: ignore[no-untyped-def]
    data = get_profile("dev-2core-cpu").to_dict()
    grid = _layer_grid()
    change(grid)
    data["gpu"]["layer_fixed"] = [grid]
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        profile_from_dict(data)
