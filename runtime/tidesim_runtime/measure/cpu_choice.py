"""What `tidesim calibrate` chooses for the CPU pool before measuring it: the layout (workers x
threads per worker) and, with `--cpu-kernel auto`, the CPU expert kernel.

Both are chosen by measurement on this machine: one round of every candidate over the same bank
of distinct experts (weights beyond the last-level cache, as every CPU measurement here), at a
few token counts, interleaved over several rounds; the candidate with the least total time per
expert (its best round) wins. Layouts split the pool's cores evenly (w workers x cores/w
threads); kernels are those that run the dtype here and keep no packed copy of the weights
(onednn-packed and kt-kernel hold a second copy of every expert they run, which no memory check
counts: they are chosen by name only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tidesim.models import ModelSpec
from tidesim_runtime.engine import cpu_kernels
from tidesim_runtime.engine.cpu_pool import CPUPool, ExpertTask, expert_task_runner
from tidesim_runtime.engine.device import DeviceInfo
from tidesim_runtime.engine.kernels import random_matrix
from tidesim_runtime.engine.slots import ExpertBank
from tidesim_runtime.measure.resources import experts_over_cache

CHOICE_TOKENS = (1, 4, 16)   # few tokens per expert: where CPU experts run in an offloaded decode


@dataclass(frozen=True)
class Choice:
    """The candidate chosen and every candidate's time per expert (seconds, summed over tokens)."""

    chosen: str
    seconds: dict[str, float]


def layouts(pool_cores: int) -> list[tuple[int, int]]:
    """(workers, threads) splitting `pool_cores` evenly, one worker first."""
    n = max(1, pool_cores)
    return [(w, n // w) for w in range(1, n + 1) if n % w == 0]


def pool_cores(device: DeviceInfo) -> int:
    return device.cpu_workers * device.cpu_threads_per_worker


def _bank(spec: ModelSpec, device: DeviceInfo, at_least: int) -> tuple[ExpertBank, dict[int, torch.Tensor]]:
    dtype = device.dtype
    n = max(experts_over_cache(spec, dtype, device, "cpu", 4), at_least)
    bank = ExpertBank.empty(spec, n, torch.device("cpu"), dtype)
    gen = torch.Generator().manual_seed(11)
    bank.flat.copy_(random_matrix(1, bank.flat.shape[1], gen, torch.device("cpu"), dtype)[0].expand_as(bank.flat))
    xs = {t: random_matrix(n * t, spec.hidden_size, gen, torch.device("cpu"), dtype) for t in CHOICE_TOKENS}
    return bank, xs


def _pass(pool: CPUPool, bank: ExpertBank, xs: dict[int, torch.Tensor]) -> float:
    """Seconds per expert of one pass at every token count (makespan x workers / experts)."""
    n = bank.flat.shape[0]
    total = 0.0
    for t, x in xs.items():
        tasks = [ExpertTask(e, e * t, (e + 1) * t) for e in range(n)]
        runner = expert_task_runner(x, torch.empty_like(x), bank.w13, bank.w2)
        t0 = time.perf_counter()
        pool.submit(tasks, runner).wait()
        total += (time.perf_counter() - t0) * pool.workers / n
    return total


def _best(candidates: list[str], run_round: dict[str, object], rounds: int) -> Choice:
    samples: dict[str, list[float]] = {c: [] for c in candidates}
    for _ in range(rounds + 1):   # the first round warms up (primitives, compilation)
        for c in candidates:
            samples[c].append(run_round[c]())  # type: ignore[operator]
    best = {c: min(s[1:]) for c, s in samples.items()}
    return Choice(min(candidates, key=lambda c: best[c]), best)


def choose_layout(spec: ModelSpec, device: DeviceInfo, rounds: int = 2) -> Choice:
    """The fastest workers x threads for the current kernel; names are 'WxT'."""
    options = layouts(pool_cores(device))
    bank, xs = _bank(spec, device, 2 * max(w for w, _ in options))
    pools = {f"{w}x{t}": CPUPool(w, t) for w, t in options}
    try:
        with torch.inference_mode():
            return _best(list(pools), {k: (lambda p=p: _pass(p, bank, xs)) for k, p in pools.items()}, rounds)
    finally:
        for p in pools.values():
            p.close()


def auto_kernels(dtype: torch.dtype) -> list[str]:
    """The kernels `auto` chooses among for `dtype`."""
    return [k.name for k in cpu_kernels.KERNELS.values()
            if k.supports(dtype) and not k.caches_weights and not k.why_unusable()]


def choose_kernel(spec: ModelSpec, device: DeviceInfo, rounds: int = 2) -> Choice:
    """The fastest kernel on the device's pool layout (restores the current kernel)."""
    names = auto_kernels(device.dtype)
    bank, xs = _bank(spec, device, 2 * device.cpu_workers)
    pool = CPUPool(device.cpu_workers, device.cpu_threads_per_worker)
    before = cpu_kernels.current().name

    def with_kernel(name: str) -> float:
        cpu_kernels.use(name)
        return _pass(pool, bank, xs)
    try:
        with torch.inference_mode():
            return _best(names, {k: (lambda k=k: with_kernel(k)) for k in names}, rounds)
    finally:
        cpu_kernels.use(before)
        pool.close()
