"""The per-resource measurements of `tidesim calibrate`: each function measures one resource
with the runtime's own kernels and writes its result into a Calibration.

Working sets: CPU-side measurements use experts (or matrices) at least twice the last-level
cache (read from /sys), on either path; GPU-side ones at least twice the GPU's L2 (and 256 MiB)
on CUDA. Copy times are device-timed queues of copies (no host launch-and-sync per copy).
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from tidesim import __version__
from tidesim.curves import composed_layer_fixed_time, layer_shape
from tidesim.hardware import Curve, ExpertCurve, HardwareProfile, Provenance
from tidesim.models import ModelSpec
from tidesim_runtime.engine import cpu_kernels
from tidesim_runtime.engine.cpu_pool import CPUPool, ExpertTask, LayerJob, expert_task_runner
from tidesim_runtime.engine.device import DeviceInfo, last_level_cache_bytes, provenance_fields
from tidesim_runtime.engine.executor import replay_routing
from tidesim_runtime.engine.kernels import (
    KVBuffer,
    attention,
    combine_pairs,
    gate_logits,
    grouped_experts,
    grouped_impl,
    layer_front,
    random_layer_weights,
    random_matrix,
    rotary_tables,
    swiglu,
)
from tidesim_runtime.engine.pinned import HostPinning, IndexStaging
from tidesim_runtime.engine.slots import ExpertBank
from tidesim_runtime.engine.streams import D2H, H2D, Backend
from tidesim_runtime.measure.timer import Stat, Timer, monotone, stat
from tidesim_runtime.reference.gate import route


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
            return cls(repeats=5 if quick else 9, gpu_tokens=tokens,
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
class Calibration:
    """Measurements as they come in, turned into a profile by profile()."""

    device: DeviceInfo
    grid: Grid
    gpu_curves: list[ExpertCurve] = field(default_factory=list)
    cpu_curves: list[ExpertCurve] = field(default_factory=list)
    attention: list[dict[str, Any]] = field(default_factory=list)
    layer_fixed: list[dict[str, Any]] = field(default_factory=list)
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
    copy_slows_cpu: float = 0.0
    contention: float = 0.0
    pool_contention: float = 0.0
    notes: list[str] = field(default_factory=list)


def model_bytes_factor(spec: ModelSpec, dtype: torch.dtype) -> float:
    """Model bytes per runtime byte (0.5 when a bf16 model runs in float32)."""
    return spec.bytes_per_param / torch.empty(0, dtype=dtype).element_size()


def working_set_bytes(device: DeviceInfo, side: str) -> int:
    """Bytes a measurement's working set must reach so that no cache holds it: twice the CPU's
    last-level cache for CPU-side work (on either path), and on a GPU twice its L2 and at least
    256 MiB."""
    if side == "gpu" and device.is_cuda:
        l2 = int(getattr(torch.cuda.get_device_properties(device.index), "L2_cache_size", 0))
        return max(256 * 2**20, 2 * l2)
    return 2 * last_level_cache_bytes()


def experts_over_cache(spec: ModelSpec, dtype: torch.dtype, device: DeviceInfo, side: str, at_least: int) -> int:
    """How many distinct experts make a working set of working_set_bytes(device, side), at most
    every routed expert of the model (a model whose experts all fit in the cache runs them from
    the cache; timing more distinct experts than it has would overstate its time, and for a tiny
    model would take minutes)."""
    per = 3 * spec.hidden_size * spec.moe_intermediate_size * torch.empty(0, dtype=dtype).element_size()
    model_experts = spec.num_experts * max(spec.num_moe_layers, 1)
    return max(at_least, min(math.ceil(working_set_bytes(device, side) / per), model_experts))


QUEUED_COPIES = 16   # copies per timed queue (fewer for big copies: at most 64 MiB a queue)


def paired_samples(grid: Grid) -> int:
    """Paired samples (alone, then under load) for a slowdown ratio: a ratio of two noisy times
    needs many more samples than one time does."""
    return max(3 * grid.repeats, 9)


# ----- measurements ------------------------------------------------------------------------
def warm_device(cal: Calibration, timer: Timer, seconds: float) -> None:
    """Keep the GPU side busy with large products for `seconds` before anything is timed: a GPU
    runs at idle clocks until it has been loaded for a while, and the first curve would pay it."""
    dev, dtype = cal.device.torch_device, cal.device.dtype
    n = 4096 if cal.device.is_cuda else 256
    a = torch.ones(n, n, device=dev, dtype=dtype)
    out = torch.empty_like(a)
    saved, timer.warm_s = timer.warm_s, seconds
    try:
        timer.warm(lambda: torch.mm(a, a, out=out))
    finally:
        timer.warm_s = saved


def measure_launch(cal: Calibration, timer: Timer) -> None:
    x = torch.zeros(16, device=cal.device.torch_device, dtype=cal.device.dtype)
    n = 200

    def many() -> None:
        for _ in range(n):
            x.add_(1.0)
    cal.launch_us = timer.time(many, cal.grid.repeats).median_s / n * 1e6


@dataclass
class GroupedBench:
    """G distinct experts in a slot pool in shuffled slot order, as a refreshed pool holds them,
    run by the executor's grouped path (grouped_experts: index building, staging, gather, grouped
    kernel, scatter) at t tokens each."""

    spec: ModelSpec
    device: DeviceInfo
    g: int
    seed: int

    def __post_init__(self) -> None:
        dev, dtype = self.device.torch_device, self.device.dtype
        self.bank = ExpertBank.empty(self.spec, self.g, dev, dtype)
        self.gen = torch.Generator().manual_seed(self.seed)
        row = random_matrix(1, self.bank.flat.shape[1], self.gen, dev, dtype)[0] * 0.05
        self.bank.flat.copy_(row.expand_as(self.bank.flat))
        self.impl = grouped_impl(dev, dtype)
        self.slots = np.random.default_rng(self.seed).permutation(self.g).astype(np.int64)
        self.experts = np.arange(self.g, dtype=np.int64)
        self.pinning = HostPinning(self.device.is_cuda)

    def fn(self, t: int) -> Callable[[], None]:
        """The grouped path over the G experts with t tokens each (inputs made here, once)."""
        dev, dtype = self.device.torch_device, self.device.dtype
        x = random_matrix(self.g * t, self.spec.hidden_size, self.gen, dev, dtype)
        y = torch.empty_like(x)
        offs = np.arange(self.g + 1, dtype=np.int64) * t
        stage = IndexStaging(self.g * t + self.g + 1, dev, self.pinning)
        return lambda: grouped_experts(x, y, offs, self.experts, self.slots, self.bank.w13, self.bank.w2,
                                       self.impl, stage)

    def close(self) -> None:
        self.pinning.release()


def measure_gpu_experts(cal: Calibration, timer: Timer, spec: ModelSpec) -> None:
    g = experts_over_cache(spec, cal.device.dtype, cal.device, "gpu", 4)
    bench = GroupedBench(spec, cal.device, g, seed=0)
    launch = cal.launch_us * 1e-6
    tokens = cal.grid.gpu_tokens
    try:
        stats = timer.time_many([bench.fn(t) for t in tokens], cal.grid.repeats)
    finally:
        bench.close()
    xs = [float(t) for t in tokens]
    ts = [(max(st.median_s - launch, 0.0) / g + launch) * 1e6 for st in stats]
    sp = [st.spread_s / g * 1e6 for st in stats]
    prov = Provenance(kind="measured", source=f"runtime grouped path ({bench.impl}) over {g} experts in shuffled "
                      "slots (index building, gather and scatter included)",
                      repeats=cal.grid.repeats, device=cal.device.describe(), tool_version=__version__)
    cal.gpu_curves.append(ExpertCurve(spec.hidden_size, spec.moe_intermediate_size,
                                      Curve(xs, monotone(ts), sp, prov), workers=1))


def measure_cpu_experts(cal: Calibration, pool: CPUPool, spec: ModelSpec) -> None:
    """Per-expert time with every worker busy: makespan x workers / tasks."""
    dtype = cal.device.dtype
    n = max(experts_over_cache(spec, dtype, cal.device, "cpu", 4), 2 * pool.workers)
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
                      f"thread(s), kernel {cpu_kernels.current().name}, {n} distinct experts "
                      f"({cal.device.dtype_name} weights)",
                      repeats=cal.grid.repeats, device=f"CPU: {provenance_fields(cal.device)['cpu']}",
                      tool_version=__version__)
    cal.cpu_curves.append(ExpertCurve(spec.hidden_size, spec.moe_intermediate_size,
                                      Curve(xs, monotone(ts), sp, prov), workers=pool.workers))


def measure_attention(cal: Calibration, timer: Timer, spec: ModelSpec) -> None:
    """The attention kernel (gpu.attention) and the executor's whole fixed per-layer path
    (gpu.layer_fixed, FixedPath) over tokens x context, in one interleaved timing: every repeat
    runs each cell of both once, so a change of the machine's speed during calibrate moves both
    grids alike (what the fixed path costs beyond attention is then a property of the code, not
    of the minute it was measured in)."""
    dev, dtype = cal.device.torch_device, cal.device.dtype
    gen = torch.Generator().manual_seed(2)
    lw = random_layer_weights(spec, dev, dtype, gen)
    tokens, context = cal.grid.att_tokens, cal.grid.att_context
    ctx_max = max(context + tokens)
    kv = KVBuffer(spec, ctx_max, dev, dtype)
    cos, sin = rotary_tables(spec, ctx_max, dev)
    cells = [(t, c) for t in tokens for c in context]
    inputs = {t: random_matrix(t, spec.hidden_size, gen, dev, dtype) for t in tokens}
    def cell(t: int, c: int) -> Callable[[], Any]:
        return lambda: attention(inputs[t], lw, kv, c, spec, cos, sin)

    path = FixedPath(spec, cal.device, ctx_max, seed=8)
    fns = [f for t, c in cells for f in (cell(t, c), path.fn(t, c))]
    stats = timer.time_many(fns, cal.grid.repeats)
    grid = {"tokens": [int(t) for t in tokens], "context": [int(c) for c in context]}
    cal.attention.append({"hidden": spec.hidden_size, "heads": spec.num_heads, "kv_heads": spec.num_kv_heads,
                          "head_dim": spec.head_dim, **grid, "time_us": monotone_grid(stats[0::2], len(context))})
    cal.layer_fixed.append({**layer_shape(spec), **grid, "time_us": monotone_grid(stats[1::2], len(context))})


def monotone_grid(stats: list[Stat], width: int) -> list[list[float]]:
    """Median times (us) of a row-major tokens x context grid, made monotone in both directions:
    more tokens or more context never cost less (a dip is timing noise)."""
    table = np.asarray([st.median_s * 1e6 for st in stats]).reshape(-1, width)
    arr = np.maximum.accumulate(np.maximum.accumulate(table, axis=0), axis=1)
    return [[float(v) for v in r] for r in arr]


def measure_dense(cal: Calibration, timer: Timer, spec: ModelSpec) -> None:
    """Effective bandwidth (model bytes/s) of a one-token product with a matrix larger than any
    cache (what an lm_head streams), and the FLOP rate of the shared-expert shape: the best over
    token counts up to a large GEMM (dense_tokens)."""
    dev, dtype = cal.device.torch_device, cal.device.dtype
    gen = torch.Generator().manual_seed(3)
    el = torch.empty(0, dtype=dtype).element_size()
    rows = max(1, working_set_bytes(cal.device, "gpu") // (spec.hidden_size * el))
    w = random_matrix(int(rows), spec.hidden_size, gen, dev, dtype)
    x1 = random_matrix(1, spec.hidden_size, gen, dev, dtype)
    st = timer.time(lambda: torch.nn.functional.linear(x1, w), cal.grid.repeats)
    cal.mem_gbs = max(cal.mem_gbs, w.numel() * spec.bytes_per_param / max(st.median_s, 1e-9) / 1e9)
    inter = spec.moe_intermediate_size * max(spec.num_shared_experts, 1)
    w13 = random_matrix(2 * inter, spec.hidden_size, gen, dev, dtype)
    w2 = random_matrix(spec.hidden_size, inter, gen, dev, dtype)
    flops_per_token = 2 * 3 * spec.hidden_size * inter
    for t in dense_tokens(cal.device):
        x = random_matrix(t, spec.hidden_size, gen, dev, dtype)
        st = timer.time(partial(swiglu, x, w13, w2), cal.grid.repeats)
        cal.tflops = max(cal.tflops, flops_per_token * t / max(st.median_s, 1e-9) / 1e12)


def dense_tokens(device: DeviceInfo) -> list[int]:
    """Token counts at which the dense FLOP rate is measured: up to a large GEMM, whose rate is
    the one the roofline needs (a latency-bound point scaled by FLOPs would charge an lm_head
    over a block of tokens many times its time; small products are charged by the memory term
    and the per-kernel launch cost)."""
    return [32, 256, 1024, 4096] if device.is_cuda else [32, 128, 512]


@dataclass
class FixedPath:
    """The executor's fixed per-layer path (Executor._front and _combine: norm, attention,
    residual, norm, shared expert, router, the host reading the split, every pair's input
    gathered once, the weighted combine of the pairs' outputs added to the residual) over `sets`
    layers with their own weights and KV buffers, taken in turn: in a run each layer's weights are
    read once per forward, after other layers and experts have passed through the caches, so a
    timing that ran one layer's weights again and again would time the cache instead."""

    spec: ModelSpec
    device: DeviceInfo
    capacity: int
    seed: int

    def __post_init__(self) -> None:
        dev, dtype = self.device.torch_device, self.device.dtype
        self.gen = torch.Generator().manual_seed(self.seed)
        first = random_layer_weights(self.spec, dev, dtype, self.gen)
        per = sum(t.numel() * t.element_size() for t in vars(first).values() if isinstance(t, torch.Tensor))
        el = torch.empty(0, dtype=dtype).element_size()
        kv_bytes = 2 * self.spec.num_kv_heads * self.capacity * self.spec.head_dim * el
        # enough layers to exceed the cache, at most the model's own (whose layers all fit in the
        # cache run from it), at least two
        need = math.ceil(working_set_bytes(self.device, "gpu") / max(per + kv_bytes, 1))
        self.sets = max(2, min(need, self.spec.num_layers))
        self.lws = [first] + [random_layer_weights(self.spec, dev, dtype, self.gen) for _ in range(self.sets - 1)]
        self.kvs = [KVBuffer(self.spec, self.capacity, dev, dtype) for _ in range(self.sets)]
        self.cos, self.sin = rotary_tables(self.spec, self.capacity, dev)
        self.turn = 0

    def fn(self, t: int, ctx: int) -> Callable[[], None]:
        """The path for t tokens at context ctx, the next layer's weights each call (inputs and
        a balanced replayed routing made here, once)."""
        spec, dev, dtype = self.spec, self.device.torch_device, self.device.dtype
        x = random_matrix(t, spec.hidden_size, self.gen, dev, dtype)
        pairs = t * spec.top_k
        counts = np.full(spec.num_experts, pairs // spec.num_experts, dtype=np.int64)
        counts[:pairs % spec.num_experts] += 1
        r = replay_routing(counts, t, spec.top_k, dev)
        xs = torch.zeros(pairs, spec.hidden_size, device=dev, dtype=dtype)
        y = torch.zeros(pairs, spec.hidden_size, device=dev, dtype=dtype)

        def run() -> None:
            i = self.turn = (self.turn + 1) % self.sets
            lw, kv = self.lws[i], self.kvs[i]
            _, moe_in, base = layer_front(x, lw, kv, ctx, spec, self.cos, self.sin)
            idx, _ = route(gate_logits(moe_in, lw), lw.gate_bias, spec.top_k, spec.n_group, spec.topk_group,
                           spec.routed_scaling_factor)
            torch.bincount(idx.reshape(-1), minlength=spec.num_experts).cpu()
            torch.index_select(moe_in, 0, r.tokens, out=xs)   # the pairs' inputs, gathered once
            _ = base + combine_pairs(y, r.weights, r.combine, spec.hidden_size).to(base.dtype)
        return run


def measure_layer_overhead(cal: Calibration, timer: Timer, spec: ModelSpec, profile: HardwareProfile) -> None:
    """The executor's fixed per-layer path (FixedPath) minus what the composed charge
    (tidesim.curves.composed_layer_fixed_time) puts on attention, shared expert and router: the
    rest is layer_overhead_us (median over token counts), what a model without a measured
    gpu.layer_fixed grid of its shape (and every dense layer) is charged."""
    ctx = cal.grid.att_context[len(cal.grid.att_context) // 2]
    path = FixedPath(spec, cal.device, max(ctx, max(cal.grid.att_tokens)), seed=4)
    residuals = []
    for t in cal.grid.att_tokens:
        measured = timer.time(path.fn(t, ctx), cal.grid.repeats).median_s
        modelled = float(composed_layer_fixed_time(profile.gpu, np.array([t]), np.array([ctx]), spec)[0])
        residuals.append(measured - (modelled - profile.gpu.layer_overhead_us * 1e-6))
    cal.layer_overhead_us = max(0.0, statistics.median(residuals) * 1e6)


def copy_region_bytes(device: DeviceInfo, biggest: int) -> int:
    """Bytes of the source and of the destination region that timed copies rotate through: no
    cache holds a copy's buffers when it runs again (the executor copies experts that no cache
    holds; copying one buffer over and over times the cache instead: on the 2-core development
    machine that made an expert's copy half what the executor paid, docs/runtime.md), and at
    least two copies of the biggest size."""
    return max(working_set_bytes(device, "cpu"), working_set_bytes(device, "gpu"), 2 * biggest)


def rotating_pairs(dst: torch.Tensor, src: torch.Tensor, n: int, count: int, start: int
                   ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """`count` (dst, src) copies of n elements each at consecutive chunks of two equal 1-D
    regions, from chunk `start`, wrapping around; and the chunk the next queue starts at."""
    chunks = max(1, min(dst.numel(), src.numel()) // max(n, 1))
    pairs = []
    for j in range(count):
        k = (start + j) % chunks
        pairs.append((dst[k * n:(k + 1) * n], src[k * n:(k + 1) * n]))
    return pairs, (start + count) % chunks


def measure_copies(cal: Calibration, backend: Backend, timer: Timer, factor: float) -> None:
    """H2D and D2H through the executor's copy path (pinned host memory and the demand copy
    streams on CUDA), as the executor issues them: a queue of QUEUED_COPIES copies timed on the
    device, per copy, each between buffers no cache holds (copy_region_bytes); sizes recorded in
    model bytes."""
    dev, dtype = cal.device.torch_device, cal.device.dtype
    el = torch.empty(0, dtype=dtype).element_size()
    biggest = max(cal.grid.copy_bytes)
    region = copy_region_bytes(cal.device, biggest) // el + 1
    pinning = HostPinning(cal.device.is_cuda)
    try:
        host = pinning.empty((region,), dtype).zero_()
        gpu = torch.zeros(region, dtype=dtype, device=dev)
        curves = {}
        for direction in (H2D, D2H):
            xs, ts, sp = [], [], []
            for nbytes in cal.grid.copy_bytes:
                n = max(1, nbytes // el)
                dst, src = (gpu, host) if direction == H2D else (host, gpu)
                queued = max(2, min(QUEUED_COPIES, (64 * 2**20) // max(n * el, 1)))
                samples, at = [], 0
                for _ in range(cal.grid.repeats + 1):
                    pairs, at = rotating_pairs(dst, src, n, queued, at)
                    samples.append(backend.copy_queue_s(pairs, direction))
                s = stat(samples[1:])
                xs.append(float(n * el * factor))
                ts.append(s.median_s * 1e6)
                sp.append(s.spread_s * 1e6)
            prov = Provenance(kind="measured", repeats=cal.grid.repeats, tool_version=__version__,
                              device=cal.device.describe(),
                              source=("pinned host <-> GPU on the executor's copy streams, queued copies timed with "
                                      "CUDA events" if cal.device.is_cuda else
                                      "memcpy between host buffers on the executor's copy thread (cpu-as-gpu), "
                                      "queued copies; x in model bytes")
                              + f"; buffers rotate over {region * el / 2**20:.0f} MiB (no cache holds them)")
            curves[direction] = Curve(xs, monotone(ts), sp, prov)
        cal.h2d, cal.d2h = curves[H2D], curves[D2H]
    finally:
        pinning.release()


def measure_copy_slowdown(cal: Calibration, backend: Backend, timer: Timer, spec: ModelSpec) -> None:
    """Grouped expert compute alone vs with H2D copies streaming at the same time."""
    dev, dtype = cal.device.torch_device, cal.device.dtype
    g = experts_over_cache(spec, dtype, cal.device, "gpu", 4)
    bench = GroupedBench(spec, cal.device, g, seed=5)
    pinning = bench.pinning
    # the copies read experts no cache holds, as the executor's do (a hot source leaves DRAM to
    # the compute and understates the slowdown)
    h = experts_over_cache(spec, dtype, cal.device, "cpu", 4)
    host = ExpertBank.empty(spec, h, torch.device("cpu"), dtype)
    pinning.pin(host.flat)
    slots = ExpertBank.empty(spec, 4, dev, dtype)
    compute = bench.fn(8)
    timer.warm(compute)
    ratios = []
    for _ in range(paired_samples(cal.grid)):  # paired samples: alone, then with copies streaming
        alone = timer.sample(compute)
        marks = [backend.copy(slots.flat[i % 4], host.flat[i % h], H2D, background=True) for i in range(4 * g)]
        busy = timer.sample(compute)
        for m in marks:
            backend.host_wait(m)
        backend.synchronize()
        ratios.append(busy / max(alone, 1e-12))
    bench.close()
    cal.copy_slows = max(0.0, statistics.median(ratios) - 1.0)


def measure_copy_pool_slowdown(cal: Calibration, backend: Backend, pool: CPUPool, spec: ModelSpec) -> None:
    """The CPU pool's expert tasks alone vs while H2D copies stream (pcie.copy_slows_cpu): the
    copies read host memory the pool's experts stream too, and on the CPU-as-GPU path each copy is
    a memcpy on a core. Sources no cache holds, as the executor's copies."""
    dtype = cal.device.dtype
    job = ContentionJob.of(cal, pool, spec, seed=11)
    n = job.experts
    sources = ExpertBank.empty(spec, n, torch.device("cpu"), dtype)
    pinning = HostPinning(cal.device.is_cuda)
    pinning.pin(sources.flat)
    slots = ExpertBank.empty(spec, 4, cal.device.torch_device, dtype)
    turn = [0]

    def copies() -> None:       # four copies queued, then waited for (the copy engine kept busy)
        marks = []
        for _ in range(4):
            i = turn[0] = (turn[0] + 1) % n
            marks.append(backend.copy(slots.flat[i % 4], sources.flat[i], H2D, background=True))
        for m in marks:
            backend.host_wait(m)

    try:
        job.timed()
        cal.copy_slows_cpu = _pool_slowdown(cal, copies, job.timed)
    finally:
        backend.synchronize()
        pinning.release()


def measure_contention(cal: Calibration, pool: CPUPool, timer: Timer, spec: ModelSpec) -> None:
    """Both directions of the GPU side / CPU pool contention, from paired samples: how much slower
    GPU-side expert work runs while the pool computes experts (cpu.gpu_contention), and how much
    slower the pool's expert tasks run while the GPU side computes (cpu.pool_contention). Near 0
    with a real GPU; on the CPU-as-GPU path both sides share cores and DRAM, and the two differ (a
    bandwidth-bound pool beside compute-bound GPU-side work), so one figure cannot stand for both."""
    g = experts_over_cache(spec, cal.device.dtype, cal.device, "gpu", 4)
    bench = GroupedBench(spec, cal.device, g, seed=7)
    job = ContentionJob.of(cal, pool, spec, seed=7)
    compute = bench.fn(8)
    timer.warm(compute)
    alone_s = timer.sample(compute)
    job_s = job.timed()
    try:
        cal.contention = _gpu_slowdown(cal, timer, compute, job.submit,
                                       max(2, math.ceil(2 * alone_s / max(job_s, 1e-6)) + 1))
        cal.pool_contention = _pool_slowdown(cal, lambda: timer.sample(compute), job.timed)
    finally:
        bench.close()


CONTENTION_TASK_TOKENS = (1, 2, 4, 8)   # tokens of the pool's tasks while contention is measured, in turn


def contention_tasks(experts: int) -> list[ExpertTask]:
    """One task per expert, its tokens cycling through CONTENTION_TASK_TOKENS: the decode's CPU
    tasks are mostly a few tokens each, where the host work per task (dispatch, the pool's
    hand-offs) weighs as much as the arithmetic, and that host work is what contends with the GPU
    side's own host work on the CPU-as-GPU path; tasks of 8 tokens only would understate it."""
    tasks, row = [], 0
    for e in range(experts):
        t = CONTENTION_TASK_TOKENS[e % len(CONTENTION_TASK_TOKENS)]
        tasks.append(ExpertTask(e, row, row + t))
        row += t
    return tasks


@dataclass
class ContentionJob:
    """The pool's work while a contention is measured: one task per expert of a host bank beyond
    the last-level cache (contention_tasks), on random inputs."""

    pool: CPUPool
    tasks: list[ExpertTask]
    runner: Callable[[ExpertTask], object]

    @classmethod
    def of(cls, cal: Calibration, pool: CPUPool, spec: ModelSpec, seed: int) -> ContentionJob:
        dtype, host_dev = cal.device.dtype, torch.device("cpu")
        n = max(experts_over_cache(spec, dtype, cal.device, "cpu", 4), 2 * pool.workers)
        host = ExpertBank.empty(spec, n, host_dev, dtype)
        tasks = contention_tasks(n)
        xc = random_matrix(tasks[-1].stop, spec.hidden_size, torch.Generator().manual_seed(seed), host_dev, dtype)
        return cls(pool, tasks, expert_task_runner(xc, torch.empty_like(xc), host.w13, host.w2))

    @property
    def experts(self) -> int:
        return len(self.tasks)

    def submit(self) -> LayerJob:
        return self.pool.submit(self.tasks, self.runner)

    def timed(self) -> float:
        """Seconds of one job, submitted and waited for."""
        t0 = time.perf_counter()
        self.submit().wait()
        return time.perf_counter() - t0


def _gpu_slowdown(cal: Calibration, timer: Timer, compute: Callable[[], Any],
                  submit: Callable[[], Any], jobs_per_sample: int) -> float:
    """GPU-side work alone, then with enough pool jobs queued to keep the pool busy throughout
    (twice the sample's length): the median ratio minus 1."""
    ratios = []
    for _ in range(paired_samples(cal.grid)):
        alone = timer.sample(compute)
        jobs = [submit() for _ in range(jobs_per_sample)]
        time.sleep(0.001)
        busy = timer.sample(compute)
        for job in jobs:
            job.wait()
        ratios.append(busy / max(alone, 1e-12))
    return max(0.0, statistics.median(ratios) - 1.0)


def _pool_slowdown(cal: Calibration, side_step: Callable[[], Any], pool_job: Callable[[], float]) -> float:
    """A pool job alone, then while a thread repeats side_step (the GPU side computing, or copies
    streaming, as the executor's GPU thread and copy thread do beside the pool): the median ratio
    minus 1. The thread sets its own intra-op thread count first: a new thread does not inherit
    the caller's OpenMP team size, and a side running on every core would measure
    oversubscription, not contention."""
    stop = threading.Event()
    started = threading.Event()

    def keep_busy() -> None:
        if not cal.device.is_cuda:
            torch.set_num_threads(cal.device.gpu_threads)
        with torch.inference_mode():
            while not stop.is_set():
                side_step()
                started.set()

    ratios = []
    for _ in range(paired_samples(cal.grid)):
        alone = pool_job()
        stop.clear()
        started.clear()
        side = threading.Thread(target=keep_busy, name="tidesim-calibrate-side", daemon=True)
        side.start()
        started.wait(timeout=60.0)
        busy = pool_job()
        stop.set()
        side.join()
        ratios.append(busy / max(alone, 1e-12))
    return max(0.0, statistics.median(ratios) - 1.0)


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


