"""bench/bench_fidelity.py's offline mode: the what-if profile by hand, and a stored quiet run
re-predicted (no runtime measurement)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bench_fidelity as bench  # noqa: E402

from tidesim.hardware import get_profile, load_profile  # noqa: E402


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
