"""Calibrate's choice of the CPU pool layout and kernel (runtime/tidesim_runtime/measure/cpu_choice.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tidesim_runtime.engine import cpu_kernels  # noqa: E402
from tidesim_runtime.engine.device import select_device  # noqa: E402
from tidesim_runtime.measure import cpu_choice  # noqa: E402

from tidesim.models import PRESETS  # noqa: E402


def test_layouts_split_the_cores_evenly() -> None:
    assert cpu_choice.layouts(1) == [(1, 1)]
    assert cpu_choice.layouts(4) == [(1, 4), (2, 2), (4, 1)]
    assert cpu_choice.layouts(6) == [(1, 6), (2, 3), (3, 2), (6, 1)]


def test_best_takes_each_candidates_best_round_after_the_warm_up() -> None:
    times = {"a": iter([9.0, 3.0, 2.5]), "b": iter([0.1, 2.8, 2.9])}   # b's warm-up round is ignored
    choice = cpu_choice._best(["a", "b"], {k: (lambda k=k: next(times[k])) for k in times}, rounds=2)
    assert choice.chosen == "a" and choice.seconds == {"a": 2.5, "b": 2.8}


def test_auto_kernels_exclude_packed_copies_and_what_cannot_run() -> None:
    # avx2-stream takes part where it builds here (AVX2 + FMA and a C++ compiler)
    stream = [] if cpu_kernels.KERNELS["avx2-stream"].why_unusable() else ["avx2-stream"]
    assert cpu_choice.auto_kernels(torch.float32) == ["linear", "weights-left", "compiled", *stream]
    assert "onednn-packed" not in cpu_choice.auto_kernels(torch.bfloat16)
    assert "kt-kernel" not in cpu_choice.auto_kernels(torch.bfloat16)


def test_choose_kernel_measures_the_pool_and_restores_the_current_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_choice, "experts_over_cache", lambda *a: 4)
    monkeypatch.setattr(cpu_choice, "auto_kernels", lambda dtype: ["linear", "weights-left"])
    before = cpu_kernels.current().name
    choice = cpu_choice.choose_kernel(PRESETS["tiny"], select_device("cpu"), rounds=1)
    assert choice.chosen in ("linear", "weights-left") and set(choice.seconds) == {"linear", "weights-left"}
    assert all(s > 0 for s in choice.seconds.values())
    assert cpu_kernels.current().name == before
    dev = select_device("cpu")
    layout = cpu_choice.choose_layout(PRESETS["tiny"], dev, rounds=1)
    names = {f"{w}x{t}" for w, t in cpu_choice.layouts(cpu_choice.pool_cores(dev))}
    assert layout.chosen in names and set(layout.seconds) == names
