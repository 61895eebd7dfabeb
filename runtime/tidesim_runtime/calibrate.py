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
  GPU compute (copy_slows_compute).
- Launch overhead (a tiny kernel), dense-weight bandwidth and FLOP rate (roofline for the shared
  expert, router and lm_head), CPU task overhead, and the per-layer overhead: the executor's fixed
  per-layer path minus the modelled attention, shared expert and router.

On the CPU-as-GPU path sizes are expressed in the model's bytes (bf16), as the simulator counts
them, while buffers are float32: a "bandwidth" there is model bytes per second.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tidesim import __version__
from tidesim.errors import InputError
from tidesim.hardware import (
    CPUProfile,
    Curve,
    ExpertCurve,
    GPUProfile,
    HardwareProfile,
    PCIeProfile,
    Provenance,
)
from tidesim.models import ModelSpec
from tidesim_runtime.cpu_pool import CPUPool, ExpertTask, expert_task_runner
from tidesim_runtime.device import (
    DeviceInfo,
    host_memory_total,
    last_level_cache_bytes,
    provenance_fields,
    usable_cores,
)
from tidesim_runtime.executor import LayerRouting
from tidesim_runtime.gate import route
from tidesim_runtime.kernels import (
    KVBuffer,
    attention,
    gate_logits,
    grouped_experts,
    grouped_impl,
    layer_front,
    random_layer_weights,
    random_matrix,
    rotary_tables,
    swiglu,
)
from tidesim_runtime.streams import D2H, H2D, Backend, make_backend
from tidesim_runtime.weights import ExpertBank

GIB = 2**30


@dataclass
class Grid:
    """What to measure; `quick` keeps the run under about 30 s on a 2-core machine."""

    repeats: int
    gpu_tokens: list[int]
    cpu_tokens: list[int]
    att_tokens: list[int]
    att_context: list[int]
    copy_bytes: list[int]

    @classmethod
    def for_device(cls, device: DeviceInfo, quick: bool) -> Grid:
        if device.is_cuda:
            tokens = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024] if not quick else [1, 4, 16, 64, 256]
            return cls(repeats=3 if quick else 7, gpu_tokens=tokens,
                       cpu_tokens=[1, 2, 4, 8, 16, 32, 64, 128] if not quick else [1, 4, 16, 64],
                       att_tokens=[1, 8, 32, 128, 512, 2048] if not quick else [8, 32, 512],
                       att_context=[128, 512, 2048, 8192, 32768] if not quick else [512, 4096],
                       copy_bytes=[2**k for k in range(10, 28, 1 if not quick else 2)])
        return cls(repeats=3 if quick else 5,
                   gpu_tokens=[1, 2, 4, 8, 16, 32, 64, 128] if not quick else [1, 4, 16, 64],
                   cpu_tokens=[1, 2, 4, 8, 16, 32, 64, 128] if not quick else [1, 4, 16, 64],
                   att_tokens=[1, 8, 32, 128] if not quick else [8, 32],
                   att_context=[32, 128, 512, 1024] if not quick else [64, 512],
                   copy_bytes=[2**k for k in range(10, 27, 1 if not quick else 2)])


@dataclass
class Stat:
    median_s: float
    spread_s: float


def stat(samples: list[float]) -> Stat:
    """Median, and spread = half the inter-quartile range (robust to a preempted repeat)."""
    if len(samples) >= 4:
        q1, _, q3 = statistics.quantiles(samples, n=4)
        spread = (q3 - q1) / 2
    else:
        spread = (max(samples) - min(samples)) / 2
    return Stat(statistics.median(samples), spread)


class Timer:
    """Times a callable on the device: CUDA events around it on CUDA, the host clock otherwise."""

    def __init__(self, device: DeviceInfo, backend: Backend) -> None:
        self.device = device
        self.backend = backend

    def time(self, fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Stat:
        return self.time_many([fn], repeats, warmup)[0]

    def time_many(self, fns: list[Callable[[], Any]], repeats: int, warmup: int = 1) -> list[Stat]:
        """Time several callables, repeats interleaved (A B C, A B C, ...): on a shared machine a
        slow spell then spreads over every point instead of bending one part of a curve."""
        for fn in fns:
            for _ in range(warmup):
                fn()
        self.backend.synchronize()
        samples: list[list[float]] = [[] for _ in fns]
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                samples[i].append(self.sample(fn))
        return [stat(s) for s in samples]

    def sample(self, fn: Callable[[], Any]) -> float:
        a = self.backend.timepoint()
        fn()
        b = self.backend.timepoint()
        self.backend.synchronize()
        return float(self.backend.elapsed(a, b))


@dataclass
class Calibration:
    """Measurements as they come in, turned into a profile by profile()."""

    device: DeviceInfo
    grid: Grid
    gpu_curves: list[ExpertCurve] = field(default_factory=list)
    cpu_curves: list[ExpertCurve] = field(default_factory=list)
    attention: list[dict[str, Any]] = field(default_factory=list)
    h2d: Curve | None = None
    d2h: Curve | None = None
    launch_us: float = 0.0
    layer_overhead_us: float = 0.0
    mem_gbs: float = 0.0
    tflops: float = 0.0
    cpu_mem_gbs: float = 0.0
    cpu_gflops: float = 0.0
    task_overhead_us: float = 0.0
    copy_slows: float = 0.0
    contention: float = 0.0
    notes: list[str] = field(default_factory=list)


def model_bytes_factor(spec: ModelSpec, dtype: torch.dtype) -> float:
    """Model bytes per runtime byte (0.5 when a bf16 model runs in float32)."""
    return spec.bytes_per_param / torch.empty(0, dtype=dtype).element_size()


def _experts_over_cache(spec: ModelSpec, dtype: torch.dtype, device: DeviceInfo, at_least: int) -> int:
    """How many distinct experts make a working set at least twice the last-level cache (or, on a
    GPU, 256 MiB, several times any L2)."""
    per = 3 * spec.hidden_size * spec.moe_intermediate_size * torch.empty(0, dtype=dtype).element_size()
    target = 256 * 2**20 if device.is_cuda else 2 * last_level_cache_bytes()
    return max(at_least, math.ceil(target / per))


# ----- measurements ------------------------------------------------------------------------
def measure_launch(cal: Calibration, timer: Timer) -> None:
    x = torch.zeros(16, device=cal.device.torch_device, dtype=cal.device.dtype)
    n = 200

    def many() -> None:
        for _ in range(n):
            x.add_(1.0)
    cal.launch_us = timer.time(many, cal.grid.repeats).median_s / n * 1e6


def measure_gpu_experts(cal: Calibration, timer: Timer, spec: ModelSpec) -> None:
    dev, dtype = cal.device.torch_device, cal.device.dtype
    g = _experts_over_cache(spec, dtype, cal.device, 4)
    bank = ExpertBank.empty(spec, g, dev, dtype)
    gen = torch.Generator().manual_seed(0)
    row = random_matrix(1, bank.flat.shape[1], gen, dev, dtype)[0] * 0.05
    bank.flat.copy_(row.expand_as(bank.flat))
    impl = grouped_impl(dev, dtype)
    launch = cal.launch_us * 1e-6
    tokens = cal.grid.gpu_tokens
    inputs = [random_matrix(g * t, spec.hidden_size, gen, dev, dtype) for t in tokens]
    fns = [lambda x=x, t=t: grouped_experts(x, [t] * g, list(range(g)), bank.w13, bank.w2, impl)
           for x, t in zip(inputs, tokens, strict=True)]
    stats = timer.time_many(fns, cal.grid.repeats)
    xs = [float(t) for t in tokens]
    ts = [(max(st.median_s - launch, 0.0) / g + launch) * 1e6 for st in stats]
    sp = [st.spread_s / g * 1e6 for st in stats]
    prov = Provenance(kind="measured", source=f"runtime grouped kernel ({impl}) over {g} experts",
                      repeats=cal.grid.repeats, device=cal.device.describe(), tool_version=__version__)
    cal.gpu_curves.append(ExpertCurve(spec.hidden_size, spec.moe_intermediate_size,
                                      Curve(xs, _monotone(ts), sp, prov), workers=1))


def measure_cpu_experts(cal: Calibration, pool: CPUPool, spec: ModelSpec) -> None:
    """Per-expert time with every worker busy: makespan x workers / tasks."""
    dtype = cal.device.dtype
    n = max(_experts_over_cache(spec, dtype, cal.device, 4), 2 * pool.workers)
    bank = ExpertBank.empty(spec, n, torch.device("cpu"), dtype)
    gen = torch.Generator().manual_seed(1)
    bank.flat.copy_(random_matrix(1, bank.flat.shape[1], gen, torch.device("cpu"), dtype)[0].expand_as(bank.flat))
    tokens = cal.grid.cpu_tokens
    jobs = []
    for t in tokens:
        x = random_matrix(n * t, spec.hidden_size, gen, torch.device("cpu"), dtype)
        runner = expert_task_runner(x, torch.empty_like(x), bank.w13, bank.w2)
        jobs.append(([ExpertTask(e, e * t, (e + 1) * t) for e in range(n)], runner))
    samples: list[list[float]] = [[] for _ in tokens]
    for tasks, runner in jobs:
        pool.submit(tasks, runner).wait()  # warm-up
    for _ in range(cal.grid.repeats):  # interleaved over token counts (see Timer.time_many)
        for i, (tasks, runner) in enumerate(jobs):
            t0 = time.perf_counter()
            pool.submit(tasks, runner).wait()
            samples[i].append((time.perf_counter() - t0) * pool.workers / n)
    stats = [stat(x) for x in samples]
    xs = [float(t) for t in tokens]
    ts = [st.median_s * 1e6 for st in stats]
    sp = [st.spread_s * 1e6 for st in stats]
    prov = Provenance(kind="measured", source=f"runtime CPU pool, {pool.workers} worker(s) x {pool.threads} "
                      f"thread(s), {n} distinct experts ({cal.device.dtype_name} weights)",
                      repeats=cal.grid.repeats, device=f"CPU: {provenance_fields(cal.device)['cpu']}",
                      tool_version=__version__)
    cal.cpu_curves.append(ExpertCurve(spec.hidden_size, spec.moe_intermediate_size,
                                      Curve(xs, _monotone(ts), sp, prov), workers=pool.workers))


def measure_attention(cal: Calibration, timer: Timer, spec: ModelSpec) -> None:
    dev, dtype = cal.device.torch_device, cal.device.dtype
    gen = torch.Generator().manual_seed(2)
    lw = random_layer_weights(spec, dev, dtype, gen)
    ctx_max = max(cal.grid.att_context + cal.grid.att_tokens)
    kv = KVBuffer(spec, ctx_max, dev, dtype)
    cos, sin = rotary_tables(spec, ctx_max, dev)
    cells = [(t, c) for t in cal.grid.att_tokens for c in cal.grid.att_context]
    inputs = {t: random_matrix(t, spec.hidden_size, gen, dev, dtype) for t in cal.grid.att_tokens}
    stats = timer.time_many([lambda t=t, c=c: attention(inputs[t], lw, kv, c, spec, cos, sin) for t, c in cells],
                            cal.grid.repeats)
    width = len(cal.grid.att_context)
    table = [[st.median_s * 1e6 for st in stats[i:i + width]] for i in range(0, len(stats), width)]
    # more context never costs less; keep the grid monotone in both directions
    arr = np.maximum.accumulate(np.maximum.accumulate(np.asarray(table), axis=0), axis=1)
    cal.attention.append({"hidden": spec.hidden_size, "heads": spec.num_heads, "kv_heads": spec.num_kv_heads,
                          "head_dim": spec.head_dim, "tokens": [int(t) for t in cal.grid.att_tokens],
                          "context": [int(c) for c in cal.grid.att_context],
                          "time_us": [[float(v) for v in r] for r in arr]})


def measure_dense(cal: Calibration, timer: Timer, spec: ModelSpec) -> None:
    """Effective bandwidth (model bytes/s) of a one-token product with a matrix larger than any
    cache (what an lm_head streams), and the FLOP rate of the shared-expert shape at 32 tokens
    (a block's worth: where the shared expert and router of a denoising step run)."""
    dev, dtype = cal.device.torch_device, cal.device.dtype
    gen = torch.Generator().manual_seed(3)
    el = torch.empty(0, dtype=dtype).element_size()
    rows = max(1, (256 * 2**20 if cal.device.is_cuda else 2 * last_level_cache_bytes()) // (spec.hidden_size * el))
    w = random_matrix(int(rows), spec.hidden_size, gen, dev, dtype)
    x1 = random_matrix(1, spec.hidden_size, gen, dev, dtype)
    st = timer.time(lambda: torch.nn.functional.linear(x1, w), cal.grid.repeats)
    cal.mem_gbs = max(cal.mem_gbs, w.numel() * spec.bytes_per_param / max(st.median_s, 1e-9) / 1e9)
    inter = spec.moe_intermediate_size * max(spec.num_shared_experts, 1)
    w13 = random_matrix(2 * inter, spec.hidden_size, gen, dev, dtype)
    w2 = random_matrix(spec.hidden_size, inter, gen, dev, dtype)
    x = random_matrix(32, spec.hidden_size, gen, dev, dtype)
    st = timer.time(lambda: swiglu(x, w13, w2), cal.grid.repeats)
    flops = 2 * 3 * spec.hidden_size * inter * 32
    cal.tflops = max(cal.tflops, flops / max(st.median_s, 1e-9) / 1e12)


def measure_layer_overhead(cal: Calibration, timer: Timer, spec: ModelSpec, profile: HardwareProfile) -> None:
    """The executor's fixed per-layer path (norms, attention, shared expert, router, the host
    reading the split, the final weighted combine) minus what the profile already charges for
    attention, shared expert and router: the rest is layer_overhead_us (median over token counts)."""
    dev, dtype = cal.device.torch_device, cal.device.dtype
    gen = torch.Generator().manual_seed(4)
    lw = random_layer_weights(spec, dev, dtype, gen)
    ctx = cal.grid.att_context[len(cal.grid.att_context) // 2]
    kv = KVBuffer(spec, max(ctx, max(cal.grid.att_tokens)), dev, dtype)
    cos, sin = rotary_tables(spec, kv.capacity, dev)
    residuals = []
    for t in cal.grid.att_tokens:
        x = random_matrix(t, spec.hidden_size, gen, dev, dtype)
        pairs = t * spec.top_k
        r = LayerRouting(torch.arange(pairs, device=dev) % t, torch.full((pairs,), 0.1, device=dev, dtype=dtype),
                         np.zeros(spec.num_experts, np.int64))
        y = torch.zeros(pairs, spec.hidden_size, device=dev, dtype=dtype)

        def fixed(x: torch.Tensor = x, t: int = t, r: LayerRouting = r, y: torch.Tensor = y) -> None:
            _, moe_in, base = layer_front(x, lw, kv, ctx, spec, cos, sin)
            idx, _ = route(gate_logits(moe_in, lw), lw.gate_bias, spec.top_k, spec.n_group, spec.topk_group,
                           spec.routed_scaling_factor)
            torch.bincount(idx.reshape(-1), minlength=spec.num_experts).cpu()
            routed = torch.zeros(moe_in.shape, dtype=torch.float32, device=dev)
            routed.index_add_(0, r.tokens, y.float() * r.weights.float()[:, None])
            _ = base + routed.to(base.dtype)

        measured = timer.time(fixed, cal.grid.repeats).median_s
        modelled = float(profile.gpu_layer_fixed_time(np.array([t]), np.array([ctx]), spec)[0])
        residuals.append(measured - (modelled - profile.gpu.layer_overhead_us * 1e-6))
    cal.layer_overhead_us = max(0.0, statistics.median(residuals) * 1e6)


def measure_copies(cal: Calibration, backend: Backend, timer: Timer, factor: float) -> None:
    """H2D and D2H through the executor's copy path; sizes recorded in model bytes."""
    dev, dtype = cal.device.torch_device, cal.device.dtype
    el = torch.empty(0, dtype=dtype).element_size()
    biggest = max(cal.grid.copy_bytes)
    host = torch.zeros(biggest // el + 1, dtype=dtype, pin_memory=cal.device.is_cuda)
    gpu = torch.zeros(biggest // el + 1, dtype=dtype, device=dev)
    curves = {}
    for direction in (H2D, D2H):
        xs, ts, sp = [], [], []
        for nbytes in cal.grid.copy_bytes:
            n = max(1, nbytes // el)
            dst, src = (gpu[:n], host[:n]) if direction == H2D else (host[:n], gpu[:n])
            samples = []
            for _ in range(cal.grid.repeats + 1):
                backend.synchronize()
                t0 = time.perf_counter()
                backend.host_wait(backend.copy(dst, src, direction))
                samples.append(time.perf_counter() - t0)
            s = stat(samples[1:])
            xs.append(float(n * el * factor))
            ts.append(s.median_s * 1e6)
            sp.append(s.spread_s * 1e6)
        prov = Provenance(kind="measured", repeats=cal.grid.repeats, tool_version=__version__,
                          device=cal.device.describe(),
                          source=("pinned host <-> GPU on the executor's copy streams" if cal.device.is_cuda else
                                  "memcpy between host buffers on the executor's copy thread (cpu-as-gpu); "
                                  "x in model bytes"))
        curves[direction] = Curve(xs, _monotone(ts), sp, prov)
    cal.h2d, cal.d2h = curves[H2D], curves[D2H]


def measure_copy_slowdown(cal: Calibration, backend: Backend, timer: Timer, spec: ModelSpec) -> None:
    """Grouped expert compute alone vs with H2D copies streaming at the same time."""
    dev, dtype = cal.device.torch_device, cal.device.dtype
    g = _experts_over_cache(spec, dtype, cal.device, 4)
    bank = ExpertBank.empty(spec, g, dev, dtype)
    host = ExpertBank.empty(spec, 4, torch.device("cpu"), dtype, pin=cal.device.is_cuda)
    slots = ExpertBank.empty(spec, 4, dev, dtype)
    gen = torch.Generator().manual_seed(5)
    x = random_matrix(8 * g, spec.hidden_size, gen, dev, dtype)
    impl = grouped_impl(dev, dtype)

    def compute() -> None:
        grouped_experts(x, [8] * g, list(range(g)), bank.w13, bank.w2, impl)

    compute()
    ratios = []
    for _ in range(max(cal.grid.repeats, 3)):  # paired samples: alone, then with copies streaming
        alone = timer.sample(compute)
        marks = [backend.copy(slots.flat[i % 4], host.flat[i % 4], H2D, background=True) for i in range(4 * g)]
        busy = timer.sample(compute)
        for m in marks:
            backend.host_wait(m)
        backend.synchronize()
        ratios.append(busy / max(alone, 1e-12))
    cal.copy_slows = max(0.0, statistics.median(ratios) - 1.0)


def measure_contention(cal: Calibration, pool: CPUPool, timer: Timer, spec: ModelSpec) -> None:
    """Fractional slowdown of GPU-side expert work while the CPU pool computes experts (paired
    samples): the profile's cpu.gpu_contention. Near 0 with a real GPU; on the CPU-as-GPU path
    both sides share cores and DRAM."""
    dev, dtype = cal.device.torch_device, cal.device.dtype
    g = _experts_over_cache(spec, dtype, cal.device, 4)
    bank = ExpertBank.empty(spec, g, dev, dtype)
    host = ExpertBank.empty(spec, max(g, 2 * pool.workers), torch.device("cpu"), dtype)
    gen = torch.Generator().manual_seed(7)
    x = random_matrix(8 * g, spec.hidden_size, gen, dev, dtype)
    xc = random_matrix(8 * host.flat.shape[0], spec.hidden_size, gen, torch.device("cpu"), dtype)
    impl = grouped_impl(dev, dtype)
    runner = expert_task_runner(xc, torch.empty_like(xc), host.w13, host.w2)
    tasks = [ExpertTask(e, 8 * e, 8 * (e + 1)) for e in range(host.flat.shape[0])]

    def compute() -> None:
        grouped_experts(x, [8] * g, list(range(g)), bank.w13, bank.w2, impl)

    compute()
    ratios = []
    for _ in range(max(cal.grid.repeats, 3)):
        alone = timer.sample(compute)
        jobs = [pool.submit(tasks, runner) for _ in range(3)]  # keeps the pool busy past the compute
        time.sleep(0.001)
        busy = timer.sample(compute)
        for job in jobs:
            job.wait()
        ratios.append(busy / max(alone, 1e-12))
    cal.contention = max(0.0, statistics.median(ratios) - 1.0)


def measure_task_overhead(cal: Calibration, pool: CPUPool) -> None:
    x = torch.zeros(1)
    samples = []
    for _ in range(max(cal.grid.repeats, 5)):
        t0 = time.perf_counter()
        pool.submit([ExpertTask(0, 0, 1)], lambda task: x.add_(1.0)).wait()
        samples.append(time.perf_counter() - t0)
    cal.task_overhead_us = statistics.median(samples) * 1e6


def measure_cpu_bandwidth(cal: Calibration, pool: CPUPool, spec: ModelSpec) -> None:
    """Model bytes per second one worker streams in a one-token product (the CPU roofline)."""
    dtype = cal.device.dtype
    rows = max(1, 2 * last_level_cache_bytes() // (spec.hidden_size * torch.empty(0, dtype=dtype).element_size()))
    w = random_matrix(int(rows), spec.hidden_size, torch.Generator().manual_seed(6), torch.device("cpu"), dtype)
    x = torch.ones(1, spec.hidden_size, dtype=dtype)
    samples = []
    for _ in range(cal.grid.repeats + 1):
        t0 = time.perf_counter()
        pool.submit([ExpertTask(0, 0, 1)], lambda task: torch.nn.functional.linear(x, w)).wait()
        samples.append(time.perf_counter() - t0)
    per_worker = w.numel() * spec.bytes_per_param / statistics.median(samples[1:]) / 1e9
    cal.cpu_mem_gbs = per_worker * pool.workers


# ----- driver ------------------------------------------------------------------------------
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
    if not device.is_cuda:
        torch.set_num_threads(device.gpu_threads)
    backend = make_backend(device.torch_device)
    pool = CPUPool(device.cpu_workers, device.cpu_threads_per_worker)
    timer = Timer(device, backend)
    factor = model_bytes_factor(models[0], device.dtype)
    steps: list[tuple[str, Callable[[], None]]] = [("launch overhead", lambda: measure_launch(cal, timer))]
    for spec in models:
        steps += [
            (f"{spec.name}: GPU expert FFN", lambda s=spec: measure_gpu_experts(cal, timer, s)),
            (f"{spec.name}: CPU expert FFN", lambda s=spec: measure_cpu_experts(cal, pool, s)),
            (f"{spec.name}: attention", lambda s=spec: measure_attention(cal, timer, s)),
            (f"{spec.name}: dense weights", lambda s=spec: measure_dense(cal, timer, s)),
        ]
    steps += [
        ("copies", lambda: measure_copies(cal, backend, timer, factor)),
        ("copies vs compute", lambda: measure_copy_slowdown(cal, backend, timer, models[0])),
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
        torch.set_num_threads(threads_before)
    return profile


def build_profile(cal: Calibration, name: str, models: list[ModelSpec]) -> HardwareProfile:
    dev = cal.device
    facts = provenance_fields(dev)
    assert cal.h2d is not None and cal.d2h is not None
    big_h2d = cal.h2d.x[-1] / (cal.h2d.time_us[-1] * 1e-6) / 1e9
    big_d2h = cal.d2h.x[-1] / (cal.d2h.time_us[-1] * 1e-6) / 1e9
    cpu_curve = cal.cpu_curves[0].curve
    spec0 = models[0]
    cpu_gflops = cpu_curve.x[-1] * spec0.expert_flops_per_token / (cpu_curve.time_us[-1] * 1e-6) / 1e9
    cpu_gflops *= max(dev.cpu_workers, 1)
    if dev.is_cuda:
        memory_gib = float(torch.cuda.get_device_properties(0).total_memory) / GIB
        gpu_name = dev.name
        description = f"{dev.name} + {facts['cpu']}, measured with tidesim calibrate"
    else:
        memory_gib = host_memory_total() / GIB
        gpu_name = f"CPU as GPU ({facts['cpu']}; {dev.gpu_threads} thread, float32)"
        description = (f"{facts['cpu']} with NO GPU: the 'GPU' side is this CPU ({dev.gpu_threads} thread, "
                       "float32) and 'PCIe' copies are memcpy between host buffers; measured with tidesim "
                       "calibrate for validating the simulator on this machine, not a GPU profile")
    notes = (f"driver {facts['driver']}; torch {facts['torch']}; CPU {facts['cpu']}; "
             f"GPU side {dev.describe()}; repeats {cal.grid.repeats}; spread = half the inter-quartile range"
             + ("" if dev.is_cuda else "; cpu-as-gpu: sizes and bandwidths in model (bf16) bytes, buffers float32; "
                "memory_gib is host memory"))
    prov = Provenance(kind="measured", source="tidesim calibrate (runtime kernels)", date=facts["date"],
                      tool_version=__version__, device=facts["device"], repeats=cal.grid.repeats, notes=notes)
    gpu = GPUProfile(name=gpu_name, memory_gib=round(memory_gib, 3), mem_bandwidth_gbs=round(cal.mem_gbs, 3),
                     bf16_tflops=round(max(cal.tflops, 1e-6), 6), mem_efficiency=1.0, compute_efficiency=1.0,
                     launch_overhead_us=round(cal.launch_us, 3), layer_overhead_us=round(cal.layer_overhead_us, 3),
                     expert_ffn=cal.gpu_curves, attention=cal.attention)
    pcie = PCIeProfile(generation=5 if dev.is_cuda else 1, h2d_gbs=round(big_h2d, 3), d2h_gbs=round(big_d2h, 3),
                       copy_overhead_us=round(cal.h2d.time_us[0], 3), copy_engines=2 if dev.is_cuda else 1,
                       copy_slows_compute=round(cal.copy_slows, 4), h2d=cal.h2d, d2h=cal.d2h)
    cpu = CPUProfile(name=facts["cpu"], cores=usable_cores(), workers=dev.cpu_workers,
                     mem_bandwidth_gbs=round(max(cal.cpu_mem_gbs, 1e-3), 3), gflops=round(max(cpu_gflops, 1e-3), 3),
                     mem_efficiency=1.0, compute_efficiency=1.0, task_overhead_us=round(cal.task_overhead_us, 3),
                     expert_ffn=cal.cpu_curves, gpu_contention=round(cal.contention, 4))
    if not dev.is_cuda:
        pcie.generation = 1  # no PCIe link: a placeholder the schema requires (see description)
    return HardwareProfile(name=name, description=description, provenance=prov, gpu=gpu, pcie=pcie, cpu=cpu)


def _monotone(values: list[float]) -> list[float]:
    """Running maximum: more tokens (or bytes) never take less time; a dip is timing noise."""
    out, best = [], 0.0
    for v in values:
        best = max(best, float(v))
        out.append(round(best, 3))
    return out
