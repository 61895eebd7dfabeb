"""`tidesim calibrate`: measure this machine with the runtime's own kernels -> HardwareProfile.

What is measured (each a median over repeats, with the spread kept):
- GPU expert FFN time vs tokens per expert, per model shape: the executor's grouped kernel over
  G experts with the same token count, charged per expert as (T - launch) / G + launch, which is
  how the cost model charges a grouped kernel. The G experts' weights exceed the last-level
  cache on the CPU-as-GPU path (on a GPU they exceed L2).
- CPU expert FFN time vs tokens, on the runtime's worker pool (its worker and thread count),
  over experts whose weights together exceed the last-level cache (no cache reuse).
- Attention time vs tokens and context (the executor's attention kernel), per model shape.
- H2D and D2H copy time vs bytes through the executor's copy path (pinned memory and copy
  streams on CUDA; the copy thread on the CPU-as-GPU path), and whether copies slow concurrent
  GPU compute (copy_slows_compute) and the CPU pool (copy_slows_cpu).
- The executor's whole fixed per-layer path (norms, attention, shared expert, router, the host
  reading the split, the pairs' gather and combine) vs tokens and context, per model shape, over
  layers whose weights no cache holds (gpu.layer_fixed: what a MoE layer is charged outside its
  experts).
- Launch overhead (a tiny kernel), dense-weight bandwidth and FLOP rate (roofline for the shared
  expert, router and lm_head), CPU task overhead, and the per-layer overhead: the executor's fixed
  per-layer path minus the modelled attention, shared expert and router (what dense layers and
  shapes without a gpu.layer_fixed grid are charged).

On the CPU-as-GPU path sizes are expressed in the model's bytes (bf16), as the simulator counts
them, while buffers are float32: a "bandwidth" there is model bytes per second.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tidesim.errors import InputError
from tidesim.hardware import HardwareProfile
from tidesim.models import ModelSpec
from tidesim_runtime.engine.cpu_pool import CPUPool
from tidesim_runtime.engine.device import DeviceInfo, PinnedThreads
from tidesim_runtime.engine.streams import make_backend
from tidesim_runtime.measure.profile import build_profile
from tidesim_runtime.measure.resources import (
    Calibration,
    Grid,
    measure_attention,
    measure_contention,
    measure_copies,
    measure_copy_pool_slowdown,
    measure_copy_slowdown,
    measure_cpu_bandwidth,
    measure_cpu_experts,
    measure_dense,
    measure_gpu_experts,
    measure_launch,
    measure_layer_overhead,
    measure_task_overhead,
    model_bytes_factor,
    warm_device,
)
from tidesim_runtime.measure.timer import Stat, Timer, monotone, stat

WARM_UP_S = 2.0   # seconds of large products on a GPU before the first measurement (clocks up)

__all__ = ["Calibration", "Grid", "Stat", "Timer", "build_profile", "calibrate", "model_bytes_factor", "monotone",
           "stat"]


# ----- driver ------------------------------------------------------------------------------
def shape_steps(cal: Calibration, timer: Timer, pool: CPUPool, spec: ModelSpec
                ) -> list[tuple[str, Callable[[], None]]]:
    """The measurements made once per model shape."""
    return [
        (f"{spec.name}: GPU expert FFN", lambda: measure_gpu_experts(cal, timer, spec)),
        (f"{spec.name}: CPU expert FFN", lambda: measure_cpu_experts(cal, pool, spec)),
        (f"{spec.name}: attention and layer fixed path", lambda: measure_attention(cal, timer, spec)),
        (f"{spec.name}: dense weights", lambda: measure_dense(cal, timer, spec)),
    ]


def calibrate(models: list[ModelSpec], device: DeviceInfo, quick: bool, name: str,
              progress: Callable[[list[tuple[str, Callable[[], None]]]], None] | None = None,
              grid: Grid | None = None) -> HardwareProfile:
    """Measure and build the profile. `progress` runs the list of (label, step) (a progress bar);
    by default the steps run in order. `grid` overrides the points measured (tests)."""
    if not models:
        raise InputError("give at least one model to calibrate for (--models)")
    grid = grid or Grid.for_device(device, quick)
    cal = Calibration(device, grid)
    threads_before = torch.get_num_threads()
    affinity = PinnedThreads(device.cpu_set)
    if not device.is_cuda:
        torch.set_num_threads(device.gpu_threads)
    backend = make_backend(device.torch_device)
    pool = CPUPool(device.cpu_workers, device.cpu_threads_per_worker)
    timer = Timer(device, backend)
    factor = model_bytes_factor(models[0], device.dtype)
    steps: list[tuple[str, Callable[[], None]]] = [
        ("warm-up", lambda: warm_device(cal, timer, WARM_UP_S if device.is_cuda else 0.2)),
        ("launch overhead", lambda: measure_launch(cal, timer))]
    for spec in models:
        steps += shape_steps(cal, timer, pool, spec)
    steps += [
        ("copies", lambda: measure_copies(cal, backend, timer, factor)),
        ("copies vs compute", lambda: measure_copy_slowdown(cal, backend, timer, models[0])),
        ("copies vs CPU pool", lambda: measure_copy_pool_slowdown(cal, backend, pool, models[0])),
        ("GPU side vs CPU pool", lambda: measure_contention(cal, pool, timer, models[0])),
        ("CPU task overhead", lambda: measure_task_overhead(cal, pool)),
        ("CPU bandwidth", lambda: measure_cpu_bandwidth(cal, pool, models[0])),
    ]
    try:
        with torch.inference_mode():
            if progress is not None:
                progress(steps)
            else:
                for _, step in steps:
                    step()
            profile = build_profile(cal, name, models)
            for spec in models:
                measure_layer_overhead(cal, timer, spec, profile)
                profile.gpu.layer_overhead_us = max(profile.gpu.layer_overhead_us, cal.layer_overhead_us)
    finally:
        pool.close()
        backend.close()
        affinity.restore()
        torch.set_num_threads(threads_before)
    return profile


