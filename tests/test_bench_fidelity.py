"""bench/bench_fidelity.py's offline mode: the what-if profile by hand, and a stored quiet run
re-predicted (no runtime measurement)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bench_fidelity as bench  # noqa: E402

from tidesim.hardware import get_profile, load_profile  # noqa: E402
from tidesim.models import PRESETS  # noqa: E402


def test_what_if_scales_every_copy_and_sets_the_copy_slowdown() -> None:
    hw = load_profile(REPO / "bench/results/fidelity-dev-2core-cpu/profile.yaml")
    # the stored profile's H2D curve: 4 MiB in 774.335 us, 8 MiB in 1515.366 us (model bytes);
    # 6 MiB is halfway: 1144.85 us, twice that with copy_scale 2: 2289.70 us
    mib = float(2**20)
    assert float(hw.h2d_time(6 * mib)) == pytest.approx(1144.8505e-6, rel=1e-6)
    slow = bench.what_if(hw, copy_scale=2.0, copy_slows=0.5)
    assert float(slow.h2d_time(6 * mib)) == pytest.approx(2289.701e-6, rel=1e-6)
    assert float(slow.d2h_time(8 * mib)) == pytest.approx(2 * 1534.049e-6, rel=1e-6)
    assert slow.pcie.copy_slows_compute == 0.5
    # nothing else moves: the expert curves and the contention are the profile's
    assert slow.gpu.expert_ffn == hw.gpu.expert_ffn and slow.cpu.gpu_contention == hw.cpu.gpu_contention
    # a preset without curves (h100-sxm-pcie5: 50 GB/s and 10 us a copy): 1 GB takes 0.02 s + 10 us,
    # at copy_scale 2 the transfer doubles and the per-copy overhead stays: 0.04 s + 10 us
    h100 = get_profile("h100-sxm-pcie5")
    assert float(h100.h2d_time(1e9)) == pytest.approx(0.02001, rel=1e-9)
    assert float(bench.what_if(h100, 2.0).h2d_time(1e9)) == pytest.approx(0.04001, rel=1e-9)

def test_bad_what_if_is_refused_with_exit_2() -> None:
    with pytest.raises(SystemExit) as e:
        bench.main(["--out", str(REPO / "bench/results/fidelity-dev-2core-cpu"), "--repredict", "--copy-scale", "0"])
    assert e.value.code == 2


def test_what_if_scales_the_fixed_layer_work_and_sets_the_contention() -> None:
    hw = load_profile(REPO / "bench/results/fidelity-dev-2core-amd/profile.yaml")
    spec = PRESETS["llada2-mini"]
    t, c = np.array([32]), np.array([128])
    # the stored grid: attention at 32 tokens, context 128: 16099.499 us; layer overhead 2587.112 us
    assert hw.gpu.attention[0]["time_us"][2][1] == pytest.approx(16099.499, rel=1e-9)
    slow = bench.what_if(hw, fixed_scale=1.5, contention=0.25)
    assert float(slow.attention_time(t, c, spec)[0]) == pytest.approx(1.5 * 16099.499e-6, rel=1e-6)
    assert slow.gpu.layer_overhead_us == pytest.approx(1.5 * 2587.111688929452, rel=1e-12)
    assert slow.cpu.gpu_contention == 0.25
    # shared expert and gate (roofline terms) do not move: the rest of the fixed time grows by exactly
    # 0.5 x (attention + overhead)
    extra = float(slow.gpu_layer_fixed_time(t, c, spec)[0] - hw.gpu_layer_fixed_time(t, c, spec)[0])
    assert extra == pytest.approx(0.5 * (16099.499 + 2587.111688929452) * 1e-6, rel=1e-6)
    assert slow.gpu.expert_ffn == hw.gpu.expert_ffn and slow.pcie == hw.pcie


def test_drift_is_the_median_signed_error_of_each_repeat_pass() -> None:
    rows = [{"run": "prefix", "repeat_errors": [0.01, -0.10]}, {"run": "prefix", "repeat_errors": [0.03, -0.20]},
            {"run": "prefix", "repeat_errors": [-0.05, -0.15]}, {"run": "none", "repeat_errors": [0.02]}]
    passes = bench.drift(rows)
    assert passes == [("prefix", 0, 0.01, 3), ("prefix", 1, -0.15, 3), ("none", 0, 0.02, 1)]
    assert bench.pass_shift(passes) == pytest.approx(0.17)      # +0.02 - (-0.15)
    assert bench.pass_shift([]) == 0.0


def test_stored_amd_run_repredicts_and_shows_the_slowdown_between_passes() -> None:
    """The quiet run of 2026-12-06 (AMD EPYC): re-predicted with its own profile it gives the stored
    errors back (median 12.7%, max 22.7%); its first passes of the prefix and none-cache traces
    are predicted to within 1% in the median, the later passes 13-18% fast: the machine slowed."""
    out = REPO / "bench/results/fidelity-dev-2core-amd"
    rows = bench.repredict(out, load_profile(out / "profile.yaml"))
    assert len(rows) == 30
    assert all(r["error"] == pytest.approx(r["stored_error"], abs=1e-9) for r in rows)
    passes = {(n, k): e for n, k, e, _ in bench.drift(rows)}
    assert abs(passes[("prefix", 0)]) < 0.01 and abs(passes[("none", 0)]) < 0.01
    assert passes[("none", 1)] < -0.12 and all(passes[("window", k)] < -0.15 for k in range(3))
    assert bench.pass_shift(bench.drift(rows)) > bench.STEADY


def test_a_full_run_records_the_passes(tmp_path, monkeypatch) -> None:
    """The measuring mode, its runtime steps stubbed out, on a copy of the stored AMD run: fidelity.json
    gets the stored median (12.7%), each pass's median signed error in run order and their shift."""
    import json
    import shutil

    src = REPO / "bench/results/fidelity-dev-2core-amd"
    out = tmp_path / "run"
    shutil.copytree(src, out)
    ran: list[list[str]] = []
    monkeypatch.setattr(bench, "tidesim", lambda args: ran.append(args))
    assert bench.main(["--out", str(out), "--hw", str(out / "profile.yaml")]) == 0
    assert [a[0] for a in ran] == ["validate"] * 3               # no synth (trace stored), no calibrate (--hw)
    # the stored prefix trace is named relative to the checkout, not where it lies on this machine
    assert ran[0][ran[0].index("--trace") + 1] == "bench/results/validation-dev-2core-cpu/trace.parquet"
    result = json.loads((out / "fidelity.json").read_text())
    assert result["median_abs_error"] == pytest.approx(0.127, abs=5e-4) and len(result["passes"]) == 9
    assert [(p["run"], p["repeat"]) for p in result["passes"]][:4] == [("prefix", 1), ("prefix", 2), ("prefix", 3),
                                                                      ("none", 1)]
    assert result["pass_shift"] == pytest.approx(max(p["median_error"] for p in result["passes"])
                                                 - min(p["median_error"] for p in result["passes"]))
    assert result["pass_shift"] > bench.STEADY


@pytest.mark.parametrize("once", [False, True])
def test_each_validation_gets_its_own_calibration_unless_once(tmp_path, monkeypatch, once) -> None:  # type: ignore[no-untyped-def]
    """Without --hw, a calibration right before each validation (OUT/profile_<run>.yaml, which
    that validation and --repredict use); --calibrate-once: one OUT/profile.yaml for all three."""
    import json
    import shutil

    src = REPO / "bench/results/fidelity-dev-2core-amd"
    out = tmp_path / "run"
    shutil.copytree(src, out)
    ran: list[list[str]] = []
    monkeypatch.setattr(bench, "tidesim", lambda args: ran.append(args))
    assert bench.main(["--out", str(out)] + (["--calibrate-once"] if once else [])) == 0
    steps = [(a[0], Path(a[a.index("-o" if a[0] == "calibrate" else "--hw") + 1]).name) for a in ran]
    if once:
        assert steps == [("calibrate", "profile.yaml")] + [("validate", "profile.yaml")] * 3
    else:
        assert steps == [x for n in ("prefix", "none", "window")
                         for x in (("calibrate", f"profile_{n}.yaml"), ("validate", f"profile_{n}.yaml"))]
    rows = json.loads((out / "fidelity.json").read_text())["rows"]
    assert {r["profile"] for r in rows} == ({"profile.yaml"} if once else {f"profile_{n}.yaml" for n in
                                                                           ("prefix", "none", "window")})
    # --repredict reads each run's own profile where there is one
    shutil.copy(out / "profile.yaml", out / "profile_none.yaml")
    assert bench.profile_path(out, "none").name == "profile_none.yaml"
    assert bench.profile_path(out, "window").name == "profile.yaml"


def test_repredict_takes_one_profile_per_run() -> None:
    """A profile per run name predicts that run's configurations: the stored profile for the prefix
    run and one with twice the fixed work for the others changes only the others."""
    out = REPO / "bench/results/fidelity-dev-2core-amd"
    hw = load_profile(out / "profile.yaml")
    slow = bench.what_if(hw, fixed_scale=2.0)
    same = bench.repredict(out, hw)
    mixed = bench.repredict(out, {"prefix": hw, "none": slow, "window": slow})
    for a, b in zip(same, mixed, strict=True):
        if a["run"] == "prefix":
            assert b["predicted_step_ms"] == pytest.approx(a["predicted_step_ms"], rel=1e-12)
        else:
            assert b["predicted_step_ms"] > a["predicted_step_ms"]


def test_errors_are_grouped_by_policy_run_and_budget() -> None:
    rows = [{"policy": "tide", "refresh": "async", "run": "none", "budget": 32, "abs_error": 0.1},
            {"policy": "tide", "refresh": "sync", "run": "none", "budget": 32, "abs_error": 0.3},
            {"policy": "fiddler", "refresh": "sync", "run": "prefix", "budget": 96, "abs_error": 0.2}]
    groups = bench.group_errors(rows)
    assert groups["tide async"] == (0.1, 0.1, 1) and groups["fiddler"] == (0.2, 0.2, 1)
    assert groups["run none"] == pytest.approx((0.2, 0.3, 2)) and groups["B=32"] == pytest.approx((0.2, 0.3, 2))
    assert list(groups)[:3] == ["fiddler", "tide async", "tide sync"]


def test_speed_probe_per_pass_and_the_speed_matched_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """repeat_speeds reads validate's probes (probe / what the profile says); a pass's speed is
    their median; the speed-matched error scales each repeat's prediction by its probe."""
    import json

    folder = tmp_path / "validate_prefix"
    folder.mkdir()
    (folder / "configurations.jsonl").write_text(
        json.dumps({"config": "a", "measured_step_s": [0.1, 0.12], "probe_s": [0.02, 0.024],
                    "probe_expected_s": 0.02}) + "\n"
        + json.dumps({"config": "old", "measured_step_s": [0.1]}) + "\n")
    assert bench.repeat_speeds(bench.configuration_rows(folder)) == {"a": pytest.approx([1.0, 1.2])}
    # predicted 100 ms against 100 and 120 ms measured: errors 0 and -1/6; scaled by 1.0 and 1.2
    # the second becomes 120 / 120 - 1 = 0, so the speed-matched |error| is 0
    rows = [{"run": "prefix", "repeat_errors": bench.repeat_errors(100.0, [0.1, 0.12]), "repeat_speeds": [1.0, 1.2]},
            {"run": "prefix", "repeat_errors": [0.1, 0.1], "repeat_speeds": [1.0, 1.0]},
            {"run": "prefix", "repeat_errors": [0.05], "repeat_speeds": []}]        # no probe: left out
    assert bench.speed_matched(rows) == pytest.approx([0.0, 0.1])
    assert bench.pass_speeds(rows) == [("prefix", 0, 1.0), ("prefix", 1, pytest.approx(1.1))]


def test_mean_profile_averages_two_calibrations_point_by_point() -> None:
    """--bracket's profile: the calibrations before and after a validation, every measured number
    their mean (an expert curve at each point, the contention), names and provenance the first's;
    two calibrations of different form are refused."""
    import dataclasses

    before = load_profile(REPO / "bench/results/fidelity-dev-2core-amd-r3/profile_prefix.yaml")
    after = load_profile(REPO / "bench/results/fidelity-dev-2core-amd-r3/profile_window.yaml")
    mean = bench.mean_profile(before, after)
    b, a, m = (h.gpu.expert_ffn[0].curve.time_us for h in (before, after, mean))
    assert m == pytest.approx([(x + y) / 2 for x, y in zip(b, a, strict=True)])
    assert mean.cpu.gpu_contention == pytest.approx((before.cpu.gpu_contention + after.cpu.gpu_contention) / 2)
    assert mean.name == before.name and mean.cpu.workers == before.cpu.workers
    spec = PRESETS["llada2-mini"]
    t = np.array([3])
    assert float(mean.cpu_expert_time(t, spec)[0]) == pytest.approx(
        (float(before.cpu_expert_time(t, spec)[0]) + float(after.cpu_expert_time(t, spec)[0])) / 2, rel=1e-9)
    other = dataclasses.replace(after, cpu=dataclasses.replace(after.cpu, workers=after.cpu.workers + 1))
    with pytest.raises(SystemExit, match="cpu.workers"):
        bench.mean_profile(before, other)
